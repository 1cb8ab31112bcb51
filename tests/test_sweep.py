"""Faithfulness sweeps: endpoints, batched == one-by-one patching, ties, counts, resuming, summaries."""

from __future__ import annotations

import importlib
import json
import math
import re

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, assert_unchanged, cached_model, model_snapshot
from edgepatch.errors import EdgepatchError
from edgepatch.graph import build_graph
from edgepatch.metrics import get_metric, logit_diff
from edgepatch.scores import EdgeScores
from edgepatch.summary import area_under_curve, cmd, cpr, summarize
from edgepatch.sweep import MIB_FRACTIONS, SweepResult, edge_counts, sweep
from edgepatch.tasks import induction

sweep_mod = importlib.import_module("edgepatch.sweep")  # the module (ep.sweep is the function)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a shared machine; restore the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(preset="tiny", cls=ANY_CLASS, level="edge", split_qkv=True, n=6, seed=1):
    model = cached_model(preset, cls)
    graph = build_graph(model, split_qkv=split_qkv, level=level)
    data = induction(101, n=n, seq_len=4, seed=0)
    gen = torch.Generator().manual_seed(seed)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=gen), graph, method="random")
    return model, graph, data, scores


def reference(model, graph, data, masks, metric="logit_diff", ablation="corrupt", direction="sufficiency",
              positions=None):
    """One plain ep.patch forward per circuit on the full batch and full logits (per-position circuits,
    ``[n_slots, n_src, n_dest]`` masks, with ``positions``)."""
    if ablation == "corrupt":
        abl = ep.source_activations(model, graph, data.corrupt)
    elif ablation == "zero":
        abl = ep.zero_ablation(graph)
    else:
        abl = ep.mean_activations(model, graph, data.clean, data.attention_mask)
    m = get_metric(metric)
    out = []
    with torch.no_grad():
        if getattr(m, "needs_clean", False):
            m = m.prepare(model(data.clean))
        for mask in masks:
            keep = mask if direction == "sufficiency" else ~mask
            with ep.patch(model, graph, (keep & graph.valid).float(), abl, positions=positions):
                out.append(m(model(data.clean), data).double())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------
# edge_counts
# ------------------------------------------------------------------------------------------------------
def test_edge_counts_specs():
    graph = build_graph(cached_model("tiny", ANY_CLASS))  # 110 edges
    assert graph.n_edges == 110
    assert edge_counts(graph, "log", n=5) == [1, 3, 10, 34, 110]
    assert edge_counts(graph, "log", n=1) == [110]
    assert edge_counts(graph, "all") == list(range(1, 111))
    assert edge_counts(graph, "mib") == [int(f * 110) for f in MIB_FRACTIONS] == [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]
    assert edge_counts(graph, [0, 0.5, 110, 3, 3]) == [0, 55, 110, 3, 3]  # order and repeats kept
    assert edge_counts(graph, [1.0, 2.0]) == [1, 2]  # whole floats are counts, as in EdgeScores.circuit
    import numpy as np  # numpy arrays and scalars and tensors of counts, as research code builds them

    assert edge_counts(graph, np.logspace(0, 2, 3).astype(int)) == [1, 10, 100]
    assert edge_counts(graph, [np.int64(3), np.float32(0.5), torch.tensor(7)]) == [3, 55, 7]


def test_edge_counts_groups_follow_ties():
    graph = build_graph(cached_model("tiny", ANY_CLASS))
    flat = torch.zeros(graph.n_edges)
    flat[:3] = 5.0  # a run of three tied scores ranks first
    flat[3:5] = 4.0
    scores = EdgeScores(graph.from_edges(flat), graph)
    assert edge_counts(graph, "groups", scores=scores) == [3, 5, 110]


@pytest.mark.parametrize("spec, message", [
    ("lgo", "Unknown counts spec 'lgo'. Did you mean 'log'?"),
    ([5, 111], "counts[1] = 111 is out of range: Graph(random-tiny, 11 src x 27 dest, 110 edges) has 110 edges"),
    ([-1], "counts[0] = -1 is out of range"),
    ([1.5], "counts[0] = 1.5 is neither an edge count"),
    (["10"], "counts[0] = '10' is not a number"),
    ([True], "counts[0] = True is not a number"),
    ([], "counts is an empty list"),
    ("groups", "counts='groups' follows runs of tied scores, so it needs the scores"),
])
def test_edge_counts_errors(spec, message):
    graph = build_graph(cached_model("tiny", ANY_CLASS))
    with pytest.raises(EdgepatchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
                       .replace("[", r"\[").replace("]", r"\]")):
        edge_counts(graph, spec)


