"""Learned edge masks: circuit discovery by optimization (subnetwork probing, Edge Pruning, continuous
sparsification).

Context
-------
Instead of testing edges one by one, give every edge a learnable mask parameter ``p``, map it to a
patching weight ``w = f(p)`` in [0, 1] (:mod:`edgepatch.masks`), and train the parameters by gradient
descent on::

    loss = faithfulness(masked model) + sparsity term

with the model's own weights frozen. The faithfulness loss is the KL divergence of the masked model's
next-token distribution at the answer position to the clean model's (default; Edge Pruning's choice), or
minus a task metric (plus it, for a lower-is-better metric). The edges whose masks end up "on" are the
circuit. Three recipes, by ``mask_fn``:

- ``"hard_concrete"`` (Edge Pruning, Bhaskar et al. 2024; gates of Louizos et al. 2018): stochastic
  hard-concrete gates and an expected-L0 density ``rho = E[#edges kept] / n_edges`` (``masks.penalty()
  / n_edges``). With ``target_sparsity`` the density is driven to the target ``rho* = 1 - target_sparsity``
  by a Lagrangian::

      g = (rho - rho*) / rho*
      loss = faithfulness + lambda1 * g + lambda2 * g**2

  The multipliers are updated by gradient *ascent* on the loss (Adam with ``maximize=True``, step
  ``lambda_lr``), so the constraint tightens while it is violated. The gap ``g`` is measured relative to
  the target (Edge Pruning uses ``rho - rho*``; dividing by the constant ``rho*`` only rescales the
  multipliers, and makes one ``lambda_lr`` work for targets from 50% to 2% of the edges). The target
  sparsity is warmed up linearly from 0 over the first ``warmup`` fraction of the epochs. The final
  circuit is the deterministic mask of Edge Pruning's (and CoFi's) code: the ``round(E[#edges kept])``
  edges with the largest parameters (``final="expected"``; ``final="threshold"`` keeps ``p > 0`` instead).
- ``"sigmoid"`` (subnetwork probing with an L1 penalty): ``w = sigmoid(p)``, penalty ``sum w``.
- ``"continuous"`` (continuous sparsification, Savarese et al. 2019): ``w = sigmoid(T * p)`` with the
  temperature ``T`` raised exponentially from 1 to ``final_temperature`` (default 200) over the epochs, so
  the weights become binary; L1 penalty ``sum sigmoid(T * p)``. Use it with ``penalty_weight`` (its
  recipe): a ``target_sparsity`` is only approximate here, because as ``T`` grows the decisions freeze
  (the gradient of ``sigmoid(T * p)`` vanishes) before the Lagrange multipliers settle.

Any recipe uses the Lagrangian when ``target_sparsity`` is given (its density is then the mean weight)
and a fixed penalty ``penalty_weight * rho`` otherwise. The final circuit of ``sigmoid`` and
``continuous`` masks is their deterministic (eval-mode) binarization by default: an edge is kept iff its
parameter is positive (sigmoid: ``w > 1/2``; continuous: ``p > 0``); ``final="expected"`` keeps the
``round(sum of weights)`` edges with the largest parameters instead.

Score kind: learned masks do not estimate the sign convention's ``metric(edge ablated) - metric(edge
kept)``. ``scores`` are the raw mask parameters ``p``, an *importance* (higher = more important, the
circuit is the top of this ranking), and ``info["score_kind"] == "importance"``. Rank them with
``by="signed"`` (``scores.circuit(k, by="signed")``), not by ``|score|``.

Model safety: the optimizer holds the mask parameters only (checked), the model's parameters are frozen
inside :func:`~edgepatch.masks.train_masks` and their ``requires_grad`` restored after; modules are put
in eval mode (no dropout) and restored; the global RNG state is restored (hard-concrete noise comes from
``seed``).

Example
-------
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.tasks import induction
>>> model = random_model("tiny"); graph = build_graph(model)
>>> r = learn_masks(model, graph, induction(101, n=8, seq_len=4), target_sparsity=0.8, epochs=5,
...                 progress=False)
>>> r.info["score_kind"], r.circuit_mask.shape
('importance', torch.Size([11, 27]))
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from edgepatch.attribution import batches as data_batches, position_slots, prepared_metric
from edgepatch.baselines import (
    _ablation_kind,
    _batches_with_ablation,
    _check_batch_size,
    _check_data,
    _eval_mode,
    _model_device_dtype,
    _progress,
    _resolve_metric,
)
from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError
from edgepatch.graph import Graph
from edgepatch.masks import ContinuousSparsification, EdgeMasks, make_mask_fn, train_masks
from edgepatch.metrics import answer_view, final_logits, reads_answer_only, with_gradient
from edgepatch.patching import Ablation, _check_graph, engine_flags
from edgepatch.progress import metric_id, positions_id, resumable, run_fingerprint
from edgepatch.scores import EdgeScores

__all__ = ["learn_masks"]

DEFAULT_INIT = {"hard_concrete": 0.95, "sigmoid": 0.95, "continuous": 0.75}  # initial eval weights


def _faithfulness_loss(metric: Any, logits: Tensor, batch: PromptPairs) -> Tensor:
    values = metric(logits, batch)
    if getattr(metric, "needs_clean", False) or not getattr(metric, "higher_is_better", True):
        return values.mean()  # KL (or another lower-is-better metric): minimize it
    return -values.mean()  # a task metric: maximize it


def learn_masks(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "kl",
    *,
    mask_fn: str = "hard_concrete",
    target_sparsity: float | None = None,
    penalty_weight: float = 0.1,
    epochs: int = 200,
    lr: float = 0.1,
    lambda_lr: float = 0.3,
    warmup: float = 0.5,
    final_temperature: float = 200.0,
    init: float | None = None,
    final: str | None = None,
    seed: int = 0,
    ablation: "str | Ablation" = "corrupt",
    batch_size: int = 64,
    progress: bool = True,
    positions: Any = None,
    slot_names: Any = None,
    out: Any = None,
) -> EdgeScores:
    """Learn edge masks (see the module docstring) and return their scores and final circuit.

    ``metric``: ``"kl"`` (default), a metric name or callable; the loss is its mean (KL) or minus its
    mean (higher-is-better metrics). ``mask_fn``: ``"hard_concrete"``, ``"sigmoid"`` or ``"continuous"``.
    ``target_sparsity``: fraction of edges to *remove* (density ``1 - target_sparsity``), reached by the
    Lagrangian (``lambda_lr``: its ascent step; ``warmup``: fraction of the epochs over which the target
    grows linearly from 0); without it, ``penalty_weight * density`` is added to the loss. ``final``:
    ``"expected"`` (keep the ``round(E[#kept])`` highest parameters; default for hard-concrete) or
    ``"threshold"`` (keep ``p > 0``; default for the others). ``epochs``:
    passes over ``data`` (one optimizer step per batch of ``batch_size`` prompts). ``lr``: Adam's
    learning rate on the mask parameters. ``final_temperature``: continuous sparsification's final
    temperature. ``ablation``: ``"corrupt"`` (default), ``"mean"``, ``"pos_mean"``, ``"zero"`` or an
    :class:`~edgepatch.patching.Ablation`. ``init``: initial weight of every edge (default 0.95; continuous: 0.75, so that the
    parameters can still cross 0 before the temperature freezes them). ``seed``: hard-concrete noise.
    ``positions``, ``slot_names``: per-position masks, one parameter per (position slot, edge), patched
    with those ``positions`` (as in :func:`edgepatch.eap`: ``"absolute"``, ``"named"`` or a
    ``[n_prompts, pos]`` tensor of slots); the density counts (slot, edge) pairs, and the scores and the
    circuit are ``[n_slots, n_src, n_dest]``.
    ``out``: a folder for resumable progress (as in :func:`edgepatch.sweep`): the training state after
    each epoch (mask parameters, both optimizers, random generator, history) is written every few
    seconds, and a run with the same folder and settings continues from it to the uninterrupted run's
    result; other settings raise an error.

    Returns :class:`~edgepatch.scores.EdgeScores` with ``scores`` = mask parameters (importance, see
    above), ``circuit_mask`` = the final circuit, ``info`` = final density (binary) and expected density,
    the history of every epoch (loss, faithfulness, expected density, kept edges, lambdas, temperature).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> from edgepatch.tasks import induction
    >>> m = random_model("tiny"); g = build_graph(m)
    >>> r = learn_masks(m, g, induction(101, n=4, seq_len=4), mask_fn="sigmoid", epochs=3, progress=False)
    >>> len(r.info["history"])
    3
    """
    _check_graph(model, graph)
    data = _check_data(model, data)
    batch_size = _check_batch_size(batch_size)
    epochs = _check_batch_size(epochs, "epochs")
    fn = make_mask_fn(mask_fn)
    kind = fn.name
    if kind not in DEFAULT_INIT:
        raise EdgepatchError(f"mask_fn must be 'hard_concrete', 'sigmoid' or 'continuous'; got {mask_fn!r}.")
    if target_sparsity is not None and not 0.0 <= float(target_sparsity) < 1.0:
        raise EdgepatchError(
            f"target_sparsity is the fraction of edges to remove, in [0, 1); got {target_sparsity!r} "
            f"(e.g. 0.95 keeps 5% of the edges)."
        )
    if not 0.0 <= float(warmup) <= 1.0:
        raise EdgepatchError(f"warmup is a fraction of the epochs, in [0, 1]; got {warmup!r}.")
    init_w = DEFAULT_INIT[kind] if init is None else float(init)
    metric_fn, metric_name = _resolve_metric(metric)
    device = _model_device_dtype(model)[0]
    slots, names = position_slots(positions, data, slot_names)
    n_slots = None if names is None else len(names)
    # what the density counts: edges (sources for a node graph), or (slot, edge) pairs per position
    n_edges = (graph.n_edges if graph.level == "edge" else graph.n_src) * (n_slots or 1)
    target_density = None if target_sparsity is None else 1.0 - float(target_sparsity)

    if final is None:
        final = "expected" if kind == "hard_concrete" else "threshold"
    if final not in ("expected", "threshold"):
        raise EdgepatchError(f"final must be 'expected' or 'threshold'; got {final!r}.")

    model_param_ids = {id(p) for p in model.parameters()}
    history: list[dict[str, Any]] = []
    rng_devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        stack.enter_context(engine_flags(model))
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        torch.manual_seed(int(seed))
        # a built-in metric reads the answer positions only: unembed (and differentiate) just those
        fast = reads_answer_only(metric_fn)
        with torch.no_grad():
            batches = [(b, a, prepared_metric(model, metric_fn, b, answer_pos=b.answer_pos if fast else None))
                       for b, a in _batches_with_ablation(model, graph, data, ablation, batch_size)]
        views = [answer_view(b) if fast else b for b, _, _ in batches]
        batch_slots = [None if slots is None else slots[sl].to(device) for sl, _ in data_batches(data, batch_size)]
        masks = EdgeMasks(graph, init=init_w, mask_fn=fn, slots=n_slots, device=device)
        masks.train()
        params = list(masks.parameters())
        if any(id(p) in model_param_ids for p in params):  # pragma: no cover - a bug, never expected
            raise EdgepatchError("learn_masks: internal error, the optimizer would update model weights.")
        opt = torch.optim.Adam(params, lr=lr)
        lambdas = torch.zeros(2, device=device, requires_grad=True)  # Lagrange multipliers (lambda1, lambda2)
        lambda_opt = torch.optim.Adam([lambdas], lr=lambda_lr, maximize=True)  # gradient *ascent*
        held = None
        if len(batches) == 1:  # one patch context for the whole run (entering one installs hooks)
            held = stack.enter_context(train_masks(model, graph, batches[0][1], masks=masks, positions=batch_slots[0]))
        # the training state after an epoch, kept only with `out` (it copies the parameters to the CPU)
        state = _training_state(masks, opt, lambdas, lambda_opt, epochs, rng_devices) if out is not None else {}
        save = resumable(out, state, "learned masks run", lambda: run_fingerprint(
            model, graph, data, ablation, metric=metric_id(metric), mask_fn=kind, target_sparsity=target_sparsity,
            penalty_weight=penalty_weight, epochs=epochs, lr=lr, lambda_lr=lambda_lr, warmup=warmup,
            final_temperature=final_temperature, init=init_w, seed=seed, batch_size=batch_size,
            positions=positions_id(slots, names)))
        start = int(state.get("epochs_done", 0))
        if start:
            _restore_training(state, masks, opt, lambdas, lambda_opt, rng_devices)
            history = [_history_row(r) for r in state["history"][:start].tolist()]
        bar = _progress(progress, epochs, f"learn masks ({kind}, {n_edges:,} edges)")
        bar.update(start)
        for epoch in range(start, epochs):
            if isinstance(fn, ContinuousSparsification):
                fn.temperature = ContinuousSparsification.schedule(epoch, epochs, final_temperature)
            target = None
            if target_density is not None:
                ramp = 1.0 if warmup == 0 else min(1.0, (epoch + 1) / max(1.0, warmup * epochs))
                target = 1.0 - (1.0 - target_density) * ramp
            sums = {"loss": 0.0, "faithfulness": 0.0, "density": 0.0}
            for (batch, abl, metric_b), view, table in zip(batches, views, batch_slots):
                ctx = (contextlib.nullcontext() if held is not None
                       else train_masks(model, graph, abl, masks=masks, positions=table))
                with ctx:
                    tokens = batch.clean.to(device)
                    logits = final_logits(model, tokens, batch.answer_pos.to(device)) if fast else model(tokens)
                faith = with_gradient(_faithfulness_loss(metric_b, logits, view), metric, "learned masks")
                density = masks.penalty() / n_edges
                if target is None:
                    loss = faith + penalty_weight * density
                else:
                    gap = (density - target) / target  # relative: lambda_lr does not depend on the target
                    loss = faith + lambdas[0] * gap + lambdas[1] * gap**2
                opt.zero_grad(set_to_none=True)
                lambda_opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if target is not None:
                    lambda_opt.step()
                w = batch.batch / data.batch
                sums["loss"] += float(loss.detach()) * w
                sums["faithfulness"] += float(faith.detach()) * w
                sums["density"] += float(density.detach()) * w
            lam = lambdas.detach().tolist()
            row = {"epoch": epoch, **sums, "n_kept": masks.n_kept(), "lambda1": lam[0], "lambda2": lam[1]}
            if target is not None:
                row["target_density"] = target
            if isinstance(fn, ContinuousSparsification):
                row["temperature"] = fn.temperature
            history.append(row)
            if out is not None:
                _record_epoch(state, masks, opt, lambdas, lambda_opt, row, rng_devices)
                save(final=epoch == epochs - 1)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4g}", kept=row["n_kept"])
        bar.close()
        if isinstance(fn, ContinuousSparsification):  # (a run resumed after its last epoch)
            fn.temperature = ContinuousSparsification.schedule(epochs - 1, epochs, final_temperature)
        masks.eval()
        with torch.no_grad():
            expected = float(masks.penalty()) / n_edges
        logits_param = masks.logits.detach().cpu()
        if final == "threshold":
            circuit = masks.circuit().cpu()
        else:  # the deterministic mask: the round(E[#kept]) edges with the largest parameters
            k = int(round(expected * n_edges))
            ranked = logits_param if n_slots else logits_param.reshape(graph.n_src, -1)
            circuit = EdgeScores(ranked, graph, slots=names).circuit(k, by="signed")

    n_kept = int(circuit.sum())
    info: dict[str, Any] = {
        "score_kind": "importance",
        "mask_fn": kind,
        "density": n_kept / n_edges,
        "n_kept": n_kept,
        "expected_density": expected,
        "final": final,
        "target_sparsity": target_sparsity,
        "target_density": target_density,
        "penalty_weight": penalty_weight if target_sparsity is None else None,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "ablation": _ablation_kind(ablation),
        "history": history,
        "loss": [h["loss"] for h in history],
    }
    if kind == "continuous":
        info["final_temperature"] = final_temperature
    return EdgeScores(logits_param, graph, method=f"learned_{kind}", metric=metric_name, info=info,
                      circuit_mask=circuit.bool(), slots=names)


# ------------------------------------------------------------------------------------------------------
# Resumable training (learn_masks(out=...)): the state after an epoch, as fixed-shape tensors
# ------------------------------------------------------------------------------------------------------

_HISTORY = ("epoch", "loss", "faithfulness", "density", "n_kept", "lambda1", "lambda2", "target_density",
            "temperature")  # the history's columns (NaN: absent from the row)
_INT_COLUMNS = ("epoch", "n_kept")


def _adam_tensors(opt: torch.optim.Optimizer, param: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's (step, exp_avg, exp_avg_sq) for ``param`` (zeros before its first step)."""
    st = opt.state.get(param, {})
    zeros = torch.zeros_like(param, memory_format=torch.contiguous_format).detach().cpu()
    return (st["step"].detach().cpu().reshape(1).float() if "step" in st else torch.zeros(1),
            st["exp_avg"].detach().cpu() if "exp_avg" in st else zeros,
            st["exp_avg_sq"].detach().cpu() if "exp_avg_sq" in st else zeros.clone())


def _rng_states(devices: list[Any]) -> list[Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def _training_state(masks: EdgeMasks, opt: torch.optim.Optimizer, lambdas: Tensor,
                    lambda_opt: torch.optim.Optimizer, epochs: int, devices: list[Any]) -> dict[str, Tensor]:
    state = {"epochs_done": torch.zeros((), dtype=torch.int64),
             "history": torch.full((epochs, len(_HISTORY)), float("nan"), dtype=torch.float64)}
    _record_epoch(state, masks, opt, lambdas, lambda_opt, None, devices)
    return state


def _record_epoch(state: dict[str, Tensor], masks: EdgeMasks, opt: torch.optim.Optimizer, lambdas: Tensor,
                  lambda_opt: torch.optim.Optimizer, row: dict[str, Any] | None, devices: list[Any]) -> None:
    """Put the training state after ``row``'s epoch (before the first epoch: None) into ``state``."""
    state["logits"] = masks.logits.detach().cpu().clone()
    state["step"], state["exp_avg"], state["exp_avg_sq"] = _adam_tensors(opt, masks.logits)
    state["lambdas"] = lambdas.detach().cpu().clone()
    state["lambda_step"], state["lambda_avg"], state["lambda_avg_sq"] = _adam_tensors(lambda_opt, lambdas)
    for i, rng in enumerate(_rng_states(devices)):
        state[f"rng{i}"] = rng
    if row is not None:
        state["history"][row["epoch"]] = torch.tensor([float(row.get(k, float("nan"))) for k in _HISTORY],
                                                      dtype=torch.float64)
        state["epochs_done"] = torch.tensor(row["epoch"] + 1)


def _restore_adam(opt: torch.optim.Optimizer, param: Tensor, step: Tensor, avg: Tensor, avg_sq: Tensor) -> None:
    if float(step) == 0:  # never stepped (the Lagrangian's optimizer without a target sparsity)
        return
    sd = opt.state_dict()
    sd["state"] = {0: {"step": step.reshape(()).clone(), "exp_avg": avg.to(param.device, param.dtype),
                       "exp_avg_sq": avg_sq.to(param.device, param.dtype)}}
    opt.load_state_dict(sd)


def _restore_training(state: dict[str, Tensor], masks: EdgeMasks, opt: torch.optim.Optimizer, lambdas: Tensor,
                      lambda_opt: torch.optim.Optimizer, devices: list[Any]) -> None:
    with torch.no_grad():
        masks.logits.copy_(state["logits"])
        lambdas.copy_(state["lambdas"])
    _restore_adam(opt, masks.logits, state["step"], state["exp_avg"], state["exp_avg_sq"])
    _restore_adam(lambda_opt, lambdas, state["lambda_step"], state["lambda_avg"], state["lambda_avg_sq"])
    torch.set_rng_state(state["rng0"])
    for i, d in enumerate(devices):
        torch.cuda.set_rng_state(state[f"rng{i + 1}"], d)


def _history_row(values: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in zip(_HISTORY, values):
        if v == v:  # not NaN
            row[k] = int(v) if k in _INT_COLUMNS else v
    return row
