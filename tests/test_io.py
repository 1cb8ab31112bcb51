"""Saving/loading (safetensors + JSON, no pickle) and MIB / EAP-IG graph JSON export/import."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import cached_model
from edgepatch.errors import EdgepatchError
from edgepatch.graph import build_graph
from edgepatch.io import (
    from_mib_json,
    from_mib_pt,
    graph_from_dict,
    graph_to_dict,
    load_circuit,
    load_scores,
    load_sweep,
    mib_edge_names,
    save_circuit,
    save_scores,
    save_sweep,
    to_mib_json,
    to_mib_pt,
)
from edgepatch.scores import EdgeScores
from edgepatch.sweep import SweepResult

GRAPH_CASES = [
    ("tiny", True, "edge"),
    ("tiny", False, "edge"),
    ("tiny-gqa", True, "edge"),
    ("tiny-gqa", False, "edge"),
    ("tiny-parallel", True, "edge"),
    ("tiny-attn-only", True, "edge"),
    ("tiny", True, "node"),
]


def graph_of(preset, split=True, level="edge"):
    return build_graph(cached_model(preset, "hooked"), split_qkv=split, level=level)


def random_scores(graph, seed=0, with_mask=True):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(graph.n_src, graph.n_dest, generator=gen)
    mask = (torch.rand(graph.n_src, graph.n_dest, generator=gen) < 0.3) & graph.valid if with_mask else None
    return EdgeScores(s, graph, method="eap", metric="logit_diff", info={"steps": 5, "t": torch.tensor([1.0, 2.0])},
                      circuit_mask=mask)


def same(a, b):
    return torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0))


# ------------------------------------------------------------------------------------------------------
# safetensors round trips
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, split, level", GRAPH_CASES)
def test_scores_round_trip_rebuilds_the_graph(tmp_path, preset, split, level):
    graph = graph_of(preset, split, level)
    s = random_scores(graph)
    save_scores(s, tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    back = load_scores(tmp_path / "s.safetensors")
    assert back.graph.src_names == graph.src_names and back.graph.dest_names == graph.dest_names
    assert back.graph.split_qkv == split and back.graph.level == level and back.graph.spec == graph.spec
    assert same(back.scores, s.scores) and torch.equal(back.circuit_mask, s.circuit_mask)
    assert (back.method, back.metric) == ("eap", "logit_diff")
    assert back.info == {"steps": 5, "t": [1.0, 2.0]}  # tensors in info come back as lists
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["kind"] == "scores" and meta["graph"]["split_qkv"] == split


def test_scores_load_with_given_graph_and_without_sidecar(tmp_path):
    graph = graph_of("tiny")
    s = random_scores(graph, with_mask=False)
    save_scores(s, tmp_path / "eap")  # no suffix: eap.safetensors + eap.json
    assert load_scores(tmp_path / "eap", graph=graph).graph is graph
    (tmp_path / "eap.json").unlink()  # the safetensors header holds the same metadata
    back = load_scores(tmp_path / "eap.safetensors")
    assert same(back.scores, s.scores) and back.circuit_mask is None
    with pytest.raises(EdgepatchError, match=r"was saved for Graph\(random-tiny, 11 src x 27 dest, 110 edges\) "
                                             r"\(split_qkv=True, level='edge'\) but the given graph is"):
        load_scores(tmp_path / "eap.safetensors", graph=graph_of("tiny", split=False))


def test_files_are_safetensors_not_pickle(tmp_path):
    graph = graph_of("tiny")
    save_scores(random_scores(graph), tmp_path / "s.safetensors")
    raw = (tmp_path / "s.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert {"scores", "circuit_mask", "__metadata__"} <= set(header)
    assert b"torch._utils" not in raw and not raw.startswith(b"\x80")  # no pickle protocol


def test_circuit_round_trip(tmp_path):
    graph = graph_of("tiny-gqa")
    names = ["input->a0.kv1<k>", "a0.h4->a1.h2<q>", "m1->logits"]
    save_circuit(graph.mask_from_edges(names), tmp_path / "c.safetensors", graph, name="toy")
    mask, g = load_circuit(tmp_path / "c.safetensors")
    assert g.edges_from_mask(mask) == graph.edges_from_mask(graph.mask_from_edges(names))
    assert mask.dtype == torch.bool
    with pytest.raises(EdgepatchError, match="holds 'circuit' data, not 'scores'; read it with edgepatch.io.load_circuit"):
        load_scores(tmp_path / "c.safetensors")


def test_sweep_round_trip(tmp_path):
    graph = graph_of("tiny")
    r = SweepResult([0, 5, 110], [0, 6, 110], torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
                    torch.randn(4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), n_edges=110,
                    method="eap", metric="kl_div", direction="necessity", ablation="mean", by="signed", ties="include",
                    higher_is_better=False, counts_spec="list", graph=graph, info={"seed": 3})
    save_sweep(r, tmp_path / "r")
    back = load_sweep(tmp_path / "r")
    for f in ("values", "clean", "ablated", "random_values"):
        assert torch.equal(getattr(back, f), getattr(r, f))
    assert back.metadata() == r.metadata()
    assert (back.counts, back.effective_counts, back.n_edges) == (r.counts, r.effective_counts, 110)
    assert back.graph.dest_names == graph.dest_names


def test_graph_dict_round_trip():
    graph = graph_of("tiny-gqa", split=False)
    d = json.loads(json.dumps(graph_to_dict(graph)))
    g = graph_from_dict(d)
    assert g.edge_names == graph.edge_names and g.spec == graph.spec
    with pytest.raises(EdgepatchError, match="Cannot rebuild the graph"):
        graph_from_dict({"split_qkv": True})


def test_missing_file_error(tmp_path):
    with pytest.raises(EdgepatchError, match="No such file"):
        load_scores(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------------
# MIB / EAP-IG JSON
# ------------------------------------------------------------------------------------------------------
def eap_ig_edge_names(n_layers, n_heads, parallel=False, attn_only=False):
    """EAP-IG's edge list (eap.graph.Graph.from_model), written independently of edgepatch's graph code."""
    names, stream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for src in stream:
            names += [f"{src}->{h}<{x}>" for h in heads for x in "qkv"]
        if attn_only:
            stream = stream + heads
            continue
        mlp_stream = stream if parallel else stream + heads
        names += [f"{src}->m{layer}" for src in mlp_stream]
        stream = stream + heads + [f"m{layer}"]
    return sorted(names + [f"{src}->logits" for src in stream])


@pytest.mark.parametrize("preset, split, level", GRAPH_CASES)
def test_mib_json_uses_eap_ig_names_and_round_trips(tmp_path, preset, split, level):
    graph = graph_of(preset, split, level)
    spec = graph.spec
    s = random_scores(graph)
    d = to_mib_json(s, tmp_path / "g.json")
    assert sorted(d["edges"]) == eap_ig_edge_names(spec.n_layers, spec.n_heads, spec.parallel, spec.attn_only)
    assert d["cfg"] == {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "parallel_attn_mlp": spec.parallel,
                        "d_model": spec.d_model, **({"n_key_value_heads": spec.n_kv_heads} if spec.gqa else {})}
    assert d["nodes"]["logits"] == {"in_graph": True}
    assert set(d["nodes"]) == {"input", "logits"} | {e.split("->")[0] for e in d["edges"]}
    assert all(set(e) == {"score", "in_graph"} for e in d["edges"].values())
    on_disk = json.loads((tmp_path / "g.json").read_text())
    assert on_disk == json.loads(json.dumps(d))
    back = from_mib_json(tmp_path / "g.json", graph)
    torch.testing.assert_close(back.scores, s.scores, equal_nan=True)
    assert torch.equal(back.circuit_mask, s.circuit_mask)
    assert back.method == "eap"


def test_mib_json_gqa_mapping_duplicates_and_averages():
    graph = graph_of("tiny-gqa")  # 6 query heads, 2 key/value heads: heads 3, 4, 5 share kv1
    flat = torch.zeros(graph.n_edges)
    i = graph.edge_names.index("input->a0.kv1<v>")
    flat[i] = 0.5
    mask = graph.from_edges((flat != 0).float(), fill=0).bool()
    d = to_mib_json(EdgeScores(graph.from_edges(flat), graph, circuit_mask=mask))
    for h in (3, 4, 5):
        assert d["edges"][f"input->a0.h{h}<v>"] == {"score": 0.5, "in_graph": True}
    assert d["edges"]["input->a0.h2<v>"] == {"score": 0.0, "in_graph": False}
    assert d["nodes"]["a0.h4"]["in_graph"] and not d["nodes"]["a0.h1"]["in_graph"]
    # MIB-side per-head values that differ: edgepatch gets their mean, in the graph if any head's edge is
    d["edges"]["input->a0.h3<v>"] = {"score": 0.1, "in_graph": False}
    d["edges"]["input->a0.h4<v>"] = {"score": 0.2, "in_graph": False}
    d["edges"]["input->a0.h5<v>"] = {"score": 0.6, "in_graph": True}
    back = from_mib_json(d, graph)
    assert back.flat[i].item() == pytest.approx(0.3)
    assert graph.edges_from_mask(back.circuit_mask) == ["input->a0.kv1<v>"]


def test_mib_json_joint_graph_reads_split_json():
    split, joint = graph_of("tiny"), graph_of("tiny", split=False)
    d = to_mib_json(random_scores(split, with_mask=False))
    back = from_mib_json(d, joint)  # the joint edge's score is the mean of its q, k and v edges
    e = "a0.h1->a1.h2"
    want = sum(d["edges"][f"{e}<{x}>"]["score"] for x in "qkv") / 3
    assert back.to_dict()[e] == pytest.approx(want)
    assert back.circuit_mask is None  # nothing was in the graph


def test_mib_json_node_level_scores():
    graph = graph_of("tiny", level="node")
    s = random_scores(graph)
    d = to_mib_json(s)
    assert d["nodes"]["a0.h2"]["score"] == pytest.approx(float(s.scores[graph.src_index("a0.h2"), 0]))
    assert d["edges"]["a0.h2->m0"]["score"] == d["nodes"]["a0.h2"]["score"]


def test_mib_json_from_a_circuit_mask():
    graph = graph_of("tiny")
    mask = graph.mask_from_edges(["input->a0.h0<q>", "a0.h0->logits"])
    d = to_mib_json(mask, graph=graph)
    assert [n for n, e in d["edges"].items() if e["in_graph"]] == ["input->a0.h0<q>", "a0.h0->logits"]
    assert {n for n, v in d["nodes"].items() if v["in_graph"]} == {"input", "a0.h0", "logits"}
    with pytest.raises(EdgepatchError, match="needs the graph"):
        to_mib_json(mask)


def test_mib_json_import_errors():
    graph = graph_of("tiny")
    d = to_mib_json(random_scores(graph, with_mask=False))
    bad_cfg = {**d, "cfg": {**d["cfg"], "n_layers": 12}}
    with pytest.raises(EdgepatchError, match="describes a model with n_layers=12 but Graph"):
        from_mib_json(bad_cfg, graph)
    extra = {**d, "edges": {**d["edges"], "a0.h9->m1": {"score": 1.0, "in_graph": False}}}
    with pytest.raises(EdgepatchError, match=r"has 1 edge\(s\) that Graph\(random-tiny.*lacks, e.g. 'a0.h9->m1'\. "
                                             r"Did you mean"):
        from_mib_json(extra, graph)
    from_mib_json(extra, graph, strict=False)
    fewer = {**d, "edges": {k: v for k, v in d["edges"].items() if k != "m1->logits"}}
    with pytest.raises(EdgepatchError, match="lacks 1 of the 110 edges .* e.g. 'm1->logits'"):
        from_mib_json(fewer, graph)
    lenient = from_mib_json(fewer, graph, strict=False)
    assert math.isnan(lenient.to_dict()["m1->logits"])
    with pytest.raises(EdgepatchError, match="is not MIB / EAP-IG graph JSON"):
        from_mib_json({"nodes": {}}, graph)
    # malformed values: edgepatch's errors naming the entry, not Python's (and a string in_graph, once true)
    edge = "input->a0.h0<q>"
    for bad, message in (
        ({**d, "cfg": {**d["cfg"], "n_layers": "two"}}, r"cfg n_layers is 'two'; expected a number"),
        ({**d, "edges": {**d["edges"], edge: {"score": "high", "in_graph": False}}},
         r"edge 'input->a0\.h0<q>' has score 'high'; expected a number"),
        ({**d, "edges": {**d["edges"], edge: {"score": 1.0, "in_graph": "false"}}},
         r"edge 'input->a0\.h0<q>' has in_graph 'false'; expected true or false"),
        ({**d, "nodes": {"m0": {"in_graph": True, "neurons": 5}}}, r"node 'm0' has neurons 5; expected a list"),
    ):
        with pytest.raises(EdgepatchError, match=message):
            from_mib_json(bad, graph)


def test_mib_json_import_refuses_folders_and_absurd_nesting(tmp_path):
    graph = graph_of("tiny")
    with pytest.raises(EdgepatchError, match=r"is a folder; give the path of a graph file in it"):
        from_mib_json(tmp_path, graph)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EdgepatchError, match=r"deep\.json' is JSON nested too deeply"):
        from_mib_json(tmp_path / "deep.json", graph)


def eap_ig_index(name, n_layers, n_heads):
    """EAP-IG's ``Graph._forward_index`` / ``_backward_index`` for one edge name, written from its definition:
    sources in forward order (input, then per layer its heads and its MLP), destinations per layer as every
    head's q, then k, then v input, then the MLP input, with logits last."""
    src, dest = name.split("->")
    if src == "input":
        f = 0
    elif src.startswith("m"):
        f = 1 + int(src[1:]) * (n_heads + 1) + n_heads
    else:
        layer, head = src[1:].split(".h")
        f = 1 + int(layer) * (n_heads + 1) + int(head)
    if dest == "logits":
        b = n_layers * (3 * n_heads + 1)
    elif dest.startswith("m"):
        b = int(dest[1:]) * (3 * n_heads + 1) + 3 * n_heads
    else:
        node, qkv = dest[:-1].split("<")
        layer, head = node[1:].split(".h")
        b = int(layer) * (3 * n_heads + 1) + "qkv".index(qkv) * n_heads + int(head)
    return f, b


