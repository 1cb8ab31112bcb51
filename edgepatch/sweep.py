"""Faithfulness sweeps: how much of the model's behaviour do the top-k edges keep, for many k at once.

Context
-------
An edge ranking (attribution scores, learned masks, ...) is judged by the circuits it induces: keep the
top ``k`` edges, ablate the rest, and measure the task metric. Plotted against ``k`` this is the
*faithfulness curve* (Hanna et al. 2024; MIB, Mueller et al. 2025). Two directions:

- ``direction="sufficiency"``: keep the top-k edges, ablate all others (the circuit alone);
- ``direction="necessity"``: ablate the top-k edges, keep all others (the model without the circuit).

Every value is reported raw (per prompt and averaged) and normalized between the full model and the fully
ablated model::

    faithfulness(k) = (mean metric(circuit_k) - mean metric(ablated)) / (mean metric(clean) - mean metric(ablated))

where ``clean`` is the unpatched forward on the clean prompts (every edge kept) and ``ablated`` the
forward with every edge ablated (with corrupted-run ablation: exactly the corrupted run). Sufficiency
curves rise from 0 (k = 0) to 1 (k = all edges); necessity curves fall from 1 to 0.

Intuition for the implementation: everything that does not depend on the circuit is computed once per
batch of prompts (the clean and the ablated metric and the ablated activations: with corrupted-run
ablation all three come from one forward of the clean and corrupted prompts together), and many circuits
are evaluated in one forward by folding a circuit axis into the batch (``weights [C, n_src, n_dest]``,
``tokens.repeat(C, 1)``, see :func:`edgepatch.patch`). Circuits that are the whole model or nothing reuse
the clean and ablated values; identical circuits are evaluated once. For the built-in metrics (which read
one position per prompt) the model only unembeds that position and the prompts are cut after their last
answer position: right padding and causal attention make both exact.

Counts (:func:`edge_counts`): ``"log"`` (``n`` log-spaced counts from 1 to all edges; 0 is not included,
because log axes cannot show it, and the k = 0 value is always available as ``result.ablated``),
``"all"`` (1 .. n_edges), ``"groups"`` (the ends of runs of tied scores, so no tie is ever split),
``"mib"`` (MIB's 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 % of the edges, truncated to integers as MIB does:
``int(fraction * n_edges)``), or a list of counts (ints, or fractions strictly between 0 and 1).

Ties (``ties=``): ``"break"`` (default) takes exactly k edges, breaking ties by edge order as
:meth:`EdgeScores.order` does; ``"include"`` extends each circuit to the end of the run of scores tied
with its k-th edge, so a tie is never split (``result.effective_counts`` then says how many edges each
circuit really holds).

Random baseline: ``random_baseline=D`` draws D random edge orders (seeded by ``seed``) and evaluates their
top-k circuits at the same effective counts: a curve that any useful ranking should beat.

Resuming: with ``out=folder`` the sweep writes its progress after every chunk of circuits
(``progress.safetensors``, written to a temporary file and moved into place, so an interruption never
leaves a half-written file) and its settings (``sweep.json``). Calling ``sweep`` again with the same folder
and the same settings skips the work already done; different settings raise an error (use another
folder, or delete it). The finished result is saved as ``result.safetensors`` + ``result.json``
(:func:`edgepatch.io.load_sweep` reads it).

Example
-------
>>> import torch, edgepatch as ep
>>> from edgepatch.scores import EdgeScores
>>> from edgepatch.tasks import induction
>>> model = ep.random_model("tiny"); graph = ep.build_graph(model)
>>> data = induction(101, n=4, seq_len=4, seed=0)
>>> scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph, method="random")
>>> result = sweep(model, graph, scores, data, counts=[0, 10, 110], progress=False)
>>> result.effective_counts
[0, 10, 110]
>>> result.values[0].equal(result.ablated), result.values[-1].equal(result.clean)  # 0 edges, all edges
(True, True)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, shape_str, suggest
from edgepatch.graph import Graph, prune_circuit
from edgepatch.metrics import (
    answer_view,
    final_logits,
    get_metric,
    metric_label,
    normalized_faithfulness,
    reads_answer_only,
)
from edgepatch.patching import Ablation, _check_graph, keep_buffer, patch, source_activations
from edgepatch.progress import digest, metric_id, open_progress, positions_id, run_fingerprint, save_progress
from edgepatch.scores import EdgeScores, plain_number

__all__ = ["edge_counts", "sweep", "SweepResult", "MIB_FRACTIONS", "COUNT_SPECS"]

COUNT_SPECS = ("all", "log", "groups", "mib")
DIRECTIONS = ("sufficiency", "necessity")
TIES = ("break", "include")
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The edge fractions at which MIB evaluates circuits (``evaluate_area_under_curve`` in MIB-circuit-track)."""

