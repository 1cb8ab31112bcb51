"""One score representation for every algorithm: a dense ``[n_src, n_dest]`` tensor plus the graph.

Context
-------
Every edge-ranking algorithm (attribution patching, integrated gradients, exact patching, ACDC, learned
masks, baselines) returns :class:`EdgeScores`. Scores are indexed like patching weights, so a circuit is
``scores.circuit(k)``, a bool ``[n_src, n_dest]`` mask usable directly as ``patch`` weights. Invalid entries
(no such edge) are NaN and never selected.

Sign convention: a score estimates ``metric(edge ablated) - metric(edge kept)`` (the effect of ablating the
edge). Ranking uses ``|score|`` by default (``by="abs"``), or the signed score (``by="signed"``: the most
negative ablation effect, i.e. the edge whose removal hurts the metric most, ranks first when
``higher_is_better``).

Ties: ``top_k`` breaks ties by edge order (``graph.edge_names``, source-major), so results are
deterministic; ``groups()`` lists the edge counts at which the set of tied scores ends (for sweeps that
follow ties).

Per-position scores (``attribute(..., positions=...)``): ``scores`` is ``[n_slots, n_src, n_dest]``, one
score per (position slot, edge), and ``slots`` names the slots. Everything ranks (slot, edge) pairs
instead of edges: ``flat`` and ``item_names`` (``"edge@slot"``) are slot-major, ``circuit(k)`` is a bool
``[n_slots, n_src, n_dest]`` mask for ``patch(..., positions=...)`` and ``sweep(..., positions=...)``, and
``slot(name)`` gives one slot's scores as ordinary edge scores.

Example
-------
>>> import torch
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> g = build_graph(random_model("tiny"))
>>> s = EdgeScores(torch.randn(g.n_src, g.n_dest), g, method="random")
>>> s.circuit(10).sum().item()
10
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from edgepatch.errors import EdgepatchError, shape_str
from edgepatch.graph import Graph, prune_circuit

RankBy = Literal["abs", "signed", "neg"]


@dataclass(eq=False)
class EdgeScores:
    """Dense scores ``[n_src, n_dest]`` (NaN where there is no edge), the graph, and how they were made.
    Per position: ``[n_slots, n_src, n_dest]`` with the slot names in ``slots`` (see the module docstring)."""

    scores: Float[Tensor, "n_src n_dest"]
    graph: Graph
    method: str = "unknown"
    metric: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    circuit_mask: Tensor | None = None  # a method's own final circuit (ACDC, learned masks), if any
    slots: tuple[str, ...] | None = None  # per-position scores: the name of each slot (default "0", "1", ...)

    def __post_init__(self) -> None:
        self.graph.check_shape(self.scores, "scores")
        if self.scores.ndim == 3:
            n = self.scores.shape[0]
            names = tuple(str(x) for x in self.slots) if self.slots is not None else tuple(map(str, range(n)))
            if len(names) != n or len(set(names)) != n:
                raise EdgepatchError(
                    f"slots must give {n} distinct names, one per slot of the scores {shape_str(self.scores.shape)}; "
                    f"got {list(names)}."
                )
            self.slots = names
        elif self.scores.ndim != 2 or self.slots is not None:
            raise EdgepatchError(
                f"scores must be [n_src, n_dest], or [n_slots, n_src, n_dest] with slots= for per-position scores; "
                f"got {shape_str(self.scores.shape)}{' with slots' if self.slots is not None else ''}."
            )
        s = self.scores.detach().float().cpu().clone()
        s[..., ~self.graph.valid] = float("nan")
        self.scores = s

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def per_position(self) -> bool:
        """Whether these are per-position scores (``[n_slots, n_src, n_dest]``)."""
        return self.slots is not None

    @property
    def n_items(self) -> int:
        """What is ranked: ``n_edges``, or ``n_slots x n_edges`` (slot, edge) pairs per position."""
        return self.graph.n_edges * (len(self.slots) if self.slots is not None else 1)

    @property
    def item_names(self) -> list[str]:
        """``graph.edge_names``, or ``"edge@slot"`` for every slot (slot-major) per position."""
        if self.slots is None:
            return list(self.graph.edge_names)
        return [f"{e}@{slot}" for slot in self.slots for e in self.graph.edge_names]

    @property
    def flat(self) -> Tensor:
        """``[n_items]`` scores in ``item_names`` order (``graph.edge_names`` order without positions)."""
        return self.graph.to_edges(self.scores).reshape(-1)

    def slot(self, slot: str | int) -> "EdgeScores":
        """One slot's scores (by name, or index) as ordinary ``[n_src, n_dest]`` edge scores."""
        if self.slots is None:
            raise EdgepatchError("slot(): these scores are not per position.")
        if isinstance(slot, str):
            if slot not in self.slots:
                raise EdgepatchError(f"Unknown slot {slot!r}; the slots are {list(self.slots)}.")
            i = self.slots.index(slot)
        else:
            i = int(slot)
            if not -len(self.slots) <= i < len(self.slots):
                raise EdgepatchError(f"slot index {i} out of range for {len(self.slots)} slots {list(self.slots)}.")
        return EdgeScores(self.scores[i], self.graph, method=self.method, metric=self.metric,
                          info={**self.info, "slot": self.slots[i]})

    def _dense(self, flat: Tensor) -> Tensor:
        """``[..., n_items]`` -> ``[..., n_src, n_dest]`` (``[..., n_slots, n_src, n_dest]`` per position)."""
        if self.slots is not None:
            flat = flat.unflatten(-1, (len(self.slots), self.graph.n_edges))
        return self.graph.from_edges(flat, fill=False)

    def ranking_key(self, by: RankBy = "abs") -> Tensor:
        f = self.flat
        if by == "abs":
            return f.abs()
        if by == "signed":
            return f
        if by == "neg":
            return -f
        raise EdgepatchError(f"by must be 'abs', 'signed' or 'neg'; got {by!r}.")

    def order(self, by: RankBy = "abs") -> Tensor:
        """Edge indices (into ``edge_names``) from highest to lowest rank; ties by edge order; NaN last."""
        key = self.ranking_key(by).nan_to_num(float("-inf"))
        return torch.sort(key, descending=True, stable=True).indices

    def top_k(self, k: int, by: RankBy = "abs") -> list[tuple[str, float]]:
        """The ``k`` best edges (per position: (slot, edge) pairs) as (name, score) pairs."""
        k = self._check_k(k)
        names, flat = self.item_names, self.flat
        return [(names[i], float(flat[i])) for i in self.order(by)[:k].tolist()]

    def circuit(self, k: int | float, by: RankBy = "abs", prune: bool = False) -> Tensor:
        """Bool ``[n_src, n_dest]`` mask of the top ``k`` edges (``k`` < 1: a fraction of all edges); per
        position ``[n_slots, n_src, n_dest]`` of the top ``k`` (slot, edge) pairs. ``prune``: only their
        connected part, as MIB evaluates it (see :func:`edgepatch.prune_circuit`)."""
        k = self._check_k(k)
        self._check_prune(prune)
        flat = torch.zeros(self.n_items, dtype=torch.bool)
        flat[self.order(by)[:k]] = True
        mask = self._dense(flat).bool()
        return prune_circuit(self.graph, mask) if prune else mask

    def circuits(self, counts: "list[int]", by: RankBy = "abs", prune: bool = False) -> Tensor:
        """Stacked bool masks ``[len(counts), n_src, n_dest]`` (per position ``[len(counts), n_slots, n_src,
        n_dest]``; nested: each contains the smaller ones; ``prune``: their connected parts, nested as well)."""
        self._check_prune(prune)
        order = self.order(by)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        c = torch.tensor([self._check_k(k) for k in counts])
        flat = rank[None, :] < c[:, None]
        mask = self._dense(flat).bool()
        return prune_circuit(self.graph, mask) if prune else mask

    def threshold(self, t: float, by: RankBy = "abs") -> Tensor:
        """Bool mask of edges (per position: (slot, edge) pairs) whose ranking key is >= ``t``."""
        key = self.ranking_key(by)
        return self._dense((key >= t) & ~key.isnan()).bool()

    def _check_prune(self, prune: bool) -> None:
        if prune and self.slots is not None:
            raise EdgepatchError(
                "prune=True: MIB's pruning is defined for circuits of edges, not of (position, edge) pairs; prune "
                "one slot's circuit with scores.slot(name).circuit(k, prune=True)."
            )

    def groups(self, by: RankBy = "abs") -> list[int]:
        """Edge counts at which a run of tied scores ends (ascending, ends with ``n_edges``)."""
        key = self.ranking_key(by)[self.order(by)]
        ends = (key[1:] != key[:-1]).nonzero().flatten() + 1
        return ends.tolist() + [len(key)]

    def to_dict(self) -> dict[str, float]:
        """``{edge name: score}`` for every edge (per position: ``{"edge@slot": score}``)."""
        return dict(zip(self.item_names, self.flat.tolist()))

    def _check_k(self, k: int | float) -> int:
        n = self.n_items
        what = "n_edges" if self.slots is None else "n_slots x n_edges"
        x = plain_number(k)
        if x is None or (isinstance(x, float) and not (0 < x < 1 or x.is_integer())):
            raise EdgepatchError(
                f"k must be a count between 0 and {what} = {n} (a whole number) or a fraction strictly between 0 and "
                f"1; got {k!r}."
            )
        if isinstance(x, float) and 0 < x < 1:
            return int(round(x * n))
        if not 0 <= int(x) <= n:
            raise EdgepatchError(f"k must be between 0 and {what} = {n} (or a fraction in (0, 1)); got {int(x)}.")
        return int(x)

    def __repr__(self) -> str:
        f = self.flat
        where = f", {len(self.slots)} position slots" if self.slots is not None else ""
        nan = int(torch.isnan(f).sum())
        return (
            f"EdgeScores({self.method}{', ' + self.metric if self.metric else ''}, {self.graph!r}{where}, "
            f"|score| max {float(f.abs().nan_to_num(0).max()):.3g}{f', {nan} NaN' if nan else ''})"
        )


def plain_number(k: Any) -> int | float | None:
    """``k`` as a Python int or float (numpy scalars and one-element tensors included), None if it is no
    number (bools are not numbers here: ``True`` edges is a mistake, not one edge)."""
    if isinstance(k, Tensor) and k.numel() == 1 and not k.dtype.is_complex:
        k = k.item()
    if isinstance(k, bool) or (hasattr(k, "dtype") and str(getattr(k, "dtype", "")) == "bool"):
        return None
    if isinstance(k, numbers.Integral):
        return int(k)
    if isinstance(k, numbers.Real):
        return float(k)
    return None


def require_edge_scores(scores: EdgeScores, what: str) -> None:
    """An error for per-position scores where only edge scores make sense."""
    if scores.slots is not None:
        raise EdgepatchError(
            f"{what} takes edge scores, not per-position scores ({len(scores.slots)} slots); pass one slot's "
            f"scores: scores.slot(name)."
        )
