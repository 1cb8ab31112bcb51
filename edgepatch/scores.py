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
    """Dense scores ``[n_src, n_dest]`` (NaN where there is no edge), the graph, and how they were made."""

    scores: Float[Tensor, "n_src n_dest"]
    graph: Graph
    method: str = "unknown"
    metric: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    circuit_mask: Tensor | None = None  # a method's own final circuit (ACDC, learned masks), if any

    def __post_init__(self) -> None:
        self.graph.check_shape(self.scores, "scores")
        if self.scores.ndim != 2:
            raise EdgepatchError(f"scores must be [n_src, n_dest]; got {shape_str(self.scores.shape)}.")
        s = self.scores.detach().float().cpu().clone()
        s[~self.graph.valid] = float("nan")
        self.scores = s

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def flat(self) -> Tensor:
        """``[n_edges]`` scores in ``graph.edge_names`` order."""
        return self.graph.to_edges(self.scores)

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
        """The ``k`` best edges as (name, score) pairs."""
        k = self._check_k(k)
        names, flat = self.graph.edge_names, self.flat
        return [(names[i], float(flat[i])) for i in self.order(by)[:k].tolist()]

    def circuit(self, k: int | float, by: RankBy = "abs", prune: bool = False) -> Tensor:
        """Bool ``[n_src, n_dest]`` mask of the top ``k`` edges (``k`` < 1: a fraction of all edges).
        ``prune``: only their connected part, as MIB evaluates it (see :func:`edgepatch.prune_circuit`)."""
        k = self._check_k(k)
        flat = torch.zeros(self.graph.n_edges, dtype=torch.bool)
        flat[self.order(by)[:k]] = True
        mask = self.graph.from_edges(flat, fill=False).bool()
        return prune_circuit(self.graph, mask) if prune else mask

    def circuits(self, counts: "list[int]", by: RankBy = "abs", prune: bool = False) -> Tensor:
        """Stacked bool masks ``[len(counts), n_src, n_dest]`` (nested: each contains the smaller ones;
        ``prune``: their connected parts, nested as well)."""
        order = self.order(by)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        c = torch.tensor([self._check_k(k) for k in counts])
        flat = rank[None, :] < c[:, None]
        mask = self.graph.from_edges(flat, fill=False).bool()
        return prune_circuit(self.graph, mask) if prune else mask

    def threshold(self, t: float, by: RankBy = "abs") -> Tensor:
        """Bool mask of edges whose ranking key is >= ``t``."""
        key = self.ranking_key(by)
        return self.graph.from_edges((key >= t) & ~key.isnan(), fill=False).bool()

    def groups(self, by: RankBy = "abs") -> list[int]:
        """Edge counts at which a run of tied scores ends (ascending, ends with ``n_edges``)."""
        key = self.ranking_key(by)[self.order(by)]
        ends = (key[1:] != key[:-1]).nonzero().flatten() + 1
        return ends.tolist() + [len(key)]

    def to_dict(self) -> dict[str, float]:
        """``{edge name: score}`` for every edge."""
        return dict(zip(self.graph.edge_names, self.flat.tolist()))

    def _check_k(self, k: int | float) -> int:
        n = self.graph.n_edges
        if isinstance(k, float) and 0 <= k <= 1 and not float(k).is_integer():
            return int(round(k * n))
        k = int(k)
        if not 0 <= k <= n:
            raise EdgepatchError(f"k must be between 0 and n_edges = {n} (or a fraction in [0, 1]); got {k}.")
        return k

    def __repr__(self) -> str:
        f = self.flat
        return (
            f"EdgeScores({self.method}{', ' + self.metric if self.metric else ''}, {self.graph!r}, "
            f"|score| max {float(f.abs().nan_to_num(0).max()):.3g})"
        )