Counts = Union[str, Sequence[Union[int, float]]]
_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------------
# Edge counts
# ------------------------------------------------------------------------------------------------------
def edge_counts(
    graph: Graph,
    spec: Counts = "log",
    scores: EdgeScores | None = None,
    n: int = 10,
    by: str = "abs",
) -> list[int]:
    """The edge counts a sweep evaluates (see the module docstring for the specs).

    ``"log"``: up to ``n`` log-spaced counts from 1 to ``graph.n_edges`` (rounded, duplicates removed,
    so small graphs may give fewer; 0 is never included). ``"all"``: 1 .. n_edges. ``"groups"``: where each
    run of tied ``scores`` ends (needs ``scores``; ``by`` is the ranking; one count per distinct score, so
    meant for scores with few distinct values such as binary masks or ACDC's kept/removed edges). ``"mib"``: one count per MIB
    fraction, ``int(f * n_edges)`` (may repeat on tiny graphs). A list: ints are counts, floats strictly
    between 0 and 1 are fractions of the edges (rounded); order and repeats are kept.

    >>> import edgepatch as ep
    >>> graph = ep.build_graph(ep.random_model("tiny"))  # 110 edges
    >>> edge_counts(graph, "log", n=5)
    [1, 3, 10, 34, 110]
    >>> edge_counts(graph, [0, 0.5, 110])
    [0, 55, 110]
    >>> edge_counts(graph, "mib")
    [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]
    """
    # per-position scores rank (slot, edge) pairs: counts are counts of those
    n_edges = scores.n_items if isinstance(scores, EdgeScores) else graph.n_edges
    if isinstance(spec, str):
        if spec == "all":
            return list(range(1, n_edges + 1))
        if spec == "log":
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise EdgepatchError(f"n (the number of log-spaced counts) must be a positive int; got {n!r}.")
            if n == 1 or n_edges == 1:
                return [n_edges]
            raw = torch.logspace(0, math.log10(n_edges), n, dtype=torch.float64).round().long()
            return sorted(set(min(max(int(k), 1), n_edges) for k in raw.tolist()))
        if spec == "groups":
            if scores is None:
                raise EdgepatchError(
                    "counts='groups' follows runs of tied scores, so it needs the scores: "
                    "edge_counts(graph, 'groups', scores=scores)."
                )
            _check_scores(scores, graph)
            return list(scores.groups(by))  # type: ignore[arg-type]
        if spec == "mib":
            return [int(f * n_edges) for f in MIB_FRACTIONS]
        raise EdgepatchError(
            f"Unknown counts spec {spec!r}.{suggest(spec, COUNT_SPECS)} Expected one of {', '.join(map(repr, COUNT_SPECS))} "
            f"or a list of edge counts (ints) / fractions of the edges (floats between 0 and 1)."
        )
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    try:
        items = list(spec)
    except TypeError:
        raise EdgepatchError(
            f"counts must be a spec name ({', '.join(map(repr, COUNT_SPECS))}) or a list of edge counts; "
            f"got {type(spec).__name__}."
        ) from None
    if not items:
        raise EdgepatchError("counts is an empty list; give at least one edge count, e.g. counts=[10, 100].")
    out: list[int] = []
    for i, k in enumerate(items):
        k = plain_number(k)  # numpy and 0-d tensor scalars too (counts=np.logspace(...).astype(int))
        if k is None:
            raise EdgepatchError(f"counts[{i}] = {items[i]!r} is not a number; give edge counts (ints) or fractions "
                                 f"(floats in (0, 1)).")
        if isinstance(k, float) and 0 < k < 1:
            out.append(int(round(k * n_edges)))
            continue
        if isinstance(k, float) and not k.is_integer():
            raise EdgepatchError(
                f"counts[{i}] = {k!r} is neither an edge count (a whole number) nor a fraction strictly between 0 and 1."
            )
        k = int(k)
        if not 0 <= k <= n_edges:
            if isinstance(scores, EdgeScores) and scores.per_position:
                has = (f"these per-position scores rank {n_edges:,} (position slot, edge) pairs "
                       f"({len(scores.slots or ())} slots x {graph.n_edges:,} edges of {graph!r})")
                what = "pairs"
            else:
                has, what = f"{graph!r} has {n_edges:,} edges", "edges"
            raise EdgepatchError(
                f"counts[{i}] = {k} is out of range: {has}. Give counts in 0..{n_edges} or fractions of the "
                f"{what} in (0, 1)."
            )
        out.append(k)
    return out


def _check_scores(scores: Any, graph: Graph) -> EdgeScores:
    if isinstance(scores, Tensor):
        scores = EdgeScores(scores, graph, method="tensor")
    if not isinstance(scores, EdgeScores):
        raise EdgepatchError(
            f"scores must be EdgeScores (from ep.attribute(...)) or a [n_src, n_dest] tensor; got {type(scores).__name__}."
        )
    g = scores.graph
    if g is not graph and (g.src_names != graph.src_names or g.dest_names != graph.dest_names):
        raise EdgepatchError(
            f"The scores were computed on {g!r} but the sweep runs on {graph!r}; score the edges of this graph "
            f"(same model, split_qkv and level)."
        )
    return scores