@pytest.mark.parametrize("preset, split, level", GRAPH_CASES)
def test_mib_pt_is_eap_ig_dense_layout_of_the_json_export(tmp_path, preset, split, level):
    graph = graph_of(preset, split, level)
    spec = graph.spec
    s = random_scores(graph)
    d = to_mib_json(s)
    returned = to_mib_pt(s, tmp_path / "sub" / "g.pt")
    pt = torch.load(tmp_path / "sub" / "g.pt", weights_only=True)  # the file this test just wrote
    n_fwd, n_bwd = 1 + spec.n_layers * (spec.n_heads + 1), spec.n_layers * (3 * spec.n_heads + 1) + 1
    want_scores, want_in = torch.zeros(n_fwd, n_bwd), torch.zeros(n_fwd, n_bwd, dtype=torch.bool)
    for name, e in d["edges"].items():
        f, b = eap_ig_index(name, spec.n_layers, spec.n_heads)
        want_scores[f, b], want_in[f, b] = e["score"], e["in_graph"]
    assert set(pt) == {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph",
                       "edgepatch"} | ({"nodes_scores"} if level == "node" else set())
    assert pt["edgepatch"] == {**d["edgepatch"], "graph": graph_to_dict(graph)}
    assert pt["cfg"] == d["cfg"]
    assert torch.equal(pt["edges_scores"], want_scores) and torch.equal(pt["edges_in_graph"], want_in)
    assert int(want_in.sum()) == sum(e["in_graph"] for e in d["edges"].values()) > 0
    for i, n in enumerate(pt["src_nodes"]):
        assert eap_ig_index(f"{n}->logits", spec.n_layers, spec.n_heads)[0] == i
        assert bool(pt["nodes_in_graph"][i]) == d["nodes"].get(n, {"in_graph": False})["in_graph"]
        if level == "node":
            assert pt["nodes_scores"][i].item() == pytest.approx(d["nodes"][n]["score"])
    for j, n in enumerate(pt["dst_nodes"]):
        assert eap_ig_index(f"input->{n}", spec.n_layers, spec.n_heads)[1] == j
    assert torch.equal(returned["edges_scores"], pt["edges_scores"])
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["g.pt"]  # no temporary file left


