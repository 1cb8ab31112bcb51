"""Edge attribution: attribution patching (EAP), integrated gradients (EAP-IG) and exact patching.

Context
-------
Ablating edge ``s->d`` changes what ``d`` reads by ``â_s - o_s``. To first order, the metric changes by

    score_sd = (â_s - o_s) · dMetric/dx_d        (summed over batch and positions)

which is attribution patching (Nanda 2023; Syed et al. 2023). It needs one clean forward and backward
(capturing the gradient at every destination input) and the ablated values; edgepatch folds the last step
into the backward: a *probe* at every destination hook accumulates ``(o_s - â_s) · grad`` for all of the
hook's destinations with one matrix product. Model parameters are frozen meanwhile, so the backward
computes no weight gradients.

Conventions (DESIGN.md §3.5):

- The objective is the **mean** over prompts of the per-prompt metric, so scores estimate the change of
  the mean metric.
- A score estimates ``metric(edge ablated) - metric(edge kept)``: the **negative** of autograd's
  gradient of the metric w.r.t. the patching weight at ``w = 1`` (see :func:`eap`), and the same sign as
  exact patching (``metric(all but e) - metric(all)``, DESIGN.md §3.6).

EAP-IG (Hanna et al. 2024) replaces the one gradient by the mean over ``steps`` points of a path from the
corrupted to the clean run:

- ``variant="inputs"``: interpolate the input embeddings ``â_input + α (o_input - â_input)`` for
  ``α = 1/steps, 2/steps, ..., 1``; score = ``(â_s - o_s) · mean_α grad_d(α)`` with clean ``o``.
- ``variant="activations"``: integrated gradients over the patching weights along ``w = α·1``: every
  destination reads ``â + α (o - â)`` of all its sources, so the path interpolates all activations; score =
  ``-mean_α dMetric/dw(α)``. Its scores add up (for many steps) to ``metric(corrupted) - metric(clean)``.
- ``variant="clean-corrupted"``: the mean of the gradients on the clean and on the corrupted run.

With ``steps=1`` the inputs and activations variants equal EAP.

Exact patching evaluates ``metric(all kept but e) - metric(all kept)`` for every edge, many edges per
forward (an edge axis folded into the batch). It is the reference that the estimates approximate.

Example
-------
>>> import edgepatch as ep
>>> model = ep.random_model("tiny")
>>> graph = ep.build_graph(model)
>>> data = ep.tasks.induction(101, n=4, seq_len=4, seed=0)
>>> scores = attribute(model, graph, data, metric="logit_diff", method="eap", progress=False)
>>> scores.scores.shape
torch.Size([11, 27])
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, positive_int, shape_str, suggest
from edgepatch.graph import Graph, dest_groups, is_post_norm
from edgepatch.masks import frozen
from edgepatch.metrics import answer_view, final_logits, get_metric, reads_answer_only, with_gradient
from edgepatch.patching import (
    _PROJECTION_FLAGS,
    Ablation,
    Projections,
    _check_graph,
    _Engine,
    _Probe,
    accumulate_probe,
    activated,
    mean_activations,
    patch,
    projection_param,
    projections_of,
    source_activations,
    zero_ablation,
)
from edgepatch.progress import digest, metric_id, positions_id, resumable, run_fingerprint
from edgepatch.scores import EdgeScores

AblationSpec = "str | Ablation"
ABLATIONS = ("corrupt", "zero", "mean", "pos_mean")


# ------------------------------------------------------------------------------------------------------
# Shared plumbing (also used by acdc, learned masks, sweeps)
# ------------------------------------------------------------------------------------------------------
def check_data(model: Any, data: Any) -> PromptPairs:
    if not isinstance(data, PromptPairs):
        raise EdgepatchError(
            f"data must be PromptPairs (e.g. ep.tasks.ioi(tokenizer), or PromptPairs.from_strings(...)); "
            f"got {type(data).__name__}."
        )
    d_vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)
    if d_vocab > 0:
        data.validate(d_vocab)
    return data


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


class AblationSource:
    """Gives the ablated source values for each batch of prompts (computed once for mean/zero)."""

    def __init__(self, model: Any, graph: Graph, data: PromptPairs, ablation: Any = "corrupt",
                 projections: bool = True) -> None:
        self.model, self.graph, self.kind = model, graph, ablation
        self.projections = projections  # also record the corrupted run's q/k/v (see Ablation)
        device = model_device(model)
        self.fixed: Ablation | None = None
        if isinstance(ablation, Ablation):
            if ablation.values.shape[1] not in (1, len(data)):
                raise EdgepatchError(
                    f"The given Ablation has batch {ablation.values.shape[1]}, but data has {len(data)} prompts; "
                    f"give one value per prompt or a broadcasting (batch 1) ablation."
                )
            self.fixed = ablation.to(device)
            self.kind = ablation.kind
        elif ablation == "zero":
            self.fixed = zero_ablation(graph, device=device, dtype=next(model.parameters()).dtype)
        elif ablation in ("mean", "pos_mean"):
            self.fixed = mean_activations(
                model, graph, data.clean.to(device), attention_mask=data.attention_mask.to(device),
                per_position=ablation == "pos_mean",
            )
        elif ablation != "corrupt":
            raise EdgepatchError(
                f"Unknown ablation {ablation!r}; expected one of {ABLATIONS} or an ep.Ablation."
                f"{suggest(str(ablation), ABLATIONS)}"
            )

    def __call__(self, batch: PromptPairs, index: slice) -> Ablation:
        if self.fixed is not None:
            return self.fixed[index] if self.fixed.values.shape[1] > 1 else self.fixed
        return source_activations(self.model, self.graph, batch.corrupt, projections=self.projections)


def batches(data: PromptPairs, batch_size: int) -> Iterator[tuple[slice, PromptPairs]]:
    if batch_size < 1:
        raise EdgepatchError(f"batch_size must be >= 1; got {batch_size}.")
    for start in range(0, len(data), batch_size):
        sl = slice(start, min(start + batch_size, len(data)))
        yield sl, data[sl]


def prepared_metric(model: Any, metric: Any, batch: PromptPairs, clean_logits: Tensor | None = None,
                    repeat: int = 1, answer_pos: Tensor | None = None) -> Callable[[Tensor, PromptPairs], Tensor]:
    """The metric for one batch; metrics that need the clean run (KL) get its logits here (repeated
    ``repeat`` times when circuits are folded into the batch; at ``answer_pos`` only when given)."""
    m = get_metric(metric)
    if getattr(m, "needs_clean", False):
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = final_logits(model, batch.clean, answer_pos)
        m = m.prepare(clean_logits.detach().repeat(repeat, *([1] * (clean_logits.ndim - 1))))
    return m


def metric_name(metric: Any) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "name", getattr(metric, "__name__", "custom"))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


class _ProbeProjection(torch.autograd.Function):
    """Identity on a head's q/k/v projection output ``[batch, pos, head, d_head]``; its backward turns
    the gradient there into the gradient at each head's *input* and accumulates ``(o - â) · grad``.

    At ``w = 1`` every head of a layer reads the same residual ``r``, so the gradient at head h's input is
    ``J_norm(r)^T (W^h grad_h)``: the projection's transpose, then the (shared) normalization's backward,
    recomputed here for all heads at once. This avoids TransformerLens's split-input mode, which would
    keep per-head copies of every normalization for the backward."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, spec: dict) -> Tensor:  # type: ignore[override]
        ctx.spec = spec
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        sp = ctx.spec
        W, resid, norm, n, buf, acc, idx = sp["W"], sp["resid"], sp["norm"], sp["n"], sp["buf"], sp["acc"], sp["idx"]
        h, d_model, d_head = W.shape
        b, p = grad.shape[:2]
        g = grad.reshape(b, p, h, d_head)
        g_norm = torch.einsum("bphd,hmd->hbpm", g, W.to(g.dtype))  # grad at the normalization's output
        # one vector-Jacobian product of the normalization at r, applied to every head's gradient
        _, vjp = torch.func.vjp(norm, resid.detach())
        (g_in,) = torch.vmap(vjp)(g_norm)  # [h, b, p, m]
        accumulate_probe(acc, buf[:n], g_in.permute(1, 2, 0, 3), idx, sp["slots"])
        return grad, None