def test_circuit_k_takes_counts_fractions_and_numpy_and_refuses_the_rest():
    import numpy as np

    graph = build_graph(cached_model("tiny", ANY_CLASS))  # 110 edges
    flat = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))
    scores = EdgeScores(graph.from_edges(flat), graph)
    top = flat.abs().argsort(descending=True)

    def kept(k):
        return graph.to_edges(scores.circuit(k)).nonzero().flatten().sort().values

    for k, n in [(5, 5), (np.int64(5), 5), (torch.tensor(5), 5), (0.5, 55), (np.float64(0.1), 11), (1.0, 1), (0, 0)]:
        assert torch.equal(kept(k), top[:n].sort().values), k
    for bad in [1.5, "a", True, -1, 111, float("nan")]:
        with pytest.raises(EdgepatchError, match="k must be"):
            scores.circuit(bad)


# ------------------------------------------------------------------------------------------------------
# Endpoints and exactness
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_endpoints_equal_clean_and_corrupted_runs(cls):
    model, graph, data, scores = setup(cls=cls)
    with torch.no_grad():
        clean = logit_diff(model(data.clean), data).double()
        corrupt = logit_diff(model(data.corrupt), data).double()
    suff = sweep(model, graph, scores, data, counts=[0, graph.n_edges], progress=False)
    torch.testing.assert_close(suff.clean, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(suff.ablated, corrupt, atol=1e-5, rtol=0)
    torch.testing.assert_close(suff.values[0], corrupt, atol=1e-5, rtol=0)  # 0 kept edges = corrupted run
    torch.testing.assert_close(suff.values[1], clean, atol=1e-5, rtol=0)  # all edges = clean run
    assert suff.normalized.tolist() == pytest.approx([0.0, 1.0])
    nec = sweep(model, graph, scores, data, counts=[0, graph.n_edges], direction="necessity", progress=False)
    torch.testing.assert_close(nec.values[0], clean, atol=1e-5, rtol=0)  # nothing ablated
    torch.testing.assert_close(nec.values[1], corrupt, atol=1e-5, rtol=0)  # everything ablated
    assert nec.normalized.tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("direction", ["sufficiency", "necessity"])
def test_batched_circuits_equal_one_by_one_patching(cls, direction):
    model, graph, data, scores = setup(cls=cls)
    counts = [1, 4, 17, 60, 109]
    r = sweep(model, graph, scores, data, counts=counts, direction=direction, batch_size=4,
              max_circuits_per_forward=3, progress=False)
    ref = reference(model, graph, data, scores.circuits(counts), direction=direction)
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    assert r.effective_counts == counts and r.values.shape == (5, 6)


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_prompts_are_split_to_fit_the_memory_budget(ablation, monkeypatch):
    """Where one circuit of ``batch_size`` prompts does not fit ``memory_budget_mb`` (long prompts), the
    prompts go in smaller batches: no forward holds more rows than fit, and the values are the reference's."""
    model, graph, data, scores = setup(n=7)
    counts = [1, 17, 60]
    one_row = sweep_mod._rows_per_forward(model, graph, data.pos, True, 1.0)  # rows in 1 MB
    budget = 3 / one_row + 1e-9  # 3 rows' worth
    seen = []
    original = sweep_mod._evaluate_chunk

    def spy(model_, graph_, tokens, abl, metric, mdata, ap, plan, chunk, *args, **kwargs):
        seen.append(tokens.shape[0] * len(chunk))  # rows of this forward: prompts x circuits
        return original(model_, graph_, tokens, abl, metric, mdata, ap, plan, chunk, *args, **kwargs)

    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", spy)
    r = sweep(model, graph, scores, data, counts=counts, batch_size=7, ablation=ablation, memory_budget_mb=budget,
              progress=False)
    assert seen and max(seen) <= 3  # batches of 3 + 3 + 1 prompts (the last with up to 3 circuits)
    ref = reference(model, graph, data, scores.circuits(counts), ablation=ablation)
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", original)
    whole = sweep(model, graph, scores, data, counts=counts, batch_size=7, ablation=ablation, progress=False)
    torch.testing.assert_close(r.values, whole.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset, cls, level, split", [
    ("tiny-gqa", ANY_CLASS, "edge", True),
    ("tiny-parallel", "bridge", "edge", False),
    ("tiny", ANY_CLASS, "node", True),
])
@pytest.mark.parametrize("metric, ablation", [("kl_div", "corrupt"), ("logit_diff", "zero"), ("prob_diff", "mean")])
def test_other_models_metrics_and_ablations_match_reference(preset, cls, level, split, metric, ablation):
    model, graph, data, scores = setup(preset, cls, level=level, split_qkv=split)
    counts = edge_counts(graph, "log", n=4)
    r = sweep(model, graph, scores, data, counts=counts, metric=metric, ablation=ablation, batch_size=4,
              progress=False)
    ref = reference(model, graph, data, scores.circuits(r.effective_counts), metric, ablation)
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    all_ablated = reference(model, graph, data, [torch.zeros_like(graph.valid)], metric, ablation)[0]
    torch.testing.assert_close(r.ablated, all_ablated, atol=1e-4, rtol=0)
    assert r.ablation == ablation and r.metric == metric


