"""ACDC: the batched, speculative search equals a plain sequential ACDC written here, one edge per forward."""

from __future__ import annotations

import functools

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, class_or_other, requires
from edgepatch.acdc import acdc, dest_owners, visiting_order
from edgepatch.errors import EdgepatchError
from edgepatch.metrics import KLDivergence, logit_diff
from edgepatch.tasks import induction

torch.set_num_threads(1)  # tiny models: threads only add contention on shared CPUs


@functools.lru_cache(maxsize=None)
def _model(preset: str, cls: str):
    requires(cls)
    return ep.random_model(preset, model_class=cls, seed=0)


@pytest.fixture(scope="module")
def data():
    return induction(101, n=6, seq_len=4, seed=1)


# ------------------------------------------------------------------------------------------------------
# An independent sequential reference: one edge per forward through the public patch()
# ------------------------------------------------------------------------------------------------------
def _node_sources(graph, dest: str) -> list[str]:
    """Source names of the node that reads ``dest`` (written from names, not from acdc.dest_owners)."""
    if dest == "logits":
        return []
    base = dest.split("<")[0]
    layer, unit = base.split(".") if "." in base else (None, None)
    if unit is not None and unit.startswith("kv"):
        group = graph.spec.n_heads // graph.spec.n_kv_heads
        g = int(unit[2:])
        return [f"{layer}.h{h}" for h in range(g * group, (g + 1) * group)]
    return [base]


def _reaches_logits(graph, W, src: str) -> bool:
    @functools.lru_cache(maxsize=None)
    def reach(s: str) -> bool:
        i = graph.src_index(s)
        for d, name in enumerate(graph.dest_names):
            if graph.valid[i, d] and W[i, d] > 0:
                if name == "logits" or any(reach(o) for o in _node_sources(graph, name)):
                    return True
        return False

    return reach(src)


def reference_acdc(model, graph, data, metric: str, threshold: float, absolute: bool):
    abl = ep.source_activations(model, graph, data.corrupt)
    if metric == "kl":
        with torch.no_grad():
            fn = KLDivergence(model(data.clean))
        damage_sign = 1.0
    else:
        fn = logit_diff
        damage_sign = -1.0

    weights = [graph.valid.float()]

    def measure(W):
        weights[0] = W
        with torch.no_grad():
            return float(fn(model(data.clean), data).double().mean())

    with ep.patch(model, graph, lambda: weights[0], abl):  # one context, read at every forward
        return _search(graph, measure, threshold, absolute, damage_sign)


def _search(graph, measure, threshold, absolute, damage_sign):
    W = graph.valid.float()
    current = measure(W)
    tested = torch.zeros_like(graph.valid)
    changes = torch.zeros(graph.n_src, graph.n_dest)
    dead = []
    for d in reversed(range(graph.n_dest)):
        dest = graph.dest_names[d]
        if dest != "logits" and not any(_reaches_logits(graph, W, o) for o in _node_sources(graph, dest)):
            dead.append(d)
            continue
        for s in reversed(range(int(graph.n_pred[d]))):
            W2 = W.clone()
            W2[s, d] = 0
            value = measure(W2)
            change = value - current
            tested[s, d] = True
            changes[s, d] = change
            if (abs(change) if absolute else damage_sign * change) < threshold:
                W, current = W2, value
    for d in dead:
        W[:, d] = 0
    return W.bool() & graph.valid, tested, changes


