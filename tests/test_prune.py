"""prune_circuit (MIB's connected-part pruning): against a name-based reference, its invariants, and
its use in EdgeScores, sweeps and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, MODEL_CASES, cached_model, model_id
from edgepatch.errors import EdgepatchError
from edgepatch.scores import EdgeScores
from edgepatch.tasks import induction


def reference_prune(graph, kept: set[str]) -> set[str]:
    """MIB's rule on edge names: drop nodes without a kept incoming or outgoing edge, and the edges
    touching them, until nothing changes. Written from the names, independently of edgepatch."""
    group = graph.spec.n_heads // graph.spec.n_kv_heads

    def readers(dest: str) -> list[str]:  # the node(s) that read a destination
        if dest == "logits":
            return []
        base = re.sub(r"<[qkv]>$", "", dest)
        m = re.fullmatch(r"a(\d+)\.kv(\d+)", base)
        if m:
            return [f"a{m[1]}.h{h}" for h in range(int(m[2]) * group, (int(m[2]) + 1) * group)]
        return [base]

    edges = {e: tuple(e.split("->")) for e in kept}
    while True:
        has_out = {s for s, _ in edges.values()}
        has_in = {"input"} | {n for _, d in edges.values() for n in readers(d)}
        alive = has_out & has_in
        left = {e: (s, d) for e, (s, d) in edges.items()
                if s in alive and (d == "logits" or any(n in alive for n in readers(d)))}
        if left == edges:
            return set(left)
        edges = left


GRAPH_CASES = [(p, "hooked" if p == "tiny-attn-only" else ANY_CLASS, split)  # (attention-only: hooked only)
               for p in ("tiny", "tiny-parallel", "tiny-gqa", "tiny-attn-only") for split in (True, False)]


@pytest.mark.parametrize("preset, cls, split", GRAPH_CASES)
@pytest.mark.parametrize("density", [0.03, 0.1, 0.3])
def test_prune_matches_name_based_reference(preset, cls, split, density):
    graph = ep.build_graph(cached_model(preset, cls), split_qkv=split)
    gen = torch.Generator().manual_seed(int(density * 100))
    circuits = (torch.rand(5, graph.n_src, graph.n_dest, generator=gen) < density) & graph.valid
    pruned = ep.prune_circuit(graph, circuits)  # batched
    assert pruned.shape == circuits.shape and pruned.dtype == torch.bool
    changed = 0
    for c, p in zip(circuits, pruned):
        expected = reference_prune(graph, set(graph.edges_from_mask(c)))
        assert set(graph.edges_from_mask(p)) == expected
        assert torch.equal(ep.prune_circuit(graph, c), p)  # one at a time, the same
        assert torch.equal(ep.prune_circuit(graph, p), p)  # idempotent
        assert not bool((p & ~c).any())  # only removes
        changed += int(not torch.equal(p, c))
    assert changed > 0 or density >= 0.3  # sparse random circuits always have dangling edges


def test_prune_small_hand_case():
    graph = ep.build_graph(cached_model("tiny", ANY_CLASS))
    keep = ["input->a0.h0<v>", "a0.h0->a1.h1<q>", "a1.h1->logits",  # a path from input to logits
            "a0.h1->logits",  # a0.h1 reads nothing kept
            "input->a1.h0<k>"]  # a1.h0 writes nothing kept
    pruned = ep.prune_circuit(graph, graph.mask_from_edges(keep))
    assert graph.edges_from_mask(pruned) == ["input->a0.h0<v>", "a0.h0->a1.h1<q>", "a1.h1->logits"]
    # removing the path's first edge leaves nothing connected
    assert not bool(ep.prune_circuit(graph, graph.mask_from_edges(keep[1:])).any())


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_pruning_never_changes_a_circuit_under_corrupted_run_ablation(case):
    model = cached_model(*case)
    graph = ep.build_graph(model)
    data = induction(model.cfg.d_vocab, n=3, seq_len=4, seed=0)
    abl_corrupt = ep.source_activations(model, graph, data.corrupt)
    gen = torch.Generator().manual_seed(3)
    circuit = (torch.rand(graph.n_src, graph.n_dest, generator=gen) < 0.15) & graph.valid
    pruned = ep.prune_circuit(graph, circuit)
    assert not torch.equal(pruned, circuit)
    with torch.no_grad():
        outs = {}
        for name, c in (("circuit", circuit), ("pruned", pruned)):
            with ep.patch(model, graph, c.float(), abl_corrupt):
                outs[name] = model(data.clean)
    torch.testing.assert_close(outs["pruned"], outs["circuit"], atol=1e-4, rtol=0)


def test_scores_circuits_pruned():
    graph = ep.build_graph(cached_model("tiny-gqa", ANY_CLASS))
    gen = torch.Generator().manual_seed(0)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=gen), graph, method="random")
    counts = [3, 10, 30, 80]
    stacked = scores.circuits(counts, prune=True)
    for k, c in zip(counts, stacked):
        assert torch.equal(c, scores.circuit(k, prune=True))
        assert torch.equal(c, ep.prune_circuit(graph, scores.circuit(k)))
    for small, big in zip(stacked[:-1], stacked[1:]):
        assert not bool((small & ~big).any())  # nested


@pytest.mark.parametrize("ablation", ["mean", "corrupt"])
def test_sweep_prune_evaluates_the_pruned_circuits(ablation):
    model = cached_model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    data = induction(model.cfg.d_vocab, n=4, seq_len=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=gen), graph, method="random")
    counts = [2, 8, 30, 110]
    r = ep.sweep(model, graph, scores, data, counts=counts, ablation=ablation, prune=True, batch_size=4,
                 progress=False)
    if ablation == "corrupt":
        abl = ep.source_activations(model, graph, data.corrupt)
    else:
        abl = ep.mean_activations(model, graph, data.clean, data.attention_mask)
    metric = ep.get_metric("logit_diff")
    expected = []
    with torch.no_grad():
        for k in counts:
            with ep.patch(model, graph, ep.prune_circuit(graph, scores.circuit(k)).float(), abl):
                expected.append(metric(model(data.clean), data).double())
    torch.testing.assert_close(r.values, torch.stack(expected), atol=1e-4, rtol=0)
    pruned_counts = [int(ep.prune_circuit(graph, scores.circuit(k)).sum()) for k in counts]
    assert r.info["pruned_counts"] == pruned_counts and r.info["prune"] is True
    assert pruned_counts[-1] == graph.n_edges  # the whole graph is connected
    assert r.effective_counts == counts  # the x axis stays the requested counts, as in MIB
    unpruned = ep.sweep(model, graph, scores, data, counts=counts, ablation=ablation, batch_size=4, progress=False)
    if ablation == "corrupt":  # pruning changes nothing under the corrupted run
        torch.testing.assert_close(r.values, unpruned.values, atol=1e-4, rtol=0)
    else:  # but it does under mean ablation (so this test can tell the two apart)
        assert not torch.allclose(r.values, unpruned.values, atol=1e-4)


def test_prune_bad_input():
    graph = ep.build_graph(cached_model("tiny", ANY_CLASS))
    with pytest.raises(EdgepatchError, match=r"circuit has shape \[3, 4\]; expected \[\.\.\., n_src, n_dest\]"):
        ep.prune_circuit(graph, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(EdgepatchError, match="0/1 or bool mask.*pass e.g. weights > 0"):
        ep.prune_circuit(graph, torch.full((graph.n_src, graph.n_dest), 0.5))
    with pytest.raises(EdgepatchError, match="must be a tensor.*got list"):
        ep.prune_circuit(graph, [1, 2])
    node = ep.build_graph(cached_model("tiny", ANY_CLASS), level="node")
    with pytest.raises(EdgepatchError, match="needs an edge-level graph.*Prune on graph.edge_graph"):
        ep.prune_circuit(node, torch.ones(node.n_src, 1, dtype=torch.bool))
    model = cached_model("tiny", ANY_CLASS)
    data = induction(model.cfg.d_vocab, n=2, seq_len=4, seed=0)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph, method="random")
    with pytest.raises(EdgepatchError, match="prune must be True or False; got 'yes'"):
        ep.sweep(model, graph, scores, data, counts=[3], prune="yes", progress=False)


def test_cli_prune_records_pruned_counts(tmp_path):
    from edgepatch import cli

    out = tmp_path / "run"
    assert cli.main(["sweep", "--model", "random:tiny", "--task", "induction", "--method", "eap", "--counts", "log",
                     "--n-prompts", "4", "--batch-size", "4", "--ablation", "mean", "--prune", "--out", str(out),
                     "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    row = record["results"][0]
    assert record["options"]["prune"] is True
    assert len(row["pruned_counts"]) == len(record["counts"])
    assert all(p <= c for p, c in zip(row["pruned_counts"], record["counts"]))