# ------------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SweepResult:
    """Metric values of the circuits of one ranking at several edge counts.

    Fields: ``counts`` (requested), ``effective_counts`` (edges actually in each circuit), ``values``
    (``[n_counts, n_prompts]`` metric per prompt), ``clean`` / ``ablated`` (``[n_prompts]``: every edge kept /
    every edge ablated), ``random_values`` (``[n_draws, n_counts]``, mean over prompts of random circuits of
    the same effective counts), ``n_edges`` and metadata (``method``, ``metric``, ``direction``, ``ablation``,
    ``by``, ``ties``, ``higher_is_better``, ``counts_spec``, ``info``).

    Derived: ``mean`` (``[n_counts]``), ``clean_mean``, ``ablated_mean``, ``normalized`` (faithfulness, see the
    module docstring), ``random_normalized`` (``[n_draws, n_counts]``), ``fractions`` (effective / n_edges).
    """

    counts: list[int]
    effective_counts: list[int]
    values: Float[Tensor, "n_counts n_prompts"]
    clean: Float[Tensor, "n_prompts"]
    ablated: Float[Tensor, "n_prompts"]
    random_values: Float[Tensor, "n_draws n_counts"]
    n_edges: int
    method: str = "unknown"
    metric: str = "logit_diff"
    direction: str = "sufficiency"
    ablation: str = "corrupt"
    by: str = "abs"
    ties: str = "break"
    higher_is_better: bool = True
    counts_spec: str = "list"
    graph: Graph | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return int(self.values.shape[1])

    @property
    def mean(self) -> Tensor:
        """``[n_counts]`` mean metric over prompts."""
        return self.values.mean(1)

    @property
    def clean_mean(self) -> float:
        return float(self.clean.mean())

    @property
    def ablated_mean(self) -> float:
        return float(self.ablated.mean())

    @property
    def normalized(self) -> Tensor:
        """``[n_counts]`` normalized faithfulness ``(mean - ablated) / (clean - ablated)``."""
        return normalized_faithfulness(self.mean, torch.tensor(self.clean_mean, dtype=self.mean.dtype),
                                       torch.tensor(self.ablated_mean, dtype=self.mean.dtype))

    @property
    def random_normalized(self) -> Tensor:
        """``[n_draws, n_counts]`` normalized faithfulness of the random circuits."""
        if self.random_values.numel() == 0:
            return self.random_values.clone()
        return normalized_faithfulness(self.random_values, torch.tensor(self.clean_mean, dtype=self.random_values.dtype),
                                       torch.tensor(self.ablated_mean, dtype=self.random_values.dtype))

    @property
    def fractions(self) -> list[float]:
        """Effective edge counts as fractions of all edges."""
        return [k / self.n_edges for k in self.effective_counts]

    # ---- summaries (edgepatch.summary) ---------------------------------------------------------------
    def auc(self, log_x: bool = False, normalized: bool = True) -> float:
        """Area under the faithfulness curve per unit of x (see :func:`edgepatch.summary.area_under_curve`)."""
        from edgepatch.summary import area_under_curve

        return area_under_curve(self, log_x=log_x, normalized=normalized)

    def cpr(self) -> float:
        """MIB's CPR (see :func:`edgepatch.summary.cpr`)."""
        from edgepatch.summary import cpr

        return cpr(self)

    def cmd(self) -> float:
        """MIB's CMD (see :func:`edgepatch.summary.cmd`)."""
        from edgepatch.summary import cmd

        return cmd(self)

    # ---- export ------------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One dict per count: count, edges, fraction, value (mean), faithfulness, clean, ablated,
        random baseline mean/std (normalized; NaN without draws) and the metadata.

        >>> r = SweepResult([1], [1], torch.tensor([[1.0, 3.0]]), torch.tensor([4.0, 4.0]), torch.tensor([0.0, 0.0]),
        ...                 torch.zeros(0, 1), n_edges=10)
        >>> r.to_records()[0]["faithfulness"]
        0.5
        """
        norm = self.normalized.tolist()
        rnd = self.random_normalized
        r_mean = rnd.mean(0).tolist() if rnd.shape[0] else [math.nan] * len(self.counts)
        r_std = rnd.std(0).tolist() if rnd.shape[0] > 1 else [math.nan] * len(self.counts)
        out = []
        for i, (k, e) in enumerate(zip(self.counts, self.effective_counts)):
            out.append({
                "method": self.method, "metric": self.metric, "direction": self.direction, "ablation": self.ablation,
                "count": k, "edges": e, "fraction": e / self.n_edges, "value": float(self.mean[i]),
                "faithfulness": norm[i], "clean": self.clean_mean, "ablated": self.ablated_mean,
                "random_faithfulness_mean": r_mean[i], "random_faithfulness_std": r_std[i],
            })
        return out

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of :meth:`to_records` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "SweepResult.to_pandas needs pandas, which is not installed. Install it (pip install pandas), "
                "or use result.to_records() (a list of dicts) or result.to_dict()."
            ) from None
        return pd.DataFrame(self.to_records())

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serializable lists and numbers (per-prompt values included)."""
        return {
            "counts": list(self.counts), "effective_counts": list(self.effective_counts), "n_edges": self.n_edges,
            "values": self.values.tolist(), "mean": self.mean.tolist(), "normalized": self.normalized.tolist(),
            "clean": self.clean.tolist(), "ablated": self.ablated.tolist(), "clean_mean": self.clean_mean,
            "ablated_mean": self.ablated_mean, "random_values": self.random_values.tolist(),
            "random_normalized": self.random_normalized.tolist(), **self.metadata(),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method, "metric": self.metric, "direction": self.direction, "ablation": self.ablation,
            "by": self.by, "ties": self.ties, "higher_is_better": self.higher_is_better,
            "counts_spec": self.counts_spec, "info": self.info,
        }

    def __repr__(self) -> str:
        norm = self.normalized
        ok = norm[~torch.isnan(norm)]
        rng = f"{float(ok.min()):.2f}..{float(ok.max()):.2f}" if ok.numel() else "-"
        if ok.numel() < norm.numel():  # (the clean and ablated metrics equal, or a metric that gave NaN)
            rng += f" ({norm.numel() - ok.numel()} NaN)"
        rnd = f", {self.random_values.shape[0]} random draws" if self.random_values.shape[0] else ""
        return (
            f"SweepResult({self.method}, {self.metric}, {self.direction}, {self.ablation}: {len(self.counts)} counts x "
            f"{self.n_prompts} prompts, faithfulness {rng}{rnd})"
        )


# ------------------------------------------------------------------------------------------------------
# Helpers: fingerprints, progress files, fast logits
# ------------------------------------------------------------------------------------------------------
# Circuits folded into one forward share its weights' reads, but the engine's per-layer temporaries grow
# with the rows; past a few hundred tokens they leave the CPU caches and the forward gets slower per row
# (GPT-2 small, 8 prompts x 16 tokens: 3 circuits per forward 0.79x ten plain forwards, 9 circuits 1.4x).
_TOKENS_PER_FORWARD = 384