def snapshot(model):
    return {
        "hooks": [(n, len(h._forward_hooks), len(h._forward_pre_hooks), len(h._backward_hooks))
                  for n, h in model.hook_dict.items()],
        "flags": {f: getattr(model.cfg, f, None) for f in
                  ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_attn_result")},
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_same_state(before, after):
    assert before["hooks"] == after["hooks"]
    assert before["flags"] == after["flags"]
    assert before["training"] == after["training"]
    assert len(before["params"]) == len(after["params"])
    for (n, i, rg, v), (n2, i2, rg2, v2) in zip(before["params"], after["params"]):
        assert (n, i, rg) == (n2, i2, rg2)
        assert torch.equal(v, v2), n


# ------------------------------------------------------------------------------------------------------
# Batched == sequential
# ------------------------------------------------------------------------------------------------------
# Thresholds are chosen so that circuits are neither full nor empty. The bridge's random models (HF's smaller
# initialization) change logit differences far less than the HookedTransformer's, so a test on ANY_CLASS
# takes its threshold by class, like CASES.
CASES = [  # thresholds chosen so that circuits are neither full nor empty (bridge: HF's smaller init)
    ("tiny", "hooked", "kl", 3e-3),
    ("tiny", "hooked", "logit_diff", 0.03),
    ("tiny", "bridge", "kl", 1e-6),
    ("tiny", "bridge", "logit_diff", 1e-3),
    ("tiny-gqa", "hooked", "kl", 1e-2),
    ("tiny-3l", "hooked", "logit_diff", 0.03),
]


@pytest.mark.parametrize("preset,cls,metric,threshold", CASES)
def test_batched_acdc_equals_sequential_reference(preset, cls, metric, threshold, data):
    model = _model(preset, cls)
    graph = ep.build_graph(model)
    absolute = metric != "kl"
    ref_circuit, ref_tested, ref_changes = reference_acdc(model, graph, data, metric, threshold, absolute)
    before = snapshot(model)
    variants = [(16, "adaptive")] + ([(5, "keep"), (7, "remove")] if (preset, cls) == ("tiny", "hooked") else [])
    for C, speculate in variants:
        result = acdc(model, graph, data, metric, threshold=threshold, batch_candidates=C,
                      speculate=speculate, progress=False)
        assert torch.equal(result.circuit_mask, ref_circuit), (C, speculate)
        assert torch.equal(result.info["tested"], ref_tested)
        got = result.scores.nan_to_num(0)
        assert torch.allclose(got[ref_tested], ref_changes[ref_tested], atol=1e-5, rtol=1e-4)
        assert result.info["n_tested"] == int(ref_tested.sum())
        assert result.info["n_forwards_sequential"] == 1 + int(ref_tested.sum())
    assert_same_state(before, snapshot(model))
    # something non-trivial was decided
    assert 0 < int(ref_circuit.sum()) < graph.n_edges


def test_batching_saves_forwards_and_is_independent_of_block_size(data):
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    runs = {C: acdc(model, graph, data, "logit_diff", threshold={"hooked": 0.01, "bridge": 1e-5}[ANY_CLASS],
                    batch_candidates=C, progress=False)
            for C in (4, 32)}
    assert torch.equal(runs[4].circuit_mask, runs[32].circuit_mask)
    seq = runs[4].info["n_forwards_sequential"]  # 1 + one forward per tested edge
    assert seq == 1 + runs[32].info["n_tested"] and seq > 100
    assert runs[4].info["n_forwards"] < seq
    assert runs[32].info["n_forwards"] * 4 < seq  # adaptive speculation: several times fewer forwards
    assert runs[32].info["n_forwards"] == 1 + runs[32].info["n_blocks"]


@pytest.mark.parametrize("positions", [None, "absolute"])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, monkeypatch, data, positions):
    """acdc(out=...) keeps its search state: interrupted after a few blocks, the same call continues from
    there (no forward repeated) and ends with the uninterrupted run's circuit, scores and counts; a finished
    search is read back without a forward; other settings are refused. Per position too."""
    import sys

    acdc_mod = sys.modules["edgepatch.acdc"]  # (edgepatch.acdc is also the function's name)
    from edgepatch import progress
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    opts = dict(threshold={"hooked": 0.03, "bridge": 1e-3}[ANY_CLASS], batch_candidates=8, progress=False,
                positions=positions)
    full = acdc(model, graph, data, "logit_diff", **opts)
    monkeypatch.setattr(progress, "SAVE_EVERY_S", 0.0)
    real = acdc_mod._CircuitEvaluator.evaluate
    calls = []

    def interrupt_after_four(self, W):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, W)

    monkeypatch.setattr(acdc_mod._CircuitEvaluator, "evaluate", interrupt_after_four)
    with pytest.raises(KeyboardInterrupt):
        acdc(model, graph, data, "logit_diff", out=tmp_path, **opts)
    monkeypatch.setattr(acdc_mod._CircuitEvaluator, "evaluate", real)
    resumed = acdc(model, graph, data, "logit_diff", out=tmp_path, **opts)
    assert torch.equal(resumed.circuit_mask, full.circuit_mask)
    assert torch.equal(resumed.info["tested"], full.info["tested"])
    assert torch.allclose(resumed.scores, full.scores, atol=1e-6, rtol=0, equal_nan=True)
    assert resumed.info["metric_final"] == pytest.approx(full.info["metric_final"], abs=1e-9)
    assert 0 < int(full.circuit_mask.sum()) < full.n_items
    assert resumed.info["n_forwards"] == 1 + resumed.info["n_blocks"]  # none repeated (the 4 before included)
    calls.clear()
    monkeypatch.setattr(acdc_mod._CircuitEvaluator, "evaluate", lambda self, W: calls.append(1) or real(self, W))
    again = acdc(model, graph, data, "logit_diff", out=tmp_path, **opts)
    assert calls == [] and torch.equal(again.circuit_mask, full.circuit_mask)
    saved = opts["threshold"]
    with pytest.raises(EdgepatchError, match=rf"holds an ACDC search with different settings \(threshold: saved "
                                             rf"{saved:g}, now {2 * saved:g}\)"):
        acdc(model, graph, data, "logit_diff", out=tmp_path, **{**opts, "threshold": 2 * saved})