def _norm_fn(model: Any, proj: Projections | None, layer: int) -> Callable[[Tensor], Tensor]:
    """The layer's attention-input normalization as a function, computed from its parameters (no hook
    point of the model fires); the module itself where edgepatch does not know its form."""
    if proj is not None:
        return lambda x: proj.norm(layer, x)
    if is_post_norm(model):  # OLMo 2/3: attention reads the residual stream itself (ln1 follows it)
        return lambda x: x
    ln = model.blocks[layer].ln1
    inner = getattr(ln, "original_component", None)  # TransformerBridge: the HF norm module itself
    return inner if inner is not None else ln


@contextlib.contextmanager
def _probe(model: Any, graph: Graph, acc: Tensor, ablated: Ablation, fixed_diff: Tensor | None = None,
           input_override: Callable[[Tensor], Tensor] | None = None, slots: Tensor | None = None) -> Iterator[_Engine]:
    """Attribution mode: identity forward; the backward accumulates ``(o - â) · grad`` into ``acc``.

    ``fixed_diff`` (``[n_src, batch, pos, d_model]``) replaces the current forward's ``o - â`` (EAP-IG on
    inputs uses the clean differences at every interpolation point). ``input_override`` maps the model's
    input residual to the one used (interpolated embeddings). Attention destinations are probed at the
    q/k/v projection outputs (see :class:`_ProbeProjection`), MLP inputs and logits at their inputs.
    ``slots`` (``[batch, pos]``): per-position scores, ``acc`` then ``[n_slots, n_src, n_dest]``."""
    engine = _Engine(model, graph, lambda: torch.ones(graph.n_src, graph.n_dest), ablated, None)
    engine.probe = acc
    engine.probe_slots = slots
    source_hooks = engine.hook_list()[: _n_source_hooks(graph)]
    name0, fn0 = source_hooks[0]
    resid: dict[int, Tensor] = {}

    def on_input(module: Any, inp: Any, out: Tensor) -> Tensor:
        x = input_override(out) if input_override is not None else out
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        fn0(module, inp, x)
        if fixed_diff is not None:
            engine.buf = fixed_diff
        resid[0] = x
        return x

    hooks: list[tuple[str, Callable]] = [(name0, on_input)]
    if fixed_diff is None:
        hooks += source_hooks[1:]
    spec = graph.spec
    for layer in range(1, spec.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_pre",
                      lambda module, inp, out, layer=layer: resid.__setitem__(layer, out)))
    d_head = spec.d_head
    proj = projections_of(model)
    for name, idx, n in dest_groups(graph):
        if name.endswith(("q_input", "k_input", "v_input")):
            layer = int(name.split(".")[1])
            kind = name.split("hook_")[1][0]

            def proj_hook(module: Any, inp: Any, y: Tensor, layer: int = layer, kind: str = kind,
                          idx: Tensor = idx, n: int = n) -> Tensor:
                n_out = y.shape[2] if y.ndim == 4 else y.shape[-1] // d_head
                W = projection_param(model, layer, "W", kind, n_out)
                assert W is not None
                sp = {"W": W.detach(), "resid": resid[layer], "norm": _norm_fn(model, proj, layer), "n": n, "buf": engine.buf, "acc": acc,
                      "idx": idx.to(acc.device), "slots": slots}
                return _ProbeProjection.apply(y, sp)

            hooks.append((f"blocks.{layer}.attn.hook_{kind}", proj_hook))
        else:
            def dest_hook(module: Any, inp: Any, x: Tensor, idx: Tensor = idx, n: int = n) -> Tensor:
                return _Probe.apply(x, acc, engine.buf[:n], idx.to(acc.device), n, slots)

            hooks.append((name, dest_hook))
    engine.hook_specs = hooks
    try:
        with activated(model, engine, _PROJECTION_FLAGS):  # no split inputs: the probe reads the projections
            yield engine
    finally:
        resid.clear()


