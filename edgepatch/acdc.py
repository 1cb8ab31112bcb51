"""ACDC: automatic circuit discovery by greedy edge removal (Conmy et al. 2023), batched and exact.

Context
-------
ACDC starts from the full graph and visits the destinations from the output backwards. At each
destination it tries its incoming edges one at a time: the edge is tentatively ablated on top of the
*current* circuit (all edges removed so far stay removed), and if the metric barely moves, the removal is
kept for good; otherwise the edge goes back in. "Barely moves" means::

    change = metric(current circuit without the edge) - metric(current circuit)
    remove the edge  iff  change < threshold            (KL divergence to the clean model: a signed increase)
    remove the edge  iff  |change| < threshold          (a task metric such as logit_diff: ``absolute=True``)

so after a removal the current metric becomes the value just measured (small changes can add up, as in
the original). Threshold 0 with ``absolute=True`` keeps every edge; a huge threshold removes every edge.

Visiting order (documented, because the result depends on it): destinations in reverse topological order,
which here is the reverse of ``graph.dest_names``: ``logits``, the last layer's MLP ``m{L}``, then that
layer's value, key and query inputs (``a{L}.h{H}<v>`` for H from last to first, then ``<k>``, then ``<q>``),
then layer L-1, and so on. Within a destination, incoming edges go from the most recent source backwards
(source index descending: ``m{L-1}``, ``a{L-1}.h{last}``, ..., ``input``). Every destination is visited
after all the destinations that read its node's output, so when it is reached, whether its node still
matters is already final.

Pruning as in the original implementation: a destination is only searched if its node (the head for a
query/key/value input, the MLP for its input) still reaches the logits through kept edges. Otherwise none
of its incoming edges can change the output; they are not tested (their score is 0, ``info["tested"]`` is
False) and are removed from the returned circuit at the end. (The original also drops nodes that no longer
connect to the *input*; this implementation does not: such edges are tested and removed by the threshold
like any other.)

Batching, exactly
-----------------
Sequential ACDC needs one forward per tested edge. Here a block of the next ``batch_candidates`` (C)
untested edges is evaluated in *one* forward: each candidate becomes one circuit, and the C circuits are
folded into the batch as the ``[C, n_src, n_dest]`` circuit axis of :func:`~edgepatch.patching.patch`.
This is speculative execution, and it stays exact:

- Each candidate is evaluated on the circuit that sequential ACDC *would* have in front of it if a
  *prediction* of the earlier candidates' outcomes comes true: candidate k's circuit is the current
  circuit, minus the earlier candidates of the block predicted to be removed, minus candidate k. Its
  baseline (``metric(current)`` at that point) is the value of the last predicted removal before it
  (or the current metric).
- The results are committed in visiting order. While every outcome matches its prediction, the
  circuit and baseline each evaluation assumed are exactly the real ones, so each decision is made on the
  same number, relative to the same circuit, as in sequential ACDC. At the first outcome that differs from
  its prediction, that decision is still valid (everything before it was predicted right), but every
  later evaluation of the block assumed the wrong circuit: they are discarded and the next block starts
  right after it, from the real circuit.

With ``speculate="keep"`` every candidate is predicted kept: all C candidates are evaluated on the current
circuit (a kept edge does not change it), and the first removal ends the block; about ``n_removed +
n_kept / C`` forwards. ``"remove"`` is the mirror (``n_kept + n_removed / C``). ``"adaptive"`` (default)
predicts each edge from its discarded evaluation when it has one (an evaluation on a circuit that differs
by a single edge is usually right) and otherwise repeats the last decision (ACDC's decisions come in
runs); forwards are about ``n_mispredicted + n_tested / C``. Whatever the prediction, the final circuit is
the same (up to floating-point differences between a batched and an unbatched forward, ~1e-7 relative,
which only matter for a change within that distance of the threshold).

Per position (``positions=``, as in :func:`~edgepatch.attribution.eap`)
------------------------------------------------------------------------
The units are (position slot, edge) pairs: ``[n_slots, n_src, n_dest]`` circuits, patched with the
prompts' slots (tokens in no slot keep every edge). The visiting order is the one above with each edge's
slots in slot order (``0``, ``1``, ...) where the edge stands. A destination is searched while its node
reaches the logits through an edge kept in *some* slot: a head's input at one position reaches its
output at later positions too (through keys and values), so the union is what can be pruned safely.
Where some token is in no slot (those keep every edge), every destination is searched.

A block may span several destinations. Connectivity (the pruning above) is checked when the commit walk
reaches a destination, on the real circuit, as sequentially; the block builder checks it on its predicted
circuit, which is the real one whenever the block's results up to there are committed. ``info`` reports
the forwards used and those sequential ACDC would need.

Example
-------
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.tasks import induction
>>> model = random_model("tiny"); graph = build_graph(model)
>>> result = acdc(model, graph, induction(101, n=8, seq_len=4), threshold=1e9, progress=False)
>>> int(result.circuit_mask.sum())
0
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from edgepatch.attribution import batches as data_batches
from edgepatch.attribution import position_slots, prepared_metric
from edgepatch.baselines import (
    _ablation_kind,
    _batches_with_ablation,
    _check_batch_size,
    _check_data,
    _eval_mode,
    _is_kl,
    _model_device_dtype,
    _progress,
    _resolve_metric,
)
from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError
from edgepatch.graph import Graph, dest_owners
from edgepatch.metrics import answer_view, final_logits, reads_answer_only
from edgepatch.patching import Ablation, _check_graph, engine_flags, patch
from edgepatch.progress import metric_id, positions_id, resumable, run_fingerprint
from edgepatch.scores import EdgeScores

__all__ = ["acdc", "visiting_order", "dest_owners"]


# ------------------------------------------------------------------------------------------------------
# Graph structure: order and connectivity
# ------------------------------------------------------------------------------------------------------
def visiting_order(graph: Graph) -> list[tuple[int, list[int]]]:
    """ACDC's visiting order: ``[(dest index, [src indices, most recent first]), ...]``, destinations in
    reverse topological order (reverse of ``graph.dest_names``). A node-level graph has one destination
    (``"*"``, each source a unit) whose sources are visited from the last to the first.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> d, srcs = visiting_order(g)[0]
    >>> g.dest_names[d], [g.src_names[s] for s in srcs][:2]
    ('logits', ['m1', 'a1.h3'])
    """
    n_pred = graph.n_pred.tolist()
    return [(d, list(range(n_pred[d] - 1, -1, -1))) for d in range(graph.n_dest - 1, -1, -1)]


def _connected_dests(circuit: Tensor, owners: list[list[int]], graph: Graph) -> Tensor:
    """``[n_dest]`` bool: destinations whose node reaches the logits through the kept edges of
    ``circuit`` (``logits`` itself is always connected)."""
    if graph.level == "node":
        return torch.ones(1, dtype=torch.bool)
    owned: list[list[int]] = [[] for _ in range(graph.n_src)]
    for d, srcs in enumerate(owners):
        for s in srcs:
            owned[s].append(d)
    dest_ok = torch.zeros(graph.n_dest, dtype=torch.bool)
    dest_ok[graph.dest_index("logits")] = True
    kept = circuit.bool() & graph.valid
    for s in range(graph.n_src - 1, -1, -1):  # readers of s come later in the forward: decided first
        if owned[s] and bool((kept[s] & dest_ok).any()):
            dest_ok[owned[s]] = True
    return dest_ok


# ------------------------------------------------------------------------------------------------------
# Evaluating many circuits per forward
# ------------------------------------------------------------------------------------------------------
class _CircuitEvaluator:
    """``evaluate(W [C, n_src, n_dest]) -> [C]``: the mean metric over all prompts of each circuit, with
    the circuits folded into the batch (one forward per prompt batch). Per position, ``W`` is ``[C, n_slots,
    n_src, n_dest]`` and ``slots`` holds each batch's ``[batch, pos]`` slot table."""

    def __init__(self, model: Any, graph: Graph, batches: list[tuple[PromptPairs, Ablation, Any]],
                 slots: list[Tensor | None] | None = None, answer_only: bool = False):
        self.model, self.graph, self.batches = model, graph, batches
        # a built-in metric reads the logits at the answer positions only: unembed just those (a forward of
        # 16 circuits x 64 prompts x 16 tokens would otherwise hold 3.3 GB of GPT-2 logits)
        self.answer_only = answer_only
        self.views = [answer_view(b) if answer_only else b for b, _, _ in batches]
        self.slots = slots if slots is not None else [None] * len(batches)
        self.n_prompts = sum(b.batch for b, _, _ in batches)
        self.device = _model_device_dtype(model)[0]
        self.n_forwards = 0
        self._W: Tensor | None = None
        self._held: Any = None  # the patch context held open for the whole search (one prompt batch)

    def _score(self, logits: Tensor, batch: PromptPairs, metric: Any, c: int) -> Tensor:
        b = batch.batch
        return torch.stack([metric(logits[i * b : (i + 1) * b], batch).double().sum() for i in range(c)])

    def _logits(self, batch: PromptPairs, c: int) -> Tensor:
        tokens = batch.clean.to(self.device).repeat(c, 1)
        if not self.answer_only:
            return self.model(tokens)
        return final_logits(self.model, tokens, batch.answer_pos.to(self.device))

    @torch.no_grad()
    def evaluate(self, W: Tensor) -> Tensor:
        c = W.shape[0]
        W = W.to(self.device)
        total = torch.zeros(c, dtype=torch.float64, device=self.device)
        if len(self.batches) == 1 and self._held is not None:
            batch, _, metric = self.batches[0]
            self._W = W
            logits = self._logits(batch, c)
            self._W = None
            total += self._score(logits, self.views[0], metric, c)
            self.n_forwards += 1
        else:
            for (batch, abl, metric), view, table in zip(self.batches, self.views, self.slots):
                with patch(self.model, self.graph, W, abl, positions=table):
                    logits = self._logits(batch, c)
                total += self._score(logits, view, metric, c)
                self.n_forwards += 1
        return (total / self.n_prompts).cpu()

    # One patch context for the whole search when there is one prompt batch (entering one costs hook
    # installation; the weights are read through a callable at every forward).
    def __enter__(self) -> "_CircuitEvaluator":
        if len(self.batches) == 1:
            _, abl, _ = self.batches[0]
            self._held = patch(self.model, self.graph, lambda: self._W, abl, positions=self.slots[0])
            self._held.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(*exc)


