"""Weight-level masks: NeuroSurgeon-style subnetworks over model parameters.

Context
-------
Edge masks (``edgepatch.masks``) ask which *connections between components* a behaviour needs. Weight masks
ask a finer question: which *weights* of chosen parameters does it need? Subnetwork probing (Cao et al.
2021), continuous sparsification (Savarese et al. 2020), differentiable masking with L0 gates (Louizos et
al. 2018; Edge Pruning, Bhaskar et al. 2024) and NeuroSurgeon (Lepori et al. 2023) all give a parameter
``W`` a learnable mask of raw parameters ``p``, map them to weights ``m`` in [0, 1] with a *mask function*
(the same ones edge masks use: :mod:`edgepatch.masks`), and run the model with ``W * m``. Training ``p``
to keep the model's behaviour while a sparsity term pushes ``m`` to 0 leaves a small binary *subnetwork*:
the weights the behaviour relies on. Ablating it (or keeping only it) then tests the claim.

Intuition: an edge circuit says "head a1.h2 talks to m3"; a weight subnetwork says "these 3% of W_in's
entries in layer 3 are what m3 uses for the task", or, at coarser granularity, "these 40 neurons" or
"these two heads' W_V".

Masking
-------
``weight_masks(model, targets, ...)`` is a context manager yielding a :class:`WeightMasks` module (the raw
mask parameters, for an optimizer). Inside, every target parameter is multiplied by its mask through
``torch.nn.utils.parametrize`` (so any code reading ``attn.W_Q`` sees the masked weight), the model's own
parameters are frozen (``requires_grad`` False, restored on exit) and gradients reach only the masks. On
exit, normal or by exception, ``parametrize.remove_parametrizations(..., leave_parametrized=False)`` gives
the model back exactly: the same parameter objects with the same values and flags, the same module classes,
no hooks. Masks on one parameter do not stack: a second ``weight_masks`` / ``apply_subnetwork`` on an
already masked parameter raises (masking *different* parameters in nested contexts is fine).

Targets are TransformerLens parameter names (``"blocks.0.attn.W_Q"``), globs (``"blocks.*.attn.W_[QK]"``)
or regexes (``"re:blocks\\.[01]\\.mlp\\.W_.*"`` or a compiled ``re.Pattern``). A wildcard never picks up
biases unless ``include_bias=True``, which also adds each matched weight's own bias (``W_in`` -> ``b_in``,
``W_O`` -> ``b_O``, layer-norm ``w`` -> ``b``). ``maskable_parameters(model)`` lists the names and shapes.

``granularity`` sets how many weights one mask value covers (a string, or ``{pattern: granularity}``,
first match wins, unmatched names use ``"element"``):

===============================  ===============================  ===================================  ================
parameter (TransformerLens)      shape                            ``"row"``: one mask per              ``"head"``
===============================  ===============================  ===================================  ================
``W_Q`` ``W_K`` ``W_V``          ``[head, d_model, d_head]``      q/k/v unit (output column),          ``[head, 1, 1]``
                                                                  ``[head, 1, d_head]``
``W_O``                          ``[head, d_head, d_model]``      z unit (input row),                  ``[head, 1, 1]``
                                                                  ``[head, d_head, 1]``
``b_Q`` ``b_K`` ``b_V``          ``[head, d_head]``               element                              ``[head, 1]``
``W_in`` ``W_gate``              ``[d_model, d_mlp]``             neuron (output column),              error
                                                                  ``[1, d_mlp]``
``W_out``                        ``[d_mlp, d_model]``             neuron (input row), ``[d_mlp, 1]``   error
``W_E``, ``W_pos``               ``[d_vocab or n_ctx, d_model]``  token / position, ``[n, 1]``         error
``W_U``                          ``[d_model, d_vocab]``           vocabulary column, ``[1, d_vocab]``  error
1-D: ``b_O`` ``b_in`` ``w`` ...  ``[n]``                          element                              error
===============================  ===============================  ===================================  ================

``"element"`` gives every weight its own mask. In a grouped-query HookedTransformer the key/value
parameters are ``_W_K`` / ``_W_V`` of shape ``[n_kv_heads, ...]``; they are named ``W_K`` / ``W_V`` here and
``"head"`` means one mask per key/value head.

Mask functions and sparsity (``mask_fn=``, options such as ``beta=`` go through ``**mask_options``)
---------------------------------------------------------------------------------------------------
- ``"sigmoid"`` + L1: ``m = sigmoid(p / temperature)``; penalty = sum of ``m``.
- ``"hard_concrete"`` + L0 (default): stretched, clamped concrete gates, noisy in training mode,
  deterministic in eval mode; penalty = the expected number of non-zero gates.
- ``"continuous"`` sparsification: ``m = sigmoid(temperature * p)`` in training, ``p > 0`` in eval; the
  temperature grows exponentially (``ContinuousSparsification.schedule``, e.g. to 200 over 90 epochs) so the
  masks become binary. The initial mask value ``init`` sets ``p0 = logit(init) / temperature``: lower
  values start closer to the threshold and end in smaller subnetworks (Savarese et al.'s ``s_init``).
- ``"identity"``: ``m = clamp(p, 0, 1)``.

``init`` is the initial mask value (its eval-mode weight). With ``init=1`` the masked model equals the full
model exactly in eval mode for ``"hard_concrete"`` (gates start saturated), ``"continuous"`` and
``"identity"``; ``"sigmoid"`` can only approach 1 (``sigmoid(9.2) = 0.9999``). :class:`WeightMasks`
starts in training mode, like any ``nn.Module``: call ``.eval()`` for deterministic masks. Each access to a
masked weight re-evaluates its mask (and re-samples hard-concrete noise); wrap one forward in
``torch.nn.utils.parametrize.cached()`` to sample once per forward, as the training loop does.

Training (``train_weight_masks``)
---------------------------------
The task loss is *faithfulness to the full model*: by default (``objective="kl"``) the KL divergence
``KL(p_full || p_masked)`` of the next-token distributions at ``data.answer_pos`` on the clean prompts,
averaged over prompts; ``objective="metric"`` uses ``-metric`` (``+metric`` for a lower-is-better metric)
instead. The sparsity term uses the masks' expected density ``d`` (expected kept weights / all target
weights; each mask value counts for the weights it covers):

- no ``target_sparsity``: ``loss = task + penalty_weight * d``;
- with ``target_sparsity = s``: a Lagrangian as in Edge Pruning,
  ``loss = task + lambda1 * (d - t) + lambda2 * (d - t) ** 2`` with the target density ``t`` annealed
  from 1 to ``1 - s`` along a half cosine over the first ``warmup`` fraction of steps, and
  ``lambda1, lambda2`` updated by gradient *ascent* (Adam, ``maximize=True``), so the density is driven
  to the target whatever the task loss's scale. ``lambda2`` (the quadratic, proportional term) learns
  fast and ``lambda1`` (the integral term) slowly (``lagrangian_lr=(0.01, 1.0)``): a fast ``lambda1``
  winds up while the masks lag behind the moving target and then overshoots it, and hard-concrete gates
  pushed far below zero hardly come back.

The hard subnetwork at the end (``binarize``) is, by default, per parameter the ``round(expected kept)``
mask units with the largest raw parameters (as CoFi does for L0 gates), so its density equals the expected
density the penalty controls; ``binarize="threshold"`` uses the mask function's own rule (eval mask > 0.5;
``p > 0`` for continuous sparsification, its default).

Ablations of a trained subnetwork (``apply_subnetwork(model, subnetwork, mode=...)``)
----------------------------------------------------------------------------------
Each mode is a context manager that parametrizes the target weights with a fixed rule and restores the
model on exit. ``S`` is the subnetwork (True = kept weight), ``W`` the original weight:

============  ====================================================================================
``keep``      ``W * S``: only the subnetwork; its complement is zeroed.
``ablate``    ``W * ~S``: the subnetwork is zeroed, everything else kept (the inverse).
``reinit``    the subnetwork keeps its weights; every weight of the complement is replaced by a fresh
              sample of ``N(mean(W), std(W))`` (mean and std of that whole parameter, float32), drawn
              from a generator seeded with ``seed``: is the subnetwork enough when the rest is random
              rather than zero?
``random``    the control for ``keep``: ``W * R`` for a random subnetwork ``R`` of the same size as
              ``S`` *per parameter*, drawn (seeded) from ``S``'s complement, so ``R`` and ``S`` are
              disjoint. Sampling is per mask unit (neuron, head) when ``subnetwork`` is a
              :class:`WeightMasks` / :class:`WeightMaskResult`, per element for a plain dict. A parameter
              whose complement has fewer units than ``S`` raises.
============  ====================================================================================

The context yields ``{name: bool tensor}``: the weights that keep their original values (``S``, ``~S``,
``S``, ``R``).

Model classes
-------------
``HookedTransformer`` (and any ``nn.Module``, by ``named_parameters`` names) is fully supported. For the
TransformerLens ``TransformerBridge``, each TransformerLens name of ``bridge.tl_parameters()`` is traced to
the HuggingFace parameter the forward actually uses (``blocks.0.attn.W_Q`` -> the split ``q`` Linear's
``weight``, ``W_O`` -> ``c_proj``'s Conv1D weight, ...) by autograd, and the mask, defined in the
TransformerLens layout, is rearranged into that parameter's layout; granularities and subnetworks are
therefore the same in both classes. Not maskable on the bridge, with a clear error: names that the bridge
computes as constants (biases an architecture lacks, e.g. Llama's ``b_Q``), tensors that repeat or combine
parameter entries (grouped-query ``W_K`` / ``W_V``, repeated over query heads: use a HookedTransformer,
whose key/value parameters are per key/value head), and tied parameters (GPT-2's ``W_E`` and ``W_U`` share
one tensor: masking one would mask both).

Example
-------
>>> import torch
>>> from edgepatch.models import random_model
>>> from edgepatch.tasks import induction
>>> model = random_model("tiny"); data = induction(101, n=4, seq_len=4, seed=0)
>>> with weight_masks(model, ["blocks.0.mlp.W_in"], mask_fn="sigmoid", granularity="row") as masks:
...     opt = torch.optim.Adam(masks.parameters(), lr=0.1)
...     loss = model(data.clean)[:, -1].logsumexp(-1).mean() + 0.01 * masks.expected_density()
...     loss.backward(); opt.step()
>>> masks
WeightMasks(1 parameter, 2,048 weights in 64 mask units, sigmoid(temperature=1.0), training)
>>> model.blocks[0].mlp.W_in.grad is None   # the model is back, untouched
True
>>> with apply_subnetwork(model, {"blocks.0.mlp.W_in": torch.rand(32, 64) > 0.5}, mode="ablate") as kept:
...     logits = model(data.clean)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, UnknownNameError, shape_str, suggest
from edgepatch.masks import ContinuousSparsification, HardConcrete, MaskFunction, frozen, make_mask_fn
from edgepatch.metrics import (
    KLDivergence,
    answer_view,
    final_logits,
    get_metric,
    metric_label,
    normalized_faithfulness,
    reads_answer_only,
    with_gradient,
)

__all__ = [
    "WeightMasks",
    "weight_masks",
    "maskable_parameters",
    "apply_subnetwork",
    "train_weight_masks",
    "WeightMaskResult",
    "sweep_weight_sparsity",
    "WeightSweepResult",
    "plot_weight_sweep",
    "GRANULARITIES",
    "ABLATION_MODES",
]

GRANULARITIES = ("element", "row", "head")
ABLATION_MODES = ("keep", "ablate", "reinit", "random")
DEFAULT_TARGETS = ("blocks.*.attn.W_*", "blocks.*.mlp.W_*")

Pattern = Union[str, "re.Pattern[str]"]
Subnetwork = Mapping[str, Tensor]

# Axes that keep their size under each granularity (the others become 1), by parameter kind.
_ROW_AXES: dict[str, tuple[int, ...]] = {
    "W_Q": (0, 2), "W_K": (0, 2), "W_V": (0, 2), "W_O": (0, 1),
    "b_Q": (0, 1), "b_K": (0, 1), "b_V": (0, 1),
    "W_in": (1,), "W_gate": (1,), "W_out": (0,), "W_E": (0,), "W_pos": (0,), "W_U": (1,),
}
_HEAD_AXES: dict[str, tuple[int, ...]] = {
    "W_Q": (0,), "W_K": (0,), "W_V": (0,), "W_O": (0,), "b_Q": (0,), "b_K": (0,), "b_V": (0,),
}
_NDIM = {"W_Q": 3, "W_K": 3, "W_V": 3, "W_O": 3, "b_Q": 2, "b_K": 2, "b_V": 2}


def _kind(name: str) -> str:
    """``blocks.0.attn.W_Q`` -> ``W_Q`` (``_W_K`` -> ``W_K``)."""
    return name.rsplit(".", 1)[-1].lstrip("_")


def _is_bias(name: str) -> bool:
    kind = _kind(name)
    return kind == "b" or kind.startswith("b_")


def _partner_bias(name: str) -> str | None:
    head, _, kind = name.rpartition(".")
    if kind == "w":
        return f"{head}.b"
    if kind.startswith("W_") and kind not in ("W_E", "W_pos", "W_gate"):
        return f"{head}.b_{kind[2:]}"
    return None


def _check_granularity(value: Any, where: str = "granularity") -> str:
    if value not in GRANULARITIES:
        hint = suggest(str(value), GRANULARITIES) or " ('row' is one mask per neuron / hidden unit.)"
        raise EdgepatchError(
            f"Unknown {where} {value!r}; expected 'element', 'row' or 'head'.{hint}"
        )
    return value


def _unit_shape(name: str, shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """The shape of the mask of parameter ``name`` (``shape``) at ``granularity`` (broadcasts to ``shape``)."""
    shape = tuple(int(s) for s in shape)
    kind = _kind(name)
    if granularity == "element":
        return shape
    if granularity == "head":
        if kind not in _HEAD_AXES or len(shape) != _NDIM[kind]:
            raise EdgepatchError(
                f"granularity='head' needs an attention parameter with a head axis (W_Q, W_K, W_V, W_O, b_Q, "
                f"b_K, b_V); {name!r} has shape {shape_str(shape)}. Fix: use granularity='row' or 'element' "
                "for it, e.g. granularity={'blocks.*.attn.*': 'head', 'blocks.*.mlp.*': 'row'}."
            )
        axes = _HEAD_AXES[kind]
    else:  # row
        if len(shape) <= 1:
            return shape
        axes = _ROW_AXES.get(kind)  # type: ignore[assignment]
        if axes is None or (kind in _NDIM and len(shape) != _NDIM[kind]) or max(axes) >= len(shape):
            raise EdgepatchError(
                f"granularity='row' (one mask per neuron / hidden unit) is defined for W_Q, W_K, W_V, W_O, W_in, "
                f"W_gate, W_out, W_E, W_pos, W_U and 1-D parameters; {name!r} has shape {shape_str(shape)}. "
                "Fix: use granularity='element' for it."
            )
    return tuple(s if i in axes else 1 for i, s in enumerate(shape))


# --------------------------------------------------------------------------------------------- sites
@dataclass(eq=False)
class _Layout:
    """How a tensor in the TransformerLens layout (``shape``) maps onto the parameter's own layout."""

    shape: torch.Size
    param_shape: torch.Size
    index: Tensor | None = None  # [param numel] long: TL flat position per parameter entry; numel = uncovered

    def to_param(self, value: Tensor, fill: Any) -> Tensor:
        """``value`` (TL layout, or broadcastable to it) in the parameter's layout; ``fill`` where uncovered."""
        if self.index is None:
            return value
        flat = value.expand(self.shape).reshape(-1)
        flat = torch.cat([flat, flat.new_full((1,), fill)])
        return flat[self.index.to(flat.device)].view(self.param_shape)

    def from_param(self, param: Tensor) -> Tensor:
        """The parameter's values in the TransformerLens layout."""
        if self.index is None:
            return param
        n = self.shape.numel()
        covered = self.index < n
        out = param.new_empty(n)
        out[self.index[covered]] = param.reshape(-1)[covered]
        return out.view(self.shape)