def test_mib_pt_from_a_mask_and_bad_input(tmp_path):
    graph = graph_of("tiny")
    mask = graph.mask_from_edges(["input->a0.h0<q>", "a0.h0->logits"])
    d = to_mib_pt(mask, tmp_path / "c.pt", graph=graph)
    kept = [(d["src_nodes"][f], d["dst_nodes"][b]) for f, b in d["edges_in_graph"].nonzero().tolist()]
    assert sorted(kept) == [("a0.h0", "logits"), ("input", "a0.h0<q>")]
    assert d["edges_scores"].sum().item() == 2.0
    with pytest.raises(EdgepatchError, match=r"to_mib_pt\(mask\) needs the graph"):
        to_mib_pt(mask, tmp_path / "c.pt")
    per_position = EdgeScores(torch.randn(2, graph.n_src, graph.n_dest), graph, slots=("a", "b"))
    with pytest.raises(EdgepatchError, match="to_mib_pt .* not per-position scores"):
        to_mib_pt(per_position, tmp_path / "p.pt")


def test_mib_json_import_points_tensor_files_to_from_mib_pt_and_refuses_binary_files(tmp_path):
    graph = graph_of("tiny")
    to_mib_pt(random_scores(graph), tmp_path / "g.pt")
    with pytest.raises(EdgepatchError, match=r"'.*g\.pt' is a tensor file .*ep\.io\.from_mib_pt\(path, graph\)"):
        from_mib_json(tmp_path / "g.pt", graph)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EdgepatchError, match="bin.json' is not valid JSON"):
        from_mib_json(tmp_path / "bin.json", graph)