def test_custom_metric_uses_full_logits():
    model, graph, data, scores = setup()
    seen = []

    def my_metric(logits, d):
        seen.append(tuple(logits.shape))
        return logit_diff(logits, d)

    r = sweep(model, graph, scores, data, counts=[5, 50], metric=my_metric, progress=False)
    assert all(s[1] == data.pos for s in seen)  # every position was unembedded for a custom metric
    ref = reference(model, graph, data, scores.circuits([5, 50]))
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    assert r.metric == "my_metric"


def test_metric_reducing_over_prompts_is_refused():
    """A metric that returns the batch's mean would give every prompt that mean, silently: sweep and
    attribution stop with the metric's name and the shape expected."""
    model, graph, data, scores = setup()

    def batch_mean(logits, d):
        return logit_diff(logits, d).mean()

    with pytest.raises(ValueError, match=r"The metric batch_mean returned a tensor of shape \[\]; expected one value "
                                         r"per prompt"):
        sweep(model, graph, scores, data, counts=[5], metric=batch_mean, progress=False)
    with pytest.raises(ValueError, match="The metric batch_mean returned"):
        ep.attribute(model, graph, data, metric=batch_mean, method="eap")


def test_explicit_ablation_object_and_model_unchanged(fresh_model):
    graph = build_graph(fresh_model)
    data = induction(101, n=4, seq_len=4, seed=0)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph)
    before = model_snapshot(fresh_model)
    abl = ep.source_activations(fresh_model, graph, data.corrupt)
    a = sweep(fresh_model, graph, scores, data, counts=[3, 30], ablation=abl, batch_size=3, progress=False)
    b = sweep(fresh_model, graph, scores, data, counts=[3, 30], progress=False)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    assert_unchanged(fresh_model, before)


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_given_ablation_from_other_prompts_is_used(cls):
    """An Ablation recorded on other prompts (kind "corrupt") is what a sweep and evaluate_circuit ablate to,
    not ``data.corrupt`` (the sweep once re-recorded the corrupted prompts' run and ignored it). References:
    plain ep.patch with that Ablation, and the model run on those prompts (every edge ablated)."""
    model, graph, data, scores = setup(cls=cls)
    other = torch.randint(0, 101, data.clean.shape, generator=torch.Generator().manual_seed(5))
    abl = ep.source_activations(model, graph, other)
    kept = abl.values.clone()
    counts = [0, 3, 30]
    r = sweep(model, graph, scores, data, counts=counts, ablation=abl, batch_size=4, progress=False)
    m = get_metric("logit_diff")
    with torch.no_grad():
        on_other = m(model(other), data).double()
        ref = []
        for mask in scores.circuits(counts):
            with ep.patch(model, graph, (mask & graph.valid).float(), abl):
                ref.append(m(model(data.clean), data).double())
    torch.testing.assert_close(r.ablated, on_other, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.values, torch.stack(ref), atol=1e-4, rtol=0)
    assert not torch.allclose(r.ablated, sweep(model, graph, scores, data, counts=[0], progress=False).ablated)
    one = ep.evaluate_circuit(model, graph, scores.circuit(3), data, ablation=abl, progress=False)
    torch.testing.assert_close(one.values[0], ref[1], atol=1e-4, rtol=0)
    assert torch.equal(abl.values, kept)  # the sweep neither wrote into nor kept the given values
    with pytest.raises(EdgepatchError, match="has batch 3, but data has 6 prompts"):
        sweep(model, graph, scores, data, counts=[3], ablation=ep.source_activations(model, graph, other[:3]),
              progress=False)


# ------------------------------------------------------------------------------------------------------
# Ties, groups, random baseline
# ------------------------------------------------------------------------------------------------------
def tied_scores(graph):
    flat = torch.zeros(graph.n_edges)
    flat[10:13] = 3.0  # ranks 0-2 tie
    flat[50:52] = -2.0  # ranks 3-4 tie (|score|)
    flat[7] = 1.0  # rank 5
    return EdgeScores(graph.from_edges(flat), graph, method="tied")


def test_ties_break_by_edge_order_or_include_the_whole_run():
    model, graph, data, _ = setup()
    scores = tied_scores(graph)
    broken = sweep(model, graph, scores, data, counts=[1, 4, 6], progress=False)
    assert broken.effective_counts == [1, 4, 6]
    ref = reference(model, graph, data, scores.circuits([1, 4, 6]))  # ties broken by edge order
    torch.testing.assert_close(broken.values, ref, atol=1e-4, rtol=0)
    included = sweep(model, graph, scores, data, counts=[1, 4, 6, 0], ties="include", progress=False)
    assert included.counts == [1, 4, 6, 0]
    assert included.effective_counts == [3, 5, 6, 0]
    ref = reference(model, graph, data, scores.circuits([3, 5, 6]))
    torch.testing.assert_close(included.values[:3], ref, atol=1e-4, rtol=0)


def test_groups_counts_never_split_ties():
    model, graph, data, _ = setup()
    scores = tied_scores(graph)
    r = sweep(model, graph, scores, data, counts="groups", progress=False)
    assert r.counts == r.effective_counts == [3, 5, 6, 110]
    assert r.counts_spec == "groups"
    torch.testing.assert_close(r.values[-1], r.clean)