@dataclass(eq=False)
class _Site:
    name: str
    module: nn.Module
    attr: str
    param: Tensor  # the model's Parameter (the ``original`` once parametrized)
    layout: _Layout

    @property
    def shape(self) -> torch.Size:
        return self.layout.shape


class _MaskParametrization(nn.Module):
    """``W -> W * mask``; holds its :class:`WeightMasks` outside the module tree (not a model parameter)."""

    def __init__(self, masks: "WeightMasks", name: str, layout: _Layout) -> None:
        super().__init__()
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "layout", layout)
        self.name = name

    def forward(self, weight: Tensor) -> Tensor:
        mask = self.masks.mask(self.name)
        return weight * self.layout.to_param(mask, 1.0).to(device=weight.device, dtype=weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.name!r}"


class _SubnetworkParametrization(nn.Module):
    """``W -> where(keep, W, replacement)`` with fixed tensors in the parameter's layout (0 if no replacement)."""

    def __init__(self, name: str, keep: Tensor, replacement: Tensor | None) -> None:
        super().__init__()
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "replacement", replacement)
        self.name = name

    def forward(self, weight: Tensor) -> Tensor:
        keep = self.keep.to(weight.device)
        if self.replacement is None:
            return torch.where(keep, weight, weight.new_zeros(()))
        return torch.where(keep, weight, self.replacement.to(device=weight.device, dtype=weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.name!r}"


def _is_bridge(model: nn.Module) -> bool:
    return hasattr(model, "tl_parameters") and hasattr(model, "original_model")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "model_name", None) or type(model).__name__


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    return owners