@pytest.mark.parametrize("preset, split, level", GRAPH_CASES)
def test_mib_pt_round_trips_like_the_json(tmp_path, preset, split, level):
    graph = graph_of(preset, split, level)
    s = random_scores(graph)
    to_mib_pt(s, tmp_path / "g.pt")
    back = from_mib_pt(tmp_path / "g.pt", graph)
    via_json = from_mib_json(to_mib_json(s), graph)
    torch.testing.assert_close(back.scores, via_json.scores, equal_nan=True)
    torch.testing.assert_close(back.scores, s.scores, equal_nan=True)
    assert torch.equal(back.circuit_mask, s.circuit_mask)
    assert (back.method, back.metric) == ("eap", "logit_diff")


def eap_ig_file(d, layout="current", seed=0):
    """An EAP-IG tensor file built in the test from graph JSON ``d``: rows and columns in a shuffled order
    (they are matched by name), an extra zero row and column for nodes no edge uses, and either EAP-IG's
    current keys or its earlier ones (``edges`` for the scores, ``src_nodes`` a dict of node -> in_graph)."""
    gen = torch.Generator().manual_seed(seed)
    src = sorted({n.split("->")[0] for n in d["edges"]}) + ["unused"]
    dst = sorted({n.split("->")[1] for n in d["edges"]}) + ["unused<q>"]
    src = [src[i] for i in torch.randperm(len(src), generator=gen).tolist()]
    dst = [dst[i] for i in torch.randperm(len(dst), generator=gen).tolist()]
    scores, kept = torch.zeros(len(src), len(dst)), torch.zeros(len(src), len(dst), dtype=torch.bool)
    for name, e in d["edges"].items():
        a, b = name.split("->")
        scores[src.index(a), dst.index(b)] = e["score"]
        kept[src.index(a), dst.index(b)] = e["in_graph"]
    nodes = [d["nodes"].get(n, {"in_graph": False})["in_graph"] for n in src]
    if layout == "current":
        return {"cfg": d["cfg"], "src_nodes": src, "dst_nodes": dst, "edges_scores": scores, "edges_in_graph": kept,
                "nodes_in_graph": torch.tensor(nodes)}
    return {"cfg": d["cfg"], "src_nodes": dict(zip(src, nodes)), "dst_nodes": dst, "edges": scores,
            "edges_in_graph": kept}