# ------------------------------------------------------------------------------------------------------
# ACDC
# ------------------------------------------------------------------------------------------------------
def acdc(
    model: Any,
    graph: Graph,
    data: PromptPairs,
    metric: Any = "kl",
    *,
    threshold: float = 0.01,
    ablation: "str | Ablation" = "corrupt",
    batch_candidates: int = 16,
    batch_size: int = 64,
    absolute: bool | None = None,
    speculate: str = "adaptive",
    progress: bool = True,
    out: "str | os.PathLike | None" = None,
    positions: Any = None,
    slot_names: Any = None,
) -> EdgeScores:
    """Run ACDC (see the module docstring) and return its scores and final circuit.

    ``metric``: ``"kl"`` (KL divergence of the answer-position distribution to the clean model's,
    default), a metric name or a callable ``(logits, data) -> [batch]``; averaged over all prompts.
    ``threshold``: remove an edge when the metric change is below it. ``absolute``: compare ``|change|``
    (default for task metrics) or the signed change in the "worse" direction (default for KL: the KL
    increase; for a higher-is-better metric, its decrease). ``ablation``: ``"corrupt"`` (the corrupted
    prompts' run), ``"mean"``, ``"pos_mean"``, ``"zero"`` or an :class:`~edgepatch.patching.Ablation`.
    ``batch_candidates``: candidate edges evaluated per forward (1 = plain sequential ACDC; the result is
    the same for every value). ``speculate``: how a block predicts the outcomes before it (``"adaptive"``,
    ``"keep"``, ``"remove"``; changes the number of forwards, never the result). ``batch_size``: prompts
    per forward (each forward holds ``batch_candidates * batch_size`` rows). ``out``: a folder for
    resumable progress (as in :func:`edgepatch.sweep`): the search state is written every few seconds,
    and the same call again continues from it, with the same result as an uninterrupted run.
    ``positions``, ``slot_names``: search (position slot, edge) pairs instead of edges (see the module
    docstring): ``"absolute"``, ``"named"`` or a ``[n_prompts, pos]`` tensor of slots, as in
    :func:`~edgepatch.attribution.eap`. Every slot multiplies the edges to test; named slots (IOI's six)
    keep that affordable.

    Returns :class:`~edgepatch.scores.EdgeScores`: ``scores`` = ``metric(without edge) - metric(current)``
    measured when the edge was tested (0 for untested edges of disconnected destinations), ``circuit_mask``
    = the final circuit, ``info`` = threshold, forwards used, forwards sequential ACDC would need, the
    ``tested`` mask and the metric of the final circuit. Per position all of them are ``[n_slots, n_src,
    n_dest]``, with the slot names in ``slots``.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> from edgepatch.tasks import induction
    >>> m = random_model("tiny"); g = build_graph(m)
    >>> r = acdc(m, g, induction(101, n=8, seq_len=4), "logit_diff", threshold=0.0, progress=False)
    >>> int(r.circuit_mask.sum()) == g.n_edges  # threshold 0 keeps every edge (|change| >= 0)
    True
    """
    _check_graph(model, graph)
    data = _check_data(model, data)
    batch_size = _check_batch_size(batch_size)
    batch_candidates = _check_batch_size(batch_candidates, "batch_candidates")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise EdgepatchError(f"threshold must be a number; got {threshold!r}.") from None
    if math.isnan(threshold):
        raise EdgepatchError("threshold is NaN; give a number (a change of the metric below it removes an edge).")
    if speculate not in ("adaptive", "keep", "remove"):
        raise EdgepatchError(f"speculate must be 'adaptive', 'keep' or 'remove'; got {speculate!r}.")
    metric_fn, metric_name = _resolve_metric(metric)
    kl = _is_kl(metric_fn)
    if absolute is None:
        absolute = not kl
    sign = 1.0 if not getattr(metric_fn, "higher_is_better", True) else -1.0  # "damage" direction

    slots, names = position_slots(positions, data, slot_names)
    n_slots = 1 if names is None else len(names)
    order = visiting_order(graph)
    owners = dest_owners(graph)
    # flat visiting list: (dest, src, slot) and where each destination's run of units ends
    flat: list[tuple[int, int, int]] = [(d, s, t) for d, srcs in order for s in srcs for t in range(n_slots)]
    dest_end: dict[int, int] = {}
    pos = 0
    for d, srcs in order:
        pos += len(srcs) * n_slots
        dest_end[d] = pos

    # the current circuit (1 = kept), [n_slots, n_src, n_dest] (one slot without positions: squeezed at the end)
    valid = graph.valid.expand(n_slots, *graph.valid.shape)
    circuit = valid.clone().float()
    scores = torch.zeros(valid.shape)
    tested = torch.zeros(valid.shape, dtype=torch.bool)

    # Per position, a node reaches the logits through an edge kept in any slot; and through every edge where
    # some token is in no slot (those tokens keep every edge, and a head carries its inputs at a slot's
    # tokens to its outputs at later tokens): nothing is pruned then.
    everything = slots is not None and bool((slots < 0).any())

    def connected(c: Tensor) -> Tensor:
        if everything:
            return torch.ones(graph.n_dest, dtype=torch.bool)
        return _connected_dests(c.amax(0), owners, graph)

    skipped: list[int] = []
    stale: dict[int, bool] = {}  # flat index -> "removed" according to an invalidated evaluation
    n_blocks = n_mispredicted = 0
    last_removed = False

    def remove_rule(change: float) -> bool:
        return (abs(change) if absolute else sign * change) < threshold

    def predict(i: int) -> bool:
        if speculate == "keep":
            return False
        if speculate == "remove":
            return True
        return stale.get(i, last_removed)

    # the search state at block boundaries, which decides the rest of the search (and what `out` keeps)
    # (saved as [n_src, n_dest] without positions, the shape earlier versions' progress files have)
    def saved(t: Tensor) -> Tensor:
        return t if names is not None else t[0]

    state = {"circuit": saved(circuit), "scores": saved(scores), "tested": saved(tested).to(torch.uint8),
             "skipped": torch.zeros(graph.n_dest, dtype=torch.uint8),
             "scalars": torch.tensor([0, -1, math.nan, math.nan, 0, 0, 0, 0], dtype=torch.float64)}
    save = resumable(out, state, "ACDC search", lambda: run_fingerprint(
        model, graph, data, ablation, metric=metric_id(metric), threshold=threshold, absolute=absolute,
        batch_size=batch_size, batch_candidates=batch_candidates, speculate=speculate,
        positions=positions_id(slots, names)))
    circuit, scores, tested = (state[k].view(valid.shape) for k in ("circuit", "scores", "tested"))
    tested = tested.bool()
    skipped = [d for d in range(graph.n_dest - 1, -1, -1) if state["skipped"][d]]  # (visiting order)
    ptr_, checked_, current_, initial_, last_, n_blocks, n_mispredicted, forwards_before = state["scalars"].tolist()
    last_removed = bool(last_)

    def checkpoint() -> None:
        state.update(circuit=saved(circuit), scores=saved(scores), tested=saved(tested).to(torch.uint8))
        state["skipped"].zero_()
        state["skipped"][skipped] = 1
        state["scalars"] = torch.tensor([ptr, checked_dest, current, initial, last_removed, n_blocks, n_mispredicted,
                                         forwards_before + ev.n_forwards], dtype=torch.float64)
        save()

    with _eval_mode(model), engine_flags(model), torch.no_grad():
        fast = reads_answer_only(metric_fn)
        batches = [(b, a, prepared_metric(model, metric_fn, b, answer_pos=b.answer_pos if fast else None))
                   for b, a in _batches_with_ablation(model, graph, data, ablation, batch_size)]
        device = _model_device_dtype(model)[0]
        tables = None if slots is None else [slots[sl].to(device) for sl, _ in data_batches(data, batch_size)]
        with _CircuitEvaluator(model, graph, batches, tables, answer_only=fast) as ev:
            if math.isnan(current_):  # a new search (else resumed from `out`)
                current_ = initial_ = float(ev.evaluate(circuit[None] if names is not None else circuit)[0])
            current, initial = current_, initial_
            ptr = int(ptr_)
            checked_dest = int(checked_)  # the destination whose connectivity the commit walk checked last
            bar = _progress(progress, len(flat), f"ACDC ({graph.n_edges:,} edges)" if names is None else
                            f"ACDC ({graph.n_edges:,} edges x {n_slots} position slots)")
            bar.update(ptr)
            while ptr < len(flat):
                # -- build a block: the next C candidates along the predicted path of decisions
                path = circuit.clone()  # the circuit if every prediction in the block comes true
                block: list[tuple[int, bool, int]] = []  # (flat index, predicted removal, baseline item)
                baseline = -1  # block item whose value is the metric of `path` (-1: `current`)
                rows: list[Tensor] = []  # the circuit evaluated for each candidate
                i, prev_dest = ptr, checked_dest
                while i < len(flat) and len(block) < batch_candidates:
                    d, src, t = flat[i]
                    if d != prev_dest:
                        prev_dest = d
                        if not bool(connected(path)[d]):
                            i = dest_end[d]
                            continue
                    removed = predict(i)
                    block.append((i, removed, baseline))
                    row = path.clone()
                    row[t, src, d] = 0.0
                    rows.append(row if names is not None else row[0])
                    if removed:
                        path[t, src, d] = 0.0
                        baseline = len(block) - 1
                    i += 1
                values: list[float] = []
                if block:
                    values = ev.evaluate(torch.stack(rows)).tolist()
                    n_blocks += 1
                results = {j: (c, removed) for c, (j, removed, _) in enumerate(block)}
                build_current = current
                # -- commit in visiting order while the predictions come true
                start = ptr
                while ptr < len(flat):
                    d, src, t = flat[ptr]
                    if d != checked_dest:
                        checked_dest = d
                        if not bool(connected(circuit)[d]):
                            skipped.append(d)
                            ptr = dest_end[d]
                            continue
                    if ptr not in results:
                        break
                    c, predicted = results.pop(ptr)
                    change = values[c] - current
                    scores[t, src, d] = change
                    tested[t, src, d] = True
                    last_removed = remove_rule(change)
                    ptr += 1
                    if last_removed:
                        circuit[t, src, d] = 0.0
                        current = values[c]
                    if last_removed != predicted:
                        n_mispredicted += 1
                        break
                # evaluations past a misprediction are stale, but still the best guess of their outcome
                for j, (c, _) in results.items():
                    base = block[c][2]
                    stale[j] = remove_rule(values[c] - (values[base] if base >= 0 else build_current))
                if ptr == start and block:  # cannot happen: the walk always reaches block[0]
                    raise EdgepatchError("acdc: internal error, no progress; please report this graph.")
                bar.update(ptr - start)
                checkpoint()
            bar.close()
            final_circuit = circuit.bool() & valid
            for d in skipped:
                final_circuit[..., d] = False
            n_forwards_search = int(forwards_before) + ev.n_forwards
            checkpoint()
            save(final=True)

    if names is None:  # edges: [n_src, n_dest]
        scores, tested, final_circuit = scores[0], tested[0], final_circuit[0]
    n_tested = int(tested.sum())
    n_batches = len(batches)
    info = {
        "threshold": threshold,
        "absolute": absolute,
        "batch_candidates": batch_candidates,
        "ablation": _ablation_kind(ablation),
        "n_forwards": n_forwards_search,
        "n_blocks": int(n_blocks),
        "n_mispredicted": int(n_mispredicted),
        "speculate": speculate,
        "n_forwards_sequential": (1 + n_tested) * n_batches,
        "n_tested": n_tested,
        "n_kept": int(final_circuit.sum()),
        "tested": tested,
        "skipped_dests": [graph.dest_names[d] for d in skipped],
        "metric_full": initial,
        "metric_final": current,
        "order": "destinations from logits backwards (reverse dest_names), sources most recent first",
    }
    return EdgeScores(scores, graph, method="acdc", metric=metric_name, info=info, circuit_mask=final_circuit,
                      slots=names)