def _already_masked(name: str, module: nn.Module, attr: str) -> EdgepatchError:
    plist = module.parametrizations[attr]  # type: ignore[index]
    ours = any(isinstance(p, (_MaskParametrization, _SubnetworkParametrization)) for p in plist)
    by = ("an open weight_masks / apply_subnetwork context" if ours
          else f"a parametrization of your own ({', '.join(type(p).__name__ for p in plist)})")
    return EdgepatchError(
        f"{name!r} is already masked by {by}; masks on one parameter do not stack. Fix: close the outer "
        "context first (or remove the parametrization), or mask different parameters in nested contexts."
    )


def _hooked_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, Tensor]]:
    """``{TL name: (owning module, attribute, parameter)}`` from ``named_parameters`` (any ``nn.Module``)."""
    out: dict[str, tuple[nn.Module, str, Tensor]] = {}
    for pname, p in model.named_parameters():
        parts = pname.split(".")
        if "parametrizations" in parts:  # <path>.parametrizations.<attr>.original: already parametrized
            i = parts.index("parametrizations")
            path, attr = parts[:i], parts[i + 1]
        else:
            path, attr = parts[:-1], parts[-1]
        shown = attr[1:] if attr.startswith(("_W_", "_b_")) else attr  # grouped-query _W_K -> W_K
        out[".".join(path + [shown])] = (model.get_submodule(".".join(path)), attr, p)
    return out


def _candidate_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    if _is_bridge(model):
        with torch.no_grad():
            return {n: tuple(t.shape) for n, t in model.tl_parameters().items()}  # type: ignore[operator]
    return {n: tuple(p.shape) for n, (_, _, p) in _hooked_candidates(model).items()}


def maskable_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """TransformerLens names and shapes that ``weight_masks`` targets can match, in model order.

    On a ``TransformerBridge`` these are all of ``bridge.tl_parameters()``; a few may still be refused
    when resolved (constants, repeated grouped-query key/value heads, tied embeddings; see module doc).

    >>> from edgepatch.models import random_model
    >>> maskable_parameters(random_model("tiny"))["blocks.0.attn.W_Q"]
    (4, 32, 8)
    """
    return _candidate_shapes(model)


@contextlib.contextmanager
def _grads_on(model: nn.Module) -> Iterator[None]:
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _bridge_sites(model: nn.Module, names: Sequence[str], optional: set[str] = frozenset()) -> list[_Site]:
    """Sites of bridge TL names; names in ``optional`` that the bridge computes as constants are skipped."""
    owners = _owners(model)
    params = [p for p in model.parameters() if p.is_floating_point()]
    sites = []
    with _grads_on(model):
        tl = model.tl_parameters()  # type: ignore[operator]
        for name in names:
            t = tl[name]
            if name in optional and t.grad_fn is None and not isinstance(t, nn.Parameter):
                continue
            if isinstance(t, nn.Parameter) and id(t) in owners:
                source, index = t, None
            else:
                source, index = _trace_source(name, t, params)
            own = owners.get(id(source), [])
            if len(own) == 1 and isinstance(own[0][0], parametrize.ParametrizationList):
                for module in model.modules():
                    plists = getattr(module, "parametrizations", None)
                    if isinstance(plists, nn.ModuleDict):
                        for attr, plist in plists.items():
                            if plist is own[0][0]:
                                raise _already_masked(name, module, attr)
            if len(own) != 1:
                raise EdgepatchError(
                    f"Cannot mask {name!r} of this TransformerBridge: its parameter is shared by "
                    f"{len(own)} modules (tied weights, e.g. GPT-2's W_E and W_U), so masking it would mask "
                    "them all. Fix: leave it out of targets, or use a HookedTransformer (untied copies)."
                )
            module, attr = own[0]
            sites.append(_Site(name, module, attr, source, _Layout(t.shape, source.shape, index)))
    if not sites:
        raise EdgepatchError(
            f"The targets {list(names)} match only constants of this TransformerBridge; nothing to mask."
        )
    return sites