# ------------------------------------------------------------------------------------------------------
# Per position: (slot, edge) pairs
# ------------------------------------------------------------------------------------------------------
def reference_acdc_per_position(model, graph, data, slots, n_slots: int, threshold: float):
    """Sequential ACDC over (slot, edge) pairs, one pair per forward through the public patch(positions=...):
    ACDC's edge order with each edge's slots in slot order; a destination is searched while its node
    reaches the logits through an edge kept in some slot, or in a token in no slot (which keeps every
    edge). logit_diff, |change| < threshold removes."""
    abl = ep.source_activations(model, graph, data.corrupt)
    weights = [graph.valid.float().expand(n_slots, -1, -1).clone()]

    def measure(W):
        weights[0] = W
        with torch.no_grad():
            return float(logit_diff(model(data.clean), data).double().mean())

    with ep.patch(model, graph, lambda: weights[0], abl, positions=slots):
        W = weights[0].clone()
        current = measure(W)
        tested = torch.zeros(W.shape, dtype=torch.bool)
        changes = torch.zeros(W.shape)
        dead = []
        for d in reversed(range(graph.n_dest)):
            dest = graph.dest_names[d]
            union = graph.valid.float() if bool((slots < 0).any()) else W.amax(0)
            if dest != "logits" and not any(_reaches_logits(graph, union, o) for o in _node_sources(graph, dest)):
                dead.append(d)
                continue
            for s in reversed(range(int(graph.n_pred[d]))):
                for t in range(n_slots):
                    W2 = W.clone()
                    W2[t, s, d] = 0
                    value = measure(W2)
                    tested[t, s, d] = True
                    changes[t, s, d] = value - current
                    if abs(value - current) < threshold:
                        W, current = W2, value
        for d in dead:
            W[..., d] = 0
    return W.bool() & graph.valid, tested, changes