def _n_source_hooks(graph: Graph) -> int:
    spec = graph.spec
    return 1 + spec.n_layers * (1 if spec.attn_only else 2)


# ------------------------------------------------------------------------------------------------------
# EAP
# ------------------------------------------------------------------------------------------------------
def eap(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "logit_diff",
    *,
    ablation: Any = "corrupt",
    batch_size: int = 32,
    progress: bool = True,
    positions: Any = None,
    slot_names: Any = None,
    out: str | os.PathLike | None = None,
) -> EdgeScores:
    """Edge attribution patching: ``score = (â_s - o_s) · dMetric/dx_d``, one clean forward + backward and
    one ablated (corrupted) forward per batch.

    The scores equal ``-dMetric/dw`` at ``w = 1`` (autograd through :func:`edgepatch.patch`). A metric
    that compares with the clean run (KL divergence) is at its minimum there, so its gradient, and every
    EAP score, is zero: use EAP-IG for such metrics (a warning says so).

    Per-position scores, one per (position slot, edge), as :func:`edgepatch.patch` takes per-position
    weights: ``positions="absolute"`` (slot = token index; padding, ``attention_mask == 0``, is not
    scored), ``positions="named"`` (the slots the task names: ``tasks.ioi``'s IO, S1, S1+1, S2, END and
    other) or a ``[n_prompts, pos]`` integer tensor giving each token's slot (-1: none); ``slot_names``
    names the slots. The scores then equal ``-dMetric/dW`` at
    ``W = 1`` for weights ``W`` ``[n_slots, n_src, n_dest]`` patched with those ``positions``.

    ``out``: a folder for resumable progress (as in :func:`edgepatch.sweep`): the scores summed over the
    batches done, written every few seconds; run again with the same folder and settings to skip those
    batches."""
    if getattr(get_metric(metric), "needs_clean", False):
        warnings.warn(
            f"eap with metric {metric_name(metric)!r}: this metric compares the patched run with the clean run "
            f"and is at its minimum at the clean run (all edges kept), where EAP takes its gradient, so every "
            f"score is ~0. Use method='eap-ig' (integrated gradients) for this metric, or a task metric such "
            f"as 'logit_diff'.", RuntimeWarning, stacklevel=2)
    return _integrated(model, graph, data, metric, ablation=ablation, batch_size=batch_size,
                       progress=progress, steps=1, variant="inputs", method="eap", positions=positions,
                       slot_names=slot_names, out=out)