def _trace_source(name: str, t: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The one parameter that ``t`` (a bridge TL tensor) rearranges, and the index mapping it to ``t``."""
    if t.grad_fn is None:
        raise EdgepatchError(
            f"Cannot mask {name!r}: this TransformerBridge computes it as a constant (e.g. zeros for a bias the "
            "architecture does not have), not from a parameter. Fix: leave it out of targets."
        )
    grads = torch.autograd.grad(t, params, grad_outputs=torch.ones_like(t), retain_graph=True, allow_unused=True)
    found = [(p, g) for p, g in zip(params, grads) if g is not None and bool(g.ne(0).any())]
    if len(found) != 1:
        raise EdgepatchError(
            f"Cannot mask {name!r}: the bridge computes it from {len(found)} parameters, so a mask on it has no "
            "single parameter to act on. Fix: leave it out of targets, or use a HookedTransformer."
        )
    source, count = found[0]
    if not bool(((count == 0) | (count == 1)).all()) or int(count.sum()) != t.numel():
        raise EdgepatchError(
            f"Cannot mask {name!r} {shape_str(t.shape)} of this TransformerBridge: it repeats or combines entries "
            f"of its parameter {shape_str(source.shape)} (e.g. grouped-query key/value heads repeated over query "
            "heads), so a mask on it is not a mask on the parameter. Fix: use a HookedTransformer (whose W_K / "
            "W_V are per key/value head) or leave it out of targets."
        )
    if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16):
        base = 2 ** 7
    else:
        base = 2 ** 16
    n = t.numel()
    codes = torch.arange(n, device=t.device).view(t.shape)
    index = torch.zeros(source.numel(), dtype=torch.long, device=source.device)
    scale = 1
    while scale < max(n, 2):
        digit = ((codes // scale) % base).to(t.dtype)
        (g,) = torch.autograd.grad(t, [source], grad_outputs=digit, retain_graph=True)
        index += g.reshape(-1).round().long() * scale
        scale *= base
    covered = count.reshape(-1) == 1
    index[~covered] = n
    with torch.no_grad():
        ok = torch.equal(t.detach().reshape(-1)[index[covered]], source.detach().reshape(-1)[covered])
    if not ok:  # pragma: no cover - a scaled or transformed view
        raise EdgepatchError(f"Cannot mask {name!r}: the bridge transforms its parameter's values (not a pure "
                             "rearrangement). Fix: use a HookedTransformer.")
    return source, index


def _match(patterns: Iterable[Pattern], names: Sequence[str], include_bias: bool, model_name: str,
           what: str = "weight-mask target") -> tuple[list[str], set[str]]:
    """Names matched by ``patterns`` in model order, and those matched only by a wildcard or as an implied
    bias (a bridge may then skip them when they are constants)."""
    chosen: list[str] = []
    exact: set[str] = set()
    for pat in patterns:
        if isinstance(pat, re.Pattern):
            hits, wild = [n for n in names if pat.fullmatch(n)], True
        elif not isinstance(pat, str):
            raise TypeError(f"A {what} must be a name, glob or regex (str / re.Pattern), got {type(pat).__name__}.")
        elif pat.startswith("re:"):
            rx = re.compile(pat[3:])
            hits, wild = [n for n in names if rx.fullmatch(n)], True
        elif any(c in pat for c in "*?["):
            hits, wild = [n for n in names if fnmatch.fnmatchcase(n, pat)], True
        else:
            hits, wild = [n for n in names if n == pat], False
        if wild and not include_bias:
            hits = [n for n in hits if not _is_bias(n)]
        if not hits:
            shown = pat.pattern if isinstance(pat, re.Pattern) else pat
            raise UnknownNameError(
                f"Unknown {what} {shown!r}: no parameter of {model_name} matches it"
                f"{' (biases need include_bias=True)' if wild and not include_bias else ''}."
                f"{suggest(shown, names)} Names look like 'blocks.0.attn.W_Q', 'blocks.0.mlp.W_in'; globs "
                "('blocks.*.attn.W_Q') and regexes ('re:...') work too; maskable_parameters(model) lists them all."
            )
        chosen.extend(hits)
        if not wild:
            exact.update(hits)
    if include_bias:
        present = set(names)
        chosen += [b for n in list(chosen) if (b := _partner_bias(n)) is not None and b in present]
    order = {n: i for i, n in enumerate(names)}
    ordered = sorted(set(chosen), key=order.__getitem__)
    return ordered, set(ordered) - exact


def _resolve(model: nn.Module, targets: Any, include_bias: bool = False) -> list[_Site]:
    if targets is None:
        targets = DEFAULT_TARGETS
    if isinstance(targets, (str, re.Pattern)):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise EdgepatchError("targets is empty; name at least one parameter, e.g. ['blocks.*.mlp.W_in'].")
    if _is_bridge(model):
        matched, optional = _match(targets, list(_candidate_shapes(model)), include_bias, _model_name(model))
        return _bridge_sites(model, matched, optional)
    cands = _hooked_candidates(model)
    sites = []
    for name in _match(targets, list(cands), include_bias, _model_name(model))[0]:
        module, attr, p = cands[name]
        sites.append(_Site(name, module, attr, p, _Layout(p.shape, p.shape)))
    return sites


def _check_free(sites: Sequence[_Site]) -> None:
    seen: set[tuple[int, str]] = set()
    for s in sites:
        if parametrize.is_parametrized(s.module, s.attr):
            raise _already_masked(s.name, s.module, s.attr)
        key = (id(s.module), s.attr)
        if key in seen:  # pragma: no cover - two TL names on one parameter
            raise EdgepatchError(f"{s.name!r} shares its parameter with another target; mask only one of them.")
        seen.add(key)


@contextlib.contextmanager
def _parametrized(sites: Sequence[_Site], make: Callable[[_Site], nn.Module]) -> Iterator[None]:
    """Register ``make(site)`` on every site; remove them all (restoring the originals) on exit."""
    _check_free(sites)
    done: list[_Site] = []
    try:
        for s in sites:
            parametrize.register_parametrization(s.module, s.attr, make(s))
            done.append(s)
        yield
    finally:
        for s in reversed(done):
            parametrize.remove_parametrizations(s.module, s.attr, leave_parametrized=False)


# --------------------------------------------------------------------------------------------- masks
def _raw_init(fn: MaskFunction, init: float) -> float:
    """The raw parameter whose eval-mode mask is ``init`` (hard-concrete: saturated at exactly 0 / 1)."""
    if isinstance(fn, HardConcrete):
        if init >= 1:
            return math.log((1 - fn.gamma) / (fn.zeta - 1)) + 0.5
        if init <= 0:
            return math.log(-fn.gamma / fn.zeta) - 0.5
    return float(fn.init_value(float(init)))


class WeightMasks(nn.Module):
    """Learnable masks over named parameters: raw parameters ``logits[i]`` of each parameter's unit shape.

    Build it with :func:`weight_masks` (which also applies it), or directly from ``{name: shape}`` to reuse
    with ``weight_masks(model, masks=...)``. ``mask(name)`` is the current mask (unit shape, broadcasting to
    the parameter's TransformerLens shape); ``binary()`` the hard subnetwork in full shape.

    >>> m = WeightMasks({"blocks.0.mlp.W_in": (32, 64)}, granularity="row", mask_fn="continuous")
    >>> m.unit_shapes["blocks.0.mlp.W_in"], m.n_total, m.eval().density()
    ((1, 64), 2048, 1.0)
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        granularity: "str | Mapping[Pattern, str]" = "element",
        mask_fn: "str | MaskFunction" = "hard_concrete",
        init: float = 1.0,
        device: Any = None,
        binarize: str = "threshold",
        **mask_options: Any,
    ) -> None:
        super().__init__()
        if not shapes:
            raise EdgepatchError("WeightMasks needs at least one parameter.")
        self.mask_fn: MaskFunction = make_mask_fn(mask_fn, **mask_options)
        self.binarize = _check_binarize(binarize)
        self.names: list[str] = list(shapes)
        self.shapes: dict[str, torch.Size] = {n: torch.Size(s) for n, s in shapes.items()}
        self.granularity: dict[str, str] = _granularities(self.names, granularity)
        self.unit_shapes: dict[str, tuple[int, ...]] = {
            n: _unit_shape(n, self.shapes[n], self.granularity[n]) for n in self.names
        }
        raw = _raw_init(self.mask_fn, float(init))
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.full(self.unit_shapes[n], raw, device=device)) for n in self.names]
        )
        self._index = {n: i for i, n in enumerate(self.names)}

    # ------------------------------------------------------------------ access
    @property
    def function(self) -> MaskFunction:
        """The mask function (``masks.mask_fn``; ``edgepatch.masks.mask_fn(kind, masks=...)`` swaps it)."""
        return self.mask_fn

    def _i(self, name: str) -> int:
        if name not in self._index:
            raise UnknownNameError(f"No mask for {name!r}.{suggest(name, self.names)} Masked: {self.names}.")
        return self._index[name]

    def __getitem__(self, name: str) -> nn.Parameter:
        """The raw mask parameters of ``name`` (unit shape)."""
        return self.logits[self._i(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.names)

    def mask(self, name: str) -> Tensor:
        """The mask of ``name`` now (training mode samples hard-concrete noise), unit shape."""
        return self.function(self[name], self.training)

    def weights(self) -> dict[str, Tensor]:
        return {n: self.mask(n) for n in self.names}

    def soft(self, name: str) -> Tensor:
        """The deterministic relaxation: ``sigmoid(temperature * p)`` for continuous sparsification, else the
        eval-mode mask. Its values in (0, 1) are the undecided ones."""
        p = self[name]
        return self.function(p, isinstance(self.function, ContinuousSparsification))

    def undecided(self, low: float = 0.01, high: float = 0.99) -> float:
        """Fraction of weights whose soft mask lies strictly inside ``(low, high)`` (0 = binary masks)."""
        with torch.no_grad():
            n = sum(float(((self.soft(k) > low) & (self.soft(k) < high)).sum()) * self.cover(k) for k in self.names)
        return n / self.n_total

    # ------------------------------------------------------------------ sizes
    def cover(self, name: str) -> int:
        """How many weights one mask value of ``name`` covers."""
        return self.shapes[name].numel() // math.prod(self.unit_shapes[name])

    @property
    def n_total(self) -> int:
        """Number of masked weights (all targets, full shapes)."""
        return sum(s.numel() for s in self.shapes.values())

    @property
    def n_units(self) -> int:
        return sum(math.prod(u) for u in self.unit_shapes.values())

    def expected_kept(self) -> Tensor:
        """Differentiable expected number of kept weights: the mask function's penalty (L1 of sigmoid masks,
        expected L0 of hard-concrete gates), each mask value counted once per weight it covers."""
        return sum(self.function.penalty(self[n]) * self.cover(n) for n in self.names)  # type: ignore[return-value]

    def expected_density(self) -> Tensor:
        """``expected_kept() / n_total`` in [0, 1], differentiable."""
        return self.expected_kept() / self.n_total

    penalty = expected_kept

    def unit_binary(self) -> dict[str, Tensor]:
        """The hard subnetwork per mask unit (unit shapes), by ``self.binarize``: ``"threshold"`` (the mask
        function's own rule: eval mask > 0.5, or ``p > 0`` for continuous sparsification) or ``"expected"``
        (per parameter, the ``round(expected kept units)`` units with the largest raw parameters, as CoFi
        does for L0 gates: the hard density then equals the expected density the penalty controls)."""
        out = {}
        for n in self.names:
            p = self[n].detach()
            if self.binarize == "threshold":
                out[n] = self.function.binarize(p).bool()
            else:
                k = int(round(float(self.function.penalty(p))))
                keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                keep[torch.sort(p.reshape(-1), descending=True, stable=True).indices[:k]] = True
                out[n] = keep.view(p.shape)
        return out

    def binary(self) -> dict[str, Bool[Tensor, "..."]]:
        """The hard subnetwork ``{name: bool tensor}`` in each parameter's full TransformerLens shape."""
        return {n: b.expand(self.shapes[n]).clone() for n, b in self.unit_binary().items()}

    def n_kept(self) -> int:
        return sum(int(b.sum()) * self.cover(n) for n, b in self.unit_binary().items())

    def density(self) -> float:
        """Fraction of masked weights in the hard subnetwork."""
        return self.n_kept() / self.n_total

    def sparsity(self) -> dict[str, float]:
        """Per parameter: fraction of its weights outside the hard subnetwork."""
        return {n: 1.0 - float(b.float().mean()) for n, b in self.unit_binary().items()}

    def layer_sparsity(self) -> dict[Any, float]:
        """Per layer (``int`` for ``blocks.L``, else the name's first part, e.g. ``"embed"``): fraction removed."""
        return _group_sparsity(self.binary())

    def extra_repr(self) -> str:
        n = len(self.names)
        return (f"{n} parameter{'s' if n != 1 else ''}, {self.n_total:,} weights in {self.n_units:,} mask units, "
                f"{self.function!r}, {'training' if self.training else 'eval'}")

    def __repr__(self) -> str:
        return f"WeightMasks({self.extra_repr()})"


def _check_binarize(value: Any) -> str:
    if value not in ("threshold", "expected"):
        raise EdgepatchError(f"binarize must be 'threshold' or 'expected', got {value!r}.")
    return value


def _granularities(names: Sequence[str], granularity: Any) -> dict[str, str]:
    if isinstance(granularity, str):
        _check_granularity(granularity)
        return {n: granularity for n in names}
    if isinstance(granularity, Mapping):
        out = {}
        for pat, value in granularity.items():
            _check_granularity(value, f"granularity for {pat!r}")
        for n in names:
            out[n] = "element"
            for pat, value in granularity.items():
                rx = pat if isinstance(pat, re.Pattern) else None
                if rx is None and isinstance(pat, str) and pat.startswith("re:"):
                    rx = re.compile(pat[3:])
                if (rx.fullmatch(n) if rx is not None else fnmatch.fnmatchcase(n, pat)):
                    out[n] = value
                    break
        return out
    _check_granularity(granularity)
    return {}  # pragma: no cover


def _group_sparsity(subnetwork: Mapping[str, Tensor]) -> dict[Any, float]:
    kept: dict[Any, int] = {}
    total: dict[Any, int] = {}
    for name, b in subnetwork.items():
        parts = name.split(".")
        key: Any = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else parts[0]
        kept[key] = kept.get(key, 0) + int(b.sum())
        total[key] = total.get(key, 0) + b.numel()
    return {k: 1.0 - kept[k] / total[k] for k in kept}


@contextlib.contextmanager
def weight_masks(
    model: nn.Module,
    targets: "Pattern | Sequence[Pattern] | None" = None,
    mask_fn: "str | MaskFunction" = "hard_concrete",
    granularity: "str | Mapping[Pattern, str]" = "element",
    init: float = 1.0,
    include_bias: bool = False,
    masks: WeightMasks | None = None,
    **mask_options: Any,
) -> Iterator[WeightMasks]:
    """Mask parameters of ``model`` with learnable masks while open; yield the :class:`WeightMasks`.

    ``targets``: names / globs / regexes (default: every attention and MLP weight matrix,
    ``blocks.*.attn.W_*`` and ``blocks.*.mlp.W_*``). ``mask_fn`` (+ ``mask_options``), ``granularity``,
    ``init`` and ``include_bias``: see the module docstring. ``masks``: an existing :class:`WeightMasks` to
    apply again (its names are the targets). The model's parameters are frozen inside; on exit (also by
    exception) the model is exactly as before.

    >>> from edgepatch.models import random_model
    >>> model = random_model("tiny")
    >>> with weight_masks(model, "blocks.*.attn.W_V", granularity="head", mask_fn="sigmoid") as m:
    ...     m.unit_shapes["blocks.1.attn.W_V"]
    (4, 1, 1)
    """
    if masks is not None:
        sites = _resolve(model, masks.names)
        for s in sites:
            if s.shape != masks.shapes[s.name]:
                raise EdgepatchError(
                    f"masks[{s.name!r}] was built for shape {shape_str(masks.shapes[s.name])} but the model's "
                    f"parameter is {shape_str(s.shape)}; these masks belong to another model."
                )
    else:
        sites = _resolve(model, targets, include_bias)
        masks = WeightMasks({s.name: s.shape for s in sites}, granularity=granularity, mask_fn=mask_fn, init=init,
                            device=sites[0].param.device, **mask_options)
    _check_free(sites)
    with frozen(model), _parametrized(sites, lambda s: _MaskParametrization(masks, s.name, s.layout)):
        yield masks


# --------------------------------------------------------------------------------------------- ablations
def _as_subnetwork(subnetwork: Any) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]] | None]:
    """``(full-shape bool dict, unit shapes or None)`` from masks, a result, or a dict."""
    if isinstance(subnetwork, WeightMaskResult):
        subnetwork = subnetwork.masks if subnetwork.masks is not None else subnetwork.subnetwork
    if isinstance(subnetwork, WeightMasks):
        return subnetwork.binary(), dict(subnetwork.unit_shapes)
    if isinstance(subnetwork, Mapping):
        return dict(subnetwork), None
    raise TypeError(
        "subnetwork must be a WeightMasks, a WeightMaskResult or a dict {name: bool tensor}, got "
        f"{type(subnetwork).__name__}."
    )