def test_identical_circuits_are_evaluated_once(monkeypatch):
    model, graph, data, scores = setup()
    evaluated = []
    real = sweep_mod._evaluate_chunk

    def spy(*args, **kwargs):
        evaluated.extend(kwargs["chunk"])  # the chunk's item indices
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", spy)
    r = sweep(model, graph, scores, data, counts=[5, 5, 0, 110, 20], progress=False)
    assert sorted(evaluated) == [0, 1]  # k = 5 and k = 20; 0 and all edges reuse the ablated / clean runs
    torch.testing.assert_close(r.values[0], r.values[1])


def test_random_baseline_is_seeded_and_matches_manual_draws():
    model, graph, data, scores = setup()
    counts = [3, 30, 110]
    a = sweep(model, graph, scores, data, counts=counts, random_baseline=2, seed=7, progress=False)
    b = sweep(model, graph, scores, data, counts=counts, random_baseline=2, seed=7, progress=False)
    c = sweep(model, graph, scores, data, counts=counts, random_baseline=2, seed=8, progress=False)
    assert a.random_values.shape == (2, 3)
    torch.testing.assert_close(a.random_values, b.random_values)
    assert not torch.allclose(a.random_values[:, :2], c.random_values[:, :2])
    assert a.random_values[:, 2].tolist() == pytest.approx([a.clean_mean] * 2)  # all edges: the clean model
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(graph.n_edges, generator=gen)  # the first draw
    masks = []
    for k in counts[:2]:
        flat = torch.zeros(graph.n_edges, dtype=torch.bool)
        flat[perm[:k]] = True
        masks.append(graph.from_edges(flat, fill=False).bool())
    ref = reference(model, graph, data, masks).mean(1)
    torch.testing.assert_close(a.random_values[0, :2], ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------------
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, fresh_model):
    graph = build_graph(fresh_model)
    data = induction(101, n=6, seq_len=4, seed=0)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=torch.Generator().manual_seed(3)), graph)
    kwargs = dict(counts=edge_counts(graph, "log", n=6), batch_size=4, max_circuits_per_forward=2,
                  random_baseline=1, progress=False)
    full = sweep(fresh_model, graph, scores, data, **kwargs)
    before = model_snapshot(fresh_model)

    real = sweep_mod._evaluate_chunk
    calls = []

    def interrupt_after_first(*args, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        sweep(fresh_model, graph, scores, data, out=tmp_path / "run", **kwargs)
    assert_unchanged(fresh_model, before)  # hooks removed even though the sweep was interrupted
    assert (tmp_path / "run" / "progress.safetensors").exists()
    assert not (tmp_path / "run" / "result.safetensors").exists()

    resumed_chunks = []

    def count(*args, **kw):
        resumed_chunks.append(list(kw["chunk"]))
        return real(*args, **kw)

    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", count)
    resumed = sweep(fresh_model, graph, scores, data, out=tmp_path / "run", **kwargs)
    n_items = 2 * len(set(resumed.effective_counts) - {0, graph.n_edges})
    assert sum(len(c) for c in resumed_chunks) == 2 * n_items - 2  # 2 batches, minus the chunk done before
    torch.testing.assert_close(resumed.values, full.values, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.random_values, full.random_values, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.clean, full.clean)

    # a finished sweep is read back without any forward
    def fail(*args, **kw):
        raise AssertionError("no circuit should be evaluated again")

    monkeypatch.setattr(sweep_mod, "_evaluate_chunk", fail)
    again = sweep(fresh_model, graph, scores, data, out=tmp_path / "run", **kwargs)
    torch.testing.assert_close(again.values, resumed.values)
    from edgepatch.io import load_sweep

    loaded = load_sweep(tmp_path / "run" / "result.safetensors")
    torch.testing.assert_close(loaded.values, resumed.values)
    assert loaded.effective_counts == resumed.effective_counts


def test_resume_with_other_settings_raises(tmp_path):
    model, graph, data, scores = setup()
    sweep(model, graph, scores, data, counts=[2, 20], out=tmp_path, progress=False)
    settings = json.loads((tmp_path / "sweep.json").read_text())["fingerprint"]
    assert settings["metric"] == "logit_diff" and settings["counts"] == [2, 20]
    with pytest.raises(EdgepatchError, match=r"holds a sweep with different settings \(metric: saved 'logit_diff', "
                                             r"now 'kl_div'\)\. Use another out folder"):
        sweep(model, graph, scores, data, counts=[2, 20], metric="kl_div", out=tmp_path, progress=False)
    with pytest.raises(EdgepatchError, match="counts: saved"):
        sweep(model, graph, scores, data, counts=[2, 21], out=tmp_path, progress=False)
    other = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph)
    with pytest.raises(EdgepatchError, match="scores: saved"):
        sweep(model, graph, other, data, counts=[2, 20], out=tmp_path, progress=False)
    # batch size and chunking are not settings: they only change how the work is split
    sweep(model, graph, scores, data, counts=[2, 20], out=tmp_path, batch_size=2, max_circuits_per_forward=1,
          progress=False)