@pytest.mark.parametrize("layout", ["current", "earlier"])
@pytest.mark.parametrize("preset, split", [("tiny", True), ("tiny-gqa", False), ("tiny-attn-only", True)])
def test_mib_pt_reads_eap_ig_files_by_name(tmp_path, preset, split, layout):
    graph = graph_of(preset, split)
    d = to_mib_json(random_scores(graph))
    torch.save(eap_ig_file(d, layout), tmp_path / "eap.pt")
    back = from_mib_pt(tmp_path / "eap.pt", graph)
    want = from_mib_json(d, graph)
    torch.testing.assert_close(back.scores, want.scores, equal_nan=True)
    assert torch.equal(back.circuit_mask, want.circuit_mask)
    assert back.method == "mib-pt"


def test_mib_pt_import_errors(tmp_path):
    graph = graph_of("tiny")
    d = to_mib_json(random_scores(graph, with_mask=False))
    f = eap_ig_file(d)

    def load(obj, name="x.pt", **kw):
        torch.save(obj, tmp_path / name)
        return from_mib_pt(tmp_path / name, graph, **kw)

    with pytest.raises(EdgepatchError, match=r"lacks \['edges_in_graph'\] .*Expected Graph\.to_pt's dict"):
        load({k: v for k, v in f.items() if k != "edges_in_graph"})
    with pytest.raises(EdgepatchError, match=r"'edges_scores' should be a \[len\(src_nodes\), len\(dst_nodes\)\] ="
                                             r" \[\d+, \d+\] tensor; got shape \[3, 3\]"):
        load({**f, "edges_scores": torch.zeros(3, 3)})
    with pytest.raises(EdgepatchError, match="describes a model with n_layers=12"):
        load({**f, "cfg": {**f["cfg"], "n_layers": 12}})
    with pytest.raises(EdgepatchError, match=r"per-position circuit \('positional_scores'\)"):
        load({**f, "positional_scores": torch.zeros(2)})
    with pytest.raises(EdgepatchError, match="holds a list, not EAP-IG's graph dict"):
        load([1, 2])
    # an in-graph cell where EAP-IG has no edge (a parallel-attention edge in a sequential graph): strict raises
    bad = {**f, "edges_in_graph": f["edges_in_graph"].clone()}
    bad["edges_in_graph"][f["src_nodes"].index("m1"), f["dst_nodes"].index("m0")] = True
    with pytest.raises(EdgepatchError, match=r"has 1 edge\(s\) that Graph.* lacks, e.g. 'm1->m0'"):
        load(bad)
    assert load(bad, strict=False).circuit_mask is None
    fewer = {**f, "dst_nodes": [n if n != "logits" else "gone" for n in f["dst_nodes"]]}
    with pytest.raises(EdgepatchError, match=r"lacks \d+ of the 110 edges"):
        load(fewer)
    assert math.isnan(load(fewer, strict=False).to_dict()["m1->logits"])
    neurons = torch.ones(len(f["src_nodes"]), graph.spec.d_model, dtype=torch.bool)
    neurons[f["src_nodes"].index("m0"), 3] = False
    with pytest.warns(UserWarning, match=r"neuron-level circuit \(1 node\(s\) .* e.g. 'm0'\)"):
        load({**f, "neurons_in_graph": neurons})
    with pytest.raises(EdgepatchError, match="No such file"):
        from_mib_pt(tmp_path / "missing.pt", graph)