def _rows_per_forward(model: Any, graph: Graph, pos: int, fast: bool, budget_mb: float) -> int:
    """How many (prompt, circuit) rows fit in ``budget_mb``: per row the engine's difference buffer
    (n_src x pos x d_model), the transient activations of one layer (split q/k/v inputs, MLP, attention
    pattern) and the logits."""
    spec = graph.spec
    elt = next(model.parameters()).element_size()
    d_mlp = int(getattr(model.cfg, "d_mlp", None) or 4 * spec.d_model)
    per_pos = graph.engine_graph.n_src * spec.d_model + 8 * spec.n_heads * spec.d_model + 4 * d_mlp + 2 * spec.n_heads * pos
    row = elt * (pos * per_pos + (1 if fast else pos) * spec.d_vocab)
    return max(1, int(budget_mb * 2**20 // row))


def _prompt_batches(n: int, batch_size: int, pos_of: Callable[[slice], int],
                    fits: Callable[[int], int]) -> list[tuple[slice, int, int]]:
    """``(prompts, pos, rows)``: batches of at most ``batch_size`` of the ``n`` prompts, each cut further
    until one circuit of it fits the memory budget (``pos_of(prompts)``: the positions a forward runs;
    ``fits(pos)``: the rows that fit, see :func:`_rows_per_forward`). Long prompts need it: GPT-2 small at
    32 x 128 tokens holds 2 GB of differences per circuit (and as much of ablated activations), ~5 GB over
    a 2 GB budget that only the number of circuits per forward used to keep."""
    out: list[tuple[slice, int, int]] = []
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        while True:
            pos = pos_of(slice(start, stop))
            rows = fits(pos)
            if rows >= stop - start or stop - start == 1:
                break
            stop = start + max(1, rows)
        out.append((slice(start, stop), pos, rows))
        start = stop
    return out


# ------------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """The circuits to evaluate. ``ranks[o]`` is the rank of every edge under order ``o`` (0: the scores,
    1..D: random draws); item ``(o, k)`` keeps ``rank < k`` (sufficiency) or ``rank >= k`` (necessity);
    ``(-1, 0)`` is the all-ablated circuit (for ablations other than the corrupted run)."""

    ranks: Tensor  # [n_orders, n_items] long (n_items: edges, or (slot, edge) pairs per position)
    items: list[tuple[int, int]]
    index: dict[tuple[int, int], int]
    prune: bool = False  # evaluate each circuit's connected part (edgepatch.prune_circuit)
    n_slots: int = 0  # per-position circuits: the slots of (slot, edge) pairs (0: edge circuits)


def sweep(
    model: Any,
    graph: Graph,
    scores: EdgeScores,
    data: PromptPairs,
    counts: Counts = "log",
    metric: Any = "logit_diff",
    ablation: Any = "corrupt",
    direction: Literal["sufficiency", "necessity"] = "sufficiency",
    by: str = "abs",
    random_baseline: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    max_circuits_per_forward: int | None = None,
    memory_budget_mb: float = 2048,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    ties: Literal["break", "include"] = "break",
    prune: bool = False,
    positions: Any = None,
) -> SweepResult:
    """Evaluate the circuits of ``scores`` at several edge counts (see the module docstring).

    ``counts``: a spec for :func:`edge_counts` (``"log"``, ``"all"``, ``"groups"``, ``"mib"``) or a list.
    ``metric``: a name or ``(logits, data) -> [batch]``. ``ablation``: ``"corrupt"`` (the corrupted
    run), ``"mean"`` / ``"pos_mean"`` (mean over the clean prompts, ignoring padding), ``"zero"``, or an
    :class:`edgepatch.Ablation` (batch 1 broadcasts, or one entry per prompt). ``direction``:
    ``"sufficiency"`` (keep the top-k, ablate the rest) or ``"necessity"`` (ablate the top-k, keep the
    rest). ``by``: the ranking (``"abs"``, ``"signed"``, ``"neg"``). ``ties``: ``"break"`` (exactly k edges,
    ties by edge order) or ``"include"`` (extend to the end of the tied run). ``random_baseline``: number of
    random edge orders (seeded by ``seed``) to evaluate at the same counts. ``batch_size``: prompts per
    forward; ``max_circuits_per_forward``: circuits folded into one forward (None: as many as fit in
    ``memory_budget_mb``, estimated from the engine's per-row buffers, and in about 384 tokens, beyond
    which the engine's temporaries leave the CPU caches). Where even one circuit of ``batch_size`` prompts
    does not fit ``memory_budget_mb`` (long prompts), the prompts are evaluated in smaller batches.
    ``out``: a folder for resumable progress and the final result. ``progress``: a ``tqdm.auto`` bar. ``prune``: evaluate each circuit's
    connected part, as MIB does (:func:`edgepatch.prune_circuit`, applied to the kept edges); the x
    axis stays the requested counts and ``result.info["pruned_counts"]`` holds the edges left (MIB's
    ``weighted_edge_counts``). With the corrupted-run ablation the values are the same either way.

    Per-position scores (``attribute(..., positions=...)``) need the same ``positions`` here (``"absolute"``,
    ``"named"`` or the ``[n_prompts, pos]`` slot tensor): circuits are then the top ``k`` (slot, edge) pairs, patched
    with per-position weights (tokens in no slot, -1, keep every edge), counts count those pairs
    (``n_edges`` of the result is ``n_slots x n_edges``), and ``ablated`` is the empty circuit's metric
    (the corrupted run's only where every token has a slot).

    Returns a :class:`SweepResult`; runs under ``torch.no_grad()`` and leaves the model as it was.

    >>> import torch, edgepatch as ep
    >>> from edgepatch.scores import EdgeScores
    >>> from edgepatch.tasks import induction
    >>> model = ep.random_model("tiny"); graph = ep.build_graph(model)
    >>> data = induction(101, n=4, seq_len=4, seed=0)
    >>> scores = EdgeScores(torch.rand(graph.n_src, graph.n_dest), graph, method="random")
    >>> r = sweep(model, graph, scores, data, counts="log", random_baseline=2, progress=False)
    >>> r.values.shape, r.random_values.shape
    (torch.Size([10, 4]), torch.Size([2, 10]))
    """
    # ---- validate ------------------------------------------------------------------------------------
    _check_graph(model, graph)
    scores = _check_scores(scores, graph)
    if not isinstance(data, PromptPairs):
        raise EdgepatchError(
            f"data must be PromptPairs (e.g. ep.tasks.ioi(tokenizer)); got {type(data).__name__}."
        )
    d_vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)
    if d_vocab > 0:
        data.validate(d_vocab)
    if direction not in DIRECTIONS:
        raise EdgepatchError(
            f"Unknown direction {direction!r}.{suggest(str(direction), DIRECTIONS)} Expected 'sufficiency' (keep the "
            f"top-k edges, ablate the rest) or 'necessity' (ablate the top-k edges, keep the rest)."
        )
    if not isinstance(prune, bool):
        raise EdgepatchError(f"prune must be True or False; got {prune!r}.")
    if prune and graph.level != "edge":
        raise EdgepatchError(f"prune=True needs an edge-level graph; got {graph!r} (level={graph.level!r}).")
    from edgepatch.attribution import ABLATIONS, AblationSource, position_slots

    if scores.per_position and positions is None:
        raise EdgepatchError(
            f"These scores are per position ({len(scores.slots or ())} slots {list(scores.slots or ())}); give the "
            f"positions they were computed with: sweep(..., positions=...)."
        )
    if positions is not None and not scores.per_position:
        raise EdgepatchError(
            "positions= evaluates per-position circuits, but these are edge scores; compute per-position scores "
            "with ep.attribute(..., positions=...), or leave positions out."
        )
    scores._check_prune(prune)  # (per position: MIB's pruning is defined for circuits of edges only)
    slots, _ = position_slots(positions, data, scores.slots) if positions is not None else (None, None)
    if ties not in TIES:
        raise EdgepatchError(f"Unknown ties {ties!r}.{suggest(str(ties), TIES)} Expected 'break' or 'include'.")
    scores.ranking_key(by)  # validates `by`
    for name, v, lo in (("random_baseline", random_baseline, 0), ("batch_size", batch_size, 1), ("seed", seed, None)):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            raise EdgepatchError(f"{name} must be an int{'' if lo is None else f' >= {lo}'}; got {v!r}.")
    if max_circuits_per_forward is not None and (
        isinstance(max_circuits_per_forward, bool) or not isinstance(max_circuits_per_forward, int) or max_circuits_per_forward < 1
    ):
        raise EdgepatchError(f"max_circuits_per_forward must be None or a positive int; got {max_circuits_per_forward!r}.")
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
        raise EdgepatchError(f"memory_budget_mb must be a positive number of megabytes; got {memory_budget_mb!r}.")
    resolved = get_metric(metric)
    mname = metric_label(metric if isinstance(metric, str) else resolved)
    spec_name = counts if isinstance(counts, str) else "list"
    requested = edge_counts(graph, counts, scores=scores, by=by)
    n_edges = scores.n_items  # edges, or (slot, edge) pairs per position

    # ---- ablation --------------------------------------------------------------------------------------
    if isinstance(ablation, Ablation):
        abl_kind = ablation.kind
        if ablation.n_src != graph.n_src:
            raise EdgepatchError(
                f"The given Ablation has {ablation.n_src} sources but {graph!r} has {graph.n_src}; compute it with "
                f"the same model and graph."
            )
        if ablation.values.shape[2] not in (1, data.pos):
            raise EdgepatchError(
                f"The given Ablation has {ablation.values.shape[2]} positions but the prompts have {data.pos}; give one "
                f"value per position or a broadcasting (pos 1) ablation."
            )
    elif isinstance(ablation, str) and ablation in ABLATIONS:
        abl_kind = ablation
    else:
        raise EdgepatchError(
            f"Unknown ablation {ablation!r}.{suggest(str(ablation), ABLATIONS)} Expected one of "
            f"{', '.join(map(repr, ABLATIONS))} or an ep.Ablation."
        )
    # the corrupted prompts' own run: recorded batch by batch with the clean run, whose corrupted half's logits
    # are the empty circuit's. A given Ablation (of any kind, also one recorded from other prompts) is used as
    # it is, and the empty circuit is evaluated like the others.
    recorded = abl_kind == "corrupt" and not isinstance(ablation, Ablation)

    # ---- plan: effective counts, orders, circuits -------------------------------------------------------
    order = scores.order(by)
    main_rank = torch.empty_like(order)
    main_rank[order] = torch.arange(n_edges)
    if ties == "include":
        ends = torch.tensor(scores.groups(by), dtype=torch.long)
        effective = [0 if k == 0 else int(ends[int(torch.searchsorted(ends, k))]) for k in requested]
    else:
        effective = list(requested)
    gen = torch.Generator().manual_seed(seed)
    ranks = [main_rank]
    for _ in range(random_baseline):
        perm = torch.randperm(n_edges, generator=gen)
        r = torch.empty_like(perm)
        r[perm] = torch.arange(n_edges)
        ranks.append(r)
    # every edge kept is the clean run; every edge ablated the corrupted run (not per position where a token
    # has no slot: its edges stay): the empty circuit is then evaluated like the others
    all_slotted = slots is None or bool((slots >= 0).all())
    empty_is_corrupt = recorded and all_slotted
    trivial = {0, n_edges}
    items: list[tuple[int, int]] = []
    if not empty_is_corrupt:
        items.append((-1, 0))
    for o in range(len(ranks)):
        for k in sorted(set(effective) - trivial):
            items.append((o, k))
    plan = _Plan(torch.stack(ranks), items, {it: i for i, it in enumerate(items)}, prune,
                 0 if scores.slots is None else len(scores.slots))

    # ---- state (possibly resumed) ------------------------------------------------------------------------
    n_prompts = len(data)
    state = {
        "values": torch.zeros(len(items), n_prompts, dtype=torch.float64),
        "done": torch.zeros(len(items), n_prompts, dtype=torch.uint8),
        "clean": torch.zeros(n_prompts, dtype=torch.float64),
        "ablated": torch.zeros(n_prompts, dtype=torch.float64),
        "base_done": torch.zeros(n_prompts, dtype=torch.uint8),
    }
    out_dir = Path(out) if out is not None else None
    progress_path = None
    fingerprint: dict[str, Any] = {}
    if out_dir is not None:
        fingerprint = run_fingerprint(
            model, graph, data, ablation, version=_FORMAT_VERSION, counts=requested, effective_counts=effective,
            metric=metric_id(metric), direction=direction, by=by, ties=ties, scores=digest(scores.scores),
            method=scores.method, n_prompts=len(data), random_baseline=random_baseline, seed=seed)
        if prune:  # (absent when False, so progress saved before the option existed still resumes)
            fingerprint["prune"] = True
        if slots is not None:
            fingerprint["positions"] = positions_id(slots, scores.slots)
        progress_path = open_progress(out_dir, fingerprint, state)

    def save_state() -> None:
        if progress_path is not None:
            save_progress(progress_path, state, fingerprint, items=items)

    # ---- run ---------------------------------------------------------------------------------------------
    fast = reads_answer_only(resolved)
    needs_clean = bool(getattr(resolved, "needs_clean", False))
    if getattr(model, "training", False):
        warnings.warn("sweep: the model is in training mode (dropout is active), so values are random; call "
                      "model.eval() first.", RuntimeWarning, stacklevel=2)

    def pending(sl: slice) -> tuple[bool, list[int]]:
        need_base = not bool(state["base_done"][sl].all())
        todo = [i for i in range(len(items)) if not bool(state["done"][i, sl].all())]
        return need_base, todo

    chunk_cap = max_circuits_per_forward
    work = []
    batches = _prompt_batches(len(data), batch_size,
                              lambda sl: int(data.answer_pos[sl].max()) + 1 if fast else data.pos,
                              lambda pos: _rows_per_forward(model, graph, pos, fast, memory_budget_mb))
    for sl, pos, fit in batches:
        need_base, todo = pending(sl)
        if need_base or todo:
            b = sl.stop - sl.start
            rows = min(fit, max(b, _TOKENS_PER_FORWARD // pos))
            cap = chunk_cap or max(1, rows // b)
            chunks = [todo[i : i + cap] for i in range(0, len(todo), cap)]
            work.append((sl, pos, chunks))

    fixed = None
    if any(True for _ in work) and not recorded:
        with torch.no_grad():
            fixed = AblationSource(model, graph, data, ablation).fixed

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(c) + 1 for _, _, c in work), desc=f"sweep {scores.method}", disable=not progress,
               leave=False)
    try:
        with torch.no_grad():
            for sl, pos, chunks in work:
                _run_batch(model, graph, data, sl, pos, fast, resolved, needs_clean, recorded, fixed, plan,
                           direction, n_edges, chunks, state, save_state, bar,
                           None if slots is None else slots[sl, :pos])
    finally:
        bar.close()

    # ---- assemble ----------------------------------------------------------------------------------------
    if not empty_is_corrupt:
        state["ablated"] = state["values"][plan.index[(-1, 0)]].clone()

    def row(o: int, k: int) -> Tensor:
        if k in trivial:
            clean_side = (k == n_edges) == (direction == "sufficiency")
            return state["clean"] if clean_side else state["ablated"]
        return state["values"][plan.index[(o, k)]]

    values = torch.stack([row(0, k) for k in effective]) if effective else torch.zeros(0, n_prompts, dtype=torch.float64)
    random_values = torch.tensor(
        [[float(row(o, k).mean()) for k in effective] for o in range(1, len(ranks))], dtype=torch.float64
    ).reshape(random_baseline, len(effective))
    result = SweepResult(
        counts=requested, effective_counts=effective, values=values, clean=state["clean"].clone(),
        ablated=state["ablated"].clone(), random_values=random_values, n_edges=n_edges, method=scores.method,
        metric=mname, direction=direction, ablation=abl_kind, by=by, ties=ties,
        higher_is_better=bool(getattr(resolved, "higher_is_better", True)), counts_spec=spec_name, graph=graph,
        info={"seed": seed, "random_baseline": random_baseline, "scores_metric": scores.metric},
    )
    if scores.slots is not None:
        result.info["slots"] = list(scores.slots)
    if prune:
        result.info["prune"] = True
        result.info["pruned_counts"] = [
            int(_circuit_weights(plan, [plan.index[(0, k)]], graph, direction).sum()) if k not in trivial
            else (n_edges if (k == n_edges) == (direction == "sufficiency") else 0)
            for k in effective
        ]
    if out_dir is not None:
        from edgepatch.io import save_sweep

        save_sweep(result, out_dir / "result.safetensors")
    return result


def evaluate_circuit(
    model: Any,
    graph: Graph,
    circuit: Any,
    data: PromptPairs,
    metric: Any = "logit_diff",
    ablation: Any = "corrupt",
    direction: Literal["sufficiency", "necessity"] = "sufficiency",
    name: str = "circuit",
    **options: Any,
) -> SweepResult:
    """The faithfulness of one circuit: keep its edges and ablate the rest (``"sufficiency"``), or ablate its
    edges and keep the rest (``"necessity"``), on ``data``.

    ``circuit``: edge names (or one name), a ``[n_src, n_dest]`` mask (bool, or 0 / 1), or ``EdgeScores``
    with a ``circuit_mask`` (ACDC's, learned masks', an imported MIB circuit's); or a per-position circuit,
    a ``[n_slots, n_src, n_dest]`` mask of (slot, edge) pairs (e.g. ``scores.circuit(k)`` of per-position
    scores, or per-position ACDC's or learned masks' scores with their ``circuit_mask``) with ``positions=``
    as :func:`sweep` takes it. ``metric``, ``ablation`` and ``options``
    (``batch_size``, ``random_baseline``, ``seed``, ``prune``, ``out``, ``progress`` (default False here),
    ``memory_budget_mb``, ``max_circuits_per_forward``) are :func:`sweep`'s. Returns a :class:`SweepResult` of
    one count (the circuit's edges, or pairs), named ``name``: ``result.normalized[0]`` is the normalized
    faithfulness, ``result.mean[0]`` the mean metric, and :func:`edgepatch.plot_faithfulness` draws it as a
    star beside the curves of rankings.

    >>> import edgepatch as ep
    >>> from edgepatch.tasks import induction
    >>> model = ep.random_model("tiny"); graph = ep.build_graph(model)
    >>> data = induction(101, n=4, seq_len=4, seed=0)
    >>> r = evaluate_circuit(model, graph, ["input->a0.h0<v>", "a0.h0->logits", "input->logits"], data)
    >>> r.effective_counts, r.normalized.shape
    ([3], torch.Size([1]))
    """
    for key in ("counts", "by", "ties"):
        if key in options:
            raise EdgepatchError(
                f"evaluate_circuit: {key}= does not apply to a single circuit (it is {key}= of a sweep over a "
                f"ranking's circuits); leave it out, or call ep.sweep with scores."
            )
    options.setdefault("progress", False)
    positions = options.get("positions")
    slot_names = None  # the slots a per-position method named (its scores' circuit_mask)
    if isinstance(circuit, EdgeScores) and circuit.per_position:
        _check_scores(circuit, graph)
        slot_names, circuit = circuit.slots, _scores_circuit(circuit)
    if isinstance(circuit, Tensor) and circuit.dim() == 3:  # (slot, edge) pairs
        from edgepatch.attribution import position_slots

        if positions is None:
            raise EdgepatchError(
                f"evaluate_circuit: a [n_slots, n_src, n_dest] circuit {shape_str(circuit.shape)} is per position; "
                f"give positions= ('absolute', 'named' or the [n_prompts, pos] slot tensor) as for ep.sweep."
            )
        given = (slot_names or range(circuit.shape[0])) if isinstance(positions, Tensor) else None
        _, names = position_slots(positions, data, given)
        if circuit.shape[0] != len(names or ()):
            raise EdgepatchError(
                f"evaluate_circuit: the circuit has {circuit.shape[0]} slots but positions={positions!r} gives "
                f"{len(names or ())} for this data ({list(names or ())[:8]}); build the circuit from scores with these "
                f"positions."
            )
        if slot_names is not None and tuple(names or ()) != tuple(slot_names):
            raise EdgepatchError(
                f"evaluate_circuit: the circuit's slots are {list(slot_names)[:8]} but positions={positions!r} "
                f"gives {list(names or ())[:8]} for this data; give the positions the circuit was found with."
            )
        mask = torch.stack([_as_circuit_mask(c, graph) for c in circuit])
        scores = EdgeScores(mask.float(), graph, method=str(name), slots=names)
    else:
        if positions is not None:
            raise EdgepatchError(
                "evaluate_circuit: positions= goes with a per-position circuit ([n_slots, n_src, n_dest]); this one "
                "is an edge circuit, which every token keeps alike. Leave positions out."
            )
        mask = _as_circuit_mask(circuit, graph)
        # 1 on the circuit, 0 elsewhere: the top n edges (ties broken by edge order) are the circuit itself
        scores = EdgeScores(mask.float(), graph, method=str(name), circuit_mask=mask)
    return sweep(model, graph, scores, data, counts=[int(mask.sum())], metric=metric, ablation=ablation,
                 direction=direction, by="signed", ties="break", **options)


def _scores_circuit(scores: EdgeScores) -> Tensor:
    """The circuit a method's scores hold (``circuit_mask``), or an error that says how to pick one."""
    if scores.circuit_mask is None:
        raise EdgepatchError(
            f"evaluate_circuit: these {scores.method} scores hold no circuit (circuit_mask is None); pick one, "
            f"e.g. scores.circuit(100) for the top 100 {'(slot, edge) pairs' if scores.per_position else 'edges'}, "
            f"or sweep the ranking with ep.sweep."
        )
    return scores.circuit_mask


def _as_circuit_mask(circuit: Any, graph: Graph) -> Tensor:
    """A circuit given as edge names, a 0 / 1 or bool mask, or EdgeScores with a circuit_mask: its bool mask."""
    if isinstance(circuit, EdgeScores):
        _check_scores(circuit, graph)
        circuit = _scores_circuit(circuit)
    if isinstance(circuit, Tensor):
        graph.check_shape(circuit, "circuit")
        t = circuit.detach().cpu()
        if t.dtype != torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise EdgepatchError(
                    f"evaluate_circuit: a circuit mask holds only 0 and 1 (or bools); got values such as "
                    f"{t[(t != 0) & (t != 1)].flatten()[:3].tolist()}. For weights between 0 and 1 use ep.patch; "
                    f"for scores, ep.sweep or scores.circuit(k)."
                )
            t = t != 0
        outside = t & ~graph.valid
        if bool(outside.any()):
            s, d = outside.nonzero()[0].tolist()
            raise EdgepatchError(
                f"evaluate_circuit: the mask marks {int(outside.sum())} entries that are not edges of {graph!r}, "
                f"e.g. {graph.src_names[s]}->{graph.dest_names[d]} (the destination does not read that source: it "
                f"writes later, or in parallel). Build the mask with graph.mask_from_edges(names), or AND it with "
                f"graph.valid."
            )
        return t
    if isinstance(circuit, str) or hasattr(circuit, "__iter__"):
        return graph.mask_from_edges(circuit)
    raise EdgepatchError(
        f"evaluate_circuit: circuit must be edge names, a [n_src, n_dest] mask or EdgeScores with a circuit_mask; "
        f"got {type(circuit).__name__}."
    )


def _run_batch(
    model: Any, graph: Graph, data: PromptPairs, sl: slice, pos: int, fast: bool, resolved: Any,
    needs_clean: bool, recorded: bool, fixed: Ablation | None, plan: _Plan, direction: str, n_edges: int,
    chunks: list[list[int]], state: dict[str, Tensor], save_state: Callable[[], None], bar: Any,
    slots: Tensor | None = None,
) -> None:
    """One batch of prompts: clean forward, ablation (and ablated metric), then the pending circuit chunks
    (``slots``: the batch's position slots, for per-position circuits; ``recorded``: the ablation is this
    batch's corrupted prompts' run, recorded here, else ``fixed``)."""
    device = next(model.parameters()).device
    batch = data[sl].to(device)
    b = len(batch)
    clean_tok = batch.clean[:, :pos]
    ap = batch.answer_pos if fast else None
    mdata = answer_view(batch) if fast else batch
    if recorded:
        # one forward of clean and corrupted prompts together: clean logits, corrupted logits (= all edges
        # ablated) and the corrupted run's source outputs (the ablation)
        abl, both_logits = source_activations(model, graph, torch.cat([clean_tok, batch.corrupt[:, :pos]]),
                                              logits_at=None if ap is None else ap.repeat(2),
                                              rows=slice(b, 2 * b))  # the corrupted half's sources
        clean_logits, corrupt_logits = both_logits[:b], both_logits[b:]
        m = resolved.prepare(clean_logits) if needs_clean else resolved
        clean_vals = m(clean_logits, mdata).double().cpu()
        ablated_vals = m(corrupt_logits, mdata).double().cpu()
    else:
        clean_logits = final_logits(model, clean_tok, ap)
        m = resolved.prepare(clean_logits) if needs_clean else resolved
        clean_vals = m(clean_logits, mdata).double().cpu()
        assert fixed is not None
        abl = fixed.to(device)
        if abl.values.shape[1] > 1:
            abl = abl[sl]
        if abl.values.shape[2] > 1:
            abl = Ablation(abl.values[:, :, :pos], abl.kind, abl.spec)
        ablated_vals = None
    state["clean"][sl] = clean_vals
    if ablated_vals is not None:
        state["ablated"][sl] = ablated_vals
    state["base_done"][sl] = 1
    save_state()
    bar.update(1)
    for chunk in chunks:
        _evaluate_chunk(model, graph, clean_tok, abl, m, mdata, ap, plan, chunk=chunk, direction=direction, b=b,
                        sl=sl, state=state, slots=slots)
        save_state()
        bar.update(1)
    if recorded:  # this batch's ablation is done with: its storage serves the next batch's
        keep_buffer(model, "ablation", abl.values)


def _circuit_weights(plan: _Plan, chunk: list[int], graph: Graph, direction: str) -> Tensor:
    """``[C, n_src, n_dest]`` 0/1 weights (1 = kept) of the chunk's circuits (``plan.prune``: their
    connected parts); per position ``[C, n_slots, n_src, n_dest]``."""
    keep = torch.zeros(len(chunk), plan.ranks.shape[1], dtype=torch.bool)
    for j, i in enumerate(chunk):
        o, k = plan.items[i]
        if o < 0:
            continue  # all ablated
        top = plan.ranks[o] < k
        keep[j] = top if direction == "sufficiency" else ~top
    if plan.prune:
        return prune_circuit(graph, graph.from_edges(keep, fill=False).bool()).float()
    if plan.n_slots:
        keep = keep.view(len(chunk), plan.n_slots, graph.n_edges)
    return graph.from_edges(keep.float())


def _evaluate_chunk(
    model: Any, graph: Graph, tokens: Tensor, abl: Ablation, metric: Any, mdata: PromptPairs, ap: Tensor | None,
    plan: _Plan, chunk: list[int], direction: str, b: int, sl: slice, state: dict[str, Tensor],
    slots: Tensor | None = None,
) -> None:
    """Evaluate the circuits ``chunk`` (item indices) on one batch in one forward (circuit axis folded;
    per position, weights ``[C, n_slots, n_src, n_dest]`` with the batch's ``slots``)."""
    c = len(chunk)
    # (the weights stay on the CPU: patch() decides there what to compute and moves them without a wait)
    W = _circuit_weights(plan, chunk, graph, direction)
    if slots is not None:
        slots = slots.to(tokens.device)
    elif c == 1:
        W = W[0]
    with patch(model, graph, W, abl, positions=slots):
        logits = final_logits(model, tokens.repeat(c, 1) if c > 1 else tokens, ap)
    vals = torch.stack([metric(logits[j * b : (j + 1) * b], mdata) for j in range(c)]).double().cpu()  # one copy
    for j, i in enumerate(chunk):
        state["values"][i, sl] = vals[j]
        state["done"][i, sl] = 1