@contextlib.contextmanager
def apply_subnetwork(
    model: nn.Module,
    subnetwork: "WeightMasks | WeightMaskResult | Subnetwork",
    mode: str = "keep",
    seed: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """Run ``model`` with a binary subnetwork kept / ablated / re-initialised / replaced by a random control.

    ``subnetwork``: trained :class:`WeightMasks` (their ``binary()``), a :class:`WeightMaskResult`, or
    ``{name: bool tensor}`` broadcastable to each parameter's TransformerLens shape (True = in the
    subnetwork). ``mode``: ``"keep"``, ``"ablate"``, ``"reinit"`` or ``"random"`` (module docstring). Yields
    ``{name: bool tensor}``, the weights that keep their original values. The model is restored on exit.

    >>> import torch
    >>> from edgepatch.models import random_model
    >>> model = random_model("tiny")
    >>> sub = {"blocks.0.mlp.W_out": torch.arange(64)[:, None].expand(64, 32) < 16}
    >>> with apply_subnetwork(model, sub, mode="random", seed=0) as kept:
    ...     int(kept["blocks.0.mlp.W_out"].sum()), bool((kept["blocks.0.mlp.W_out"] & sub["blocks.0.mlp.W_out"]).any())
    (512, False)
    """
    if mode not in ABLATION_MODES:
        raise EdgepatchError(
            f"Unknown mode {mode!r}; expected one of {', '.join(map(repr, ABLATION_MODES))}."
            f"{suggest(str(mode), ABLATION_MODES)}"
        )
    sub, units = _as_subnetwork(subnetwork)
    if not sub:
        raise EdgepatchError("The subnetwork is empty (no parameters); pass {name: bool tensor} for at least one.")
    sites = _resolve(model, list(sub))
    _check_free(sites)
    gen = torch.Generator().manual_seed(int(seed))
    kept: dict[str, Tensor] = {}
    replacements: dict[str, Tensor | None] = {}
    for s in sites:
        value = sub[s.name]
        if not isinstance(value, Tensor) or value.dtype != torch.bool:
            got = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise EdgepatchError(
                f"subnetwork[{s.name!r}] must be a bool tensor (True = in the subnetwork), got {got}. "
                "Fix: pass `mask > 0.5` or masks.binary()."
            )
        try:
            full = value.to(s.param.device).expand(s.shape)
        except RuntimeError:
            raise EdgepatchError(
                f"subnetwork[{s.name!r}] has shape {shape_str(value.shape)} but the parameter is "
                f"{shape_str(s.shape)}; expected a bool tensor of (or broadcastable to) that shape."
            ) from None
        replacement = None
        if mode == "keep":
            keep = full
        elif mode == "ablate":
            keep = ~full
        elif mode == "reinit":
            keep = full
            original = s.layout.from_param(s.param.detach()).float()
            std, mean = original.std().nan_to_num(0.0), original.mean()
            noise = torch.randn(tuple(s.shape), generator=gen)
            replacement = (noise.to(original.device) * std + mean).to(s.param.dtype)
        else:  # random
            keep = _random_control(s.name, full, None if units is None else units.get(s.name), gen)
        kept[s.name] = keep.clone()
        replacements[s.name] = replacement

    def make(s: _Site) -> nn.Module:
        keep_p = s.layout.to_param(kept[s.name], True)
        rep = replacements[s.name]
        rep_p = None if rep is None else s.layout.to_param(rep, 0.0)
        return _SubnetworkParametrization(s.name, keep_p, rep_p)

    with _parametrized(sites, make):
        yield kept


def _random_control(name: str, full: Tensor, unit_shape: tuple[int, ...] | None, gen: torch.Generator) -> Tensor:
    shape = full.shape
    if unit_shape is None or len(unit_shape) != len(shape):
        unit_shape = tuple(shape)
    reduce_dims = tuple(i for i, u in enumerate(unit_shape) if u == 1 and shape[i] != 1)
    units = full.amax(dim=reduce_dims, keepdim=True) if reduce_dims else full  # any weight of the unit kept
    flat = units.reshape(-1).cpu()
    k, free = int(flat.sum()), int((~flat).sum())
    if k > free:
        word = "weights" if units.numel() == full.numel() else "mask units"
        raise EdgepatchError(
            f"mode='random' draws a random subnetwork as large as the learned one from its complement, but "
            f"{name!r} keeps {k} {word} and its complement has only {free}. Fix: use a sparser subnetwork "
            "(at most half of each parameter), or leave this parameter out of the control."
        )
    candidates = (~flat).nonzero().squeeze(1)
    pick = candidates[torch.randperm(free, generator=gen)[:k]]
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[pick] = True
    return out.view(units.shape).to(full.device).expand(shape)


# --------------------------------------------------------------------------------------------- training
@dataclass(repr=False)
class WeightMaskResult:
    """A trained weight mask: the binary subnetwork, its size and how faithful it is.

    ``subnetwork``: ``{name: bool tensor}`` (full TransformerLens shapes). ``sparsity``: per parameter, the
    fraction of weights removed; ``layer_sparsity``: the same per layer. ``history``: one value per step
    under ``"loss"``, ``"task_loss"``, ``"expected_density"``, ``"undecided"`` (fraction of soft masks in
    (0.01, 0.99)), ``"temperature"`` and, with a target, ``"target_density"``, ``"lambda1"``, ``"lambda2"``.
    ``metric_full`` / ``metric_subnetwork``: the metric's mean on the full model and with
    ``apply_subnetwork(mode="keep")``.
    """

    subnetwork: dict[str, Tensor]
    masks: WeightMasks | None
    n_kept: int
    n_total: int
    sparsity: dict[str, float]
    layer_sparsity: dict[Any, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    metric_name: str = ""
    metric_full: float = math.nan
    metric_subnetwork: float = math.nan
    target_sparsity: float | None = None

    @property
    def density(self) -> float:
        return self.n_kept / max(self.n_total, 1)

    @property
    def overall_sparsity(self) -> float:
        return 1.0 - self.density

    def __repr__(self) -> str:
        target = "" if self.target_sparsity is None else f", target sparsity {self.target_sparsity:g}"
        return (f"WeightMaskResult({len(self.subnetwork)} parameters, kept {self.n_kept:,} / {self.n_total:,} "
                f"weights ({self.density:.1%}){target}, {self.metric_name} {self.metric_full:.4g} -> "
                f"{self.metric_subnetwork:.4g})")


def _answer_logits(model: nn.Module, data: PromptPairs, batch_size: int) -> Tensor:
    """The logits at each prompt's answer position, ``[batch, d_vocab]`` (the other positions are not
    unembedded: see :func:`~edgepatch.metrics.final_logits`)."""
    with torch.no_grad():
        return torch.cat([final_logits(model, part.clean, part.answer_pos)[:, 0].detach()
                          for part in (data[i:i + batch_size] for i in range(0, data.batch, batch_size))])


def _task_logits(model: nn.Module, part: PromptPairs, answer_only: bool) -> tuple[Tensor, PromptPairs]:
    """The logits a metric reads on ``part`` and the data it reads them with: at the answer positions only
    where the metric reads nothing else (``answer_only``), else at every position."""
    if answer_only:
        return final_logits(model, part.clean, part.answer_pos), answer_view(part)
    return model(part.clean), part


def _evaluate(model: nn.Module, data: PromptPairs, metric: Any, clean_at: Tensor, batch_size: int) -> float:
    values = []
    with torch.no_grad():
        for i in range(0, data.batch, batch_size):
            part = data[i:i + batch_size]
            fn = metric.prepare(clean_at[i:i + batch_size]) if getattr(metric, "needs_clean", False) else metric
            values.append(fn(*_task_logits(model, part, reads_answer_only(metric))).float())
    return float(torch.cat(values).mean())


def train_weight_masks(
    model: nn.Module,
    data: PromptPairs,
    targets: "Pattern | Sequence[Pattern] | None" = None,
    metric: Any = "logit_diff",
    mask_fn: "str | MaskFunction" = "hard_concrete",
    *,
    objective: str = "kl",
    granularity: "str | Mapping[Pattern, str]" = "element",
    init: float = 1.0,
    include_bias: bool = False,
    target_sparsity: float | None = None,
    penalty_weight: float = 1.0,
    epochs: int = 300,
    lr: float = 0.1,
    lagrangian_lr: tuple[float, float] = (0.01, 1.0),
    warmup: float = 0.4,
    batch_size: int | None = None,
    schedule: Callable[[int, WeightMasks], Any] | None = None,
    final_temperature: float = 200.0,
    binarize: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **mask_options: Any,
) -> WeightMaskResult:
    """Learn a weight subnetwork of ``targets`` that keeps the model's behaviour on ``data``.

    Loss: faithfulness (``objective="kl"``: KL from the full model's next-token distribution at
    ``answer_pos``; ``"metric"``: minus ``metric``) plus sparsity: ``penalty_weight * expected_density``,
    or, with ``target_sparsity``, the Edge-Pruning Lagrangian (module docstring) that lands the density
    on ``1 - target_sparsity``. ``epochs`` passes over ``data`` in batches of ``batch_size`` (default: all),
    Adam with ``lr`` on the masks; gradient ascent (Adam) on the multipliers ``lambda1, lambda2`` with
    learning rates ``lagrangian_lr``; the target density falls from 1 to ``1 - target_sparsity`` along a
    half cosine over the first ``warmup`` fraction of steps, then holds. ``schedule(epoch, masks)`` runs
    before each epoch; by default continuous sparsification raises its temperature exponentially from 1 to
    ``final_temperature``. ``binarize`` (``"threshold"`` or ``"expected"``; default ``"threshold"`` for
    continuous sparsification, else ``"expected"``) picks the final hard subnetwork (``WeightMasks.unit_binary``).
    Seeded (hard-concrete noise) without touching the global RNG. Returns a :class:`WeightMaskResult`;
    the model comes back unchanged.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.tasks import induction
    >>> model = random_model("tiny"); data = induction(101, n=8, seq_len=4, seed=0)
    >>> res = train_weight_masks(model, data, "blocks.0.mlp.W_in", target_sparsity=0.5, epochs=100,
    ...                          progress=False)
    >>> abs(res.density - 0.5) < 0.05, sorted(res.history)[:3]
    (True, ['expected_density', 'lambda1', 'lambda2'])
    """
    if objective not in ("kl", "metric"):
        raise EdgepatchError(f"Unknown objective {objective!r}; expected 'kl' (KL to the full model) or 'metric'.")
    if target_sparsity is not None and not 0.0 <= float(target_sparsity) < 1.0:
        raise EdgepatchError(
            f"target_sparsity must be in [0, 1) (fraction of weights removed), got {target_sparsity!r}."
        )
    if not isinstance(epochs, int) or epochs < 1:
        raise EdgepatchError(f"epochs must be a positive int, got {epochs!r}.")
    metric_fn = get_metric(metric)
    device = next(model.parameters()).device
    data = data.to(device)
    bs = data.batch if batch_size is None else int(batch_size)
    clean_at = _answer_logits(model, data, bs)
    batches = [(data[i:i + bs], clean_at[i:i + bs]) for i in range(0, data.batch, bs)]
    sign = -1.0 if getattr(metric_fn, "higher_is_better", True) else 1.0
    answer_only = objective == "kl" or reads_answer_only(metric_fn)  # unembed just the answer positions
    if schedule is None:
        def schedule(epoch: int, masks: WeightMasks) -> None:
            if isinstance(masks.function, ContinuousSparsification):
                masks.function.temperature = ContinuousSparsification.schedule(epoch, epochs, final_temperature)

    history: dict[str, list[float]] = {k: [] for k in ("loss", "task_loss", "expected_density", "undecided",
                                                       "temperature")}
    target = None if target_sparsity is None else 1.0 - float(target_sparsity)
    if target is not None:
        history.update(target_density=[], lambda1=[], lambda2=[])
    n_steps = epochs * len(batches)
    warm_steps = max(int(warmup * n_steps), 1)

    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with weight_masks(model, targets, mask_fn=mask_fn, granularity=granularity, init=init,
                          include_bias=include_bias, **mask_options) as masks:
            if binarize is None:
                binarize = "threshold" if isinstance(masks.function, ContinuousSparsification) else "expected"
            masks.binarize = _check_binarize(binarize)
            masks.train()
            opt = torch.optim.Adam(masks.parameters(), lr=lr)
            lambda1 = torch.zeros((), device=device, requires_grad=True)
            lambda2 = torch.zeros((), device=device, requires_grad=True)
            lag_opt = torch.optim.Adam([dict(params=[lambda1], lr=lagrangian_lr[0]),
                                        dict(params=[lambda2], lr=lagrangian_lr[1])],
                                       betas=(0.5, 0.999), maximize=True)
            step = 0
            bar = tqdm(range(epochs), desc="weight masks", disable=not progress, leave=False)
            for epoch in bar:
                schedule(epoch, masks)
                for part, part_clean in batches:
                    with parametrize.cached():
                        logits, view = _task_logits(model, part, answer_only)
                    if objective == "kl":
                        task = KLDivergence(part_clean)(logits, view).mean()
                    else:
                        fn = metric_fn.prepare(part_clean) if getattr(metric_fn, "needs_clean", False) else metric_fn
                        task = sign * with_gradient(fn(logits, view), metric, "weight masks").mean()
                    dens = masks.expected_density()
                    if target is not None:
                        ramp = 0.5 * (1.0 - math.cos(math.pi * min(1.0, (step + 1) / warm_steps)))
                        t = 1.0 - (1.0 - target) * ramp
                        gap = dens - t
                        loss = task + lambda1 * gap + lambda2 * gap ** 2
                    else:
                        loss = task + penalty_weight * dens
                    opt.zero_grad()
                    lag_opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if target is not None:
                        lag_opt.step()
                        history["target_density"].append(t)
                        history["lambda1"].append(float(lambda1.detach()))
                        history["lambda2"].append(float(lambda2.detach()))
                    history["loss"].append(float(loss.detach()))
                    history["task_loss"].append(float(task.detach()))
                    history["expected_density"].append(float(dens.detach()))
                    history["undecided"].append(masks.undecided())
                    history["temperature"].append(float(getattr(masks.function, "temperature", math.nan)))
                    step += 1
                bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", density=f"{history['expected_density'][-1]:.3f}")
            masks.eval()
    subnetwork = masks.binary()
    metric_full = _evaluate(model, data, metric_fn, clean_at, bs)
    with apply_subnetwork(model, subnetwork, mode="keep"):
        metric_sub = _evaluate(model, data, metric_fn, clean_at, bs)
    return WeightMaskResult(
        subnetwork=subnetwork, masks=masks, n_kept=masks.n_kept(), n_total=masks.n_total,
        sparsity=masks.sparsity(), layer_sparsity=masks.layer_sparsity(), history=history,
        metric_name=metric_label(metric_fn), metric_full=metric_full, metric_subnetwork=metric_sub,
        target_sparsity=None if target_sparsity is None else float(target_sparsity),
    )


# --------------------------------------------------------------------------------------------- sweeps
@dataclass(repr=False)
class WeightSweepResult:
    """Subnetworks trained at several target sparsities. Lists are aligned with ``sparsities``.

    ``metric``: the metric's mean with each subnetwork kept (the rest zeroed); ``metric_full`` on the full
    model, ``metric_empty`` with every target weight zeroed; ``faithfulness`` =
    ``(metric - metric_empty) / (metric_full - metric_empty)``.
    """

    sparsities: list[float]
    achieved_sparsity: list[float]
    n_kept: list[int]
    n_total: int
    metric: list[float]
    faithfulness: list[float]
    metric_full: float
    metric_empty: float
    metric_name: str
    results: list[WeightMaskResult]

    def __repr__(self) -> str:
        return (f"WeightSweepResult({len(self.sparsities)} sparsities, {self.n_total:,} weights, "
                f"{self.metric_name}: full {self.metric_full:.4g}, empty {self.metric_empty:.4g})")


def sweep_weight_sparsity(
    model: nn.Module,
    data: PromptPairs,
    targets: "Pattern | Sequence[Pattern] | None" = None,
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99),
    metric: Any = "logit_diff",
    progress: bool = True,
    **train_options: Any,
) -> WeightSweepResult:
    """Train one subnetwork per target sparsity (``train_weight_masks``, hard-concrete + Lagrangian by
    default) and score each with ``apply_subnetwork(mode="keep")``. ``train_options`` go to
    ``train_weight_masks`` (``epochs``, ``lr``, ``mask_fn``, ``granularity``, ...).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.tasks import induction
    >>> sweep = sweep_weight_sparsity(random_model("tiny"), induction(101, n=4, seq_len=4), "blocks.0.mlp.W_in",
    ...                               sparsities=[0.5, 0.9], epochs=10, progress=False)
    >>> len(sweep.n_kept), sweep.n_total
    (2, 2048)
    """
    from tqdm.auto import tqdm

    metric_fn = get_metric(metric)
    results = []
    for s in tqdm(list(sparsities), desc="sparsity sweep", disable=not progress, leave=False):
        results.append(train_weight_masks(model, data, targets, metric=metric_fn, target_sparsity=float(s),
                                          progress=False, **train_options))
    if not results:
        raise EdgepatchError("sparsities is empty; pass at least one target sparsity, e.g. [0.5, 0.9].")
    device = next(model.parameters()).device
    data = data.to(device)
    bs = data.batch if train_options.get("batch_size") is None else int(train_options["batch_size"])
    clean_at = _answer_logits(model, data, bs)
    empty = {n: torch.zeros((), dtype=torch.bool) for n in results[0].subnetwork}
    with apply_subnetwork(model, empty, mode="keep"):
        metric_empty = _evaluate(model, data, metric_fn, clean_at, bs)
    metric_full = results[0].metric_full
    values = [r.metric_subnetwork for r in results]
    with torch.no_grad():
        faith = normalized_faithfulness(torch.tensor(values, dtype=torch.float64), metric_full, metric_empty)
    return WeightSweepResult(
        sparsities=[float(s) for s in sparsities], achieved_sparsity=[r.overall_sparsity for r in results],
        n_kept=[r.n_kept for r in results], n_total=results[0].n_total, metric=values,
        faithfulness=[float(f) for f in faith], metric_full=metric_full, metric_empty=metric_empty,
        metric_name=results[0].metric_name, results=results,
    )


def plot_weight_sweep(
    sweeps: "WeightSweepResult | Mapping[str, WeightSweepResult]",
    x: str = "n_kept",
    y: str = "faithfulness",
    title: str | None = None,
) -> Any:
    """A plotly figure of one or several sparsity sweeps: ``y`` (``"faithfulness"`` or ``"metric"``) against
    ``x`` (``"n_kept"``, log axis, or ``"sparsity"``). plotly is imported only when called.

    >>> fig = plot_weight_sweep(WeightSweepResult([0.5], [0.5], [10], 20, [1.0], [0.5], 2.0, 0.0, "logit_diff", []))
    >>> fig.data[0].y
    (0.5,)
    """
    import plotly.graph_objects as go

    if x not in ("n_kept", "sparsity"):
        raise EdgepatchError(f"x must be 'n_kept' or 'sparsity', got {x!r}.")
    if y not in ("faithfulness", "metric"):
        raise EdgepatchError(f"y must be 'faithfulness' or 'metric', got {y!r}.")
    if isinstance(sweeps, WeightSweepResult):
        sweeps = {"weight masks": sweeps}
    fig = go.Figure()
    for label, sweep in sweeps.items():
        xs = sweep.n_kept if x == "n_kept" else sweep.achieved_sparsity
        ys = sweep.faithfulness if y == "faithfulness" else sweep.metric
        fig.add_trace(go.Scatter(x=list(xs), y=list(ys), mode="lines+markers", name=str(label)))
    any_sweep = next(iter(sweeps.values()))
    fig.update_layout(
        title=title or f"Weight subnetworks ({any_sweep.metric_name})",
        xaxis_title="kept weights" if x == "n_kept" else "sparsity (fraction removed)",
        yaxis_title="normalized faithfulness" if y == "faithfulness" else any_sweep.metric_name,
    )
    if x == "n_kept":
        fig.update_xaxes(type="log")
    return fig