@pytest.mark.parametrize("cls,unslotted", [("hooked", True), ("bridge", True), (ANY_CLASS, False)])
def test_per_position_acdc_equals_a_sequential_reference(cls, unslotted, data):
    """Two slots, with tokens in none (which keep every edge) or without: the batched search over (slot,
    edge) pairs makes the sequential reference's decisions, for every block size and speculation."""
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    n, pos = data.clean.shape
    slots = torch.zeros((n, pos), dtype=torch.long)
    slots[:, -1] = 1  # the answer position
    if unslotted:
        slots[:, [0, -2]] = -1  # the first token and the one before the answer in no slot
    threshold = {"hooked": 0.05, "bridge": 2e-3}[cls]
    ref_circuit, ref_tested, ref_changes = reference_acdc_per_position(model, graph, data, slots, 2, threshold)
    assert 0 < int(ref_circuit.sum()) < 2 * graph.n_edges  # neither end: the comparisons below can fail
    assert bool((ref_circuit[0] != ref_circuit[1]).any())  # the slots' circuits differ
    before = snapshot(model)
    for C, speculate in [(16, "adaptive"), (1, "adaptive"), (5, "keep")]:
        result = acdc(model, graph, data, "logit_diff", threshold=threshold, positions=slots, slot_names=["rest", "END"],
                      batch_candidates=C, speculate=speculate, batch_size=4 if C == 1 else 64, progress=False)
        assert result.per_position and result.slots == ("rest", "END")
        assert torch.equal(result.circuit_mask, ref_circuit), (C, speculate)
        assert torch.equal(result.info["tested"], ref_tested)
        got = result.scores.nan_to_num(0)
        assert torch.allclose(got[ref_tested], ref_changes[ref_tested], atol=1e-5, rtol=1e-4)
        assert result.info["n_forwards_sequential"] == (1 + int(ref_tested.sum())) * (2 if C == 1 else 1)
        assert bool(result.info["skipped_dests"]) != unslotted  # (pruning happens, where it may)
    assert_same_state(before, snapshot(model))
    # the circuit evaluates as it was measured: its metric is the search's last value
    sw = ep.evaluate_circuit(model, graph, result, data, metric="logit_diff", positions=slots)
    assert float(sw.mean[0]) == pytest.approx(result.info["metric_final"], abs=1e-5)


def test_one_slot_over_every_token_is_edge_acdc(data):
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    threshold = {"hooked": 0.03, "bridge": 1e-3}[ANY_CLASS]
    edges = acdc(model, graph, data, "logit_diff", threshold=threshold, progress=False)
    one = acdc(model, graph, data, "logit_diff", threshold=threshold, progress=False,
               positions=torch.zeros(data.clean.shape, dtype=torch.long))
    assert one.scores.shape == (1, graph.n_src, graph.n_dest) and not edges.per_position
    assert 0 < int(edges.circuit_mask.sum()) < graph.n_edges
    assert torch.equal(one.circuit_mask[0], edges.circuit_mask)
    assert torch.equal(one.info["tested"][0], edges.info["tested"])
    assert torch.allclose(one.scores[0], edges.scores, atol=1e-6, equal_nan=True)
    assert one.info["n_forwards"] == edges.info["n_forwards"]


