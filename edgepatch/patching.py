"""Exact edge patching: what each destination reads, edge by edge.

Context
-------
In an unpatched forward, destination ``d`` (a head's query/key/value input, an MLP input, or the final
residual) reads ``r_d = const + sum_s o_s`` over its predecessor sources ``s``. Patching gives every edge a
weight ``w_sd`` in [0, 1] and an *ablated* source value ``â_s`` (from a corrupted run, zero, or a mean), and
lets the destination read::

    x_d = r_d - sum_s (1 - w_sd) * (o_s - â_s)

``o_s`` are the source outputs *of the current forward*, already affected by upstream patching; everything
after ``x_d`` (norm, projections, attention, MLP) runs as the model defines it. ``w = 1`` keeps the edge
(clean), ``w = 0`` ablates it. The rule is differentiable in ``w``, which is what attribution and learned
masks use.

Intuition for the implementation: the correction is linear, so one forward needs only the differences
``D_s = o_s - â_s`` of the sources computed so far (a ``[n_src, batch, pos, d_model]`` buffer) and, at each
hook that reads the stream, one matrix product ``(1 - W[:n, dests]).T @ D[:n]`` for all of that hook's
destinations at once. Head outputs come from ``hook_z`` and ``W_O`` (never TransformerLens's
``use_attn_result``). Hooks are plain forward hooks on TransformerLens hook points, removed on exit; the
flags the engine needs (``hook_mlp_in``) are switched on inside the context and restored after it.

Attention destinations: every head of a layer reads the same residual ``r``, and TransformerLens exposes
per-head inputs only in its split-input mode, which copies ``r`` per head and normalizes every copy (about
1.2x a plain forward on CPU by itself). Instead the engine hooks the q/k/v *projections*: for the heads
whose inputs are patched it computes ``x_h = r - sum_s (1 - w_sh) D_s`` (q, k, v and the layer's MLP input
in one product), normalizes them with one kernel and projects them (:class:`Projections`); heads whose
edges are all ablated take the corrupted run's projection (:attr:`Ablation.projections`). In a layer with
any such head the engine projects the unpatched heads too and hands the model's own q/k/v projections an
input with no positions, so they cost nothing; likewise the attention output is the sum of the per-head
outputs the engine records anyway, and the model's output projection gets no positions. Both only where
no other hook watches the hook points involved (a user's hook there sees the usual tensors). Without
gradients the buffer is token-major, kept on the model for the next forward (on CPU a fresh one
page-faults), and only the sources a destination needs are read (additive or subtractive form, whichever
touches fewer). On a GPU it is source-major instead, each layer's mixing one matrix product over every
token, and every decision that depends on the weights' values is taken on a CPU copy of them, so that the
CPU never waits for the GPU in a forward. Architectures where that is not exact fall back to the
split-input mode.

Example
-------
>>> import torch
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> model = random_model("tiny"); graph = build_graph(model)
>>> clean, corrupt = torch.randint(0, 101, (2, 4, 6))
>>> abl = source_activations(model, graph, corrupt)
>>> with patch(model, graph, torch.zeros(graph.n_src, graph.n_dest), abl):
...     patched = model(clean)
>>> torch.allclose(patched, model(corrupt), atol=1e-4)
True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from edgepatch.errors import EdgepatchError, shape_str
from edgepatch.graph import Graph, ModelSpec, dest_groups, is_post_norm, model_spec, normalizes_attention_output
from edgepatch.metrics import final_logits, run_without_logits

Weights = Union[Tensor, Iterable[str]]


# ------------------------------------------------------------------------------------------------------
# Ablated source values
# ------------------------------------------------------------------------------------------------------
@dataclass
class Ablation:
    """Ablated source outputs ``â``: ``values`` is ``[n_src, batch, pos, d_model]``, where batch and pos
    may be 1 to broadcast (zero and mean ablation). ``kind`` says how they were made.

    ``projections`` (corrupted-run ablations only): that run's q/k/v projections, ``"{layer}{q|k|v}"`` ->
    ``[batch, pos, heads, d_head]``. A head input whose edges are all ablated reads exactly what it read
    in the corrupted run, so the patched forward takes its projection from here instead of recomputing it;
    likewise an MLP whose input edges are all ablated takes its output from ``values`` (kind "corrupt").
    (Not in models whose heads do not add up to what the residual stream receives, Gemma 2/3 and OLMo 2:
    there such an input is not the corrupted run's, and the engine computes it.)
    Both assume the values are this model's run on the corrupted prompts: recompute them after changing
    the model's weights."""

    values: Float[Tensor, "n_src batch pos d_model"]
    kind: str
    spec: ModelSpec
    projections: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 4:
            raise EdgepatchError(
                f"Ablation values must be [n_src, batch, pos, d_model]; got shape {shape_str(self.values.shape)}."
            )

    @property
    def n_src(self) -> int:
        return int(self.values.shape[0])

    def _map(self, values: Callable[[Tensor], Tensor], proj: Callable[[Tensor], Tensor]) -> "Ablation":
        projections = None if self.projections is None else {k: proj(v) for k, v in self.projections.items()}
        return Ablation(values(self.values), self.kind, self.spec, projections)

    def to(self, device: Any = None, dtype: Any = None) -> "Ablation":
        return self._map(lambda v: v.to(device=device, dtype=dtype), lambda v: v.to(device=device, dtype=dtype))

    def contiguous(self) -> "Ablation":
        """A copy that owns its memory (e.g. after selecting prompts from a larger run)."""
        return self._map(Tensor.contiguous, Tensor.contiguous)

    def __getitem__(self, index: Any) -> "Ablation":
        """Select prompts (batch entries); broadcast (batch 1) ablations are returned as they are."""
        if self.values.shape[1] == 1:
            return self
        return self._map(lambda v: v[:, index], lambda v: v[index])

    def __repr__(self) -> str:
        return f"Ablation({self.kind}, {shape_str(self.values.shape)})"


def _source_hooks(model: Any, graph: Graph, sink: Callable[[int, Tensor], None],
                  skip: Callable[[], bool] | None = None) -> list[tuple[str, Callable]]:
    """Forward hooks that report every source's output ``[n, batch, pos, d_model]`` to ``sink(start, t)``
    (head outputs are not computed while ``skip()`` is true)."""
    spec = graph.spec
    hooks: list[tuple[str, Callable]] = []

    def on_input(module: Any, inp: Any, out: Tensor) -> None:
        sink(0, out.unsqueeze(0))

    hooks.append(("blocks.0.hook_resid_pre", on_input))
    for layer in range(spec.n_layers):
        start = graph.head_src_slice(layer).start

        def on_z(module: Any, inp: Any, z: Tensor, layer: int = layer, start: int = start) -> None:
            if skip is None or not skip():
                sink(start, head_outputs(model, layer, z))

        hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
        if not spec.attn_only:
            idx = graph.mlp_src_index(layer)
            scale = residual_scale(model, layer)

            def on_mlp(module: Any, inp: Any, out: Tensor, idx: int = idx, scale: float = scale) -> None:
                sink(idx, (out if scale == 1 else out * scale).unsqueeze(0))

            hooks.append((mlp_out_hook(model, layer), on_mlp))
    return hooks


def residual_scale(model: Any, layer: int) -> float:
    """The factor by which the residual stream scales the layer's attention and MLP outputs before adding
    them: 1, except in Granite-family blocks (TransformerBridge's ``ScaledResidualBlockBridge``, the
    model's ``residual_multiplier``). Sources are what the residual stream adds: the scaled outputs."""
    return float(getattr(model.blocks[layer], "residual_contribution_scale", 1.0))


def mlp_out_hook(model: Any, layer: int) -> str:
    """The hook point the engine reads the layer's MLP output at: ``hook_mlp_out``, except in scaled blocks
    (:func:`residual_scale`), whose ``hook_mlp_out`` shows the scaled output to TransformerLens's hooks
    only; there the MLP's own output, ``mlp.hook_out``, which the source hooks scale."""
    if residual_scale(model, layer) != 1:
        return f"blocks.{layer}.mlp.hook_out"
    return f"blocks.{layer}.hook_mlp_out"


def head_outputs(model: Any, layer: int, z: Float[Tensor, "batch pos head d_head"],
                 W_O: Tensor | None = None, out: Tensor | None = None) -> Float[Tensor, "head batch pos d_model"]:
    """Per-head outputs ``z_h @ W_O^h`` (without ``b_O``), head-major, as the residual stream adds them
    (times :func:`residual_scale` in Granite-family blocks). ``W_O``: the layer's, if at hand (scaled
    alike); ``out``: a contiguous ``[head, batch, pos, d_model]`` tensor to write them into.
    TransformerBridge's ``hook_z`` sees heads flattened (``[batch, pos, head * d_head]``); both layouts are
    accepted."""
    if W_O is None:
        W_O = model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        scale = residual_scale(model, layer)
        W_O = W_O if scale == 1 else W_O * scale
    h, k, m = W_O.shape
    b, p = z.shape[:2]
    zh = z.reshape(b * p, h, k).transpose(0, 1)  # [head, batch*pos, d_head]
    if out is None:
        return torch.bmm(zh, W_O.to(z.dtype)).view(h, b, p, m)
    torch.bmm(zh, W_O.to(z.dtype), out=out.view(h, b * p, m))
    return out


@torch.no_grad()
def source_activations(model: Any, graph: Graph, tokens: Tensor, *, projections: bool = True,
                       logits_at: Tensor | None | bool = False, rows: slice | None = None,
                       **forward_kwargs: Any) -> Any:
    """Run ``model(tokens)`` unpatched and record every source's output: the ablated values of
    corrupted-run patching. ``forward_kwargs`` (e.g. ``attention_mask``) go to the model. With
    ``projections`` (and a model whose q/k/v the engine can recompute), also record the q/k/v
    projections, which fully ablated head inputs reuse (see :class:`Ablation`). The run stops before the
    unembedding unless ``logits_at`` asks for the logits too (``None``: all positions; a ``[batch]`` tensor:
    those positions only); then it returns ``(ablation, logits)``. ``rows``: record only these rows of the
    batch (e.g. the corrupted half of a forward that also runs the clean prompts for their logits);
    the logits keep every row.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> m = random_model("tiny"); g = build_graph(m)
    >>> source_activations(m, g, torch.zeros(2, 5, dtype=torch.long))
    Ablation(corrupt, [11, 2, 5, 32])
    """
    spec = _check_graph(model, graph)
    _check_tokens(tokens, spec, "tokens")
    if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
        raise EdgepatchError(f"rows must be a slice of the batch with step 1 (e.g. slice(8, 16)); got {rows!r}.")
    out: dict[str, Tensor] = {}
    recorded = [False] * graph.n_src

    def sink(start: int, t: Tensor) -> None:
        if rows is not None:
            t = t[:, rows]
        if "buf" not in out:
            _, b, p, m = t.shape
            out["buf"] = take_buffer(model, "ablation", t, (graph.n_src, b, p, m))
        out["buf"][start : start + t.shape[0]] = t
        recorded[start : start + t.shape[0]] = [True] * t.shape[0]

    hooks = _source_hooks(model, graph.engine_graph, sink)
    proj: dict[str, Tensor] = {}
    # (not where heads are normalized before the residual stream adds them: the engine does not reuse them there)
    if projections and projections_of(model) is not None and not normalizes_attention_output(model):
        for layer in range(spec.n_layers):
            for kind in "qkv":
                def record(module: Any, inp: Any, y: Tensor, key: str = f"{layer}{kind}") -> None:
                    y = y if rows is None else y[rows]
                    proj[key] = (y.unflatten(-1, (-1, spec.d_head)) if y.ndim == 3 else y).contiguous()

                hooks.append((f"blocks.{layer}.attn.hook_{kind}", record))
    with _hooks_installed(model, hooks):
        if logits_at is False:
            run_without_logits(model, tokens, **forward_kwargs)
        else:
            logits = final_logits(model, tokens, logits_at, **forward_kwargs)
    missing = [graph.src_names[i] for i, done in enumerate(recorded) if not done]
    if missing or (proj and len(proj) != 3 * spec.n_layers):
        what = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "") if missing else "some q/k/v projections"
        raise EdgepatchError(
            f"source_activations: the model ran no hook for {what}, so their activations were not recorded. "
            f"{_unusual_blocks(model)}"
        )
    abl = Ablation(out["buf"], "corrupt", spec, proj or None)
    return abl if logits_at is False else (abl, logits)


def _unusual_blocks(model: Any) -> str:
    """The end of the error for a hook point the model did not run."""
    return (f"The model's blocks ({type(model.blocks[0]).__name__}) do not run TransformerLens's standard hook "
            f"points: please report this architecture to edgepatch.")


@torch.no_grad()
def mean_activations(
    model: Any,
    graph: Graph,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
    per_position: bool = False,
    batch_size: int = 32,
) -> Ablation:
    """Mean source outputs over a reference dataset: over prompts and (unless ``per_position``) positions,
    ignoring padding where ``attention_mask`` is given. Returns a broadcasting ``Ablation``
    (``[n_src, 1, 1, d_model]``, or ``[n_src, 1, pos, d_model]`` per position)."""
    spec = _check_graph(model, graph)
    _check_tokens(tokens, spec, "tokens")
    total: Tensor | None = None
    count: Tensor | None = None
    for start in range(0, tokens.shape[0], batch_size):
        tok = tokens[start : start + batch_size]
        kwargs = {}
        mask = torch.ones(tok.shape, dtype=torch.bool, device=tok.device)
        if attention_mask is not None:
            mask = attention_mask[start : start + batch_size].bool()
            kwargs["attention_mask"] = attention_mask[start : start + batch_size]
        vals = source_activations(model, graph, tok, **kwargs).values  # [n_src, b, p, m]
        w = mask.to(vals.device, vals.dtype)[None, :, :, None]
        s = (vals * w).sum(1, keepdim=True)
        c = w.sum(1, keepdim=True)
        if not per_position:
            s, c = s.sum(2, keepdim=True), c.sum(2, keepdim=True)
        total = s if total is None else total + s
        count = c if count is None else count + c
    assert total is not None and count is not None
    return Ablation(total / count.clamp(min=1), "pos_mean" if per_position else "mean", spec)