def test_resume_refuses_a_changed_metric_function_or_model_weight(tmp_path, fresh_model):
    """Two things a name cannot tell apart: a custom metric changed but named as before (once taken for the
    saved one, mixing old and new values in one result), and a model whose middle weight changed (the model
    entry once read only the first and last parameters). A metric that keeps state (a counter) still
    resumes, and a registered metric passed as a function is its name."""
    graph = build_graph(fresh_model)
    data = induction(101, n=4, seq_len=4, seed=0)
    scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=torch.Generator().manual_seed(3)), graph)

    def make(scale):
        calls = {"n": 0}

        def metric(logits, data):
            calls["n"] += 1
            return scale * logit_diff(logits, data)

        return metric

    kw = dict(counts=[2, 20], progress=False)
    first = make(1.0)
    sweep(fresh_model, graph, scores, data, metric=first, out=tmp_path / "m", **kw)
    sweep(fresh_model, graph, scores, data, metric=first, out=tmp_path / "m", **kw)  # its counter moved on
    sweep(fresh_model, graph, scores, data, metric=make(1.0), out=tmp_path / "m", **kw)  # the same code and scale
    with pytest.raises(EdgepatchError, match=r"different settings \(metric: saved 'metric#\w+', now 'metric#\w+'\)"):
        sweep(fresh_model, graph, scores, data, metric=make(100.0), out=tmp_path / "m", **kw)
    sweep(fresh_model, graph, scores, data, metric="logit_diff", out=tmp_path / "n", **kw)
    sweep(fresh_model, graph, scores, data, metric=ep.metrics.logit_diff, out=tmp_path / "n", **kw)
    with torch.no_grad():
        fresh_model.blocks[1].attn.W_V.mul_(3.0)
    with pytest.raises(EdgepatchError, match=r"different settings \(model: saved"):
        sweep(fresh_model, graph, scores, data, metric="logit_diff", out=tmp_path / "n", **kw)