def test_edge_progress_keeps_its_shape_and_folders_keep_their_kind(tmp_path, data):
    """An edge search's progress file keeps the [n_src, n_dest] tensors of earlier versions, so their files
    still resume; a per-position search's folder is refused to an edge search."""
    from safetensors import safe_open

    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    opts = dict(threshold={"hooked": 0.03, "bridge": 1e-3}[ANY_CLASS], progress=False)
    acdc(model, graph, data, "logit_diff", out=tmp_path / "pos", positions="absolute", **opts)
    with pytest.raises(EdgepatchError, match="different settings"):
        acdc(model, graph, data, "logit_diff", out=tmp_path / "pos", **opts)
    acdc(model, graph, data, "logit_diff", out=tmp_path / "edges", **opts)
    with safe_open(str(tmp_path / "edges" / "progress.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in ("circuit", "scores", "tested")}
    assert shapes == dict.fromkeys(("circuit", "scores", "tested"), tuple(graph.valid.shape))


# ------------------------------------------------------------------------------------------------------
# Threshold extremes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_threshold_zero_keeps_every_edge_with_absolute_change(cls, data):
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    result = acdc(model, graph, data, "logit_diff", threshold=0.0, progress=False)
    assert int(result.circuit_mask.sum()) == graph.n_edges
    assert bool(result.info["tested"][graph.valid].all())
    # and every score is the change of removing that edge from the full model (exact patching)
    assert result.info["n_forwards"] < 20


def test_threshold_zero_with_kl_removes_only_edges_that_lower_kl(data):
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    result = acdc(model, graph, data, "kl", threshold=0.0, progress=False)
    removed = graph.valid & ~result.circuit_mask & result.info["tested"]
    assert bool((result.scores[removed] < 0).all())
    kept = result.circuit_mask
    assert bool((result.scores[kept] >= 0).all())


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_huge_threshold_removes_every_edge(cls, metric, data):
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    result = acdc(model, graph, data, metric, threshold=1e9, progress=False)
    assert int(result.circuit_mask.sum()) == 0
    # only the logits' edges are tested: after they go, nothing else reaches the output
    logits = graph.dest_index("logits")
    assert int(result.info["tested"].sum()) == int(graph.n_pred[logits])
    assert len(result.info["skipped_dests"]) == graph.n_dest - 1
    assert result.info["n_forwards"] <= 3


# ------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------
def test_prompt_batches_and_ablations(data):
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    threshold = {"hooked": 0.03, "bridge": 1e-3}[ANY_CLASS]
    one = acdc(model, graph, data, "logit_diff", threshold=threshold, batch_size=64, progress=False)
    split = acdc(model, graph, data, "logit_diff", threshold=threshold, batch_size=4, progress=False)
    assert 0 < int(one.circuit_mask.sum()) < graph.n_edges  # (neither end: the comparisons below can fail)
    assert torch.equal(one.circuit_mask, split.circuit_mask)
    assert split.info["n_forwards"] == 2 * one.info["n_forwards"]
    abl = ep.source_activations(model, graph, data.corrupt)
    given = acdc(model, graph, data, "logit_diff", threshold=threshold, ablation=abl, batch_size=4, progress=False)
    assert torch.equal(given.circuit_mask, one.circuit_mask)
    for kind in ("mean", "zero"):
        r = acdc(model, graph, data, "kl", threshold=1e-2, ablation=kind, progress=False)
        assert r.info["ablation"] == kind and r.method == "acdc" and r.metric == "kl_div"
        assert 0 <= int(r.circuit_mask.sum()) <= graph.n_edges


def test_visiting_order_and_owners():
    model = _model("tiny-gqa", ANY_CLASS)
    graph = ep.build_graph(model)
    order = visiting_order(graph)
    names = [graph.dest_names[d] for d, _ in order]
    assert names[:3] == ["logits", "m1", "a1.kv1<v>"]
    assert [graph.src_names[s] for s in order[0][1]][:3] == ["m1", "a1.h5", "a1.h4"]
    owners = dest_owners(graph)
    assert [graph.src_names[s] for s in owners[graph.dest_index("a1.kv1<k>")]] == ["a1.h3", "a1.h4", "a1.h5"]
    assert [graph.src_names[s] for s in owners[graph.dest_index("a0.h2<q>")]] == ["a0.h2"]
    assert owners[graph.dest_index("logits")] == []


def test_errors(data):
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    with pytest.raises(EdgepatchError, match="speculate must be"):
        acdc(model, graph, data, speculate="maybe", progress=False)
    with pytest.raises(EdgepatchError, match="threshold must be a number"):
        acdc(model, graph, data, threshold="big", progress=False)
    with pytest.raises(EdgepatchError, match="threshold is NaN; give a number"):  # (once: kept every edge)
        acdc(model, graph, data, threshold=float("nan"), progress=False)
    with pytest.raises(EdgepatchError, match="batch_candidates must be a positive int"):
        acdc(model, graph, data, batch_candidates=0, progress=False)
    with pytest.raises(EdgepatchError, match="ablation must be one of"):
        acdc(model, graph, data, ablation="resample", progress=False)
    with pytest.raises(EdgepatchError, match="data must be PromptPairs"):
        acdc(model, graph, data.clean, progress=False)


def test_model_restored_after_an_exception(data):
    model = _model("tiny", class_or_other("bridge"))
    graph = ep.build_graph(model)
    before = snapshot(model)

    def broken(logits, data):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        acdc(model, graph, data, broken, threshold=0.1, progress=False)
    assert_same_state(before, snapshot(model))