class _Payload:
    """Pickles as a call that creates a folder: proof of whether loading a file ran code from it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.target),)


def _archive(tmp_path, name, members):
    import zipfile

    with zipfile.ZipFile(tmp_path / name, "w") as z:
        for member, data in members.items():
            z.writestr(f"archive/{member}", data)
    return tmp_path / name


def test_mib_pt_never_runs_code_from_the_file(tmp_path):
    import os
    import pickle

    graph = graph_of("tiny")
    target = tmp_path / "pwned"
    good = eap_ig_file(to_mib_json(random_scores(graph)))
    # a torch.save file whose dict also holds a function: refused by name before anything is loaded
    torch.save({**good, "hook": os.getcwd}, tmp_path / "fn.pt")
    # (anchored: the refusal was once wrapped in "its data.pkl is not a valid pickle (...)")
    with pytest.raises(EdgepatchError, match=r"^'[^']*fn\.pt' refers to the global '(posix|nt)\.getcwd'.*does not load it"):
        from_mib_pt(tmp_path / "fn.pt", graph)
    # hand-built archives whose index would call os.mkdir when unpickled, in both pickle dialects
    for protocol, what in ((2, r"the global '(posix|nt)\.mkdir'"), (4, "the opcode STACK_GLOBAL")):
        evil = pickle.dumps({"cfg": good["cfg"], "x": _Payload(target)}, protocol=protocol)
        path = _archive(tmp_path, f"evil{protocol}.pt", {"data.pkl": evil, "version": "3"})
        with pytest.raises(EdgepatchError, match=what):
            from_mib_pt(path, graph)
    evil = pickle.dumps(_Payload(target), protocol=2)
    (tmp_path / "bare.pt").write_bytes(evil)
    with pytest.raises(EdgepatchError, match="a bare pickle"):
        from_mib_pt(tmp_path / "bare.pt", graph)
    # members torch.save does not write (TorchScript code) are refused even when the pickle is plain
    torch.save(good, tmp_path / "ok.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "ok.pt") as z:
        members = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    from_mib_pt(_archive(tmp_path, "repacked.pt", members), graph)  # the same members, re-zipped: loads
    with pytest.raises(EdgepatchError, match=r"contains 'archive/code/__torch__\.py'"):
        from_mib_pt(_archive(tmp_path, "ts.pt", {**members, "code/__torch__.py": "x"}), graph)
    # what passes the scan but torch's restricted loader refuses: its reason, without its advice to load
    # the file with weights_only=False
    odd = _archive(tmp_path, "odd.pt", {"data.pkl": b"\x80\x02U\x01aQ.", "version": "3"})  # a str as storage id
    with pytest.raises(EdgepatchError, match=r"other than tensors.*\(persistent_load id must be tuple or int") as err:
        from_mib_pt(odd, graph)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(EdgepatchError, match="not a readable torch.save archive"):
        from_mib_pt(tmp_path / "trunc.pt", graph)
    assert not target.exists()


def test_mib_json_neuron_level_circuits_warn():
    import warnings

    graph = graph_of("tiny")
    d = to_mib_json(random_scores(graph))
    d_model = graph.spec.d_model
    full = {**d, "nodes": {n: {**v, "neurons": [True] * d_model} for n, v in d["nodes"].items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_mib_json(full, graph)  # every neuron kept: an edge circuit, no warning
    partial = {**full, "nodes": {**full["nodes"], "m0": {"in_graph": True, "neurons": [True, False] * (d_model // 2)}}}
    with pytest.warns(UserWarning, match=r"neuron-level circuit \(1 node\(s\) keep only some of their neurons, e.g. 'm0'\)"):
        back = from_mib_json(partial, graph)
    assert torch.equal(back.circuit_mask, from_mib_json(d, graph).circuit_mask)


def test_mib_edge_names_for_attention_only_models_skip_mlps():
    graph = graph_of("tiny-attn-only")
    names = {n for group in mib_edge_names(graph) for n in group}
    assert not any("m0" in n for n in names)
    d = to_mib_json(random_scores(graph, with_mask=False))
    d["edges"]["a0.h0->m0"] = {"score": 1.0, "in_graph": True}  # EAP-IG graphs always have MLPs: ignored
    assert from_mib_json(d, graph).circuit_mask is None


def test_per_position_scores_round_trip(tmp_path):
    g = build_graph(cached_model("tiny", "hooked"))
    s = EdgeScores(torch.randn(3, g.n_src, g.n_dest), g, method="eap", slots=("IO", "S", "END"))
    save_scores(s, tmp_path / "pos")
    back = load_scores(tmp_path / "pos")
    assert back.slots == ("IO", "S", "END")
    assert torch.equal(back.scores.nan_to_num(0), s.scores.nan_to_num(0))
    assert back.top_k(4) == s.top_k(4)