def eap_ig(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "logit_diff",
    *,
    steps: int = 5,
    variant: str = "inputs",
    ablation: Any = "corrupt",
    batch_size: int = 32,
    progress: bool = True,
    positions: Any = None,
    slot_names: Any = None,
    out: str | os.PathLike | None = None,
) -> EdgeScores:
    """EAP with integrated gradients over ``steps`` points (see the module docstring for the variants
    ``"inputs"``, ``"activations"`` and ``"clean-corrupted"``). ``positions``, ``slot_names``: per-position
    scores, as in :func:`eap`; ``out``: resumable progress, as in :func:`eap`."""
    variants = ("inputs", "activations", "clean-corrupted")
    if variant not in variants:
        raise EdgepatchError(f"Unknown EAP-IG variant {variant!r}; expected one of {variants}.{suggest(variant, variants)}")
    if not isinstance(steps, int) or steps < 1:
        raise EdgepatchError(f"steps must be a positive integer; got {steps!r}.")
    return _integrated(model, graph, data, metric, ablation=ablation, batch_size=batch_size, progress=progress,
                       steps=steps, variant=variant, method=f"eap-ig-{variant}" if variant != "inputs" else "eap-ig",
                       positions=positions, slot_names=slot_names, out=out)


def position_slots(positions: Any, data: PromptPairs, slot_names: Any = None) -> tuple[Tensor | None, tuple[str, ...] | None]:
    """``positions`` (None, ``"absolute"``, ``"named"`` or a ``[n_prompts, pos]`` integer tensor of slots,
    -1: none) as ``(slots [n_prompts, pos] long, slot names)``; ``(None, None)`` without positions.
    ``"absolute"``: each token's index, padding (``attention_mask == 0``) excluded. ``"named"``: the
    slots a task names in ``data.meta["positions"]`` / ``data.meta["slot_names"]`` (``tasks.ioi``)."""
    if positions is None:
        if slot_names is not None:
            raise EdgepatchError("slot_names names the slots of positions=...; give positions too.")
        return None, None
    n, pos = data.clean.shape
    if isinstance(positions, str) and positions == "named":
        table, names = data.meta.get("positions"), data.meta.get("slot_names")
        if table is None or names is None:
            raise EdgepatchError(
                f"positions='named' takes each token's slot from the data (meta['positions'] and "
                f"meta['slot_names']), which {data!r} does not have; tasks.ioi names IO, S1, S1+1, S2 and END. "
                f"Give a [n_prompts, pos] tensor of slots instead, or positions='absolute'."
            )
        if slot_names is not None and tuple(map(str, slot_names)) != tuple(map(str, names)):
            raise EdgepatchError(
                f"slot_names {list(slot_names)} differ from the data's named slots {list(names)}: these scores were "
                f"computed with other slots than positions='named' gives for this data."
            )
        positions, slot_names = table, names
    if isinstance(positions, str):
        if positions != "absolute":
            raise EdgepatchError(f"positions must be None, 'absolute', 'named' or a [n_prompts, pos] integer tensor of "
                                 f"slots; got {positions!r}.")
        slots = torch.arange(pos).expand(n, pos).clone()
        slots[data.attention_mask.cpu() == 0] = -1
        n_slots = pos
    elif isinstance(positions, Tensor) and not positions.is_floating_point() and positions.dtype != torch.bool:
        if tuple(positions.shape) != (n, pos):
            raise EdgepatchError(
                f"positions has shape {shape_str(positions.shape)}; expected [n_prompts, pos] = [{n}, {pos}], each "
                f"token's slot (-1: none), aligned with the prompts' tokens (data.clean)."
            )
        slots = positions.long().cpu()
        if bool((slots < -1).any()):
            raise EdgepatchError(f"positions holds {int(slots.min())}; slots are >= 0, and -1 marks a token in no slot.")
        n_slots = int(slots.max()) + 1 if slot_names is None else len(slot_names)
        if n_slots < 1:
            raise EdgepatchError("positions puts no token in any slot (all -1): nothing to score.")
    else:
        raise EdgepatchError(f"positions must be None, 'absolute', 'named' or a [n_prompts, pos] integer tensor of "
                             f"slots; got {type(positions).__name__}.")
    if slot_names is None:
        names = tuple(str(i) for i in range(n_slots))
    else:
        names = tuple(str(x) for x in slot_names)
        if len(names) != n_slots or len(set(names)) != len(names) or int(slots.max()) >= len(names):
            raise EdgepatchError(
                f"slot_names must give one distinct name per slot: positions uses slots 0..{int(slots.max())}; got "
                f"{list(names)}."
            )
    return slots, names


