"""Baselines for circuit discovery: random scores and activation magnitudes.

Context
-------
A circuit-discovery method is only as good as its margin over a method that knows nothing. Two such
baselines return :class:`~edgepatch.scores.EdgeScores` like every other method, so they go through the
same sweeps and plots:

- :func:`random_scores`: a seeded standard-normal score per edge. Its faithfulness curve is what a
  method with no information about the task achieves.
- :func:`activation_magnitude`: the score of edge ``s->d`` is how much patching *could* change what
  ``d`` reads from ``s``: the mean L2 norm (over prompts and real, non-padding token positions) of the
  difference ``o_s - â_s`` between source ``s``'s output and its ablated value (corrupted run or mean),
  or of ``o_s`` itself for zero ablation (``â_s = 0``). It is a property of the *source*: every valid
  destination of ``s`` gets the same score. It ignores what the destination does with its input and what
  the metric cares about, which is exactly what attribution methods add.

Score kind: neither baseline estimates the sign convention's ``metric(edge ablated) - metric(edge kept)``;
``info["score_kind"]`` is ``"random"`` or ``"magnitude"`` (non-negative, larger = bigger potential
effect). Ranking by ``|score|`` (the default) is the intended use for both.

Example
-------
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.tasks import induction
>>> model = random_model("tiny"); graph = build_graph(model)
>>> random_scores(graph, seed=0).circuit(10).sum().item()
10
>>> s = activation_magnitude(model, graph, induction(101, n=4, seq_len=4), progress=False)
>>> bool((s.flat >= 0).all())
True
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from edgepatch.attribution import ABLATIONS, AblationSource, batches, check_data, progress_bar
from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, positive_int, suggest
from edgepatch.graph import Graph
from edgepatch.metrics import KLDivergence, get_metric
from edgepatch.patching import Ablation, _check_graph, engine_flags, source_activations
from edgepatch.scores import EdgeScores

__all__ = ["random_scores", "activation_magnitude"]


# ------------------------------------------------------------------------------------------------------
# Private helpers shared by the search methods (acdc, learned masks, baselines), on top of the plumbing
# in edgepatch.attribution (ablation sources, batches, prepared metrics), so that every method means the
# same thing by "corrupt", "mean", "pos_mean" and "zero".
# ------------------------------------------------------------------------------------------------------
def _check_data(model: Any, data: Any) -> PromptPairs:
    return check_data(model, data)


def _check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    return positive_int(batch_size, name)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _batches_with_ablation(model: Any, graph: Graph, data: PromptPairs, ablation: Any,
                           batch_size: int) -> list[tuple[PromptPairs, Ablation]]:
    """``data`` split into batches of ``batch_size`` prompts (moved to the model's device), each with its
    ablated source values (the batch's corrupted run, or a shared mean / zero / user ``Ablation``)."""
    if isinstance(ablation, str) and ablation not in ABLATIONS:
        raise EdgepatchError(
            f"ablation must be one of {list(ABLATIONS)} or an ep.Ablation; got {ablation!r}. 'corrupt' patches "
            f"in the corrupted prompts' activations, 'mean' ('pos_mean') their mean (per position) over the "
            f"clean prompts, 'zero' zeros.{suggest(ablation, ABLATIONS)}"
        )
    device = _model_device_dtype(model)[0]
    data = data.to(device)
    source = AblationSource(model, graph, data, ablation)
    return [(batch, source(batch, index)) for index, batch in batches(data, batch_size)]


def _ablation_kind(ablation: Any) -> str:
    return ablation.kind if isinstance(ablation, Ablation) else str(ablation)


def _resolve_metric(metric: Any) -> tuple[Any, str]:
    """The metric callable (``"kl"`` is an alias of ``"kl_div"``) and its display name."""
    if isinstance(metric, str) and metric.lower() in ("kl", "kl_div", "kl-div", "kl_divergence"):
        metric = "kl_div"
    fn = get_metric(metric)
    name = metric if isinstance(metric, str) else getattr(fn, "metric_name", getattr(fn, "__name__", type(fn).__name__))
    return fn, str(name)


def _is_kl(metric: Any) -> bool:
    return isinstance(metric, KLDivergence)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Put every module of ``model`` in eval mode (no dropout) and restore each one's flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def _progress(progress: bool, total: int, desc: str) -> Any:
    return progress_bar(total, desc, progress)


# ------------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------------
def random_scores(graph: Graph, seed: int = 0) -> EdgeScores:
    """Seeded standard-normal scores, one per edge (the same seed gives the same scores).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> torch.equal(random_scores(g, seed=1).flat, random_scores(g, seed=1).flat)
    True
    """
    if not isinstance(graph, Graph):
        raise EdgepatchError(f"graph must be an edgepatch Graph (from ep.build_graph(model)); got {type(graph).__name__}.")
    gen = torch.Generator().manual_seed(int(seed))
    flat = torch.randn(graph.n_edges, generator=gen)
    return EdgeScores(graph.from_edges(flat, fill=float("nan")), graph, method="random",
                      info={"seed": int(seed), "score_kind": "random"})


@torch.no_grad()
def activation_magnitude(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = None,
    *,
    ablation: "str | Ablation" = "corrupt",
    batch_size: int = 32,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge ``s->d`` by the mean L2 norm of ``o_s - â_s`` over prompts and real tokens.

    ``o_s`` is source ``s``'s output on the clean prompts; ``â_s`` its ablated value (``ablation``:
    ``"corrupt"`` = the corrupted prompts' run, ``"mean"`` / ``"pos_mean"`` = its mean over the clean
    prompts' real tokens (per position), ``"zero"`` = 0, so the score is the norm of ``o_s``; or an
    :class:`~edgepatch.patching.Ablation`).
    Padding tokens (``data.attention_mask``) are left out of the mean. All destinations of a source share
    its score. ``metric`` is accepted for a uniform signature and ignored (recorded in ``info``).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> from edgepatch.tasks import induction
    >>> m = random_model("tiny"); g = build_graph(m)
    >>> s = activation_magnitude(m, g, induction(101, n=2, seq_len=3), ablation="zero", progress=False)
    >>> s.info["score_kind"]
    'magnitude'
    """
    _check_graph(model, graph)
    data = _check_data(model, data)
    batch_size = _check_batch_size(batch_size)
    eg = graph.engine_graph
    device = _model_device_dtype(model)[0]
    total = torch.zeros(graph.n_src, dtype=torch.float64)
    count = 0.0
    batches = _batches_with_ablation(model, graph, data, ablation, batch_size)
    with _eval_mode(model), engine_flags(model):
        bar = _progress(progress, data.batch, "activation magnitude")
        for batch, abl in batches:
            vals = source_activations(model, eg, batch.clean.to(device)).values  # [n_src, batch, pos, d_model]
            diff = vals - abl.values.to(vals.device, vals.dtype)
            norms = diff.norm(dim=-1)  # [n_src, batch, pos]
            mask = batch.attention_mask.to(norms.device, norms.dtype)[None]
            total += (norms * mask).sum((1, 2)).double().cpu()
            count += float(mask.sum())
            bar.update(batch.batch)
        bar.close()
    per_src = (total / max(count, 1.0)).float()
    dense = per_src[:, None].expand(graph.n_src, graph.n_dest).clone()
    return EdgeScores(dense, graph, method="activation_magnitude", metric="",
                      info={"score_kind": "magnitude", "ablation": _ablation_kind(ablation), "per_source": per_src,
                            "ignored_metric": None if metric is None else str(metric)})
