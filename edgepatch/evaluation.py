"""Evaluating edge rankings against a known circuit: ROC curves and their area.

Context
-------
When the true circuit is known (a planted circuit, see :mod:`edgepatch.planted`, or a reference circuit from
the literature), a ranking of the edges can be judged like a classifier: walk down the ranking and, at every
threshold, count the true circuit edges above it (true positive rate) and the other edges above it (false
positive rate). The area under that ROC curve is the probability that a random circuit edge ranks above a
random non-circuit edge (ties counting one half).

Only valid edges count (``graph.edge_names``); the ranking key is ``|score|`` (``by="abs"``, the default),
the signed score (``"signed"``), its negative (``"neg"``), or ``"auto"``: signed for scores that are an
importance (``info["score_kind"] == "importance"``, e.g. learned masks), ``|score|`` otherwise.

Ties: edges with equal ranking keys cannot be ordered, so the curve takes them as one step (one point per
distinct key value): it moves diagonally across a tie, and the trapezoid over that step gives the one-half
credit. Unscored edges (NaN) rank last, tied with each other (their threshold is ``-inf``).

Example
-------
>>> import torch
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.scores import EdgeScores
>>> g = build_graph(random_model("tiny"))
>>> truth = g.mask_from_edges(["input->a0.h0<q>", "a0.h1->m1"])
>>> curve = roc(EdgeScores(truth.float(), g), truth)
>>> curve.auc, curve.thresholds.tolist()
(1.0, [inf, 1.0, 0.0])
>>> fpr, tpr, auc = curve  # also unpacks as (fpr, tpr, auc)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from edgepatch.errors import EdgepatchError, shape_str, suggest
from edgepatch.scores import EdgeScores, require_edge_scores

__all__ = ["roc", "RocCurve", "plot_roc", "circuit_recovery"]

BY = ("abs", "signed", "neg", "auto")


class RocCurve(tuple):
    """An ROC curve: ``fpr``, ``tpr`` (``[n_points]`` float64, from (0, 0) to (1, 1)), ``thresholds``
    (``[n_points]``: point k counts the edges whose ranking key is >= ``thresholds[k]``; the first is
    ``+inf``), ``auc`` (trapezoid area) and ``by`` (the ranking key used).

    It is also the tuple ``(fpr, tpr, auc)`` (what :func:`roc` returned before thresholds were added), so
    ``fpr, tpr, auc = roc(...)`` and ``roc(...)[2]`` keep working."""

    fpr: Float[Tensor, "n_points"]
    tpr: Float[Tensor, "n_points"]
    thresholds: Float[Tensor, "n_points"]
    auc: float

    def __new__(cls, fpr: Tensor, tpr: Tensor, thresholds: Tensor, auc: float, by: str = "abs") -> "RocCurve":
        self = super().__new__(cls, (fpr, tpr, auc))
        self.__dict__.update(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(auc), by=by)
        return self

    def __repr__(self) -> str:
        return f"RocCurve(auc={self.auc:.4f}, {len(self.fpr)} points, by={self.by!r})"


def _true_flat(scores: EdgeScores, true_edges: Tensor | Iterable[str]) -> Tensor:
    graph = scores.graph
    if isinstance(true_edges, str):
        true_edges = [true_edges]
    if not isinstance(true_edges, Tensor):
        true_edges = graph.mask_from_edges(list(true_edges))
    if tuple(true_edges.shape) == (graph.n_edges,):
        return true_edges.bool().cpu()
    if tuple(true_edges.shape) != (graph.n_src, graph.n_dest):
        raise EdgepatchError(
            f"true_edges has shape {shape_str(true_edges.shape)}; expected a [n_src, n_dest] = [{graph.n_src}, "
            f"{graph.n_dest}] bool mask, a [n_edges] = [{graph.n_edges}] bool vector, or a list of edge names."
        )
    return graph.to_edges(true_edges.bool().cpu())


def _resolve_by(scores: EdgeScores, by: str) -> str:
    if by not in BY:
        raise EdgepatchError(f"by must be one of {BY}; got {by!r}.{suggest(str(by), BY)}")
    if by == "auto":
        return "signed" if scores.info.get("score_kind") == "importance" else "abs"
    return by


def roc(scores: EdgeScores, true_edges: Tensor | Iterable[str], by: str = "abs") -> RocCurve:
    """ROC curve of ranking the edges by ``scores`` (``by``: ``"abs"``, ``"signed"``, ``"neg"``, ``"auto"``)
    against the true circuit ``true_edges`` (a bool mask ``[n_src, n_dest]``, ``[n_edges]``, or edge names).

    Returns a :class:`RocCurve` (``fpr``, ``tpr``, ``thresholds``, ``auc``): one point per distinct score
    (ties grouped), and the trapezoid area under them. It unpacks as ``(fpr, tpr, auc)``.

    >>> import torch
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> truth = g.mask_from_edges(["input->a0.h0<q>"])
    >>> fpr, tpr, auc = roc(EdgeScores(torch.zeros(g.n_src, g.n_dest), g), truth)  # all tied
    >>> fpr.tolist(), tpr.tolist(), auc
    ([0.0, 1.0], [0.0, 1.0], 0.5)
    """
    if isinstance(scores, Tensor):
        raise EdgepatchError("roc needs EdgeScores (which carry their graph); wrap a tensor: EdgeScores(tensor, graph).")
    if not isinstance(scores, EdgeScores):
        raise EdgepatchError(f"scores must be EdgeScores; got {type(scores).__name__}.")
    require_edge_scores(scores, "roc (a true circuit is a set of edges)")
    by = _resolve_by(scores, by)
    truth = _true_flat(scores, true_edges)
    n_pos = int(truth.sum())
    n_neg = int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        raise EdgepatchError(
            f"roc needs both circuit and non-circuit edges; true_edges marks {n_pos} of {scores.graph.n_edges} edges."
        )
    key = scores.ranking_key(by).double().nan_to_num(float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(key, descending=True, stable=True).indices
    key, truth = key[order], truth[order]
    ends = torch.cat([(key[1:] != key[:-1]).nonzero().flatten(), torch.tensor([len(key) - 1])])
    tp = torch.cumsum(truth.double(), 0)[ends]
    fp = torch.cumsum((~truth).double(), 0)[ends]
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), tp / n_pos])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), fp / n_neg])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), key[ends]])
    auc = float(torch.trapezoid(tpr, fpr))
    return RocCurve(fpr, tpr, thresholds, auc, by)


def circuit_recovery(circuit: Tensor | EdgeScores, true_edges: Tensor | Iterable[str],
                     graph: Any = None) -> dict[str, Any]:
    """Compare one circuit (a bool ``[n_src, n_dest]`` mask, or EdgeScores with a ``circuit_mask`` such as
    ACDC's or learned masks') with the true circuit: ``tp``, ``fp``, ``fn``, ``precision``, ``recall`` and
    ``exact`` (the same edge set).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> truth = g.mask_from_edges(["a0.h1->m1", "input->m0"])
    >>> circuit_recovery(g.mask_from_edges(["a0.h1->m1"]), truth, g)["recall"]
    0.5
    """
    if isinstance(circuit, EdgeScores):
        graph = circuit.graph
        if circuit.circuit_mask is None:
            raise EdgepatchError(f"{circuit!r} has no circuit_mask; pick one with scores.circuit(k) first.")
        circuit = circuit.circuit_mask
    if graph is None:
        raise EdgepatchError("circuit_recovery needs the graph when circuit is a mask: circuit_recovery(mask, truth, graph).")
    graph.check_shape(circuit, "circuit")
    probe = EdgeScores(torch.zeros(graph.n_src, graph.n_dest), graph)
    truth = _true_flat(probe, true_edges)
    found = graph.to_edges(circuit.bool().cpu())
    tp, fp, fn = int((found & truth).sum()), int((found & ~truth).sum()), int((~found & truth).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "exact": fp == 0 and fn == 0}


def plot_roc(scores: Mapping[str, EdgeScores] | EdgeScores, true_edges: Tensor | Iterable[str], by: str = "abs",
             title: str | None = None) -> Any:
    """ROC curves of several rankings (``{"EAP": scores, ...}``) against ``true_edges``: a plotly Figure
    (see :func:`edgepatch.plots.plot_roc`, which this calls; plotly is imported only here)."""
    from edgepatch.plots import plot_roc as _plot_roc

    return _plot_roc(scores, true_edges, by=by, title=title)
