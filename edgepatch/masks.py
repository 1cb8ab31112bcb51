"""Learnable edge masks: mask functions and the ``train_masks`` / ``mask_fn`` modes.

Context
-------
Learned-mask circuit discovery (subnetwork probing, Edge Pruning) gives every edge a raw parameter and
maps it to a weight in [0, 1] with a *mask function*; training the parameters against a faithfulness loss
plus a sparsity penalty finds a small circuit. The mask functions here are shared with weight-level masks:

- ``identity``: ``w = clamp(p, 0, 1)``; penalty ``sum w``.
- ``sigmoid``: ``w = sigmoid(p / temperature)``; L1 penalty ``sum w``.
- ``hard_concrete`` (Louizos et al. 2018, used by Edge Pruning): in training, a stretched, clamped
  concrete sample ``clamp(sigmoid((log u - log(1-u) + p) / beta) * (zeta - gamma) + gamma, 0, 1)`` with
  ``u ~ U(0, 1)``; in eval, the same without noise. Expected-L0 penalty
  ``sum sigmoid(p - beta * log(-gamma / zeta))``.
- ``continuous`` sparsification (Savarese et al. 2019): ``w = sigmoid(temperature * p)``; the temperature
  grows during training (exponentially, e.g. to 200 over 90 epochs) so weights become binary; in eval,
  ``w = (p > 0)``.

Modes are context managers that restore what they found and nest:

- ``train_masks(model, graph, ablated, ...)`` patches the model with weights computed from a fresh
  :class:`EdgeMasks` at every forward, freezes the model's parameters (their ``requires_grad`` is restored
  on exit, so an optimizer over ``masks.parameters()`` never touches model weights) and yields the masks.
- ``mask_fn(kind, **options)`` changes how raw parameters become weights while open: for one ``EdgeMasks``
  (``masks=``) or, by default, for every mask that has no function of its own.

Example
-------
>>> import torch
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.patching import zero_ablation
>>> model = random_model("tiny"); graph = build_graph(model)
>>> with train_masks(model, graph, zero_ablation(graph), mask_fn="sigmoid", init=3.0) as masks:
...     opt = torch.optim.Adam(masks.parameters(), lr=0.1)
...     loss = model(torch.zeros(1, 4, dtype=torch.long))[:, -1].logsumexp(-1).sum() + 1e-3 * masks.penalty()
...     loss.backward(); opt.step()
>>> masks.n_kept() <= graph.n_edges
True
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from edgepatch.errors import EdgepatchError, suggest
from edgepatch.graph import Graph
from edgepatch.patching import Ablation, patch


class MaskFunction:
    """Maps raw mask parameters to weights in [0, 1]; ``penalty`` is the (expected) number kept."""

    name = "base"

    def __call__(self, params: Tensor, training: bool) -> Tensor:
        raise NotImplementedError

    def penalty(self, params: Tensor) -> Tensor:
        return self(params, training=False).sum()

    def binarize(self, params: Tensor) -> Tensor:
        """The final hard circuit: which parameters count as kept."""
        return self(params, training=False) > 0.5

    def init_value(self, weight: float) -> float:
        """The raw parameter whose (eval) weight is ``weight`` (used for ``init`` given as a weight)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({opts})"


class Identity(MaskFunction):
    name = "identity"

    def __call__(self, params: Tensor, training: bool) -> Tensor:
        return params.clamp(0, 1)

    def init_value(self, weight: float) -> float:
        return weight


@dataclass(repr=False)
class Sigmoid(MaskFunction):
    temperature: float = 1.0
    name = "sigmoid"

    def __call__(self, params: Tensor, training: bool) -> Tensor:
        return torch.sigmoid(params / self.temperature)

    def init_value(self, weight: float) -> float:
        w = min(max(weight, 1e-4), 1 - 1e-4)
        return self.temperature * math.log(w / (1 - w))