@torch.enable_grad()
def _integrated(model: Any, graph: Graph, data: PromptPairs, metric: Any, *, ablation: Any, batch_size: int,
                progress: bool, steps: int, variant: str, method: str, positions: Any = None,
                slot_names: Any = None, out: str | os.PathLike | None = None) -> EdgeScores:
    _check_graph(model, graph)
    data = check_data(model, data)
    batch_size = positive_int(batch_size, "batch_size")
    slots, names = position_slots(positions, data, slot_names)
    device = model_device(model)
    data = data.to(device)
    eg = graph.engine_graph
    lead = () if names is None else (len(names),)
    acc = torch.zeros(*lead, eg.n_src, eg.n_dest, device=device, dtype=torch.float32)
    abl_source = AblationSource(model, graph, data, ablation, projections=False)  # (gradients: not used)
    n = len(data)
    t0 = time.perf_counter()
    points = 2 if variant == "clean-corrupted" else steps
    # the scores summed over the batches done: acc is the state's tensor where it lives on the CPU
    state = {"acc": acc if acc.device.type == "cpu" else acc.cpu(), "batches_done": torch.zeros(1, dtype=torch.int64)}
    save = resumable(out, state, f"{method.upper()} run", lambda: run_fingerprint(
        model, graph, data, ablation, metric=metric_id(metric), steps=steps, variant=variant, batch_size=batch_size,
        positions=positions_id(slots, names)))
    done = int(state["batches_done"])
    if done:
        acc.copy_(state["acc"])
    bar = progress_bar(math.ceil(n / batch_size) * points, method, progress)
    bar.update(done * points)
    fast = reads_answer_only(get_metric(metric))
    with frozen(model):
        for i, (sl, full) in enumerate(batches(data, batch_size)):
            if i < done:
                continue
            # unembed only the answer positions (built-in metrics), without TransformerLens's W_U copy
            # (see final_logits), which autograd would otherwise keep until the backward
            _integrate_batch(model, graph, full, answer_view(full) if fast else full, abl_source(full, sl),
                             metric, acc, n, steps, variant, bar, device, full.answer_pos if fast else None,
                             None if slots is None else slots[sl].to(device))
            if out is not None:
                if state["acc"] is not acc:
                    state["acc"] = acc.cpu()
                state["batches_done"] = torch.tensor([i + 1])
                save(final=i + 1 == math.ceil(n / batch_size))
    bar.close()
    # acc accumulated +grad·(o - â) = dM/dw; scores estimate the effect of ablating: -dM/dw.
    # (The activations branch subtracted its gradients, so negate only the probe's sum.)
    scores = -acc if variant != "activations" else acc
    info = {"steps": steps, "variant": variant, "ablation": str(abl_source.kind), "n_prompts": n,
            "seconds": time.perf_counter() - t0, "score_kind": "ablation_effect"}
    return EdgeScores(_to_graph(graph, scores), graph, method=method, metric=metric_name(metric), info=info,
                      slots=names)


