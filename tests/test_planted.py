"""Planted-circuit models: the true edges matter, every other edge has exactly zero effect, and circuit
discovery methods find the planted circuit."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from edgepatch.errors import EdgepatchError
from edgepatch.evaluation import circuit_recovery, roc
from edgepatch.patching import source_activations
from edgepatch.planted import Planted, PlantingCheck, planted_model, verify_planting

from conftest import HAVE

# planted models are HookedTransformers (TransformerLens 2.x / 3.x); the error elsewhere is tested below
pytestmark = pytest.mark.skipif("hooked" not in HAVE, reason="planted models need HookedTransformer")

OFF_TOL = 1e-6  # |effect| of an edge outside the circuit (float32 batched-matmul rounding is ~1e-7)
ON_MARGIN = 1e-3  # |effect| of a planted edge


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two on a shared 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def planted(**kw) -> Planted:
    """Shared planted models (read-only in these tests; every method restores the model)."""
    return planted_model(**kw)


CASES = [
    dict(n_layers=2, n_heads=2, seed=0, n_prompts=16),
    dict(n_layers=2, n_heads=3, seed=1, n_prompts=16),
    dict(n_layers=3, n_heads=2, seed=2, n_prompts=16),
    dict(n_layers=4, n_heads=2, seed=3, n_prompts=8),
    dict(n_layers=2, n_heads=2, seed=0, layer_norm=True, n_prompts=16),
    dict(n_layers=3, n_heads=2, seed=1, layer_norm=True, n_prompts=8),
]


def case_id(kw):
    return f"{kw['n_layers']}l{kw['n_heads']}h-s{kw['seed']}" + ("-ln" if kw.get("layer_norm") else "")


# ------------------------------------------------------------------------------------------------------
# The planting is exact
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", CASES, ids=case_id)
def test_planted_edges_matter_and_no_other_edge_does(kw):
    p = planted(**kw)
    check = verify_planting(*p)
    assert isinstance(check, PlantingCheck)
    assert check.max_off < OFF_TOL, check
    assert check.min_on > ON_MARGIN, check
    assert check.ok()
    max_off, min_on = check  # unpacks as the two numbers
    assert (max_off, min_on) == (check.max_off, check.min_on)
    if kw.get("layer_norm"):  # float64 and exact in exact arithmetic: only last-bit rounding is left
        assert check.max_off < 1e-12, check


def test_off_circuit_effects_are_exactly_zero_in_float64():
    p = planted_model(n_layers=2, n_heads=2, seed=4, dtype=torch.float64, n_prompts=8)
    check = verify_planting(*p)
    assert check.max_off < 1e-12 and check.min_on > ON_MARGIN, check


def test_joint_qkv_graph_and_no_distractors():
    p = planted_model(n_layers=2, n_heads=2, seed=5, split_qkv=False, distractors=False, n_prompts=8)
    assert not p.graph.split_qkv and p.graph.n_dest == 2 * 2 + 2 + 1
    check = verify_planting(*p)
    assert check.max_off < OFF_TOL and check.min_on > ON_MARGIN, check
    # without distractors, every node outside the circuit writes exactly zero
    acts = source_activations(p.model, p.graph, p.task.clean).values
    active = set(p.task.meta["planted"]["active_nodes"]) | {"input"}
    for i, name in enumerate(p.graph.src_names):
        assert bool((acts[i] == 0).all()) == (name not in active), name


def test_zero_ablation_is_exact_without_layer_norm():
    p = planted(**CASES[0])
    check = verify_planting(*p, ablation="zero")
    assert check.max_off < OFF_TOL, check


# ------------------------------------------------------------------------------------------------------
# Structure of the planted circuit
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [CASES[2], CASES[5]], ids=case_id)
def test_circuit_is_connected_and_queries_pair_with_keys(kw):
    model, graph, true_edges, task, metric = planted(**kw)
    assert metric == "logit_diff"
    assert true_edges.dtype == torch.bool and not (true_edges & ~graph.valid).any()
    names = graph.edges_from_mask(true_edges)
    assert names == task.meta["planted"]["true_edges"]
    assert set(names) <= set(task.meta["planted"]["wired_edges"])
    srcs = {n.split("->")[0] for n in names}
    dests = {n.split("->")[1] for n in names}
    assert "input" in srcs and "logits" in dests
    # every source used by the circuit (other than input) reads something itself: paths start at input
    for s in srcs - {"input"}:
        assert any(d.split("<")[0] == s for d in dests), s
    # every node the circuit passes through reaches the logits
    for d in dests - {"logits"}:
        assert d.split("<")[0] in srcs, d
    # a head's query and key inputs are both in the circuit or both out (else its pattern is constant)
    for layer in range(graph.spec.n_layers):
        for h in range(graph.spec.n_heads):
            q = any(n.endswith(f"a{layer}.h{h}<q>") for n in names)
            k = any(n.endswith(f"a{layer}.h{h}<k>") for n in names)
            assert q == k, (layer, h)
    assert any(n.endswith("<q>") for n in names)  # at least one content-dependent head


def test_same_seed_same_model_and_prompts():
    a = planted_model(n_layers=2, n_heads=2, seed=7, n_prompts=8, min_effect=None)
    b = planted_model(n_layers=2, n_heads=2, seed=7, n_prompts=8, min_effect=None)
    c = planted_model(n_layers=2, n_heads=2, seed=8, n_prompts=8, min_effect=None)
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), n
    assert torch.equal(a.task.clean, b.task.clean) and torch.equal(a.true_edges, b.true_edges)
    assert not torch.equal(a.task.clean, c.task.clean)


def test_task_answers_are_the_models_predictions():
    model, graph, true_edges, task, metric = planted(**CASES[0])
    with torch.no_grad():
        clean = model(task.clean)[:, -1]
    assert torch.equal(clean.argmax(-1), task.answers[:, 0])
    assert bool((task.answers != task.wrong).all())


# ------------------------------------------------------------------------------------------------------
# The LayerNorm variant: constant norms and zero means make the LN statistics edge-independent
# ------------------------------------------------------------------------------------------------------
def test_layer_norm_sources_have_constant_norm_and_zero_mean():
    model, graph, true_edges, task, metric = planted(**CASES[4])
    assert model.cfg.normalization_type == "LN" and model.cfg.act_fn == "solu_ln"
    for tokens in (task.clean, task.corrupt):
        acts = source_activations(model, graph, tokens).values  # [n_src, batch, pos, d_model]
        norms = acts.norm(dim=-1)
        assert (norms - norms[:, :1, :1]).abs().max() < 1e-10  # the same at every position of every prompt
        assert acts.sum(-1).abs().max() < 1e-10
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        for name, pattern in cache.items():
            assert bool((pattern.amax(-1) == 1.0).all()), name  # one-hot attention everywhere


def test_layer_norm_variant_is_not_exact_for_zero_ablation():
    # documented limit: zero ablation changes a source's norm, so the LayerNorm scale changes
    check = verify_planting(*planted(**CASES[4]), ablation="zero")
    assert check.max_off > OFF_TOL


def test_layer_norm_gradients_see_the_coupling():
    # documented: first-order scores are non-zero off the circuit (LN statistics) and exactly zero on the
    # true query/key edges (saturated softmax), although the exact effects are the other way round
    from edgepatch.attribution import eap

    model, graph, true_edges, task, metric = planted(**CASES[4])
    scores = eap(model, graph, task, metric, progress=False).to_dict()
    truth = set(graph.edges_from_mask(true_edges))
    qk = [n for n in truth if n.endswith(("<q>", "<k>"))]
    assert qk and all(scores[n] == 0 for n in qk)
    assert max(abs(v) for n, v in scores.items() if n not in truth) > 1e-2


def test_errors(monkeypatch):
    with monkeypatch.context() as m:  # as under TransformerLens 4, which has no HookedTransformer
        m.setattr("edgepatch.models.model_classes", lambda: ("bridge",))
        with pytest.raises(EdgepatchError, match=r"planted_model builds a HookedTransformer .* has none \(TransformerLens 4 removed it\)"):
            planted_model()
    with pytest.raises(EdgepatchError, match="needs d_head >= 3"):
        planted_model(layer_norm=True, d_head=2)
    with pytest.raises(EdgepatchError, match="density must be in"):
        planted_model(density=0.0)
    with pytest.raises(EdgepatchError, match="no planting among 1 attempts .* min_effect=1000.0"):
        planted_model(n_prompts=4, min_effect=1e3, max_attempts=1)


# ------------------------------------------------------------------------------------------------------
# Circuit discovery recovers the planted circuit
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", CASES[:3], ids=case_id)
def test_eap_ig_finds_the_planted_circuit(kw):
    from edgepatch.attribution import attribute

    model, graph, true_edges, task, metric = planted(**kw)
    scores = attribute(model, graph, task, metric, method="eap-ig", progress=False)
    assert roc(scores, true_edges).auc >= 0.95


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("kw", [CASES[0], CASES[4]], ids=case_id)
def test_acdc_recovers_the_planted_set_exactly(kw):
    if not _has("edgepatch.acdc"):
        pytest.skip("edgepatch.acdc is not available yet")
    from edgepatch.attribution import attribute

    model, graph, true_edges, task, metric = planted(**kw)
    # off-circuit edges change nothing (< 1e-6), planted ones more than 1e-3: any threshold between works
    result = attribute(model, graph, task, metric, method="acdc", threshold=1e-4, progress=False)
    assert circuit_recovery(result, true_edges)["exact"]


def test_learned_masks_rank_the_planted_circuit_first():
    if not _has("edgepatch.learned"):
        pytest.skip("edgepatch.learned is not available yet")
    from edgepatch.attribution import attribute

    model, graph, true_edges, task, metric = planted(**CASES[0])
    result = attribute(model, graph, task, metric, method="learned", epochs=20, progress=False)
    assert roc(result, true_edges, by="auto").auc >= 0.95