@dataclass(repr=False)
class HardConcrete(MaskFunction):
    """Hard-concrete gates. ``beta`` is the temperature, ``(gamma, zeta)`` the stretch interval."""

    beta: float = 2 / 3
    gamma: float = -0.1
    zeta: float = 1.1
    name = "hard_concrete"

    def __call__(self, params: Tensor, training: bool) -> Tensor:
        if training:
            u = torch.rand_like(params).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + params) / self.beta)
        else:
            s = torch.sigmoid(params)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def penalty(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def init_value(self, weight: float) -> float:
        s = (min(max(weight, 1e-4), 1 - 1e-4) - self.gamma) / (self.zeta - self.gamma)
        return math.log(s / (1 - s))


@dataclass(repr=False)
class ContinuousSparsification(MaskFunction):
    """``sigmoid(temperature * p)`` in training, ``p > 0`` in eval; raise ``temperature`` while training."""

    temperature: float = 1.0
    name = "continuous"

    def __call__(self, params: Tensor, training: bool) -> Tensor:
        if training:
            return torch.sigmoid(self.temperature * params)
        return (params > 0).to(params.dtype)

    def penalty(self, params: Tensor) -> Tensor:
        return torch.sigmoid(self.temperature * params).sum()

    def binarize(self, params: Tensor) -> Tensor:
        return params > 0

    def init_value(self, weight: float) -> float:
        w = min(max(weight, 1e-4), 1 - 1e-4)
        return math.log(w / (1 - w)) / self.temperature

    @staticmethod
    def schedule(epoch: int, n_epochs: int, final_temperature: float = 200.0, initial: float = 1.0) -> float:
        """Savarese et al.'s exponential schedule: ``initial * (final / initial) ** (epoch / (n_epochs - 1))``."""
        frac = epoch / max(n_epochs - 1, 1)
        return initial * (final_temperature / initial) ** frac


MASK_FUNCTIONS: dict[str, type[MaskFunction]] = {
    "identity": Identity,
    "sigmoid": Sigmoid,
    "hard_concrete": HardConcrete,
    "hard-concrete": HardConcrete,
    "continuous": ContinuousSparsification,
    "continuous_sparsification": ContinuousSparsification,
}


def make_mask_fn(kind: "str | MaskFunction", **options: Any) -> MaskFunction:
    """A mask function from its name and options (or the given instance, unchanged)."""
    if isinstance(kind, MaskFunction):
        if options:
            raise EdgepatchError("Pass options to make_mask_fn only with a mask function name, not an instance.")
        return kind
    if kind not in MASK_FUNCTIONS:
        raise EdgepatchError(
            f"Unknown mask function {kind!r}; expected one of {sorted(set(MASK_FUNCTIONS))}.{suggest(str(kind), MASK_FUNCTIONS)}"
        )
    try:
        return MASK_FUNCTIONS[kind](**options)
    except TypeError as err:
        raise EdgepatchError(f"Bad options {options} for mask function {kind!r}: {err}") from None


_DEFAULT_STACK: list[MaskFunction] = [Sigmoid()]


def current_mask_fn() -> MaskFunction:
    """The mask function used by masks that have none of their own (innermost ``mask_fn`` context)."""
    return _DEFAULT_STACK[-1]


class EdgeMasks(nn.Module):
    """Raw mask parameters ``logits`` (``[n_src, n_dest]``, or ``[slots, n_src, n_dest]`` per position)
    and the mask function that turns them into patching weights."""

    def __init__(
        self,
        graph: Graph,
        init: float | Tensor = 1.0,
        mask_fn: "str | MaskFunction | None" = None,
        slots: int | None = None,
        init_is_weight: bool = True,
        device: Any = "cpu",
    ) -> None:
        super().__init__()
        self.graph = graph
        self.mask_fn: MaskFunction | None = None if mask_fn is None else make_mask_fn(mask_fn)
        shape = (graph.n_src, graph.n_dest) if slots is None else (slots, graph.n_src, graph.n_dest)
        if isinstance(init, Tensor):
            graph.check_shape(init, "init")
            data = init.detach().to(device=device, dtype=torch.float32).expand(shape).clone()
        else:
            value = self.function.init_value(float(init)) if init_is_weight else float(init)
            data = torch.full(shape, value, device=device)
        self.logits = nn.Parameter(data)
        self.register_buffer("valid", graph.valid.to(device), persistent=False)

    @property
    def function(self) -> MaskFunction:
        return self.mask_fn if self.mask_fn is not None else current_mask_fn()

    def weights(self) -> Tensor:
        """Current patching weights (training mode samples hard-concrete noise)."""
        return self.function(self.logits, self.training)

    def penalty(self) -> Tensor:
        """Sparsity penalty over valid edges: L1 of sigmoid weights, expected L0 of hard-concrete, ..."""
        f = self.function
        valid = self.valid.expand_as(self.logits)
        return f.penalty(self.logits[valid])

    def circuit(self) -> Tensor:
        """The binary circuit ``[n_src, n_dest]`` (valid edges only)."""
        return self.function.binarize(self.logits.detach()) & self.valid

    def n_kept(self) -> int:
        return int(self.circuit().sum())

    def density(self) -> float:
        return self.n_kept() / max(int(self.valid.sum()) * (self.logits.shape[0] if self.logits.ndim == 3 else 1), 1)

    def extra_repr(self) -> str:
        return f"{self.graph!r}, mask_fn={self.function!r}"


def _freeze(model: Any) -> dict[int, bool]:
    saved = {}
    for p in model.parameters():
        saved[id(p)] = p.requires_grad
        p.requires_grad_(False)
    return saved


def _unfreeze(model: Any, saved: dict[int, bool]) -> None:
    for p in model.parameters():
        if id(p) in saved:
            p.requires_grad_(saved[id(p)])


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Parameters of ``model`` do not require grad inside; each one's flag is restored on exit."""
    saved = _freeze(model)
    try:
        yield
    finally:
        _unfreeze(model, saved)


@contextlib.contextmanager
def train_masks(
    model: Any,
    graph: Graph,
    ablated: Ablation,
    init: float | Tensor = 1.0,
    mask_fn: "str | MaskFunction | None" = None,
    positions: Tensor | str | None = None,
    masks: EdgeMasks | None = None,
    **mask_options: Any,
) -> Iterator[EdgeMasks]:
    """Patch ``model`` with learnable edge masks; yield the :class:`EdgeMasks` for an optimizer.

    ``init``: the initial weight of every edge (1 = the full model), or a tensor of raw parameters with
    ``init_is_weight=False`` semantics when ``masks`` is built by you. ``mask_fn``: a name
    (``"sigmoid"``, ``"hard_concrete"``, ``"continuous"``, ``"identity"``) or a :class:`MaskFunction`;
    ``mask_options`` go to it (e.g. ``beta=2/3``). Model parameters are frozen inside and restored after.
    """
    if masks is None:
        fn = make_mask_fn(mask_fn, **mask_options) if mask_fn is not None else None
        slots = None
        if isinstance(positions, Tensor):
            slots = int(positions.max()) + 1
        elif positions == "absolute":
            raise EdgepatchError("train_masks(positions='absolute') needs masks=EdgeMasks(graph, slots=seq_len).")
        device = next(model.parameters()).device
        masks = EdgeMasks(graph, init=init, mask_fn=fn, slots=slots, device=device)
    with frozen(model), patch(model, graph, masks.weights, ablated, positions=positions):
        yield masks


@contextlib.contextmanager
def mask_fn(kind: "str | MaskFunction", masks: EdgeMasks | None = None, **options: Any) -> Iterator[MaskFunction]:
    """Use mask function ``kind`` while open: for ``masks`` if given, else for every mask without one.

    >>> with mask_fn("hard_concrete", beta=0.5) as f:
    ...     current_mask_fn().beta
    0.5
    """
    fn = make_mask_fn(kind, **options)
    if masks is not None:
        previous = masks.mask_fn
        masks.mask_fn = fn
        try:
            yield fn
        finally:
            masks.mask_fn = previous
    else:
        _DEFAULT_STACK.append(fn)
        try:
            yield fn
        finally:
            _DEFAULT_STACK.pop()