def _integrate_batch(model: Any, graph: Graph, full: PromptPairs, mdata: PromptPairs, abl: Ablation | None,
                     metric: Any, acc: Tensor, n: int, steps: int, variant: str, bar: Any, device: Any,
                     answer_pos: Tensor | None, slots: Tensor | None = None) -> None:
    """One batch of :func:`_integrated`: ``full`` holds the tokens, ``mdata`` is what the metric reads
    (the answer positions only when ``answer_pos`` is given); ``slots``: the batch's position slots."""
    assert abl is not None
    eg = graph.engine_graph
    tokens = full.clean
    m = prepared_metric(model, metric, full, answer_pos=answer_pos)
    method_name = "EAP" if variant == "inputs" and steps == 1 else "EAP-IG"

    def run(tokens: Tensor) -> Tensor:  # the logits the metric reads
        return final_logits(model, tokens, answer_pos)

    if variant == "activations":
        w = torch.ones(*acc.shape[:-2], eg.n_src, eg.n_dest, device=device)
        for k in range(1, steps + 1):
            wk = (w * (k / steps)).requires_grad_(True)
            with patch(model, graph, lambda wk=wk: wk, abl, positions=slots):
                logits = run(tokens)
            (with_gradient(m(logits, mdata), metric, method_name).sum() / (n * steps)).backward()
            acc -= wk.grad.detach()  # probe convention: acc holds +grad.D; here -dM/dw ... see _integrated
            bar.update(1)
        return
    if variant == "inputs" and steps == 1:  # EAP: the probe records the clean run's o - â itself
        with _probe(model, graph, acc, abl, slots=slots) as engine:
            objective = with_gradient(m(run(tokens), mdata), metric, method_name).sum() / n
            engine.abl = None  # the ablated values and the logits are not needed by the backward:
            abl = None  # free them before it, which is where EAP's memory peaks
            objective.backward()
        bar.update(1)
        return
    # inputs / clean-corrupted: probe with the clean differences o - â
    clean_diff = source_activations(model, graph, tokens, projections=False).values - abl.values.to(device)
    if clean_diff.shape[1] != len(tokens):
        clean_diff = clean_diff.expand(-1, len(tokens), -1, -1)
    clean_diff = clean_diff.contiguous()
    if variant == "clean-corrupted":
        alphas = [1.0, 0.0]
    else:
        alphas = [k / steps for k in range(1, steps + 1)]
    in_clean = clean_diff[0] + abl.values[0].to(device)  # clean input residual
    in_abl = abl.values[0].to(device).expand_as(in_clean)
    for alpha in alphas:
        target = (in_clean if alpha == 1.0 else in_abl + alpha * (in_clean - in_abl)).detach()
        override = (lambda x, t=target: t.clone().requires_grad_(True))
        with _probe(model, graph, acc, abl, fixed_diff=clean_diff, input_override=override, slots=slots):
            logits = run(tokens)
            (with_gradient(m(logits, mdata), metric, method_name).sum() / (n * len(alphas))).backward()
        bar.update(1)


def _to_graph(graph: Graph, edge_scores: Tensor) -> Tensor:
    """Edge-level scores -> the graph's level (node graphs: sum over each source's edges)."""
    if graph.level == "edge":
        return edge_scores
    return edge_scores.nan_to_num(0).sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------------