def test_metric_ids_follow_code_and_values_not_state():
    """What a resumed run compares of a custom metric: its code and the numbers it holds (closures, defaults,
    a callable object's attributes), not a cache or counter it keeps; a built-in metric is its name."""
    from functools import partial

    from edgepatch.progress import metric_id

    class Scaled:
        def __init__(self, scale):
            self.scale, self.seen = scale, []

        def __call__(self, logits, data):
            self.seen.append(1)
            return self.scale * logit_diff(logits, data)

    one = Scaled(1.0)
    before = metric_id(one)
    one.seen.append(2)
    assert metric_id(one) == before == metric_id(Scaled(1.0)) != metric_id(Scaled(2.0))
    assert metric_id(get_metric(Scaled(1.0))) == metric_id(get_metric(Scaled(1.0))) != metric_id(get_metric(Scaled(2.0)))
    pick = lambda logits, data, k: logits[:, -1, k]  # noqa: E731
    assert metric_id(partial(pick, k=1)) != metric_id(partial(pick, k=2))
    assert metric_id(lambda logits, data: logits[:, -1, 0]) != metric_id(lambda logits, data: logits[:, -1, 1])
    assert metric_id(ep.metrics.logit_diff) == metric_id("logit_diff") == "logit_diff"
    assert metric_id(get_metric("kl_div")) == "kl_div"


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(direction="sufficient"), "Unknown direction 'sufficient'. Did you mean 'sufficiency'?"),
    (dict(ablation="corupt"), "Unknown ablation 'corupt'. Did you mean 'corrupt'?"),
    (dict(ties="inclusive"), "Unknown ties 'inclusive'. Did you mean 'include'?"),
    (dict(counts=[200]), "counts[0] = 200 is out of range"),
    (dict(by="absolute"), "by must be 'abs', 'signed' or 'neg'"),
    (dict(batch_size=0), "batch_size must be an int >= 1; got 0"),
    (dict(random_baseline=-1), "random_baseline must be an int >= 0; got -1"),
    (dict(max_circuits_per_forward=0), "max_circuits_per_forward must be None or a positive int; got 0"),
    (dict(memory_budget_mb=float("nan")), "memory_budget_mb must be a positive number of megabytes; got nan"),
    (dict(metric="logit_dif"), "Unknown metric 'logit_dif'. Did you mean 'logit_diff'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    model, graph, data, scores = setup()
    with pytest.raises(ValueError) as info:
        sweep(model, graph, scores, data, progress=False, **kwargs)
    assert message in str(info.value)


def test_scores_of_another_graph_raise():
    model, graph, data, _ = setup()
    joint = build_graph(model, split_qkv=False)
    with pytest.raises(EdgepatchError, match="The scores were computed on Graph"):
        sweep(model, graph, EdgeScores(torch.zeros(joint.n_src, joint.n_dest), joint), data, progress=False)


def test_out_must_be_a_folder(tmp_path):
    model, graph, data, scores = setup()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(EdgepatchError, match="is a file; give a folder"):
        sweep(model, graph, scores, data, counts=[1], out=f, progress=False)


# ------------------------------------------------------------------------------------------------------
# Result object and summaries
# ------------------------------------------------------------------------------------------------------
def hand_result(counts, f, n_edges=100, direction="sufficiency"):
    """A result whose normalized faithfulness is exactly ``f`` (clean 1, ablated 0, one prompt)."""
    return SweepResult(list(counts), list(counts), torch.tensor(f, dtype=torch.float64)[:, None],
                       torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                       torch.zeros(0, len(counts)), n_edges=n_edges, direction=direction, method="hand")


def test_result_exports():
    model, graph, data, scores = setup()
    r = sweep(model, graph, scores, data, counts=[1, 10], random_baseline=2, progress=False)
    recs = r.to_records()
    assert [x["count"] for x in recs] == [1, 10] and recs[0]["edges"] == 1
    assert recs[1]["fraction"] == pytest.approx(10 / 110)
    assert recs[0]["faithfulness"] == pytest.approx(float(r.normalized[0]))
    json.dumps(r.to_dict())  # JSON-serializable
    df = r.to_pandas()
    assert list(df["count"]) == [1, 10]
    assert "SweepResult(random, logit_diff, sufficiency, corrupt: 2 counts x 6 prompts" in repr(r)


def test_to_pandas_without_pandas(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="SweepResult.to_pandas needs pandas"):
        hand_result([1, 2], [0.0, 1.0]).to_pandas()


def test_area_under_curve_hand_values():
    r = hand_result([0, 50, 100], [0.0, 1.0, 1.0])
    assert area_under_curve(r) == pytest.approx(0.75)  # trapezoids 0.25 + 0.5 over a range of 1
    assert area_under_curve(r, normalize_x=False) == pytest.approx(0.75)
    r = hand_result([1, 10, 100], [0.0, 1.0, 1.0])
    assert area_under_curve(r, log_x=True) == pytest.approx(0.75)  # equally spaced in ln x
    assert r.auc(log_x=True) == pytest.approx(0.75)
    with pytest.raises(EdgepatchError, match="needs at least two distinct edge counts above 0"):
        area_under_curve(hand_result([0, 5], [0.0, 1.0]), log_x=True)


def test_mib_cpr_and_cmd_follow_mib_definition():
    n = 1000
    counts = [int(f * n) for f in MIB_FRACTIONS]
    f = [0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9, 1.1, 1.0, 1.0]
    r = hand_result(counts, f, n_edges=n)
    x = list(MIB_FRACTIONS)
    want_cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    want_cmd = sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(9))
    assert cpr(r) == pytest.approx(want_cpr) and r.cpr() == pytest.approx(want_cpr)
    assert cmd(r) == pytest.approx(want_cmd) and r.cmd() == pytest.approx(want_cmd)
    assert summarize(r)["cpr"] == pytest.approx(want_cpr)
    perfect = hand_result(counts, [1.0] * 10, n_edges=n)
    assert cmd(perfect) == 0.0 and cpr(perfect) == pytest.approx(0.999)
    with pytest.raises(EdgepatchError, match="Run ep.sweep\\(..., counts='mib'\\)"):
        cpr(hand_result([1, 10], [0.0, 1.0]))
    assert "cpr" not in summarize(hand_result([1, 10], [0.0, 1.0]))


def test_mib_sweep_end_to_end():
    model, graph, data, scores = setup()
    r = sweep(model, graph, scores, data, counts="mib", progress=False)
    assert r.counts == edge_counts(graph, "mib")
    assert math.isfinite(r.cpr()) and math.isfinite(r.cmd())


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_fast_path_falls_back_when_the_unembedding_cannot_be_sliced(monkeypatch, cls):
    """Without the pre-hook that unembeds only the answer positions, the logits of every position are
    computed and the answer positions gathered afterwards: the same values."""
    import contextlib

    import edgepatch.metrics as metrics_mod

    model, graph, data, scores = setup(cls=cls)
    fast = sweep(model, graph, scores, data, counts=[4, 40], metric="kl_div", progress=False)
    monkeypatch.setattr(metrics_mod, "answer_logits", lambda model, ap: contextlib.nullcontext())
    slow = sweep(model, graph, scores, data, counts=[4, 40], metric="kl_div", progress=False)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.ablated, slow.ablated, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Per-position circuits
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("direction, ablation, per_forward", [("sufficiency", "corrupt", 3), ("necessity", "mean", 1),
                                                              ("sufficiency", "mean", 2)])