def zero_ablation(graph: Graph, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> Ablation:
    """Ablate to zero: ``â_s = 0`` for every source."""
    return Ablation(torch.zeros(graph.n_src, 1, 1, graph.spec.d_model, device=device, dtype=dtype), "zero", graph.spec)


# ------------------------------------------------------------------------------------------------------
# Model state: hooks and flags, restored on exit, nesting by counters
# ------------------------------------------------------------------------------------------------------
class _ModelSlot:
    """Per-model engine state: flag nesting depth, the saved flags, and the stack of active patches."""

    def __init__(self) -> None:
        self.depth = 0
        self.saved_flags: dict[str, Any] = {}
        self.saved_bridge: dict[int, Any] = {}
        self.stack: list["_Engine"] = []
        # The largest CPU scratch buffers (differences, head outputs) of earlier forwards without
        # gradients, kept for the next (see _Engine._scratch); freed with the model or by release_buffers().
        self.spares: dict[str, Tensor] = {}
        self.mlp_capture: list[Any] = []  # hooks that make TransformerBridge blocks fire hook_mlp_in


_SLOTS: "weakref.WeakKeyDictionary[Any, _ModelSlot]" = weakref.WeakKeyDictionary()

_FLAGS = (("use_attn_in", False), ("use_split_qkv_input", True), ("use_hook_mlp_in", True))
_PROJECTION_FLAGS = {"use_attn_in": False, "use_split_qkv_input": False, "use_hook_mlp_in": True}


def _slot(model: Any) -> _ModelSlot:
    slot = _SLOTS.get(model)
    if slot is None:
        slot = _SLOTS[model] = _ModelSlot()
    return slot


def take_buffer(model: Any, name: str, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialized tensor of ``shape`` (``like``'s dtype and device) for work on ``model``: on CPU the
    storage kept under ``name`` by :func:`keep_buffer` when it is large enough (it is then no longer kept:
    the caller owns it), else fresh. Large CPU allocations are mapped afresh by the C allocator every time
    and page-fault on their first write: a sweep's 60 MB ablation buffer (GPT-2 small, 8 x 16 tokens)
    took ~15,000 page faults per batch."""
    need = math.prod(shape)
    return _take_storage(model, name, like, need)[:need].view(shape)


def _take_storage(model: Any, name: str, like: Tensor, need: int) -> Tensor:
    """:func:`take_buffer`'s storage, whole: a flat tensor of at least ``need`` elements."""
    if like.device.type == "cpu":
        spares = _slot(model).spares
        spare = spares.get(name)
        if spare is not None and spare.dtype == like.dtype and spare.numel() >= need:
            del spares[name]
            return spare
    return like.new_empty(need)


def keep_buffer(model: Any, name: str, t: Tensor) -> None:
    """Keep ``t``'s storage on ``model`` for a later :func:`take_buffer` (CPU only; a larger one already kept
    under ``name`` stays; nothing that would bring the model's kept buffers over ``_KEEP_BYTES`` in all). The
    caller promises that nothing else still uses ``t`` or its views; :func:`release_buffers` frees what is
    kept."""
    if t.device.type != "cpu":
        return
    storage = t.untyped_storage()
    spares = _slot(model).spares
    kept = spares.get(name)
    if kept is not None and kept.untyped_storage().nbytes() >= storage.nbytes():
        return
    others = sum(v.untyped_storage().nbytes() for k, v in spares.items() if k != name)
    if others + storage.nbytes() <= _KEEP_BYTES:
        spares[name] = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),))


def _set_flag(model: Any, flag: str, value: bool) -> None:
    setter = getattr(model, f"set_{flag}", None)
    if setter is not None:
        try:
            setter(value)
        except NotImplementedError as err:  # TransformerBridge: an attention it cannot split per head
            attn = type(model.blocks[0].attn).__name__ if getattr(model, "blocks", None) else "?"
            raise EdgepatchError(
                f"edgepatch cannot give each head of {getattr(model.cfg, 'model_name', type(model).__name__)} its own "
                f"q/k/v input: TransformerBridge cannot split this model's attention ({attn}) into per-head inputs "
                f"(set_{flag} says: {err}), and edgepatch's own per-head projections do not cover this architecture. "
                "Patching edges into this model's attention heads is not supported yet: open an issue for this "
                "architecture."
            ) from err
    elif hasattr(model.cfg, flag):
        setattr(model.cfg, flag, value)


@contextlib.contextmanager
def engine_flags(model: Any, want: dict[str, bool] | None = None) -> Iterator[None]:
    """Set the TransformerLens flags the engine reads and restore them on exit. Default: ``hook_mlp_in``
    on, ``use_attn_in`` off, and split q/k/v inputs on only where the engine cannot recompute patched heads
    at the projections itself (:func:`projections_of`; TransformerBridge cannot split every attention).
    Levels nest like a stack: each restores exactly what it changed."""
    slot = _slot(model)
    if want is None:  # split inputs only where the engine cannot recompute patched heads at the projections
        want = dict(_FLAGS) if projections_of(model) is None else dict(_PROJECTION_FLAGS)
    attn_only = bool(getattr(model.cfg, "attn_only", False))
    if slot.depth == 0:
        slot.saved_bridge = _bridge_capture_state(model)
        slot.mlp_capture = _capture_bridge_mlp_inputs(model)
    previous = {flag: bool(getattr(model.cfg, flag, False)) for flag, _ in _FLAGS}
    order = [flag for flag, _ in _FLAGS]  # attn_in off before split on; restore in reverse
    slot.depth += 1
    try:
        for flag in order:
            if flag not in want or (flag == "use_hook_mlp_in" and attn_only):
                continue
            if previous[flag] != want[flag] and (hasattr(model.cfg, flag) or hasattr(model, f"set_{flag}")):
                if want[flag] and flag == "use_split_qkv_input" and bool(getattr(model.cfg, "use_attn_in", False)):
                    _set_flag(model, "use_attn_in", False)
                _set_flag(model, flag, want[flag])
        yield
    finally:
        slot.depth -= 1
        _restore_flags(model, previous)
        if slot.depth == 0:
            for handle in slot.mlp_capture:
                handle.remove()
            slot.mlp_capture = []
            _restore_bridge_capture_state(model, slot.saved_bridge)


def _restore_flags(model: Any, saved: dict[str, bool]) -> None:
    # split inputs off before attn_in may go back on (TransformerLens refuses both at once)
    for flag in ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_in"):
        if flag in saved and bool(getattr(model.cfg, flag, False)) != saved[flag]:
            _set_flag(model, flag, saved[flag])


def _bridge_capture_state(model: Any) -> dict[int, tuple[Any, bool, Any]]:
    """TransformerBridge blocks wire forward pre-hooks lazily once split q/k/v inputs are on (and keep a
    reference to the last residual): remember which were unwired so that exit can undo exactly that."""
    state = {}
    if not hasattr(model, "original_model"):  # not a TransformerBridge
        return state
    for module in getattr(model, "blocks", ()):
        if hasattr(module, "_teardown_capture_hooks") and hasattr(module, "_capture_hooks_wired"):
            attn = getattr(module, "submodules", {}).get("attn") if getattr(module, "submodules", None) else None
            state[id(module)] = (module, bool(module._capture_hooks_wired),
                                 getattr(attn, "_captured_pre_ln_residual", None) if attn is not None else None)
    return state


def _restore_bridge_capture_state(model: Any, state: dict[int, tuple[Any, bool, Any]]) -> None:
    for module, wired, captured in state.values():
        if not wired and module._capture_hooks_wired:
            module._teardown_capture_hooks()
        attn = module.submodules.get("attn") if getattr(module, "submodules", None) else None
        if attn is not None and hasattr(attn, "_captured_pre_ln_residual"):
            attn._captured_pre_ln_residual = captured


def _capture_bridge_mlp_inputs(model: Any) -> list[Any]:
    """Make every TransformerBridge block fire ``hook_mlp_in`` with the residual stream its MLP reads, as
    every other block does; returns the handles of the hooks installed here (the caller removes them).

    TransformerBridge fires ``hook_mlp_in`` (and gives split q/k/v inputs their pre-normalization residual)
    from pre-hooks that a block's forward installs on its normalizations. Two kinds of block do not:

    - blocks whose own forward skips that set-up (Bloom's): it is run here, and undone on exit like the
      set-up the flags cause (see :func:`_bridge_capture_state`). Without it Bloom's split inputs carry the
      normalized residual and its MLP inputs are never patched;
    - parallel blocks whose MLP reads the attention's normalization (GPT-J, Phi, Falcon, Cohere: no ``ln2``
      to hook): ``hook_mlp_in`` never fires there. Here a pre-hook on ``ln1`` keeps the residual and a
      pre-hook on the MLP fires ``hook_mlp_in`` with it; where a hook changed it, the MLP reads the
      normalization of the changed residual (computed from ``ln1``'s parameters, no hook firing), else its
      input as it was.

    Without this, patching those MLP inputs silently did nothing: an edge into them kept its clean value
    whatever its weight."""
    if not hasattr(model, "original_model"):
        return []
    handles: list[Any] = []
    proj = Projections(model, True)
    for layer, block in enumerate(getattr(model, "blocks", ())):
        if hasattr(block, "_maybe_wire_capture_hooks") and not getattr(block, "_capture_hooks_wired", True):
            block._maybe_wire_capture_hooks()
        subs = getattr(block, "submodules", None) or {}
        target = subs.get("mlp") if getattr(block, "mlp_reads_resid_directly", False) else subs.get("ln2")
        if target is not None and getattr(target, "original_component", None) is not None:
            continue  # TransformerBridge fires hook_mlp_in itself
        ln1, mlp, hook = subs.get("ln1"), subs.get("mlp"), getattr(block, "hook_mlp_in", None)
        if ln1 is None or mlp is None or hook is None or getattr(ln1, "original_component", None) is None:
            continue
        handles += _shared_norm_mlp_hooks(model, layer, ln1, mlp, hook, proj)
    return handles