# Exact patching
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_patching(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "logit_diff",
    *,
    ablation: Any = "corrupt",
    batch_size: int = 32,
    edges_per_forward: int | None = None,
    memory_budget_mb: float = 1024,
    edges: Tensor | None = None,
    progress: bool = True,
    positions: Any = None,
    slot_names: Any = None,
    out: str | os.PathLike | None = None,
) -> EdgeScores:
    """The true effect of ablating each edge alone: ``metric(all kept but e) - metric(all kept)``
    (DESIGN.md §3.6), many edges per forward.

    ``out``: a folder for resumable progress (as in :func:`edgepatch.sweep`): written every few seconds;
    run again with the same folder and settings to skip the forwards already done.

    ``edges``: optional bool ``[n_src, n_dest]`` mask restricting which edges are evaluated (others NaN).
    ``edges_per_forward``: edges folded into one forward (default: from ``memory_budget_mb``).

    Per position (``positions``, ``slot_names`` as in :func:`eap`): the effect of ablating each edge at
    the tokens of one slot only, every (slot, edge) pair alone, the ground truth of per-position EAP;
    ``edges`` may then also be ``[n_slots, n_src, n_dest]``. That is ``n_slots`` times the work: restrict
    it with ``edges``."""
    _check_graph(model, graph)
    data = check_data(model, data).to(model_device(model))
    batch_size = positive_int(batch_size, "batch_size")
    if edges_per_forward is not None:
        edges_per_forward = positive_int(edges_per_forward, "edges_per_forward")
    slots, names = position_slots(positions, data, slot_names)
    device = model_device(model)
    g = graph
    S = 0 if names is None else len(names)
    valid = g.valid if not S else g.valid.expand(S, *g.valid.shape)
    if edges is not None and tuple(edges.shape) not in (tuple(g.valid.shape), tuple(valid.shape)):
        raise EdgepatchError(
            f"edges has shape {shape_str(edges.shape)}; expected a bool mask [n_src, n_dest] = "
            f"{shape_str(g.valid.shape)}{f' or [n_slots, n_src, n_dest] = {shape_str(valid.shape)}' if S else ''}."
        )
    todo = valid.clone() if edges is None else (edges.bool().cpu() & valid)
    idx = todo.nonzero()  # [E, 2] (for node graphs: [n_src, 1] sources), per position [E, 3] (slot first)
    n = len(data)
    if edges_per_forward is None:
        spec = g.spec
        per_row = (g.engine_graph.n_src + 4 * spec.n_layers) * data.clean.shape[1] * spec.d_model * 4 * 3
        edges_per_forward = max(1, int(memory_budget_mb * 2**20 // max(per_row * min(batch_size, n), 1)))
    abl_source = AblationSource(model, graph, data, ablation)
    n_chunks = math.ceil(len(idx) / edges_per_forward)
    state = {"effects": torch.zeros(len(idx), dtype=torch.float64),  # summed over the (batch, chunk) done
             "done": torch.zeros(math.ceil(n / batch_size), n_chunks, dtype=torch.uint8)}
    save = resumable(out, state, "exact patching", lambda: run_fingerprint(
        model, graph, data, ablation, metric=metric_id(metric), batch_size=batch_size,
        edges_per_forward=edges_per_forward, edges=digest(todo),
        positions=positions_id(slots, names)))
    effects = state["effects"]
    t0 = time.perf_counter()
    n_forwards = 0
    fast = reads_answer_only(get_metric(metric))  # unembed only the answer positions (see final_logits)
    bar = progress_bar(int(state["done"].numel()), "exact", progress)
    bar.update(int(state["done"].sum()))
    for b_i, (sl, batch) in enumerate(batches(data, batch_size)):
        if bool(state["done"][b_i].all()):
            continue
        abl = abl_source(batch, sl)
        ap = batch.answer_pos if fast else None
        view = answer_view(batch) if fast else batch
        clean_logits = final_logits(model, batch.clean, ap)
        m = prepared_metric(model, metric, batch, clean_logits)
        base = m(clean_logits, view).double()  # all kept == the clean forward (invariant 1)
        folded: dict[int, Any] = {}
        for c_i, start in enumerate(range(0, len(idx), edges_per_forward)):
            if state["done"][b_i, c_i]:
                continue
            chunk = idx[start : start + edges_per_forward]
            c = len(chunk)
            if c not in folded:
                folded[c] = prepared_metric(model, metric, batch, clean_logits, repeat=c)
            W = torch.ones(c, *todo.shape)
            W[(torch.arange(c), *chunk.T)] = 0
            W, table = W.to(device), None if slots is None else slots[sl].to(device)  # (per position: [c, S, ...])
            with patch(model, graph, W, abl, positions=table):
                logits = final_logits(model, batch.clean.repeat(c, 1), ap)
            n_forwards += 1
            vals = folded[c](logits, _repeat(view, c)).double().view(c, len(batch.clean))
            effects[start : start + c] += (vals - base).sum(1).cpu() / n
            state["done"][b_i, c_i] = 1
            save()
            bar.update(1)
    save(final=True)
    bar.close()
    scores = torch.full(todo.shape, float("nan"))
    scores[tuple(idx.T)] = effects.float()
    info = {"ablation": str(abl_source.kind), "n_prompts": n, "forwards": n_forwards,
            "edges_per_forward": edges_per_forward, "seconds": time.perf_counter() - t0,
            "score_kind": "ablation_effect"}
    return EdgeScores(scores, graph, method="exact", metric=metric_name(metric), info=info, slots=names)


def _repeat(batch: PromptPairs, c: int) -> PromptPairs:
    """The batch repeated ``c`` times (circuit-major), matching ``tokens.repeat(c, 1)``."""
    if c == 1:
        return batch
    index = torch.arange(len(batch.clean)).repeat(c)
    return batch[index]


# ------------------------------------------------------------------------------------------------------
# The dispatcher
# ------------------------------------------------------------------------------------------------------
def _random(model: Any, graph: Graph, data: PromptPairs, metric: Any = None, *, seed: int = 0,
            ablation: Any = None, batch_size: Any = None, progress: Any = None) -> EdgeScores:
    """``method="random"``: :func:`~edgepatch.baselines.random_scores` (``seed``). It takes the options
    every other method takes (``ablation``, ``batch_size``, ``progress``), so that loops over methods can
    pass them all, and ignores them."""
    from edgepatch.baselines import random_scores

    return random_scores(graph, seed=seed)


def _methods() -> dict[str, tuple[Callable[..., EdgeScores], dict[str, Any], dict[str, Any]]]:
    """Method name -> (function, options the name fixes, option defaults the name sets)."""
    from edgepatch.acdc import acdc
    from edgepatch.baselines import activation_magnitude
    from edgepatch.learned import learn_masks

    return {
        "eap": (eap, {}, {}),
        "eap-ig": (eap_ig, {}, {}),
        "eap-ig-inputs": (eap_ig, {"variant": "inputs"}, {}),
        "eap-ig-activations": (eap_ig, {"variant": "activations"}, {}),
        "clean-corrupted": (eap_ig, {"variant": "clean-corrupted"}, {}),
        "exact": (exact_patching, {}, {}),
        "acdc": (acdc, {}, {}),
        "learned": (learn_masks, {}, {}),
        "edge-pruning": (learn_masks, {}, {"mask_fn": "hard_concrete"}),
        "subnetwork-probing": (learn_masks, {}, {"mask_fn": "sigmoid"}),
        "random": (_random, {}, {}),
        "activation-magnitude": (activation_magnitude, {}, {}),
    }


def _check_options(method: str, fn: Callable[..., EdgeScores], fixed: dict[str, Any], options: dict[str, Any]) -> None:
    """A clear error for an option the method does not take (instead of Python's TypeError from deep
    inside), listing the options it does take."""
    import inspect

    params = inspect.signature(fn).parameters
    takes = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in fixed]
    for name in options:
        if name in fixed:
            raise EdgepatchError(
                f"method={method!r} sets {name}={fixed[name]!r} itself; got {name}={options[name]!r} too. "
                f"Use method={fn.__name__.replace('_', '-')!r} with {name}={options[name]!r} instead."
            )
        if name not in takes:
            raise EdgepatchError(
                f"method={method!r} has no option {name!r}.{suggest(name, takes)} Its options: "
                f"{', '.join(takes)}."
            )


def attribute(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "logit_diff",
    method: str = "eap",
    **options: Any,
) -> EdgeScores:
    """Score every edge with ``method``: ``"eap"``, ``"eap-ig"`` (``steps=``, ``variant=``),
    ``"eap-ig-activations"``, ``"clean-corrupted"``, ``"exact"``, ``"acdc"``, ``"learned"`` /
    ``"edge-pruning"`` / ``"subnetwork-probing"``, ``"random"``, ``"activation-magnitude"``.

    ``metric``: a name (``"logit_diff"``, ``"kl"``, ...) or a callable ``(logits, data) -> [batch]``.
    ``options`` go to the method (``ablation=``, ``batch_size=``, ``progress=``, ...)."""
    methods = _methods()
    key = method.lower().replace("_", "-") if isinstance(method, str) else method
    if key not in methods:
        raise EdgepatchError(
            f"Unknown method {method!r}; expected one of {sorted(methods)}.{suggest(str(key), methods)}"
        )
    fn, fixed, defaults = methods[key]
    _check_options(key, fn, fixed, options)
    scores = fn(model, graph, data, metric, **{**defaults, **options, **fixed})
    nan = int(torch.isnan(scores.flat).sum())
    if nan:
        warnings.warn(
            f"attribute({method!r}): {nan} of {scores.flat.numel()} scores are NaN: the metric gave NaN (or an "
            f"infinity) on some prompts (a log of 0, a division by 0?). Rankings, sweeps and circuits of these "
            f"scores are not meaningful; check the metric on the clean and corrupted runs.",
            RuntimeWarning, stacklevel=2)
    return scores