def test_per_position_circuits_equal_one_by_one_patching(cls, direction, ablation, per_forward):
    """Per-position scores sweep the top k (slot, edge) pairs, each circuit patched with per-position weights;
    circuits folded into one forward get their own slots. Tokens in no slot (-1) keep every edge, so the
    empty circuit is evaluated, not taken from the corrupted run; with every token in a slot it is that run
    (test_per_position_sweep_with_absolute_positions_and_errors)."""
    model, graph, data, _ = setup(cls=cls)
    n, p = data.clean.shape
    slots = torch.randint(-1, 2, (n, p), generator=torch.Generator().manual_seed(3))
    slots[:, -1] = 1  # the answer position has a slot, but not in prompt 0
    slots[0, -1] = -1
    scores = ep.attribute(model, graph, data, method="eap", positions=slots, slot_names=["a", "b"], progress=False)
    counts = [1, 7, 30, 2 * graph.n_edges - 5]
    r = sweep(model, graph, scores, data, counts=counts, direction=direction, ablation=ablation, batch_size=4,
              max_circuits_per_forward=per_forward, positions=slots, random_baseline=1, progress=False)
    ref = reference(model, graph, data, scores.circuits(counts), ablation=ablation, direction=direction,
                    positions=slots)
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    assert r.n_edges == 2 * graph.n_edges and r.info["slots"] == ["a", "b"]
    empty = reference(model, graph, data, [torch.zeros(2, graph.n_src, graph.n_dest, dtype=torch.bool)],
                      ablation=ablation, positions=slots)[0]
    torch.testing.assert_close(r.ablated, empty, atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = get_metric("logit_diff")(model(data.clean), data).double()
    torch.testing.assert_close(r.clean, plain, atol=1e-4, rtol=0)
    if ablation == "corrupt":  # prompt 0's answer token keeps its edges into the logits: not the corrupted run
        with torch.no_grad():
            corrupted = get_metric("logit_diff")(model(data.corrupt), data).double()
        assert float((r.ablated[0] - corrupted[0]).abs()) > 1e-3


def test_per_position_sweep_with_absolute_positions_and_errors():
    model, graph, data, edge_scores = setup()
    scores = ep.attribute(model, graph, data, method="eap", positions="absolute", progress=False)
    r = sweep(model, graph, scores, data, counts=[3, 50], positions="absolute", batch_size=4, progress=False)
    ref = reference(model, graph, data, scores.circuits([3, 50]), positions="absolute")
    torch.testing.assert_close(r.values, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # every token has a slot: the empty circuit is the corrupted run
        corrupted = get_metric("logit_diff")(model(data.corrupt), data).double()
    torch.testing.assert_close(r.ablated, corrupted, atol=1e-4, rtol=0)
    with pytest.raises(EdgepatchError, match="These scores are per position .* sweep\\(..., positions=...\\)"):
        sweep(model, graph, scores, data, counts=[3], progress=False)
    with pytest.raises(EdgepatchError, match="positions= evaluates per-position circuits, but these are edge scores"):
        sweep(model, graph, edge_scores, data, counts=[3], positions="absolute", progress=False)
    with pytest.raises(EdgepatchError, match="prune=True"):
        sweep(model, graph, scores, data, counts=[3], positions="absolute", prune=True, progress=False)
    n_slots = data.pos
    n = n_slots * graph.n_edges
    assert scores.n_items == n
    with pytest.raises(EdgepatchError, match=re.escape(
            f"counts[0] = {n + 1} is out of range: these per-position scores rank {n:,} (position slot, edge) "
            f"pairs ({n_slots} slots x {graph.n_edges:,} edges of {graph!r}). Give counts in 0..{n} or fractions "
            f"of the pairs in (0, 1).")):
        sweep(model, graph, scores, data, counts=[n + 1], positions="absolute", progress=False)


# ------------------------------------------------------------------------------------------------------
# evaluate_circuit
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("direction, ablation", [("sufficiency", "corrupt"), ("necessity", "mean")])
def test_evaluate_circuit_matches_plain_patching(cls, direction, ablation):
    """One circuit, given as names, a bool mask, a 0 / 1 float mask or EdgeScores with a circuit_mask, gives
    the metric of one plain ep.patch forward with that circuit (and its normalized faithfulness)."""
    model, graph, data, _ = setup(cls=cls)
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(graph.n_src, graph.n_dest, generator=gen) < 0.3) & graph.valid
    names = graph.edges_from_mask(mask)
    ref = reference(model, graph, data, [mask, torch.ones_like(mask), torch.zeros_like(mask)],
                    ablation=ablation, direction="sufficiency")  # the circuit, then every edge kept / none
    keep = ref[0] if direction == "sufficiency" else reference(model, graph, data, [mask], ablation=ablation,
                                                                direction="necessity")[0]
    clean, ablated = ref[1].mean(), ref[2].mean()
    as_scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=gen), graph, circuit_mask=mask)
    for given in (names, mask, mask.float(), as_scores):
        r = ep.evaluate_circuit(model, graph, given, data, ablation=ablation, direction=direction, name="mine",
                                batch_size=4)
        assert r.effective_counts == [len(names)] and r.method == "mine" and r.direction == direction
        torch.testing.assert_close(r.values[0], keep, atol=1e-4, rtol=0)
        assert float(r.normalized[0]) == pytest.approx(float((keep.mean() - ablated) / (clean - ablated)), abs=1e-4)
    # the empty circuit and the whole model are the two ends
    assert float(ep.evaluate_circuit(model, graph, [], data).normalized[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(ep.evaluate_circuit(model, graph, graph.valid, data).normalized[0]) == pytest.approx(1.0, abs=1e-6)


def test_evaluate_circuit_per_position():
    """A per-position circuit ([n_slots, n_src, n_dest] pairs) with positions= equals one plain ep.patch forward
    with those per-position weights; a slot tensor works as "absolute" does."""
    model, graph, data, _ = setup()
    gen = torch.Generator().manual_seed(11)
    n_slots = data.pos
    mask = (torch.rand(n_slots, graph.n_src, graph.n_dest, generator=gen) < 0.2) & graph.valid
    ref = reference(model, graph, data, [mask], positions="absolute")[0]
    r = ep.evaluate_circuit(model, graph, mask, data, positions="absolute", batch_size=4)
    assert r.effective_counts == [int(mask.sum())] and r.n_edges == n_slots * graph.n_edges
    torch.testing.assert_close(r.values[0], ref, atol=1e-4, rtol=0)
    slots = torch.arange(data.pos).expand(len(data), -1).clone()  # every token its own slot, as "absolute"
    by_tensor = ep.evaluate_circuit(model, graph, mask.float(), data, positions=slots, batch_size=4)
    torch.testing.assert_close(by_tensor.values, r.values, atol=1e-6, rtol=0)
    with pytest.raises(EdgepatchError, match=r"is per position; give positions="):
        ep.evaluate_circuit(model, graph, mask, data)
    with pytest.raises(EdgepatchError, match=rf"circuit has 2 slots but positions='absolute' gives {n_slots}"):
        ep.evaluate_circuit(model, graph, mask[:2], data, positions="absolute")
    with pytest.raises(EdgepatchError, match=r"positions= goes with a per-position circuit"):
        ep.evaluate_circuit(model, graph, mask[0], data, positions="absolute")
    # a per-position method's scores with its circuit (ACDC's, learned masks'): the circuit, its slots checked
    named = tuple(f"t{i}" for i in range(n_slots))
    found = EdgeScores(torch.randn(mask.shape, generator=gen), graph, slots=named, circuit_mask=mask)
    by_scores = ep.evaluate_circuit(model, graph, found, data, positions=slots, batch_size=4)
    torch.testing.assert_close(by_scores.values, r.values, atol=1e-6, rtol=0)
    with pytest.raises(EdgepatchError, match=r"circuit's slots are \['t0', .* but positions='absolute' gives \['0', "):
        ep.evaluate_circuit(model, graph, found, data, positions="absolute")
    with pytest.raises(EdgepatchError, match=r"scores hold no circuit .* top 100 \(slot, edge\) pairs"):
        ep.evaluate_circuit(model, graph, EdgeScores(found.scores, graph, slots=named), data, positions=slots)


def test_evaluate_circuit_bad_input():
    model, graph, data, scores = setup()
    with pytest.raises(EdgepatchError, match=r"only 0 and 1 .* got values such as \[0.5"):
        ep.evaluate_circuit(model, graph, torch.full((graph.n_src, graph.n_dest), 0.5), data)
    with pytest.raises(EdgepatchError, match=r"marks 1 entries that are not edges .* e\.g\. m1->a0\.h0<q>"):
        bad = torch.zeros(graph.n_src, graph.n_dest, dtype=torch.bool)
        bad[graph.src_index("m1"), graph.dest_index("a0.h0<q>")] = True
        ep.evaluate_circuit(model, graph, bad, data)
    with pytest.raises(EdgepatchError, match=r"random scores hold no circuit .* scores\.circuit\(100\)"):
        ep.evaluate_circuit(model, graph, scores, data)
    with pytest.raises(EdgepatchError, match=r"counts= does not apply to a single circuit"):
        ep.evaluate_circuit(model, graph, ["m1->logits"], data, counts=[3])
    with pytest.raises(EdgepatchError, match=r"Got a dict of \d+ edges where edge names are expected; its values "
                                             r"would be ignored\. Pass list\(d\) .* scores\.circuit\(k\)"):
        ep.evaluate_circuit(model, graph, scores.to_dict(), data)  # (once: every edge, as a circuit)
    with pytest.raises(EdgepatchError, match=r"must be edge names, a \[n_src, n_dest\] mask .* got int"):
        ep.evaluate_circuit(model, graph, 3, data)
    with pytest.raises(EdgepatchError, match=r"circuit .*shape|shape.*circuit"):
        ep.evaluate_circuit(model, graph, torch.ones(3, 3, dtype=torch.bool), data)
    with pytest.raises(EdgepatchError, match=r"Unknown destination 'logit' .* Did you mean 'logits'\?"):
        ep.evaluate_circuit(model, graph, ["m1->logit"], data)