def _shared_norm_mlp_hooks(model: Any, layer: int, ln1: Any, mlp: Any, hook: Any, proj: "Projections") -> list[Any]:
    """The two pre-hooks of :func:`_capture_bridge_mlp_inputs` for a parallel block whose MLP reads ``ln1``'s
    output."""
    kept: dict[str, Any] = {}
    checked: list[bool] = []

    def keep(module: Any, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            kept["r"] = args[0]

    def fire(module: Any, args: tuple) -> tuple | None:
        r = kept.pop("r", None)
        if r is None or not args or not isinstance(args[0], Tensor) or not bool(getattr(model.cfg, "use_hook_mlp_in", False)):
            return None
        y = hook(r)
        if y is r:
            return None
        if not checked:  # once per context: the MLP must read exactly this normalization of the residual
            tol = 1e-4 if args[0].dtype in (torch.float32, torch.float64) else 1e-2
            if args[0].shape != r.shape or bool(((proj.norm(layer, r) - args[0]).abs() > tol * (1 + args[0].abs())).any()):
                raise EdgepatchError(
                    f"edgepatch cannot patch the MLP inputs of {type(model.blocks[layer]).__name__} "
                    f"(layer {layer}): its MLP does not read the normalization of the residual stream that the "
                    f"attention reads, and TransformerBridge fires no hook_mlp_in there. Please report this "
                    f"model's architecture to edgepatch."
                )
            checked.append(True)
        return (proj.norm(layer, y),) + tuple(args[1:])

    return [ln1.register_forward_pre_hook(keep), mlp.register_forward_pre_hook(fire)]


def _hook_point(model: Any, name: str) -> Any:
    """The hook point ``name``, found by attribute access (TransformerBridge rebuilds its ``hook_dict``,
    about 10 ms for GPT-2 small, on every access; its attributes resolve the same aliases)."""
    try:
        hp = functools.reduce(getattr, name.split("."), model)
    except AttributeError:
        hp = model.hook_dict.get(name)
    if not isinstance(hp, torch.nn.Module):
        raise EdgepatchError(
            f"The model has no hook point {name!r}, which edgepatch needs. Supported models are "
            f"TransformerLens HookedTransformer and TransformerBridge with standard hook names."
        )
    return hp


# Hook points that carry the residual stream's shape ([batch, pos, d_model]) to TransformerLens's hooks
_RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_in", "hook_mlp_out")


def _register(model: Any, name: str, fn: Callable, prepend: bool = False) -> Any:
    """``fn`` as a forward hook of hook point ``name`` (``prepend``: before the hooks already there);
    returns the handle.

    The engine's hooks are plain PyTorch forward hooks (TransformerLens's ``add_hook`` wrapper costs Python
    time on every call), so they see a TransformerBridge hook point's raw tensor, not the one its
    ``hook_conversion`` shows TransformerLens hooks. The attention hooks handle the raw layouts; at the
    residual-stream hook points a conversion restores ``[batch, pos, d_model]`` where the model flattens
    tokens (OPT runs its MLP on ``[batch * pos, d_model]``), so the engine applies it there as
    TransformerLens would, and reverts what the hook returns."""
    hp = _hook_point(model, name)
    conv = getattr(hp, "hook_conversion", None)
    if conv is None or name.rsplit(".", 1)[-1] not in _RESIDUAL_HOOKS:
        return hp.register_forward_hook(fn, prepend=prepend)

    def converted(module: Any, inp: Any, out: Any) -> Any:
        res = fn(module, inp, conv.convert(out))
        return None if res is None else conv.revert(res)

    return hp.register_forward_hook(converted, prepend=prepend)


@contextlib.contextmanager
def _hooks_installed(model: Any, hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for name, fn in hooks:
            handles.append(_register(model, name, fn))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------------
# The mixing step, with a memory-light backward
# ------------------------------------------------------------------------------------------------------
class _Mix(torch.autograd.Function):
    """``mt @ buf`` where ``buf`` holds (detached) copies of the ``groups`` tensors, stacked.

    ``mt`` is ``[h, n]`` with ``buf`` ``[n, Y]``, or ``[C, h, n]`` (one matrix per circuit folded into the
    batch) with ``buf`` ``[n, C, X]``. The buffer is written in place as sources are computed, which
    autograd's saved-tensor checks would reject; the prefix a destination reads is never written again in
    the same forward, so the backward reads it safely and routes the gradient to the original
    (differentiable) ``groups``."""

    @staticmethod
    def forward(ctx: Any, mt: Tensor, buf: Tensor, *groups: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mt)
        ctx.buf = buf
        ctx.shapes = [g.shape for g in groups]
        if mt.ndim == 2:
            return mt @ buf
        return torch.bmm(mt, buf.transpose(0, 1))  # [C, h, X]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        (mt,) = ctx.saved_tensors
        buf = ctx.buf
        g_mt = None
        if ctx.needs_input_grad[0]:
            g_mt = grad @ buf.T if mt.ndim == 2 else torch.bmm(grad, buf.transpose(0, 1).transpose(1, 2))
        group_grads: list[Tensor | None] = [None] * len(ctx.shapes)
        if any(ctx.needs_input_grad[2:]) and bool(mt.any()):
            if mt.ndim == 2:
                g_buf = mt.T @ grad
            else:
                g_buf = torch.bmm(mt.transpose(1, 2), grad).transpose(0, 1).reshape(buf.shape[0], -1)
            sizes = [s[0] for s in ctx.shapes]
            group_grads = [g.reshape(s) for g, s in zip(g_buf.split(sizes), ctx.shapes)]
        return (g_mt, None, *group_grads)


def accumulate_probe(acc: Tensor, buf: Tensor, g: Tensor, idx: Tensor, slots: Tensor | None) -> None:
    """Attribution's contraction: ``acc[:n, idx] += sum over tokens of D_s . grad_h`` for the sources ``D``
    (``buf``, ``[n, b, p, m]``) and the destinations' input gradients ``g`` (``[b, p, h, m]``). Per position
    (``slots``, ``[b, p]`` slot of each token, -1: none; ``acc`` ``[n_slots, n_src, n_dest]``): each token's
    products go to its slot's scores, at the cost of the plain contraction."""
    n = buf.shape[0]
    h = g.shape[2]
    if slots is None:
        acc[:n, idx] += (buf.reshape(n, -1) @ g.permute(2, 0, 1, 3).reshape(h, -1).T).to(acc.dtype)
        return
    per_token = torch.einsum("nbpm,bphm->bpnh", buf, g.to(buf.dtype)).reshape(-1, n * h)  # [tokens, n*h]
    flat = slots.reshape(-1).to(per_token.device)
    keep = flat >= 0
    summed = per_token.new_zeros(acc.shape[0], n * h).index_add_(0, flat[keep], per_token[keep])
    acc[:, :n, idx] += summed.view(-1, n, h).to(acc.dtype)


class _Probe(torch.autograd.Function):
    """Identity in the forward; in the backward, accumulate ``grad . D`` into ``acc[:n, idx]``: the
    gradient of the metric w.r.t. the weights of these destinations' edges, at weights 1 (attribution);
    per position slot with ``slots`` (see :func:`accumulate_probe`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, acc: Tensor, buf: Tensor, idx: Tensor, n: int,  # type: ignore[override]
                slots: Tensor | None = None) -> Tensor:
        ctx.acc, ctx.buf, ctx.idx, ctx.n, ctx.slots = acc, buf, idx, n, slots
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        g = grad if grad.ndim == 4 else grad.unsqueeze(2)  # [b, p, h, m]
        accumulate_probe(ctx.acc, ctx.buf[: ctx.n], g, ctx.idx, ctx.slots)
        return grad, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# q/k/v projections of patched heads, without TransformerLens's split-input mode
# ------------------------------------------------------------------------------------------------------
_HT_NORMS = ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre", "Identity")
_BRIDGE_NORMS = ("NormalizationBridge", "RMSNormalizationBridge")
_BRIDGE_ATTENTION = ("AttentionBridge", "JointQKVAttentionBridge", "PositionEmbeddingsAttentionBridge",
                     "JointQKVPositionEmbeddingsAttentionBridge", "BloomAttentionBridge")
# Bridge attention classes whose forward takes batch and positions from the q/k/v projections, not from
# their input (see Projections.input_hooks).
_BRIDGE_SHAPE_FROM_QKV = ("JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge")
# Bridge attention classes that take batch and positions from their input but run each of q, k, v and the
# output projection through its own LinearBridge (q, k, v, o), whose input hooks then serve.
_BRIDGE_SEPARATE_QKV = ("PositionEmbeddingsAttentionBridge",)


class Projections:
    """How every layer turns its input residual into the q/k/v projections (the outputs of the
    ``hook_q/k/v`` hook points, before rotary embeddings and q/k norms): the layer's input normalization,
    then ``x @ W^h + b^h`` per head.

    The engine uses it to recompute only the heads whose inputs are patched, instead of switching on
    TransformerLens's split-input mode, which copies the residual and runs a normalization per head for
    *every* head (about 1.2x a plain forward on CPU by itself). The normalization is computed
    functionally from the module's parameters, so no hook of the model fires for the recomputation.
    :func:`projections_of` returns None for architectures where the hook outputs are not of that form
    (post-norm blocks, shortformer positions, 4-bit weights, unknown modules); the engine then falls
    back to the split-input mode, which is exact for any model TransformerLens supports."""

    def __init__(self, model: Any, bridge: bool) -> None:
        self.model = model
        self.bridge = bridge
        # Parameters fetched during the current forward (TransformerBridge builds W_Q & co. as new views
        # on every access, ~0.1 ms each, ~6 ms per forward of GPT-2 small); cleared at every forward.
        self.params: dict[tuple[int, str], Tensor | None] = {}

    def clear(self) -> None:
        self.params.clear()

    def _param(self, layer: int, name: str, fetch: Callable[[], Tensor | None]) -> Tensor | None:
        key = (layer, name)
        if key not in self.params:
            self.params[key] = fetch()
        return self.params[key]

    def norm(self, layer: int, x: Tensor) -> Tensor:
        """The layer's attention-input normalization over the last dimension, for any leading shape."""
        ln = self.model.blocks[layer].ln1
        m = x.shape[-1]
        dtype = x.dtype
        xf = x if dtype in (torch.float32, torch.float64) else x.float()
        if self.bridge:
            comp = ln.original_component
            if ln.use_native_layernorm_autograd or getattr(ln.config, "layer_norm_folding", False):
                return comp(x)
            # TransformerBridge's own normalization: float32, the affine map too, then the input's dtype
            eps = getattr(ln.config, "eps", 1e-5)
            w = ln.weight
            w = ((1.0 + w) if getattr(ln.config, "rmsnorm_uses_offset", False) else w).to(xf.dtype)
            if ln.uses_rms_norm:
                return F.rms_norm(xf, (m,), w, eps=eps).to(dtype)
            bias = getattr(comp, "bias", None)
            return F.layer_norm(xf, (m,), w, None if bias is None else bias.to(xf.dtype), eps=eps).to(dtype)
        name = type(ln).__name__
        if name == "Identity":
            return x
        w = ln.w if name in ("LayerNorm", "RMSNorm") else None
        b = ln.b if name == "LayerNorm" else None
        fused = xf is x  # float32/64: one kernel including the affine map (TransformerLens computes the
        # normalization in float32 and applies the affine map in the model's dtype: keep that order)
        if name.startswith("LayerNorm"):
            y = F.layer_norm(xf, (m,), w if fused else None, b if fused else None, eps=ln.eps)
        else:
            y = F.rms_norm(xf, (m,), w if fused else None, eps=ln.eps)
        if fused:
            return y
        y = y.to(dtype)
        y = y * w if w is not None else y
        return y + b if b is not None else y

    def input_hooks(self, layer: int) -> tuple[str, ...]:
        """The hook points that carry the layer's normalized attention input to the q/k/v projections and
        nowhere else that needs its positions (so hooks there may return the input with no positions, and
        the model's projections do no work); none where there are no such hook points. See
        :meth:`_Engine._make_input_hook`."""
        block = self.model.blocks[layer]
        if self.bridge:
            attn = block.attn
            kind = type(attn).__name__
            if kind in _BRIDGE_SHAPE_FROM_QKV and hasattr(attn, "hook_in"):
                return (f"blocks.{layer}.attn.hook_in",)
            if kind in _BRIDGE_SEPARATE_QKV and all(hasattr(getattr(attn, c, None), "hook_in") for c in "qkv"):
                return tuple(f"blocks.{layer}.attn.{c}.hook_in" for c in "qkv")
            return ()
        # HookedTransformer: ln1 runs once for each of q, k and v; its hook_normalized feeds the projection
        return (f"blocks.{layer}.ln1.hook_normalized",) if hasattr(block.ln1, "hook_normalized") else ()

    def output_hooks(self, layer: int) -> tuple[str, str, tuple[str, ...]] | None:
        """``(z, attention output, in between)``: the hook points of the per-head values ``z``, of the
        attention output ``sum_h z_h W_O^h + b_O`` as the residual stream receives it, and those that fire
        between the two. Where the attention output is exactly that sum (no normalization after the
        attention, no per-head result hook), a hook at ``z`` may return ``z`` with no positions, so that
        the model's output projection does no work, and the hook at the output returns the sum; None
        elsewhere. See :meth:`_Engine._make_z_hook`."""
        block = self.model.blocks[layer]
        cfg = self.model.cfg
        z = f"blocks.{layer}.attn.hook_z"
        if residual_scale(self.model, layer) != 1:  # (the block scales the attention output after it)
            return None
        if self.bridge:
            attn = block.attn
            if (type(attn).__name__ not in _BRIDGE_SHAPE_FROM_QKV + _BRIDGE_SEPARATE_QKV
                    or getattr(cfg, "use_attn_result", False) or not hasattr(attn, "hook_out")):
                return None
            between = [f"blocks.{layer}.attn.o.hook_out"] if hasattr(getattr(attn, "o", None), "hook_out") else []
            if hasattr(attn, "hook_hidden_states"):
                between.append(f"blocks.{layer}.attn.hook_hidden_states")
            return z, f"blocks.{layer}.attn.hook_out", tuple(between)
        if getattr(cfg, "use_normalization_before_and_after", False) or getattr(cfg, "use_attn_result", False):
            return None
        return z, f"blocks.{layer}.hook_attn_out", ()

    def weight(self, layer: int, kind: str, n_out: int) -> Tensor:
        """``W_Q`` / ``W_K`` / ``W_V`` as ``[n_out, d_model, d_head]`` (see :func:`projection_param`)."""
        W = self._param(layer, f"W{kind}", lambda: projection_param(self.model, layer, "W", kind, n_out))
        assert W is not None
        return W

    def bias(self, layer: int, kind: str, n_out: int) -> Tensor | None:
        return self._param(layer, f"b{kind}", lambda: projection_param(self.model, layer, "b", kind, n_out))

    def output(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The layer's ``W_O`` (``[head, d_head, d_model]``) and ``b_O``."""
        attn = self.model.blocks[layer].attn
        W_O = self._param(layer, "W_O", lambda: attn.W_O)
        assert W_O is not None
        return W_O, self._param(layer, "b_O", lambda: attn.b_O)


def projection_param(model: Any, layer: int, which: str, kind: str, n_out: int) -> Tensor | None:
    """``W_Q`` / ``b_Q`` (``which`` "W" / "b", ``kind`` q/k/v) of a layer with ``n_out`` heads first: the
    key/value heads for grouped-query attention (HookedTransformer's ``W_K`` repeats them over query
    heads; its ``_W_K`` does not). None for an absent bias."""
    attn = model.blocks[layer].attn
    name = f"{which}_{kind.upper()}"
    t = getattr(attn, name, None)
    if t is not None and t.shape[0] != n_out:
        raw = getattr(attn, f"_{name}", None)
        t = raw if raw is not None and raw.shape[0] == n_out else t[:: t.shape[0] // n_out]
    return t


def projections_of(model: Any) -> Projections | None:
    """A :class:`Projections` for ``model``, or None when its q/k/v hook outputs are not
    ``norm1(resid) @ W + b`` per head (see the class docstring)."""
    cfg = model.cfg
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return None
    if is_post_norm(model):
        return None
    if getattr(cfg, "positional_embedding_type", "") == "shortformer" or getattr(cfg, "load_in_4bit", False):
        return None
    bridge = hasattr(model, "original_model")
    for block in blocks:
        ln = getattr(block, "ln1", None)
        if ln is None:
            return None
        if bridge:
            attn = block.attn
            hf_attn = getattr(attn, "original_component", None)
            if (type(ln).__name__ not in _BRIDGE_NORMS or ln.original_component is None
                    or type(attn).__name__ not in _BRIDGE_ATTENTION or getattr(attn.config, "gated_q_proj", False)
                    or getattr(hf_attn, "key_multiplier", None) is not None):
                return None
        elif type(ln).__name__ not in _HT_NORMS:
            return None
    return Projections(model, bridge)


class _Engine:
    """One patching configuration's hooks; the per-forward state lives here between hooks."""

    def __init__(
        self,
        model: Any,
        graph: Graph,
        weight_fn: Callable[[], Tensor],
        ablation: Ablation,
        slots: Tensor | None,
        proj: Projections | None = None,
    ) -> None:
        self.model = model
        self.proj = proj  # recompute patched heads' q/k/v projections (None: split-input mode)
        self.graph = graph
        self.g = graph.engine_graph
        self.weight_fn = weight_fn
        self.abl = ablation.values
        self.abl_kind = ablation.kind
        self.abl_proj = ablation.projections  # the corrupted run's q/k/v (projection mode), or None
        self.slots = slots  # per-token weight slots [batch, pos] (per-position weights) or None
        self.probe: Tensor | None = None  # attribution: scores accumulator [n_src, n_dest] (or [slots, ...])
        self.probe_slots: Tensor | None = None  # attribution per position: each token's slot [batch, pos]
        self.n_circuits = 0
        self.plan = dest_groups(graph)
        # The residual stream receives a normalization of the heads' sum (Gemma 2/3): heads do not cancel.
        # Nor does a destination whose every incoming weight is 0 then read its corrupted-run input (where
        # some upstream head differs from its ablated value, the residual stream minus the differences of the
        # recorded head outputs is not the corrupted run's): no corrupted-run shortcuts for it.
        self.heads_add_up = not normalizes_attention_output(model)
        self.handles: list[Any] = []
        self.hook_specs: list[tuple[str, Callable]] | None = None  # default: hook_list()
        self._reset()

    def _reset(self) -> None:
        # this forward is over: its scratch buffers may serve the next one (within keep_buffer's cap on
        # what a model holds while idle: a notebook would keep it for good)
        for name, store in getattr(self, "stores", {}).items():
            keep_buffer(self.model, name, store)
        self.stores: dict[str, Tensor] = {}  # scratch buffers this forward took (see _scratch)
        if self.proj is not None:
            self.proj.clear()
        self.W: Tensor | None = None
        self._Wc: Tensor | None = None  # self.W on the CPU, for decisions (see _wc)
        self.buf: Tensor | None = None
        self.source_major = False  # no gradient, off the CPU: the buffer is [n_src, batch, pos, d_model] (see _start)
        self.groups: list[tuple[int, Tensor]] = []
        self.filled = 0
        self.inactive = False  # no destination changes in this forward: skip all work
        self.sparse = False  # no gradient needed: gather only the sources a hook uses
        self.tok_slot: Tensor | None = None  # no gradient, per position: each token's slot of W, flattened
        self.tok_slot_c: Tensor | None = None  # the same on the CPU (for decisions)
        self.row_slots = self.slots  # per position: each batch row's token slots (circuits folded: their table)
        self.circuit_slots = 0  # per-position circuits folded into the batch: slots per circuit (W's are c*S + s)
        self.prefix_sums: dict[int, Tensor] = {}  # n -> sum of D[:n] (sparse mode, for the additive form; lazy)
        self.resid: dict[int, Tensor] = {}  # projection mode: each layer's input residual
        self.pending: dict[int, dict[str, tuple[Tensor, Tensor, int]]] = {}  # layer -> kind -> (heads, q/k/v, H)
        self.owned: set[int] = set()  # layers whose q/k/v the engine computes for all heads (not the model)
        self.partials: dict[int, tuple[Tensor, Tensor, int]] = {}  # MLP / logits dest -> (partial input, r, n)
        self.attn_out: dict[int, Tensor] = {}  # layer -> attention output computed from the head outputs
        self.summed: set[int] = set()  # layers whose attention output came from attn_out (not the model)
        self.mlp_skip: dict[int, Tensor | None] = {}  # layer -> per circuit, MLP output taken as ablated
        self.mlp_short: dict[int, Tensor] = {}  # layer -> the skip of an MLP that ran on fewer rows

    # -- decisions on the CPU, arithmetic on the model's device -------------------------------------------
    # Which heads to mix, project, take from the cache or skip depends on the weights' values. On a GPU,
    # reading a value (bool(), nonzero(), an index moved with a blocking copy) waits for every kernel
    # queued so far: hundreds of such waits per forward left the GPU idle most of the time (GPT-2 small,
    # 32 x 128 tokens on an H100: patched / plain forward 7x). So the weights are copied to the CPU once
    # per forward (:meth:`_wc`, nothing to copy when they are there already), every decision reads that
    # copy, and the indices it yields go to the device without waiting (:meth:`_on`).
    def _wc(self) -> Tensor:
        """The forward's weights (:attr:`W`, in the model's dtype) on the CPU."""
        if self._Wc is None:
            assert self.W is not None
            self._Wc = self.W.detach().cpu()
        return self._Wc

    def _on(self, t: Tensor, device: Any = None) -> Tensor:
        """A CPU tensor (indices) on the model's device, copied without waiting for the device's queue."""
        device = self.buf.device if device is None and self.buf is not None else device
        if device is None or t.device == device:
            return t
        return t.to(device, non_blocking=True)

    # -- hooks -----------------------------------------------------------------------------------------
    def hook_list(self) -> list[tuple[str, Callable]]:
        hooks = _source_hooks(self.model, self.g, self._sink, skip=lambda: self.inactive)
        # The input hook must also start a new forward: wrap it.
        name0, fn0 = hooks[0]

        def on_input(module: Any, inp: Any, out: Tensor) -> None:
            self._start(out)
            fn0(module, inp, out)
            if self.proj is not None and not self.inactive:
                self.resid[0] = out

        hooks[0] = (name0, on_input)
        if self.proj is not None:
            for i, (name, _) in enumerate(hooks):
                if name.endswith(".attn.hook_z"):
                    layer = int(name.split(".")[1])
                    names = self.proj.output_hooks(layer)
                    if names is not None:
                        hooks[i] = (name, self._make_z_hook(layer, names[2]))
                        hooks.append((names[1], self._make_attn_out_hook(layer)))
        for i, (name, fn) in enumerate(hooks):
            if name.endswith((".hook_mlp_out", ".mlp.hook_out")):  # (see mlp_out_hook)
                hooks[i] = (name, self._make_mlp_out_hook(int(name.split(".")[1]), fn))
        attn: dict[int, list[tuple[str, Tensor, int]]] = {}
        self.deferred: dict[int, list[tuple[int, int]]] = {}  # layer -> [(MLP / logits destination, n)]
        self.mlp_dest: dict[int, tuple[int, int]] = {}  # layer -> (MLP destination, n)
        for name, idx, n in self.plan:
            if self.proj is not None and name.endswith(("q_input", "k_input", "v_input")):
                attn.setdefault(int(name.split(".")[1]), []).append((name.split("hook_")[1][0], idx, n))
            else:
                if self.proj is not None:
                    self.deferred.setdefault(int(name.split(".")[1]), []).append((int(idx[0]), n))
                hook = self._make_dest_hook(idx, n)
                if name.endswith(".hook_mlp_in"):
                    layer = int(name.split(".")[1])
                    self.mlp_dest[layer] = (int(idx[0]), n)
                    hook = self._make_mlp_in_hook(layer, hook)
                hooks.append((name, hook))
        self.attn_plan = {layer: (groups, torch.cat([idx for _, idx, _ in groups])) for layer, groups in attn.items()}
        for layer, groups in attn.items():
            if layer > 0:
                def on_resid(module: Any, inp: Any, out: Tensor, layer: int = layer) -> None:
                    if not self.inactive:
                        self.resid[layer] = out

                hooks.append((f"blocks.{layer}.hook_resid_pre", on_resid))
            for kind, _, _ in groups:
                hooks.append((f"blocks.{layer}.attn.hook_{kind}", self._make_proj_hook(layer, kind)))
            names = self.proj.input_hooks(layer) if self.proj is not None else ()
            for name in names:
                hooks.append((name, self._make_input_hook(layer, names)))
        return hooks

    def install(self) -> None:
        if self.hook_specs is None:
            self.hook_specs = self.hook_list()
        fired = [False] * len(self.hook_specs)
        final = self.plan[-1][0]  # the logits' hook: the last of a forward
        # Where a destination reads, the engine's hook puts the patched value in place before any other hook
        # there (a user's, also one added later): that hook sees, and may change, what the destination
        # receives in the patched forward. Where a source writes (and where the engine reads the residual
        # stream), the engine's hook runs after every other: what they change is the source's output. Hooks
        # added later (run_with_hooks inside patch) would run after it, so at the start of every forward a
        # pre-hook at the model's input hook point (the first the engine has; TransformerLens's run_with_hooks
        # calls forward() itself, past any hook on the model) moves the engine's reading hooks back to the end.
        dests = {name for name, _, _ in self.plan}
        last = []
        for i, (name, fn) in enumerate(self.hook_specs):
            front = name in dests or name.endswith((".attn.hook_q", ".attn.hook_k", ".attn.hook_v"))
            handle = _register(self.model, name, self._watched(fn, fired, i, name == final), front)
            self.handles.append(handle)
            if not front:
                last.append((handle.hooks_dict_ref, handle.id))

        def readers_last(module: Any, args: Any) -> None:
            for ref, key in last:
                hooks = ref()
                if hooks is not None and len(hooks) > 1 and next(reversed(hooks)) != key:
                    hooks.move_to_end(key)

        self.handles.append(_hook_point(self.model, self.hook_specs[0][0]).register_forward_pre_hook(readers_last))

    def _watched(self, fn: Callable, fired: list[bool], i: int, final: bool) -> Callable:
        """``fn``, noting that hook ``i`` fired in this forward; the first hook (the model's input) starts a
        forward, the logits' hook checks that every other hook fired before it. A hook point the model never
        runs (as TransformerBridge did not run ``hook_mlp_in`` in Bloom's and some parallel blocks) would
        leave its destinations unpatched or its sources unrecorded: an error, not a silently wrong result."""
        def hook(module: Any, inp: Any, out: Any) -> Any:
            if i == 0:
                fired[:] = [False] * len(fired)
            elif final and (missing := self._missing(fired, i)):
                raise EdgepatchError(
                    f"patch: the model ran no hook at {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                    f"in this forward, so edgepatch could not patch or record what passes there; the result "
                    f"would be wrong. {_unusual_blocks(self.model)}"
                )
            fired[i] = True
            return fn(module, inp, out)

        return hook

    def _missing(self, fired: list[bool], final: int) -> list[str]:
        """The hooks that did not fire before the logits' hook, except split q/k/v inputs while that mode is
        off (``patch`` leaves it off where no attention input is patched: those hooks have nothing to do).
        The mode is read now, not at install: a suspended outer patch is reinstalled while the inner one's
        flags still hold."""
        split = bool(getattr(self.model.cfg, "use_split_qkv_input", False))
        return [name for j, (name, _) in enumerate(self.hook_specs or ()) if j != final and not fired[j]
                and (split or not name.endswith(("hook_q_input", "hook_k_input", "hook_v_input")))]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._reset()

    # -- per forward -----------------------------------------------------------------------------------
    def _start(self, x: Tensor) -> None:
        self._reset()
        b, p, m = x.shape
        ab, ap = self.abl.shape[1], self.abl.shape[2]
        W = self.graph.expand(self.weight_fn())
        # the weights on the CPU for decisions (see _wc): the caller's where they are there, no copy back
        host = W.detach().to(x.dtype) if W.device.type == "cpu" else None
        W = W.to(x.device, x.dtype, non_blocking=True)
        may_fold = self.slots is None or W.ndim == 4  # circuits folded into the batch
        if (ab not in (1, b) and not (b % ab == 0 and may_fold)) or (ap not in (1, p)):
            raise EdgepatchError(
                f"patch: the ablated activations have batch x pos = {ab} x {ap} (the corrupted tokens' shape), "
                f"but the model is now run on tokens of shape [{b}, {p}]. Clean and corrupted tokens must have "
                f"the same shape: pad both to the same length (PromptPairs does this), or use mean/zero "
                f"ablation, which broadcasts."
            )
        if self.abl.device != x.device or self.abl.dtype != x.dtype:
            self.abl = self.abl.to(x.device, x.dtype)
        self.n_circuits = 0
        if self.slots is not None and W.ndim == 4:
            W = self._fold_slot_circuits(W, b, p)
            host = host.reshape(W.shape) if host is not None else None
        elif self.slots is None and W.ndim == 3:
            c = W.shape[0]
            if b % c:
                raise EdgepatchError(
                    f"patch: weights hold {c} circuits ([C, n_src, n_dest]) but the batch has {b} rows, not a "
                    f"multiple of {c}. Fold the circuits into the batch: tokens.repeat({c}, 1) runs every prompt "
                    f"under every circuit (rows c*batch .. (c+1)*batch-1 use circuit c)."
                )
            self.n_circuits = c
        if self.n_circuits:  # (edge or per-position circuits folded into the batch)
            c = self.n_circuits
            if ab not in (1, b // c):
                raise EdgepatchError(
                    f"patch: the ablated activations have batch {ab}, but the batch holds {c} circuits x "
                    f"{b // c} prompts; compute the ablation on the {b // c} unrepeated prompts."
                )
        elif ab not in (1, b):
            raise EdgepatchError(
                f"patch: the ablated activations have batch x pos = {ab} x {ap} (the corrupted tokens' shape), "
                f"but the model is now run on tokens of shape [{b}, {p}]. Clean and corrupted tokens must have "
                f"the same shape: pad both to the same length (PromptPairs does this), or use mean/zero "
                f"ablation, which broadcasts."
            )
        if self.row_slots is not None:
            if tuple(self.row_slots.shape) != (b, p):
                raise EdgepatchError(
                    f"patch: positions has shape {shape_str(self.slots.shape)} but the model is run on tokens of "
                    f"shape [{b}, {p}]; give one position slot per token (or -1 to leave a token unpatched)."
                )
        self.W = W
        self._Wc = host
        self.batch = b
        self.cache: dict[str, Tensor] | None = None
        if (self.proj is not None and self.abl_proj is not None and not W.requires_grad
                and self.heads_add_up):  # (see __init__)
            some = next(iter(self.abl_proj.values()))
            if some.shape[1] == p and some.shape[0] * max(self.n_circuits, 1) == b:
                if some.device != x.device or some.dtype != x.dtype:
                    self.abl_proj = {k: v.to(x.device, x.dtype) for k, v in self.abl_proj.items()}
                self.cache = self.abl_proj
        needs_grad = torch.is_grad_enabled() and (W.requires_grad or x.requires_grad or self.abl.requires_grad)
        if not needs_grad and self.probe is None:
            if bool((self._wc()[..., self.g.valid] == 1).all()):
                self.inactive = True  # all edges kept (in every slot): the plain forward, nothing to record
                return
            self.sparse = True
            if self.row_slots is not None:
                # per position: each token mixes with its slot's weights; an unpatched token (-1) gets a
                # slot of ones of its own
                slots = self.row_slots.cpu()
                if bool((slots < 0).any()):
                    self.W = W = torch.cat([W, W.new_ones(1, *W.shape[1:])])
                    if self._Wc is not None:
                        self._Wc = torch.cat([self._Wc, self._Wc.new_ones(1, *W.shape[1:])])
                    slots = torch.where(slots < 0, W.shape[0] - 1, slots)
                self.tok_slot_c = slots.reshape(-1)
                self.tok_slot = self.tok_slot_c.to(x.device, non_blocking=True)
            self.prefix_sums[0] = x.new_zeros(b, p, m)
            if (x.device.type != "cpu" or _SOURCE_MAJOR_ON_CPU) and self.tok_slot is None:
                # source-major storage on a GPU: a layer's mixing is then one matrix product
                # [h, k] @ [k, batch*pos*d_model] (see _mixed_source_major)
                self.source_major = True
                self.buf = x.new_empty(self.g.n_src, b, p, m)
                return
            # token-major storage: the mixing products are then one batched product per token
            # ([h, k] @ [k, d_model]), about twice as fast on CPU as one [h, k] @ [k, batch*pos*d_model]
            self.buf = self._scratch("differences", x, (b, p, self.g.n_src, m)).permute(2, 0, 1, 3)
            return
        self.buf = x.new_empty(self.g.n_src, b, p, m)

    def _fold_slot_circuits(self, W: Tensor, b: int, p: int) -> Tensor:
        """``C`` per-position circuits (``W`` ``[C, S, n_src, n_dest]``) on the prompts of ``positions``
        repeated ``C`` times: the weights as ``C * S`` slots, circuit ``c``'s rows reading the slots
        ``c * S + slot`` (:attr:`row_slots`; -1 stays -1)."""
        assert self.slots is not None
        c, S = W.shape[:2]
        rows = self.slots.shape[0]
        if b != c * rows or self.slots.shape[1] != p:
            raise EdgepatchError(
                f"patch: weights hold {c} per-position circuits ([C, slots, n_src, n_dest]) and positions "
                f"{rows} prompts x {self.slots.shape[1]} tokens, but the model is run on tokens of shape [{b}, {p}]. "
                f"Run tokens.repeat({c}, 1): rows c*{rows} .. (c+1)*{rows}-1 use circuit c."
            )
        slots = self.slots.to(W.device)
        offsets = (torch.arange(c, device=W.device) * S).repeat_interleave(rows).view(-1, 1)
        rows_ = slots.repeat(c, 1)
        self.row_slots = torch.where(rows_ >= 0, rows_ + offsets, rows_)
        self.n_circuits = c
        self.circuit_slots = S
        return W.reshape(c * S, *W.shape[2:])

    def _scratch(self, name: str, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """An uninitialized buffer ``name`` of ``shape``, like ``x``, for a forward without gradients
        (nothing outside the forward keeps a reference to it; a later call with the same name in the same
        forward returns the same storage). On CPU it reuses the storage of an earlier forward on the same
        model: large allocations (the 60 MB difference buffer of GPT-2 small at 8 x 16 tokens) are mapped
        afresh by the C allocator every time and page-fault on their first write, about 30 ms per forward
        here, 5% of a patched forward. The storage goes back to the model's slot when the forward's state
        is reset."""
        need = math.prod(shape)
        if x.device.type != "cpu":  # the CUDA caching allocator already reuses memory
            return x.new_empty(shape)
        store = self.stores.get(name)
        if store is None or store.dtype != x.dtype or store.numel() < need:
            # (taken from the model's spares: a nested forward on the same model allocates its own)
            store = self.stores[name] = _take_storage(self.model, name, x, need)
        return store[:need].view(shape)

    def _sink(self, start: int, out: Tensor) -> None:
        if self.inactive:
            return
        if self.buf is None:
            raise EdgepatchError("patch: a source hook ran before the model's input hook; unsupported model.")
        n = out.shape[0]
        a = self.abl[start : start + n]
        if self.probe is not None or self.sparse:  # no gradient flows through D: write it in place
            dst = self.buf[start : start + n]
            with torch.no_grad():
                if self.n_circuits and a.shape[1] not in (1, out.shape[1]):
                    c = self.n_circuits
                    torch.sub(out.view(n, c, -1, *out.shape[2:]), a[:, None], out=dst.view(n, c, -1, *dst.shape[2:]))
                else:
                    torch.sub(out, a, out=dst)
            self.filled = max(self.filled, start + n)
            return
        if self.n_circuits and a.shape[1] not in (1, out.shape[1]):
            c = self.n_circuits
            diff = (out.view(n, c, -1, *out.shape[2:]) - a[:, None]).view(out.shape)
        else:
            diff = out - a
        if diff.shape[1:] != self.buf.shape[1:]:
            diff = diff.expand(n, *self.buf.shape[1:])
        with torch.no_grad():
            self.buf[start : start + n] = diff
        self.groups.append((start, diff))
        self.filled = max(self.filled, start + n)

    def _prefix_groups(self, n: int) -> list[Tensor]:
        out, covered = [], 0
        for start, t in sorted(self.groups, key=lambda st: st[0]):
            if start >= n:
                break
            if start != covered or start + t.shape[0] > n:
                raise EdgepatchError(
                    "patch: sources were computed in an unexpected order for this model; please report this "
                    "model's architecture to edgepatch."
                )
            out.append(t)
            covered += t.shape[0]
        if covered != n:
            raise EdgepatchError(f"patch: internal error, {covered} of {n} predecessor sources available.")
        return out

    def _make_dest_hook(self, idx: Tensor, n: int) -> Callable:
        def hook(module: Any, inp: Any, x: Tensor) -> Tensor | None:
            W, buf = self.W, self.buf
            if self.inactive or W is None or buf is None:
                return None
            idx_d = self._on(idx)
            if self.probe is not None:
                return _Probe.apply(x, self.probe, buf[:n], idx_d, n, self.probe_slots)
            if self.sparse:
                partial = self.partials.pop(int(idx[0]), None)
                if partial is not None:
                    return self._finish_partial(x, W, idx, n, *partial)
                return self._sparse_mix(x, W, buf, idx, n)
            Wh = W[..., :n, :][..., idx_d]  # [n, h] / [C, n, h] / [slots, n, h]
            if not Wh.requires_grad and not bool((self._wc()[..., :n, :][..., idx] != 1).any()):
                return None
            corr = self._dense_corr(Wh, n)
            if x.ndim == 3:
                corr = corr[:, :, 0]
            return x - corr

        return hook

    # -- MLPs whose output is known -------------------------------------------------------------------
    def _mlp_skipped(self, layer: int) -> Tensor | None:
        """Per circuit (one entry without circuits folded into the batch; per batch row with per-position
        weights), whether the layer's MLP output is not computed but taken as its ablated value ``â``; None
        where every circuit computes it. Without gradients, that is exact (to rounding) where

        - no destination reads the output (every outgoing weight 0): each destination subtracts all of
          ``o - â`` from the residual, so ``o`` cancels and ``â`` takes its place, whatever the ablation;
        - or every incoming weight is 0 and ``â`` comes from the corrupted run (``kind`` "corrupt"): the
          MLP then reads exactly its corrupted-run input, so it outputs ``â``. Not where heads do not add
          up (Gemma 2/3): there the residual stream minus the heads' differences is not the corrupted run's.

        Sweeps meet these in most small circuits (GPT-2 small, the 10 log-spaced EAP circuits: 42 of
        108 MLP runs). Only where no other hook watches the MLP's hook points, which would see fewer rows."""
        if layer in self.mlp_skip:
            return self.mlp_skip[layer]
        skip = None
        if self.sparse and self.W is not None and layer in self.mlp_dest:
            W = self._wc()
            d, n = self.mlp_dest[layer]
            silent = self._unread(W, self.g.mlp_src_index(layer))  # no destination reads the output
            if self.abl_kind == "corrupt" and self.heads_add_up:
                Wc = W if W.ndim == 3 else W.unsqueeze(0)
                silent |= (Wc[:, :n, d] == 0).all(-1)  # the corrupted-run input: the corrupted output
            if self.tok_slot_c is not None:  # per position: batch rows whose every token's slot is silent
                silent = silent[self.tok_slot_c].view(self.batch, -1).all(1)
            skip = silent if bool(silent.any()) and self._mlp_alone(layer) else None
        self.mlp_skip[layer] = skip
        return skip

    def _mlp_skipped_everywhere(self, layer_of_dest: int, d: int) -> bool:
        """Whether destination ``d`` (deferred with layer ``layer_of_dest``) is an MLP input that no
        circuit computes (its partial input is then not needed)."""
        if self.mlp_dest.get(layer_of_dest, (None,))[0] != d:
            return False
        skip = self._mlp_skipped(layer_of_dest)
        return skip is not None and bool(skip.all())

    def _mlp_alone(self, layer: int) -> bool:
        """No hook but the engine's on the MLP's input and output hook points, and none at all on the
        modules of its normalizations and of the MLP (they would see the shortened batch), except
        TransformerBridge's own, which feeds the normalization from ``hook_mlp_in``, and edgepatch's, which
        fire ``hook_mlp_in`` where TransformerBridge does not (:func:`_capture_bridge_mlp_inputs`)."""
        from transformer_lens.hook_points import HookPoint

        block = self.model.blocks[layer]
        if not _alone(_hook_point(self.model, f"blocks.{layer}.hook_mlp_in"), 1):
            return False
        out = _hook_point(self.model, mlp_out_hook(self.model, layer))
        scaled_out = getattr(block, "hook_mlp_out", None)  # a scaled block's own (see mlp_out_hook)
        if scaled_out is not None and scaled_out is not out and not _alone(scaled_out, 0):
            return False
        # TransformerBridge's own capture hooks, and ours that fire hook_mlp_in (_capture_bridge_mlp_inputs)
        bridge_own = {h.id for h in getattr(block, "_capture_hook_handles", ())} | \
            {h.id for h in _slot(self.model).mlp_capture}
        if getattr(block, "mlp", None) is None:
            return False
        for part in ("ln2", "mlp", "ln2_post"):  # ln2_post: Gemma 2's normalization of the MLP output
            module = getattr(block, part, None)
            for m in (() if module is None else module.modules()):
                if isinstance(m, HookPoint):
                    if m is not out and not _alone(m, 0):
                        return False
                elif (set(m._forward_hooks) | set(m._forward_pre_hooks)) - bridge_own or m._backward_hooks \
                        or m._backward_pre_hooks:
                    return False
        return _alone(out, 1)

    def _make_mlp_in_hook(self, layer: int, patched: Callable) -> Callable:
        """The MLP input's destination hook (``patched``), which passes the MLP only the rows of the
        circuits that compute it (see :meth:`_mlp_skipped`); :meth:`_make_mlp_out_hook` puts the rest
        back."""
        def hook(module: Any, inp: Any, x: Tensor) -> Tensor | None:
            skip = None if self.inactive else self._mlp_skipped(layer)
            if skip is None:
                return patched(module, inp, x)
            self.mlp_short[layer] = skip
            if bool(skip.all()):
                self.partials.pop(self.mlp_dest[layer][0], None)
                return x[:0]
            y = patched(module, inp, x)
            y = x if y is None else y
            keep = (~skip).repeat_interleave(y.shape[0] // len(skip)).nonzero().flatten()  # batch rows
            lo, hi = int(keep[0]), int(keep[-1]) + 1
            return y[lo:hi] if hi - lo == len(keep) else y.index_select(0, self._on(keep, y.device))

        return hook

    def _make_mlp_out_hook(self, layer: int, record: Callable) -> Callable:
        """The MLP's source hook (``record``, which reports ``o - â``), after filling in the rows the MLP
        did not run on with the ablated output ``â`` (see :meth:`_mlp_skipped`)."""
        src = self.g.mlp_src_index(layer)
        scale = residual_scale(self.model, layer)

        def hook(module: Any, inp: Any, out: Tensor) -> Tensor | None:
            skip = self.mlp_short.pop(layer, None)
            if skip is None:
                record(module, inp, out)
                return None
            b = self.batch
            rows = skip.repeat_interleave(b // len(skip))  # batch rows the MLP did not run on (CPU)
            full = out.new_empty(b, *out.shape[1:])
            if out.shape[0]:
                full.index_copy_(0, self._on((~rows).nonzero().flatten(), out.device), out)
            a = self.abl[src]  # [ab, ap, d_model]: a circuit's or slot's row i is prompt i % ab
            if scale != 1:  # (the MLP's own output, which its block scales: see mlp_out_hook)
                a = a / scale
            a = a.expand(a.shape[0], *out.shape[1:])
            idx = rows.nonzero().flatten()
            full.index_copy_(0, self._on(idx, out.device),
                             a.index_select(0, self._on(idx % a.shape[0], out.device)).to(out.dtype))
            record(module, inp, full)
            return full

        return hook

    # -- projection mode: attention destinations -------------------------------------------------------
    def _make_z_hook(self, layer: int, between: tuple[str, ...]) -> Callable:
        """The source hook of the layer's heads (at ``hook_z``): record their outputs ``z_h W_O^h``.
        Their sum plus ``b_O`` is the attention output: keep it for the output hook and pass the model's
        output projection ``z`` with no positions, so that it does no work (not when another hook watches
        ``z`` or the hook points up to the attention output, see :meth:`Projections.output_hooks`)."""
        start = self.graph.engine_graph.head_src_slice(layer).start
        watched = [_hook_point(self.model, name) for name in between]

        def hook(module: Any, inp: Any, z: Tensor) -> Tensor | None:
            if self.inactive:
                return None
            assert self.proj is not None
            W_O, b_O = self.proj.output(layer)
            # no gradient: into one scratch buffer for every layer (nothing keeps the outputs)
            shape = (W_O.shape[0], *z.shape[:2], W_O.shape[2])
            scratch = self._scratch("head outputs", z, shape) if self.sparse else None
            ours = _alone(module, 1) and all(_alone(w, 0) for w in watched)  # the attention output too
            # heads nobody reads: their outputs cancel, so the ablated ones stand in (the residual stream
            # must then receive those too: only where the engine computes the attention output)
            silent = self._silent_heads(layer) if self.sparse and ours else None
            if silent is None:
                outs = head_outputs(self.model, layer, z, W_O, out=scratch)
            else:
                outs = self._some_head_outputs(layer, z, W_O, silent, scratch)
            self._sink(start, outs)
            if not ours:
                return None
            total = outs.sum(0)
            self.attn_out[layer] = total + b_O.to(total.dtype) if b_O is not None else total
            self.summed.add(layer)
            return z[:, :0]

        return hook

    def _silent_heads(self, layer: int) -> Tensor | None:
        """The layer's heads that no destination reads in any circuit of the batch (every outgoing weight
        0), as indices; None where there are none. Their outputs cancel out of every destination's input
        (see :meth:`_mlp_skipped`), so they are not computed: the ablated outputs stand in for them. Not
        where the attention output is normalized before the residual stream adds it: the residual stream
        would then change, not cancel."""
        if self.W is None or not self.heads_add_up:
            return None
        silent = self._unread(self._wc(), self.g.head_src_slice(layer)).all(0)  # [H]
        return silent.nonzero().flatten() if bool(silent.any()) else None

    def _unread(self, W: Tensor, src: int | slice) -> Tensor:
        """Per circuit (``[circuits]``, or ``[circuits, sources]`` for a slice), whether no destination
        reads the sources ``src``: every outgoing weight 0 (``W``: the weights on the CPU)."""
        Wc = W if W.ndim == 3 else W.unsqueeze(0)
        return ((Wc[:, src] == 0) | ~self.g.valid[src]).all(-1)

    def _some_head_outputs(self, layer: int, z: Tensor, W_O: Tensor, silent: Tensor, out: Tensor | None) -> Tensor:
        """:func:`head_outputs` with the ``silent`` heads' outputs replaced by their ablated values (any
        value would cancel; the ablated one makes their differences for the buffer exactly 0)."""
        h, k, m = W_O.shape
        b, p = z.shape[:2]
        outs = out if out is not None else z.new_empty(h, b, p, m)
        keep = torch.ones(h, dtype=torch.bool)
        keep[silent] = False
        need = keep.nonzero().flatten()
        a = self.abl[self.g.head_src_slice(layer)]  # [H, ab, ap, m]
        for i in silent.tolist():
            _put_ablated(outs[i], a[i])
        if need.numel():
            need = self._on(need, z.device)
            zh = z.reshape(b * p, h, k).index_select(1, need).transpose(0, 1)  # [need, b*p, d_head]
            vals = torch.bmm(zh, W_O.index_select(0, need).to(z.dtype))
            outs.view(h, b * p, m).index_copy_(0, need, vals)
        return outs

    def _make_attn_out_hook(self, layer: int) -> Callable:
        def hook(module: Any, inp: Any, out: Tensor) -> Tensor | None:
            total = self.attn_out.pop(layer, None)
            return None if total is None else total.to(out.dtype)

        return hook

    def _make_input_hook(self, layer: int, names: tuple[str, ...]) -> Callable:
        """At the layer's attention input (:meth:`Projections.input_hooks`, one or more hook points
        ``names``): compute the layer's q/k/v. When the engine computes them for every head
        (:meth:`_project_layer`), pass the model's own projections an input with no positions, so that they
        cost nothing; the q/k/v hooks then return the engine's values. Not when another hook watches one
        of these hook points (its user would see no positions): the model's projections then run as usual
        and only patched heads are replaced."""
        def hook(module: Any, inp: Any, out: Tensor) -> Tensor | None:
            if self.inactive or self.W is None or self.buf is None:
                return None
            if layer not in self.pending:
                own = all(_alone(_hook_point(self.model, name), 1) for name in names)
                self.pending[layer] = self._project_layer(layer, own=own)
            return out[:, :0] if layer in self.owned else None

        return hook

    def _make_proj_hook(self, layer: int, kind: str) -> Callable:
        def hook(module: Any, inp: Any, out: Tensor) -> Tensor | None:
            if self.inactive or self.W is None or self.buf is None:
                return None
            pending = self.pending.get(layer)
            if pending is None:  # the layer's first q/k/v hook computes all three
                pending = self.pending[layer] = self._project_layer(layer)
            res = pending.pop(kind, None)
            if not pending:
                self.resid.pop(layer, None)
            if res is None:
                return None
            if layer in self.owned:
                heads, vals, h = res
                _check_heads(out.unflatten(-1, (-1, vals.shape[-1])) if out.ndim == 3 else out, h)
                return (vals.flatten(-2) if out.ndim == 3 else vals).to(out.dtype)
            heads, vals, h = res
            return _put_heads(out, self._on(heads, out.device), vals, h)

        return hook

    def _project_layer(self, layer: int, own: bool = False) -> dict[str, tuple[Tensor, Tensor, int]]:
        """q/k/v projections of the layer's heads whose inputs differ from the unpatched residual:
        ``norm(x_h) @ W^h + b^h`` with ``x_h = r - sum_s (1 - w_sh) D_s``, one matrix product for all
        of the layer's destinations, one normalization, one batched projection per kind.

        With ``own`` (the model's own projections can be skipped, see :meth:`_make_input_hook`) and some
        head patched, the layer becomes :attr:`owned`: the unpatched heads are projected here too, from
        the residual, and every kind's entry holds all heads in order.

        Without gradients, the same product also computes the part of the layer's MLP input (and of the
        logits, after the last layer) that comes from the sources before the layer (:attr:`partials`),
        so those destinations do not read the whole buffer again."""
        W, buf = self.W, self.buf
        assert W is not None and buf is not None and self.proj is not None
        groups, cols = self.attn_plan[layer]
        n = groups[0][2]
        Wl = W[..., :n, :][..., self._on(cols)]  # [n, R] / [C, n, R] / [slots, n, R]
        mixed = zero_c = None  # per circuit (no gradient): the heads to mix, those fully ablated
        # (the heads chosen here, sel and cached, are indices on the CPU: see _wc)
        if W.requires_grad:
            sel = torch.arange(len(cols))  # the gradient at w = 1 is not zero
            cached = sel[:0]
        else:
            Wcl = self._wc()[..., :n, :][..., cols]
            flat = Wcl.reshape(-1, n, len(cols))
            need_c = flat.ne(1).any(1)  # [circuits, heads]
            # every edge ablated: the input is the corrupted run's, so is the projection
            zero_c = flat.eq(0).all(1) if self.cache is not None else torch.zeros_like(need_c)
            mixed = need_c & ~zero_c
            zero = zero_c.all(0)  # in every circuit
            sel = (need_c.any(0) & ~zero).nonzero().flatten()
            cached = zero.nonzero().flatten()
        deferred = []
        Wd = None  # the deferred destinations' weights
        if self.sparse:
            deferred = [(d, nd) for d, nd in self.deferred.get(layer, [])
                        if bool((self._wc()[..., :nd, d] != 1).any()) and not self._mlp_skipped_everywhere(layer, d)]
            if deferred:
                Wd = W[..., :n, :].index_select(-1, self._on(torch.tensor([d for d, _ in deferred])))
        r = self.resid[layer]
        if own and self.sparse and self.n_circuits > 1 and sel.numel() and mixed is not None:
            if self.circuit_slots:  # per-position circuits: what each circuit's slots patch
                C, S = self.n_circuits, self.circuit_slots
                assert zero_c is not None
                mixed = need_c[: C * S].view(C, S, -1).any(1)
                # every slot of the circuit ablates the input, and every token is in a slot: the corrupted one
                zero_c = zero_c[: C * S].view(C, S, -1).all(1)
                if W.shape[0] > C * S:  # the slot of ones appended for tokens in no slot (see _start)
                    zero_c = torch.zeros_like(zero_c)
                mixed &= ~zero_c
            # circuit by circuit costs more, smaller operations: only where it mixes a quarter less
            # (circuits that patch nearly the same heads, like ACDC's candidates once its circuit is sparse, do not)
            if 4 * int(mixed.sum()) <= 3 * self.n_circuits * sel.numel():
                self.owned.add(layer)
                return self._project_per_circuit(layer, groups, Wl, r, n, deferred, Wd, mixed, zero_c)
        out: dict[str, tuple[Tensor, Tensor, int]] = {}
        if cached.numel():
            self._cached_heads(layer, groups, cached, out)
        if sel.numel() == 0 and not deferred and not cached.numel():
            return out
        if own and (sel.numel() or cached.numel()):
            self.owned.add(layer)
            self._clean_heads(layer, groups, torch.cat([sel, cached]), r, out)
        if sel.numel() == 0 and not deferred:
            return self._in_order(out) if layer in self.owned else out
        Wh = Wl.index_select(-1, self._on(sel))
        if Wd is not None:
            Wh = torch.cat([Wh, Wd], dim=-1)
        R = sel.numel()
        spans = self._spans(groups, sel)
        b, p, m = r.shape
        hw = [self._head_weights(layer, kind, h, heads) for kind, h, _, _, heads in spans]
        if self.sparse and b * p > _CHUNK_TOKENS and not self.source_major:
            projected = self._mix_project_chunked(layer, r, Wh, n, R, spans, [W for W, _ in hw], deferred)
        else:
            y = self._head_inputs(r, Wh, n)  # [b, p, R, m]
            for i, (d, _) in enumerate(deferred):
                self.partials[d] = (y[:, :, R + i].clone(), r, n)
            if R == 0:
                return self._in_order(out) if layer in self.owned else out
            y = self.proj.norm(layer, y)  # (also normalizes the deferred columns, which are not used)
            projected = []
            for (_, _, lo, hi, _), (Wk, _) in zip(spans, hw):
                yk = y[:, :, lo:hi].reshape(b * p, hi - lo, m).transpose(0, 1)  # [R_k, b*p, m], a view
                projected.append(torch.bmm(yk, Wk.to(yk.dtype)))
        for (kind, h, _, _, heads), vals, (_, bk) in zip(spans, projected, hw):
            self._join_heads(kind, h, heads, vals, bk, (b, p), out)
        return self._in_order(out) if layer in self.owned else out

    @staticmethod
    def _spans(groups: list[tuple[str, Tensor, int]], sel: Tensor) -> list[tuple[str, int, int, int, Tensor]]:
        """For the mixed destinations ``sel`` (sorted, over the layer's q/k/v heads in ``groups`` order):
        ``(kind, h, lo, hi, heads)`` per kind with some, ``sel[lo:hi]`` being that kind's ``heads``."""
        spans = []
        start = 0
        for kind, idx, _ in groups:
            h = len(idx)
            lo = int(torch.searchsorted(sel, start))
            hi = int(torch.searchsorted(sel, start + h))
            if hi > lo:
                spans.append((kind, h, lo, hi, sel[lo:hi] - start))
            start += h
        return spans

    def _project_per_circuit(self, layer: int, groups: list[tuple[str, Tensor, int]], Wl: Tensor, r: Tensor, n: int,
                             deferred: list[tuple[int, int]], Wd: Tensor | None, mixed: Tensor,
                             zero: Tensor) -> dict[str, tuple[Tensor, Tensor, int]]:
        """:meth:`_project_layer` for an owned layer with circuits folded into the batch (no gradient),
        circuit by circuit: each mixes only the heads whose weights it patches (``mixed``, ``[C, heads]``);
        its other heads take the clean projection (weights all 1) or the corrupted run's (all 0,
        ``zero``). A sweep folds circuits of different sizes, where the union of what they patch mixes
        ~1.7x the inputs they need (GPT-2 small, the benchmark's EAP sweep). The deferred MLP / logits
        inputs (weights ``Wd``, ``[C, n, len(deferred)]``) are mixed with every circuit's heads, as in
        :meth:`_project_layer`."""
        b, p, m = r.shape
        C = self.n_circuits
        rows, per = b // C, b * p // C  # batch rows and tokens per circuit
        parts = [r.new_empty(b, p, m) for _ in deferred]
        pieces = []
        for c in range(C):
            rc = r[c * rows : (c + 1) * rows]
            sel, cached = mixed[c].nonzero().flatten(), zero[c].nonzero().flatten()
            out: dict[str, tuple[Tensor, Tensor, int]] = {}
            if cached.numel():
                self._cached_heads(layer, groups, cached, out, repeat=False)
            self._clean_heads(layer, groups, torch.cat([sel, cached]), rc, out)
            slotted = self.tok_slot is not None  # per position: every slot's weights, each token takes its own
            Wh = (Wl if slotted else Wl[c]).index_select(-1, self._on(sel))
            if Wd is not None:
                Wh = torch.cat([Wh, Wd if slotted else Wd[c]], dim=-1)
            if Wh.shape[-1]:
                spans = self._spans(groups, sel)
                hw = [self._head_weights(layer, kind, h, heads) for kind, h, _, _, heads in spans]
                projected = self._mix_project_chunked(layer, r, Wh, n, sel.numel(), spans, [W for W, _ in hw],
                                                      deferred, tokens=(c * per, (c + 1) * per), parts=parts)
                for (kind, h, _, _, heads), vals, (_, bk) in zip(spans, projected, hw):
                    self._join_heads(kind, h, heads, vals, bk, (rows, p), out)
            pieces.append(self._in_order(out))
        for i, (d, _) in enumerate(deferred):
            self.partials[d] = (parts[i], r, n)
        return {kind: (torch.arange(h), torch.cat([o[kind][1] for o in pieces]), h)
                for kind, (_, _, h) in pieces[0].items()}

    def _mix_project_chunked(self, layer: int, r: Tensor, Wh: Tensor, n: int, R: int,
                             spans: list[tuple[str, int, int, int, Tensor]], weights: list[Tensor],
                             deferred: list[tuple[int, int]], tokens: tuple[int, int] | None = None,
                             parts: list[Tensor] | None = None) -> list[Tensor]:
        """:meth:`_project_layer`'s mixing, normalization and projection (no gradient), token block by
        token block (at most ``_CHUNK_TOKENS``, within one circuit): the per-layer temporaries (the mixed
        inputs and their normalization, ``tokens x R x d_model``) then stay in the CPU caches and under the
        size the C allocator maps afresh for every allocation (page faults). GPT-2 small, batch 32 x 16,
        random weights: patched / plain forward 1.88 -> 1.49 (TransformerBridge), 1.75 -> 1.67
        (HookedTransformer); blocks of 64 tokens are slower again. Returns each span's projections
        ``[R_k, b*p, d_head]`` (no bias) and records the deferred partial inputs.

        ``tokens``: only the tokens ``t0:t1`` of the flattened batch x pos, all of one circuit, whose weights
        ``Wh`` then are (``[n, R']``); their projections are returned and their deferred inputs written into
        ``parts`` (recorded by the caller)."""
        assert self.proj is not None
        b, p, m = r.shape
        T = b * p
        per = T // max(self.n_circuits, 1)  # tokens per circuit
        flat_r = r.reshape(T, 1, m)
        own_parts = parts is None
        if parts is None:
            parts = [r.new_empty(b, p, m) for _ in deferred]
        weights = [W.to(r.dtype) for W in weights]
        pieces: list[list[Tensor]] = [[] for _ in spans]
        t0, end = tokens if tokens is not None else (0, T)
        step = _CHUNK_TOKENS if not self.source_major else T  # (a GPU takes the tokens at once)
        while t0 < end:
            c, within = divmod(t0, per)
            t1 = min(t0 + step, t0 - within + per)  # not past the circuit's last token
            Wc = Wh[c] if Wh.ndim == 3 and self.tok_slot is None else Wh
            y = self._mixed(flat_r[t0:t1], Wc, n, tokens=(t0, t1), scratch=True)[:, 0]  # [t, R', m]
            for i in range(len(deferred)):
                parts[i].view(T, m)[t0:t1] = y[:, R + i]
            if R:
                y = self.proj.norm(layer, y)
                for j, (_, _, lo, hi, _) in enumerate(spans):
                    pieces[j].append(torch.bmm(y[:, lo:hi].transpose(0, 1), weights[j]))  # [R_k, t, d_head]
            t0 = t1
        if own_parts:
            for i, (d, _) in enumerate(deferred):
                self.partials[d] = (parts[i], r, n)
        return [torch.cat(pc, dim=1) if len(pc) > 1 else pc[0] for pc in pieces]

    def _project_heads(self, layer: int, kind: str, h: int, heads: Tensor, xs: Tensor, bp: tuple[int, int],
                       out: dict[str, tuple[Tensor, Tensor, int]]) -> None:
        """``xs_j @ W^h + b^h`` for the ``heads`` of ``kind`` (of ``h``), from their normalized inputs ``xs``
        (``[len(heads), b*p, d_model]``), joined to the heads of ``kind`` already in ``out`` (from the
        cache, the residual or the mixed inputs)."""
        Wk, bk = self._head_weights(layer, kind, h, heads)
        self._join_heads(kind, h, heads, torch.bmm(xs, Wk.to(xs.dtype)), bk, bp, out)

    def _head_weights(self, layer: int, kind: str, h: int, heads: Tensor) -> tuple[Tensor, Tensor | None]:
        """``W`` ``[len(heads), d_model, d_head]`` and ``b`` of the ``heads`` of ``kind`` (of ``h``)."""
        assert self.proj is not None
        Wk = self.proj.weight(layer, kind, h)
        bk = self.proj.bias(layer, kind, h)
        if len(heads) != h:
            heads = self._on(heads, Wk.device)
            Wk = Wk.index_select(0, heads)
            bk = bk.index_select(0, heads) if bk is not None else None
        return Wk, bk

    def _join_heads(self, kind: str, h: int, heads: Tensor, vals: Tensor, bk: Tensor | None, bp: tuple[int, int],
                    out: dict[str, tuple[Tensor, Tensor, int]]) -> None:
        """Projections ``vals`` (``[len(heads), b*p, d_head]``, no bias) of the ``heads`` of ``kind``, plus
        the bias, joined to the heads of ``kind`` already in ``out``."""
        vals = vals.view(len(heads), *bp, -1).permute(1, 2, 0, 3)
        if bk is not None:
            vals = vals + bk.to(vals.dtype)
        if kind in out:
            heads, vals = torch.cat([out[kind][0], heads]), torch.cat([out[kind][1], vals], dim=2)
        out[kind] = (heads, vals, h)

    def _clean_heads(self, layer: int, groups: list[tuple[str, Tensor, int]], patched: Tensor, r: Tensor,
                     out: dict[str, tuple[Tensor, Tensor, int]]) -> None:
        """Owned layers: the projections of the heads not in ``patched``, from the unpatched residual."""
        assert self.proj is not None
        keep = torch.ones(sum(len(idx) for _, idx, _ in groups), dtype=torch.bool)
        keep[patched] = False
        if not bool(keep.any()):
            return
        rn = self.proj.norm(layer, r)
        b, p, m = rn.shape
        start = 0
        for kind, idx, _ in groups:
            h = len(idx)
            heads = keep[start : start + h].nonzero().flatten()
            start += h
            if heads.numel():
                self._project_heads(layer, kind, h, heads, rn.reshape(1, b * p, m).expand(len(heads), -1, -1),
                                    (b, p), out)

    def _in_order(self, out: dict[str, tuple[Tensor, Tensor, int]]) -> dict[str, tuple[Tensor, Tensor, int]]:
        """Owned layers: every kind's heads in order 0..H-1 (each kind's entry covers all its heads)."""
        for kind, (heads, vals, h) in out.items():
            if not bool((heads == torch.arange(h)).all()):
                vals = vals.index_select(2, self._on(torch.argsort(heads), vals.device))
            out[kind] = (heads, vals, h)
        return out

    def _cached_heads(self, layer: int, groups: list[tuple[str, Tensor, int]], cols: Tensor,
                      out: dict[str, tuple[Tensor, Tensor, int]], repeat: bool = True) -> None:
        """The corrupted run's projections of the fully ablated destinations ``cols`` (repeated over the
        circuits folded into the batch, unless ``repeat`` is False: for one circuit's rows)."""
        assert self.cache is not None
        start = 0
        for kind, idx, _ in groups:
            h = len(idx)
            heads = cols[(cols >= start) & (cols < start + h)] - start
            start += h
            if heads.numel():
                vals = self.cache[f"{layer}{kind}"]
                vals = vals.index_select(2, self._on(heads, vals.device))  # [b, p, k, d]
                if self.n_circuits > 1 and repeat:
                    vals = vals.repeat(self.n_circuits, 1, 1, 1)
                out[kind] = (heads, vals, h)

    def _finish_partial(self, x: Tensor, W: Tensor, idx: Tensor, nd: int, partial: Tensor, r: Tensor,
                        n: int) -> Tensor:
        """Complete a destination whose input from sources ``< n`` was computed with the attention
        destinations (:meth:`_project_layer`): ``x - r + partial - sum_{n <= s < nd} (1 - w_sd) D_s``
        (the same in the additive and the subtractive form)."""
        y = x - r + partial
        if nd == n:
            return y
        if not bool((self._wc()[..., n:nd, :][..., idx[0]] != 1).any()):
            return y
        Wr = 1 - W[..., n:nd, :][..., int(idx[0])]  # [k] or [C, k] (or [slots, k])
        k = nd - n
        if self.source_major:
            D = self.buf[n:nd].reshape(k, -1)  # type: ignore[index]  # [k, b*p*m], a view
            if Wr.ndim == 1:
                return y.sub_((Wr.view(1, k) @ D).view(y.shape))
            c = Wr.shape[0]  # circuits folded into the batch: circuit i has the rows i*b/c .. (i+1)*b/c - 1
            return y.sub_(torch.bmm(Wr.view(c, 1, k), D.view(k, c, -1).transpose(0, 1)).view(y.shape))
        store = self.buf.permute(1, 2, 0, 3)  # type: ignore[union-attr]
        b, p, _, m = store.shape
        D = store[:, :, n:nd]
        if self.tok_slot is not None:  # each token its slot's weights
            corr = torch.bmm(Wr[self.tok_slot].view(b * p, 1, k), D.reshape(b * p, k, m)).view(b, p, m)
        elif Wr.ndim == 1:
            corr = torch.matmul(Wr.view(1, k), D.reshape(b * p, k, m)).view(b, p, m)
        else:
            c = Wr.shape[0]
            corr = torch.matmul(Wr.view(c, 1, 1, k), D.reshape(c, -1, k, m)).view(b, p, m)
        return y.sub_(corr)

    def _head_inputs(self, r: Tensor, Wh: Tensor, n: int) -> Tensor:
        """``x_h = r - sum_{s<n} (1 - w_sh) D_s`` for the destinations of ``Wh`` (``[n, R]``,
        ``[C, n, R]`` with circuits, ``[slots, n, R]`` per position), as ``[batch, pos, R, d_model]``
        (without gradients, in the scratch buffer "mixed")."""
        if self.sparse:
            return self._mixed(r, Wh, n, scratch=True)
        return r.unsqueeze(2) - self._dense_corr(Wh, n)

    def _dense_corr(self, Wh: Tensor, n: int) -> Tensor:
        """``sum_{s<n} (1 - w_sh) D_s`` with gradients (to the weights and to the sources) or per-position
        weights, for the destinations of ``Wh`` (``[n, h]``, ``[C, n, h]`` with circuits folded into the
        batch, ``[slots, n, h]`` per position), as ``[batch, pos, h, d_model]``."""
        buf = self.buf
        assert buf is not None
        _, b, p, m = buf.shape
        groups = self._prefix_groups(n)
        if self.row_slots is not None:
            D = torch.cat(groups) if len(groups) > 1 else groups[0]  # [n, b, p, m]
            slots = self.row_slots.to(Wh.device)
            Wp = torch.cat([Wh, Wh.new_ones(1, n, Wh.shape[-1])])  # [S+1, n, h]
            mt = 1 - Wp[torch.where(slots < 0, Wp.shape[0] - 1, slots)]  # [b, p, n, h]
            return torch.einsum("bpnh,nbpm->bphm", mt, D)
        if Wh.ndim == 2:
            corr = _Mix.apply((1 - Wh).T.contiguous(), buf[:n].view(n, -1), *groups)  # [h, b*p*m]
            return corr.view(-1, b, p, m).permute(1, 2, 0, 3)
        c = Wh.shape[0]
        corr = _Mix.apply((1 - Wh).transpose(1, 2).contiguous(), buf[:n].view(n, c, -1), *groups)  # [C, h, X]
        return corr.view(c, -1, b // c, p, m).permute(0, 2, 3, 1, 4).reshape(b, p, -1, m)

    def _sparse_mix(self, x: Tensor, W: Tensor, buf: Tensor, idx: Tensor, n: int) -> Tensor | None:
        """A hook input's patched value without gradients (see :meth:`_sparse_rows`); ``idx`` on the CPU."""
        if not bool((self._wc()[..., :n, :][..., idx] != 1).any()):
            return None
        Wh = W[..., :n, :][..., self._on(idx)]  # [n, h] or [C, n, h]
        base = x
        if x.ndim == 4:
            base = x if x.shape[2] == len(idx) else x.expand(*x.shape[:2], len(idx), x.shape[3])
        y = self._mixed(base, Wh, n)  # [b, p, h, m]
        return y[:, :, 0] if x.ndim == 3 else y

    def _mixed(self, r: Tensor, Wh: Tensor, n: int, tokens: tuple[int, int] | None = None,
               scratch: bool = False) -> Tensor:
        """``r - sum_{s<n} (1 - w_sh) D_s`` for the ``h`` destinations of ``Wh`` (``[n, h]``, or
        ``[C, n, h]`` with circuits, or ``[slots, n, h]`` per position, each token taking its slot's
        weights), as ``[batch, pos, h, d_model]``. ``r`` is ``[b, p, d_model]`` (one residual for all) or
        ``[b, p, h, d_model]``. No gradient. ``tokens``: only the tokens ``t0:t1`` of the flattened
        batch x pos; ``r`` is then theirs, as ``[t1 - t0, 1, ...]``. ``scratch``: the result may be the
        forward's scratch buffer "mixed" (see :meth:`_scratch`), for a caller done with it before the next."""
        if self.source_major:
            return self._mixed_source_major(r, Wh, n, tokens)
        h = Wh.shape[-1]
        b, p, m = r.shape[0], r.shape[1], r.shape[-1]
        rows, additive = self._sparse_rows(Wh, n)
        r4 = r if r.ndim == 4 else r.unsqueeze(2)

        def own(t: Tensor) -> Tensor:  # [b, p, ...] -> the rows of r's tokens
            return t if tokens is None else t.flatten(0, 1)[tokens[0] : tokens[1]].unsqueeze(1)

        base = r4 - own(self._prefix_sum(n)).unsqueeze(2) if additive else r4
        if rows.numel() == 0:
            return base.expand(b, p, h, m)
        store = own(self.buf.permute(1, 2, 0, 3))  # type: ignore[union-attr]  # [b, p, n_src, m]
        coef = Wh if additive else Wh - 1  # y = base + sum_s coef_s D_s
        dense = 2 * rows.numel() > n  # dense enough: multiply over the contiguous prefix, no gather copy
        slot = self.tok_slot
        if slot is not None and tokens is not None:
            slot = slot[tokens[0] : tokens[1]]
        if r.device.type == "cpu":
            k = n + 1 if dense else rows.numel() + 1
            product = h * k + (0 if dense else _COPY_COST * 2 * k)
            if slot is not None:  # (source, destination) pairs, each token scaled by its slot's weight
                used = coef if tokens is None else coef.index_select(0, torch.unique(slot))  # (one circuit's)
                pairs = used.ne(0).any(0).nonzero()
                if _SLOT_EDGE_COST * len(pairs) + _COPY_COST * h < product:
                    return self._mixed_by_slot_edge(base, coef, pairs, store, slot)
            else:
                edges = coef.nonzero()  # [E, 2] (source, destination) or [E, 3] (circuit, source, destination)
                if _EDGE_COST * len(edges) + _COPY_COST * h < product:
                    return self._mixed_by_edge(base, coef, edges, store)
        if base.shape[2] == 1 and self.filled <= n < store.shape[2]:
            # The base joins the product as one more source with coefficient 1, in the store's row n
            # (source n is not computed yet; its hook overwrites the row): no separate pass adds it.
            store[:, :, n] = base[:, :, 0]
            ones = coef.new_ones(*coef.shape[:-2], 1, h)
            if dense:
                coef, D = torch.cat([coef, ones], dim=-2), store[:, :, : n + 1]
            else:
                rows = torch.cat([rows, rows.new_tensor([n])])
                coef = torch.cat([coef.index_select(-2, rows[:-1]), ones], dim=-2)
                D = self._gather(store, rows)
            base = None
        elif dense:
            D = store[:, :, :n]
        else:
            coef, D = coef.index_select(-2, rows), self._gather(store, rows)
        k = D.shape[2]
        D = D.reshape(b * p, k, m)
        coef = coef.transpose(-1, -2)  # [h, k] or [C, h, k] (or [slots, h, k])
        out = self._scratch("mixed", D, (b * p, h, m)) if scratch else None
        if slot is not None:
            coef = coef[slot]  # [b*p, h, k]: one product per token, as with shared weights
            if base is None:
                return torch.bmm(coef, D, out=out).view(b, p, h, m)
            return torch.baddbmm(base.reshape(b * p, -1, m), coef, D, out=out).view(b, p, h, m)
        if coef.ndim == 2:
            coef = coef.expand(b * p, h, k)
            if base is None:
                return torch.bmm(coef, D, out=out).view(b, p, h, m)
            return torch.baddbmm(base.reshape(b * p, -1, m), coef, D, out=out).view(b, p, h, m)
        c = coef.shape[0]
        y = torch.matmul(coef.unsqueeze(1), D.view(c, -1, k, m),  # [C, b/C * p, h, m]
                         out=None if out is None else out.view(c, -1, h, m)).view(b, p, h, m)
        return y if base is None else y.add_(base)

    def _mixed_source_major(self, r: Tensor, Wh: Tensor, n: int, tokens: tuple[int, int] | None) -> Tensor:
        """:meth:`_mixed` with the buffer source-major (``[n_src, batch, pos, d_model]``, on a GPU): one matrix
        product ``(Wh - 1)^T @ D[:n]`` over all the tokens (one per circuit with circuits folded into the
        batch), the base residual riding in it as one more source where the buffer's row ``n`` is free.
        Every source of the prefix takes part: a GPU multiplies by zero faster than it gathers rows, and
        the number of rows is then known without reading the weights (see :meth:`_wc`)."""
        assert self.buf is not None
        h, m = Wh.shape[-1], r.shape[-1]
        D = self.buf.view(self.buf.shape[0], -1, m)  # [n_src, T, m]
        if tokens is not None:
            D = D[:, tokens[0] : tokens[1]]
        t = D.shape[1]
        coef = Wh - 1  # x_h = r + sum_s coef_sh D_s
        base: Tensor | None = r.reshape(t, -1, m)  # [t, 1 or h, m]
        k = n
        if base is not None and base.shape[1] == 1 and self.filled <= n < D.shape[0]:
            D[n].copy_(base[:, 0])  # (source n is not computed yet: its hook overwrites the row)
            coef = torch.cat([coef, coef.new_ones(*coef.shape[:-2], 1, h)], dim=-2)
            k, base = n + 1, None
        Dk = D[:k].reshape(k, t * m)  # a view
        if coef.ndim == 2:
            y = torch.mm(coef.T, Dk).view(h, t, m).transpose(0, 1)  # [t, h, m], a view
        else:  # circuits folded into the batch: circuit c has the tokens c*t/C .. (c+1)*t/C - 1
            c = coef.shape[0]
            y = torch.bmm(coef.transpose(1, 2), Dk.view(k, c, -1).transpose(0, 1))  # [C, h, t/C * m]
            y = y.view(c, h, t // c, m).transpose(1, 2).reshape(t, h, m)
        if base is not None:
            y = y.add_(base)
        return y.view(*r.shape[:2], h, m)

    def _gather(self, store: Tensor, rows: Tensor) -> Tensor:
        """``store[:, :, rows]`` (``store`` ``[b, p, n_src, m]``) into the forward's scratch buffer (see
        :meth:`_scratch`; 27 MB for 69 of GPT-2's sources at 8 x 16 tokens), used before the next gather."""
        b, p, _, m = store.shape
        return torch.index_select(store, 2, rows, out=self._scratch("gathered", store, (b, p, rows.numel(), m)))

    @staticmethod
    def _mixed_by_edge(base: Tensor, coef: Tensor, edges: Tensor, store: Tensor) -> Tensor:
        """``base + sum_s coef_sh D_s`` (see :meth:`_mixed`) one edge at a time: ``base`` copied to every
        destination, then one scaled addition per nonzero coefficient. On CPU, for a sparse circuit, much
        cheaper than the matrix product, which multiplies every gathered source by every destination
        (GPT-2 small, last layer of a random 1% circuit: 50 edges, 2.5 ms against 4.6 ms)."""
        b, p, _, m = store.shape
        h = coef.shape[-1]
        y = base.expand(b, p, h, m).contiguous()
        if y.data_ptr() == base.data_ptr():  # contiguous() returned base itself (maybe the model's
            y = y.clone()  # residual stream): the additions below must not change it
        values = coef[tuple(edges.T)].tolist()
        if coef.ndim == 2:
            for (s, d), w in zip(edges.tolist(), values):
                y[:, :, d].add_(store[:, :, s], alpha=w)
            return y
        c = coef.shape[0]  # circuits folded into the batch: circuit i has the rows i*b/c .. (i+1)*b/c - 1
        yc, sc = y.unflatten(0, (c, b // c)), store.unflatten(0, (c, b // c))
        for (i, s, d), w in zip(edges.tolist(), values):
            yc[i, :, :, d].add_(sc[i, :, :, s], alpha=w)
        return y

    @staticmethod
    def _mixed_by_slot_edge(base: Tensor, coef: Tensor, pairs: Tensor, store: Tensor, slot: Tensor) -> Tensor:
        """:meth:`_mixed_by_edge` with per-position weights (``coef`` ``[slots, n, h]``, each token taking
        its ``slot``'s): one scaled addition per (source, destination) pair with a nonzero coefficient in
        some slot, each token scaled by its slot's coefficient."""
        b, p, _, m = store.shape
        h = coef.shape[-1]
        y = base.expand(b, p, h, m).contiguous()
        if y.data_ptr() == base.data_ptr():
            y = y.clone()
        s_idx, d_idx = pairs[:, 0], pairs[:, 1]
        per_token = coef[:, s_idx, d_idx][slot].unsqueeze(-1)  # [b*p, pairs, 1]
        yt, st = y.view(b * p, h, m), store.reshape(b * p, -1, m)
        for j, (s, d) in enumerate(pairs.tolist()):
            yt[:, d].addcmul_(st[:, s], per_token[:, j])
        return y

    def _prefix_sum(self, n: int) -> Tensor:
        """``sum_{s<n} D_s`` (``[b, p, d_model]``), from the longest prefix summed so far: computed only
        when the additive form needs it (sparse circuits), not in every forward."""
        k = max(j for j in self.prefix_sums if j <= n)
        if k < n:
            store = self.buf.permute(1, 2, 0, 3)  # type: ignore[union-attr]
            self.prefix_sums[n] = self.prefix_sums[k] + store[:, :, k:n].sum(2)
        return self.prefix_sums[n]

    def _sparse_rows(self, Wh: Tensor, n: int) -> tuple[Tensor, bool]:
        """No-gradient path. ``x_d = r_d - sum_s (1 - w_sd) D_s`` touches the sources with some w != 1;
        the same value ``(r_d - sum_{s<n} D_s) + sum_s w_sd D_s`` touches those with some w != 0. Use the
        form with fewer sources (a sparse circuit costs almost nothing): its rows, and whether additive."""
        h = Wh.shape[-1]
        sub_rows = (Wh != 1).reshape(-1, n, h).any(0).any(1).nonzero().flatten()
        add_rows = (Wh != 0).reshape(-1, n, h).any(0).any(1).nonzero().flatten()
        additive = add_rows.numel() < sub_rows.numel() and n <= self.filled
        return (add_rows if additive else sub_rows), additive


# The scratch buffers kept on a model between forwards (see keep_buffer) hold at most this much in all:
# GPT-2 small keeps its differences up to ~2,200 tokens per forward (64 prompts x 32), SmolLM2-135M up
# to ~1,500. ep.release_buffers(model) frees them at once.
_KEEP_BYTES = 2**30
_CHUNK_TOKENS = 128  # see _Engine._mix_project_chunked
# The GPU's layout of the difference buffer and its products (see _Engine._start), also on the CPU: for tests
_SOURCE_MAJOR_ON_CPU = bool(int(os.environ.get("EDGEPATCH_SOURCE_MAJOR_ON_CPU", "0") or 0))
# _Engine._mixed on CPU: the cost of one edge's scaled addition and of copying one source or destination
# row, in units of one source x destination product of the matrix product (GPT-2 small, 2 threads)
_EDGE_COST = 20
_COPY_COST = 6
_SLOT_EDGE_COST = 30  # the same with per-position weights (a scaled addition with a weight per token)


def _put_ablated(dst: Tensor, a: Tensor) -> None:
    """Write ablated values ``a`` (``[ab, ap, d_model]``, batch and positions possibly 1) into the batch
    rows ``dst`` (``[rows, pos, d_model]``): ``a``'s prompts repeat over circuits folded into the rows."""
    if a.shape[0] not in (1, dst.shape[0]):
        dst = dst.unflatten(0, (-1, a.shape[0]))  # a view: circuit x prompt
    dst.copy_(a)  # broadcasts batch / positions of 1


def _alone(hook_point: Any, ours: int) -> bool:
    """Whether no hook but the engine's ``ours`` forward hooks is on ``hook_point``: none before it, none
    after it, none in the backward pass (which would see the tensors the engine shortens)."""
    return (len(hook_point._forward_hooks) == ours and not hook_point._forward_pre_hooks
            and not hook_point._backward_hooks and not hook_point._backward_pre_hooks)


def _put_heads(out: Tensor, heads: Tensor, vals: Tensor, n_heads: int) -> Tensor:
    """Replace the ``heads`` of a q/k/v hook output (``[b, p, H, d]``, or ``[b, p, H * d]`` in
    TransformerBridge) by ``vals`` ``[b, p, len(heads), d]``, out of place (autograd-safe)."""
    d = vals.shape[-1]
    o4 = out.unflatten(-1, (-1, d)) if out.ndim == 3 else out
    _check_heads(o4, n_heads)
    new = o4.index_copy(2, heads, vals.to(out.dtype))
    return new.flatten(-2) if out.ndim == 3 else new


def _check_heads(o4: Tensor, n_heads: int) -> None:
    """A q/k/v hook output, heads unflattened (``[b, p, H, d]``), has the graph's ``n_heads``."""
    if o4.shape[2] != n_heads:
        raise EdgepatchError(
            f"patch: an attention hook output has {o4.shape[2]} heads where the graph has {n_heads} destinations "
            f"(shape {shape_str(o4.shape)}); models with ungrouped grouped-query attention "
            f"(cfg.ungroup_grouped_query_attention=True) are not supported."
        )


# ------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------
def _check_graph(model: Any, graph: Graph) -> ModelSpec:
    if not isinstance(graph, Graph):
        raise EdgepatchError(f"graph must be an edgepatch Graph (from ep.build_graph(model)); got {type(graph).__name__}.")
    spec = model_spec(model)
    if not spec.same_shape(graph.spec):
        g = graph.spec
        raise EdgepatchError(
            f"The graph was built for {g.name} ({g.n_layers} layers x {g.n_heads} heads, d_model {g.d_model}) but "
            f"the model is {spec.name} ({spec.n_layers} layers x {spec.n_heads} heads, d_model {spec.d_model}). "
            f"Build the graph from this model: ep.build_graph(model)."
        )
    return spec


def _check_tokens(tokens: Any, spec: ModelSpec, what: str) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        desc = f"a tensor of shape {shape_str(tokens.shape)} and dtype {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise EdgepatchError(f"{what} must be token ids, an integer tensor [batch, pos]; got {desc}.")


def as_weights(graph: Graph, weights: Weights, per_position: bool = False, values: bool = True) -> Tensor:
    """Validate and convert ``weights`` (a dense tensor, or edge names to keep) to a float tensor
    ``[n_src, n_dest]`` (``[slots, n_src, n_dest]`` with per-position weights). ``values``: also check that
    they are numbers in [0, 1] (not with gradients)."""
    if isinstance(weights, str):
        raise EdgepatchError(
            f"weights is a single string {weights!r}; pass a list of edge names to keep, e.g. [{weights!r}]."
        )
    if isinstance(weights, Mapping):
        raise EdgepatchError(
            f"weights is a dict of {len(weights)} edges; edgepatch does not guess what the other edges get. Build "
            f"the weights: W = torch.ones(graph.n_src, graph.n_dest) (or torch.zeros), then W[graph.edge(name)] = "
            f"value for each entry; or pass list(d) to keep just those edges and ablate the rest."
        )
    if not isinstance(weights, Tensor):
        try:
            names = list(weights)
        except TypeError:
            raise EdgepatchError(
                f"weights must be a tensor [n_src, n_dest] or a collection of edge names; got {type(weights).__name__}."
            ) from None
        if names and not all(isinstance(n, str) for n in names):
            bad = next(n for n in names if not isinstance(n, str))
            raise EdgepatchError(f"weights as a collection must hold edge names (str); found {bad!r}.")
        return graph.mask_from_edges(names).float()
    w = weights
    if graph.level == "node" and w.ndim == (2 if per_position else 1):
        w = w.unsqueeze(-1)
    want = 3 if per_position else 2
    if w.ndim == want + 1:
        want += 1  # a circuit axis folded into the batch
    if w.ndim != want or tuple(w.shape[-2:]) != (graph.n_src, graph.n_dest):
        exp = "[slots, n_src, n_dest] (or [C, slots, n_src, n_dest])" if per_position else "[n_src, n_dest]"
        raise EdgepatchError(
            f"weights has shape {shape_str(w.shape)}; expected {exp} = "
            f"{'[slots, ' if per_position else '['}{graph.n_src}, {graph.n_dest}] for {graph!r}."
            + ("" if per_position else " For per-position weights pass positions=... to patch(); [C, n_src, n_dest] "
               "runs C circuits at once with the batch folded (tokens.repeat(C, 1)).")
        )
    graph.check_shape(w)
    if not w.is_floating_point():
        w = w.float()
    if values and not w.requires_grad:
        valid = graph.valid.to(w.device)
        bad = torch.isnan(w) & valid
        if bool(bad.any()):
            first = bad.reshape(-1, graph.n_src, graph.n_dest).any(0).nonzero()[0].tolist()
            name = (graph.src_names[first[0]] if graph.level == "node"
                    else f"{graph.src_names[first[0]]}->{graph.dest_names[first[1]]}")
            raise EdgepatchError(
                f"weights contain {int(bad.sum())} NaN value(s) (first at {name!r}). Weights must be numbers in "
                f"[0, 1]: 1 keeps an edge, 0 ablates it."
            )
        vals = w[..., valid]
        if vals.numel() and (float(vals.min()) < -1e-6 or float(vals.max()) > 1 + 1e-6):
            raise EdgepatchError(
                f"weights must lie in [0, 1] (1 keeps an edge, 0 ablates it); got values from "
                f"{float(vals.min()):.4g} to {float(vals.max()):.4g}. Clamp them, or map raw mask "
                f"parameters through a mask function (ep.mask_fn)."
            )
    return w


def _called_weights(fn: Callable[[], Tensor], graph: Graph, per_position: bool) -> Tensor:
    """The weights a callable gives for this forward, checked as :func:`as_weights` checks a tensor: their
    values too where they are on the CPU (on a GPU that would wait for the device in every forward)."""
    w = fn()
    if not isinstance(w, Tensor):
        raise EdgepatchError(
            f"patch: the weights callable returned {type(w).__name__}; it must return a weight tensor as patch "
            f"takes one ([n_src, n_dest] = [{graph.n_src}, {graph.n_dest}] for {graph!r}), e.g. a mask function "
            f"of trainable parameters (ep.mask_fn)."
        )
    return as_weights(graph, w, per_position=per_position, values=w.device.type == "cpu")


# ------------------------------------------------------------------------------------------------------
# The public context manager
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def patch(
    model: Any,
    graph: Graph,
    weights: Weights | Callable[[], Tensor],
    ablated: Ablation,
    positions: Tensor | str | None = None,
) -> Iterator[None]:
    """Patch ``model``'s edges while the context is open (DESIGN.md §2).

    ``weights``: a ``[n_src, n_dest]`` tensor in [0, 1] (1 = clean, 0 = ablated; differentiable), a
    collection of edge names to keep (all others ablated), or a callable returning such a tensor at every
    forward (learned masks). ``ablated``: from :func:`source_activations`, :func:`mean_activations` or
    :func:`zero_ablation`.

    Per-position weights: ``positions="absolute"`` with weights ``[pos, n_src, n_dest]`` (one weight per
    token position), or ``positions`` = a ``[batch, pos]`` long tensor mapping each token to a slot of
    weights ``[slots, n_src, n_dest]`` (-1: the token is not patched). Use named slots for padded,
    variable-length prompts (e.g. the IO, S1, S2 and END positions of IOI), not raw indices.

    Several circuits in one forward: weights ``[C, n_src, n_dest]`` (or per position ``[C, slots, n_src,
    n_dest]`` with ``positions`` for the ``batch`` prompts) on ``tokens.repeat(C, 1)``: rows ``c * batch``
    to ``(c + 1) * batch - 1`` use circuit ``c``; the ablation is the unrepeated prompts'.

    Contexts nest: an inner ``patch`` on the same model replaces the outer one until it exits. On exit,
    normally or by an exception, hooks are removed and TransformerLens flags restored. On CPU, forwards
    without gradients keep their scratch buffers on the model for the next one (the largest used;
    :func:`release_buffers` frees them).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> m = random_model("tiny"); g = build_graph(m)
    >>> tok = torch.randint(0, 101, (2, 5))
    >>> with patch(m, g, torch.ones(g.n_src, g.n_dest), zero_ablation(g)):
    ...     out = m(tok)
    >>> torch.allclose(out, m(tok), atol=1e-5)
    True
    """
    _check_graph(model, graph)
    if not isinstance(ablated, Ablation):
        raise EdgepatchError(
            f"ablated must be an Ablation (from ep.source_activations, ep.mean_activations or ep.zero_ablation); "
            f"got {type(ablated).__name__}."
        )
    if ablated.n_src != graph.n_src or not ablated.spec.same_shape(graph.spec):
        raise EdgepatchError(
            f"ablated has {ablated.n_src} sources of a {ablated.spec.name} model but {graph!r} has {graph.n_src}: "
            f"compute the ablation with the same model and graph."
        )
    slots: Tensor | None = None
    per_position = positions is not None
    if isinstance(positions, str):
        if positions != "absolute":
            raise EdgepatchError(f"positions must be None, 'absolute' or a [batch, pos] long tensor; got {positions!r}.")
    elif isinstance(positions, Tensor):
        if positions.ndim != 2 or positions.is_floating_point():
            raise EdgepatchError(
                f"positions must be a [batch, pos] integer tensor of weight slots; got shape {shape_str(positions.shape)} "
                f"and dtype {positions.dtype}."
            )
        slots = positions.long()
    elif positions is not None:
        raise EdgepatchError(f"positions must be None, 'absolute' or a [batch, pos] long tensor; got {type(positions).__name__}.")

    fixed_weights: Tensor | None = None
    if callable(weights) and not isinstance(weights, Tensor):
        weight_fn = functools.partial(_called_weights, weights, graph, per_position)
    else:
        fixed = as_weights(graph, weights, per_position=per_position)
        if per_position and fixed.ndim == 4 and not isinstance(positions, Tensor):
            raise EdgepatchError(
                "patch: per-position circuits folded into the batch (weights [C, slots, n_src, n_dest]) need "
                "positions as a [batch, pos] tensor of slots for the unrepeated prompts; for one slot per token "
                "index give torch.arange(pos).expand(batch, pos)."
            )
        if isinstance(positions, Tensor):
            n_slots = fixed.shape[-3]
            if bool((slots >= n_slots).any()):  # type: ignore[operator]
                raise EdgepatchError(
                    f"positions refers to slot {int(slots.max())} but weights has only {n_slots} slots."  # type: ignore[union-attr]
                )
        weight_fn = lambda: fixed  # noqa: E731
        fixed_weights = fixed

    proj = projections_of(model)
    engine: _Engine
    if positions == "absolute":
        engine = _AbsoluteEngine(model, graph, weight_fn, ablated, None, proj)
    else:
        engine = _Engine(model, graph, weight_fn, ablated, slots, proj)

    flags = dict(_FLAGS)
    if proj is not None or (fixed_weights is not None and not fixed_weights.requires_grad
                            and not _attention_patched(graph, fixed_weights)):
        # Patched heads' q/k/v are recomputed at the projections (or no attention input is patched):
        # no need for TransformerLens's costly per-head split inputs.
        flags = _PROJECTION_FLAGS
    with activated(model, engine, flags):
        yield


@contextlib.contextmanager
def activated(model: Any, engine: "_Engine", flags: dict[str, bool] | None = None) -> Iterator["_Engine"]:
    """Make ``engine`` the model's active patch: flags set, the outer engine (if any) suspended, the
    engine's hooks installed; all undone on exit, also after an exception."""
    slot = _slot(model)
    with engine_flags(model, flags):
        outer = slot.stack[-1] if slot.stack else None
        if outer is not None:
            outer.remove()
        slot.stack.append(engine)
        try:
            engine.install()
            yield engine
        finally:
            engine.remove()
            slot.stack.pop()
            if outer is not None:
                outer.install()


def _attention_patched(graph: Graph, W: Tensor) -> bool:
    """Whether any weight into an attention input (q/k/v) differs from 1."""
    g = graph.engine_graph
    cols = torch.tensor([i for i, d in enumerate(g.dest_names) if d.startswith("a")], dtype=torch.long)
    Wx = graph.expand(W)
    if cols.numel() == 0:
        return False
    sub = Wx[..., cols.to(Wx.device)]
    valid = g.valid[:, cols].to(Wx.device)
    return bool((sub[..., valid] != 1).any())


class _AbsoluteEngine(_Engine):
    """Per-position weights indexed by absolute position: token (b, p) uses slot p."""

    def _start(self, x: Tensor) -> None:
        b, p, _ = x.shape
        self.slots = torch.arange(p, device=x.device).expand(b, p)
        super()._start(x)
        assert self.W is not None
        if self.W.shape[0] != p:
            raise EdgepatchError(
                f"patch(positions='absolute'): weights have {self.W.shape[0]} positions but the tokens have {p}."
            )


def release_buffers(model: Any) -> None:
    """Free the scratch buffers that patched forwards without gradients keep on ``model`` between calls
    (CPU only; the largest of each used: the differences, ``batch x pos x n_src x d_model`` floats, e.g.
    60 MB for GPT-2 small at 8 x 16 tokens; one layer's head outputs, ``n_heads x batch x pos x
    d_model``; one layer's mixed inputs, ``batch x pos x`` its mixed destinations ``x d_model``, and the
    sources a sparse circuit gathers for them; and a sweep's ablation, the size of the differences; at
    most 1 GiB in all, the first kept first). They are also freed with the model. Reusing them spares
    every forward the page faults of fresh allocations of that size."""
    slot = _SLOTS.get(model)
    if slot is not None:
        slot.spares.clear()


def active_patch(model: Any) -> Any:
    """The innermost active patch engine on ``model`` (None when unpatched)."""
    slot = _SLOTS.get(model)
    return slot.stack[-1] if slot and slot.stack else None
