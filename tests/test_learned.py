"""Learned edge masks: sparsity targets reached, faithful circuits, the model never touched."""

from __future__ import annotations

import functools

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, class_or_other, requires
from edgepatch.errors import EdgepatchError
from edgepatch.learned import learn_masks
from edgepatch.metrics import KLDivergence, logit_diff, normalized_faithfulness
from edgepatch.tasks import induction

torch.set_num_threads(1)  # tiny models: threads only add contention on shared CPUs

TARGET_SPARSITY = 0.8
EPOCHS = 120


@functools.lru_cache(maxsize=None)
def _model(preset: str, cls: str):
    requires(cls)
    return ep.random_model(preset, model_class=cls, seed=0)


@functools.lru_cache(maxsize=None)
def _data():
    return induction(101, n=8, seq_len=5, seed=0)


def snapshot(model):
    return {
        "hooks": [(n, len(h._forward_hooks), len(h._forward_pre_hooks), len(h._backward_hooks))
                  for n, h in model.hook_dict.items()],
        "flags": {f: getattr(model.cfg, f, None) for f in
                  ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_attn_result")},
        "params": [(n, id(p), p.requires_grad, p.grad is None, p.detach().clone())
                   for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_same_state(before, after):
    assert before["hooks"] == after["hooks"]
    assert before["flags"] == after["flags"]
    assert before["training"] == after["training"]
    assert len(before["params"]) == len(after["params"])
    for (n, i, rg, nograd, v), (n2, i2, rg2, nograd2, v2) in zip(before["params"], after["params"]):
        assert (n, i, rg, nograd) == (n2, i2, rg2, nograd2), n
        assert torch.equal(v, v2), n


@functools.lru_cache(maxsize=None)
def _hard_concrete_run(cls: str):
    """One Edge-Pruning run per model class, shared by the tests below (with the model state around it)."""
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    before = snapshot(model)
    rng = torch.get_rng_state()
    result = learn_masks(model, graph, _data(), target_sparsity=TARGET_SPARSITY, epochs=EPOCHS, progress=False)
    return result, before, snapshot(model), rng, torch.get_rng_state()


# ------------------------------------------------------------------------------------------------------
# Edge Pruning (hard-concrete + Lagrangian)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_hard_concrete_reaches_target_sparsity_within_10_percent(cls):
    result, *_ = _hard_concrete_run(cls)
    graph = result.graph
    target_kept = graph.n_edges * (1 - TARGET_SPARSITY)  # 22 of 110 edges
    # relative tolerance: within 10% of the target number of kept edges (here +-2.2 edges)
    assert abs(result.info["n_kept"] - target_kept) <= 0.1 * target_kept
    assert result.info["n_kept"] == int(result.circuit_mask.sum())
    assert result.info["density"] == pytest.approx(result.info["n_kept"] / graph.n_edges)
    assert abs(result.info["expected_density"] - (1 - TARGET_SPARSITY)) <= 0.1 * (1 - TARGET_SPARSITY)
    # the warm-up ramps the target from density 1 down to the target
    targets = [h["target_density"] for h in result.info["history"]]
    assert targets[0] > 0.95 and targets[-1] == pytest.approx(1 - TARGET_SPARSITY)
    assert all(a >= b for a, b in zip(targets, targets[1:]))


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_scores_are_importances_and_the_circuit_is_their_top(cls):
    result, *_ = _hard_concrete_run(cls)
    assert result.info["score_kind"] == "importance"
    assert result.method == "learned_hard_concrete" and result.metric == "kl_div"
    k = result.info["n_kept"]
    assert torch.equal(result.circuit(k, by="signed"), result.circuit_mask)
    assert not bool((result.circuit_mask & ~result.graph.valid).any())
    assert len(result.info["loss"]) == EPOCHS


def test_hard_concrete_circuit_is_faithful():
    result, *_ = _hard_concrete_run(ANY_CLASS)
    model, data, graph = _model("tiny", ANY_CLASS), _data(), result.graph
    abl = ep.source_activations(model, graph, data.corrupt)
    with torch.no_grad():
        clean_logits = model(data.clean)
        clean = float(logit_diff(clean_logits, data).mean())
        corrupt_logits = model(data.corrupt)
        corrupt = float(logit_diff(corrupt_logits, data).mean())
        with ep.patch(model, graph, result.circuit_mask, abl):
            circuit_logits = model(data.clean)
    assert abs(clean - corrupt) > 0.05  # the task separates the full model from the corrupted one
    kl = KLDivergence(clean_logits)
    circuit_ld = float(logit_diff(circuit_logits, data).mean())
    assert normalized_faithfulness(circuit_ld, clean, corrupt) >= 0.5
    # and by the loss it was trained on: KL(clean || circuit) at most half of KL(clean || ablated)
    kl_circuit, kl_ablated = float(kl(circuit_logits, data).mean()), float(kl(corrupt_logits, data).mean())
    assert normalized_faithfulness(kl_circuit, 0.0, kl_ablated) >= 0.5


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_model_and_global_rng_untouched(cls):
    _, before, after, rng_before, rng_after = _hard_concrete_run(cls)
    assert_same_state(before, after)  # values, identities, requires_grad, no .grad, hooks, flags, modes
    assert torch.equal(rng_before, rng_after)


# ------------------------------------------------------------------------------------------------------
# Other recipes
# ------------------------------------------------------------------------------------------------------
def test_sigmoid_l1_and_continuous_sparsification():
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    before = snapshot(model)
    # (the bridge's random model, HF's smaller initialization, moves the metric less: a weaker penalty)
    penalty = {"hooked": 0.05, "bridge": 0.01}[ANY_CLASS]
    sig = learn_masks(model, graph, _data(), mask_fn="sigmoid", penalty_weight=penalty, epochs=40, progress=False)
    assert sig.method == "learned_sigmoid" and sig.info["final"] == "threshold"
    assert torch.equal(sig.circuit_mask, (sig.scores > 0) & graph.valid)
    assert 0 < sig.info["n_kept"] < graph.n_edges
    cs = learn_masks(model, graph, _data(), mask_fn="continuous", penalty_weight=penalty, epochs=30,
                     final_temperature=200, progress=False)
    temps = [h["temperature"] for h in cs.info["history"]]
    assert temps[0] == pytest.approx(1.0) and temps[-1] == pytest.approx(200.0)
    assert all(b > a for a, b in zip(temps, temps[1:]))  # exponential: ratios constant
    assert temps[2] / temps[1] == pytest.approx(temps[1] / temps[0])
    assert torch.equal(cs.circuit_mask, (cs.scores > 0) & graph.valid)
    assert 0 < cs.info["n_kept"] < graph.n_edges
    # a stronger penalty keeps fewer edges
    strong = learn_masks(model, graph, _data(), mask_fn="sigmoid", penalty_weight=1.0, epochs=40, progress=False)
    assert strong.info["n_kept"] < sig.info["n_kept"]
    assert_same_state(before, snapshot(model))


def test_seeded_and_task_metric_and_mean_ablation():
    model = _model("tiny", class_or_other("bridge"))
    graph = ep.build_graph(model)
    a = learn_masks(model, graph, _data(), target_sparsity=0.5, epochs=8, seed=3, progress=False)
    b = learn_masks(model, graph, _data(), target_sparsity=0.5, epochs=8, seed=3, progress=False)
    c = learn_masks(model, graph, _data(), target_sparsity=0.5, epochs=8, seed=4, progress=False)
    assert torch.equal(a.scores.nan_to_num(0), b.scores.nan_to_num(0))
    assert not torch.equal(a.scores.nan_to_num(0), c.scores.nan_to_num(0))
    r = learn_masks(model, graph, _data(), "logit_diff", mask_fn="sigmoid", ablation="mean", batch_size=4,
                    epochs=4, progress=False)
    assert r.metric == "logit_diff" and r.info["ablation"] == "mean"
    # the loss is minus the task metric: the first epoch's faithfulness is -logit_diff of (nearly) the model
    with torch.no_grad():
        ld = float(logit_diff(model(_data().clean), _data()).mean())
    assert r.info["history"][0]["faithfulness"] == pytest.approx(-ld, abs=0.05)


def test_errors():
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    with pytest.raises(EdgepatchError, match="target_sparsity is the fraction of edges to remove"):
        learn_masks(model, graph, _data(), target_sparsity=1.5, progress=False)
    with pytest.raises(EdgepatchError, match="mask_fn must be"):
        learn_masks(model, graph, _data(), mask_fn="identity", progress=False)
    with pytest.raises(EdgepatchError, match="Unknown mask function"):
        learn_masks(model, graph, _data(), mask_fn="hardconcrete", progress=False)
    with pytest.raises(EdgepatchError, match="final must be"):
        learn_masks(model, graph, _data(), final="top", progress=False)


def test_model_restored_after_an_exception():
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    before = snapshot(model)
    calls = []

    def broken(logits, data):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return logit_diff(logits, data)

    with pytest.raises(RuntimeError, match="boom"):
        learn_masks(model, graph, _data(), broken, epochs=5, progress=False)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("recipe", [
    dict(target_sparsity=0.7, epochs=7),  # hard-concrete noise, both optimizers
    dict(mask_fn="continuous", penalty_weight=0.5, lr=0.3, epochs=6, batch_size=4),  # temperature schedule, 2 batches
    dict(mask_fn="sigmoid", positions="absolute", penalty_weight=0.5, lr=0.3, epochs=5, batch_size=4),  # per position
])
def test_interrupted_training_resumes_to_the_same_result(tmp_path, monkeypatch, recipe):
    """learn_masks(out=...) keeps its training state after every epoch: interrupted in the middle of an
    epoch, the same call continues from the last finished epoch (no epoch trained twice) and ends with the
    uninterrupted run's parameters, circuit and history; a finished run is read back without training;
    other settings are refused; the model and the global random generator are left as they were."""
    from edgepatch import progress

    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    n_batches = -(-_data().batch // recipe.get("batch_size", 64))
    calls = []
    stop_at = [None]

    def counted(logits, data):  # logit_diff, counting its calls (one per batch), interrupting on request
        if stop_at[0] is not None and len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return logit_diff(logits, data)

    opts = dict(metric=counted, progress=False, **recipe)
    full = learn_masks(model, graph, _data(), **opts)
    epochs = recipe["epochs"]
    assert len(calls) == epochs * n_batches
    monkeypatch.setattr(progress, "SAVE_EVERY_S", 0.0)
    before, rng = snapshot(model), torch.get_rng_state()
    calls.clear()
    stop_at[0] = 3 * n_batches + n_batches // 2 + (n_batches == 1)  # within the 4th epoch (its 2nd batch, or 5th epoch's 1st)
    with pytest.raises(KeyboardInterrupt):
        learn_masks(model, graph, _data(), out=tmp_path, **opts)
    assert_same_state(before, snapshot(model))
    assert torch.equal(torch.get_rng_state(), rng)
    done = stop_at[0] // n_batches  # epochs finished before the interruption
    calls.clear()
    stop_at[0] = None
    resumed = learn_masks(model, graph, _data(), out=tmp_path, **opts)
    assert len(calls) == (epochs - done) * n_batches  # the finished epochs are not trained again
    assert torch.equal(resumed.scores.nan_to_num(0), full.scores.nan_to_num(0))
    assert torch.equal(resumed.circuit_mask, full.circuit_mask)
    assert resumed.info["history"] == full.info["history"]
    assert resumed.info["n_kept"] == full.info["n_kept"] and 0 < full.info["n_kept"] < full.n_items
    calls.clear()
    again = learn_masks(model, graph, _data(), out=tmp_path, **opts)
    assert calls == [] and torch.equal(again.scores.nan_to_num(0), full.scores.nan_to_num(0))
    assert again.info["history"] == full.info["history"]
    with pytest.raises(EdgepatchError, match=r"holds a learned masks run with different settings \(seed: saved 0, "
                                             r"now 1\)"):
        learn_masks(model, graph, _data(), out=tmp_path, seed=1, **opts)


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
def test_per_position_masks_follow_a_plain_reference(cls):
    """positions=...: one mask parameter per (slot, edge), each batch patched with its own prompts' slots.
    Two epochs of sigmoid masks over two batches equal a plain loop written here: sigmoid weights through
    ep.patch(positions=...), minus the mean logit difference (on the full logits: learn_masks unembeds only
    the answer positions) plus the L1 density, one Adam step per batch. With one slot holding every token,
    the masks are the edge masks."""
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    data = _data()
    slots = torch.zeros_like(data.clean)
    slots[:5, -1] = 1  # first batch: the answer position, and the rest
    slots[5:, :3] = 1  # second batch: the first three tokens, and the rest
    slots[0, 0] = -1  # a token in no slot: never patched
    opts = dict(mask_fn="sigmoid", penalty_weight=0.3, epochs=2, batch_size=5, lr=0.05, progress=False)
    got = learn_masks(model, graph, data, "logit_diff", positions=slots, slot_names=["rest", "last"], **opts)
    assert got.slots == ("rest", "last") and got.scores.shape == (2, graph.n_src, graph.n_dest)
    assert got.circuit_mask.shape == (2, graph.n_src, graph.n_dest)

    init = float(torch.logit(torch.tensor(0.95)))
    logits = torch.full((2, graph.n_src, graph.n_dest), init, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    valid = graph.valid.expand(2, -1, -1)
    for _ in range(2):
        for start in (0, 5):
            batch = data[start : start + 5]
            abl = ep.source_activations(model, graph, batch.corrupt)
            with ep.patch(model, graph, torch.sigmoid(logits), abl, positions=slots[start : start + 5]):
                out = model(batch.clean)
            loss = -logit_diff(out, batch).mean() + 0.3 * torch.sigmoid(logits)[valid].sum() / (2 * graph.n_edges)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(got.scores.nan_to_num(0), (logits.detach() * valid).nan_to_num(0), atol=1e-5)
    moved = (got.scores - init).abs()[valid]
    assert bool((moved > 1e-3).any())  # (the training moved the parameters: the comparison is not vacuous)
    assert torch.equal(got.circuit_mask, (got.scores > 0) & valid)

    one = learn_masks(model, graph, data, "logit_diff", positions=torch.zeros_like(data.clean), **opts)
    edges = learn_masks(model, graph, data, "logit_diff", **opts)
    assert one.slots == ("0",)
    assert torch.allclose(one.scores[0].nan_to_num(0), edges.scores.nan_to_num(0), atol=1e-5)
    hc = learn_masks(model, graph, data, positions=slots, target_sparsity=0.5, epochs=3, progress=False)
    n_pairs = 2 * graph.n_edges
    assert hc.info["n_kept"] == round(hc.info["expected_density"] * n_pairs) == int(hc.circuit_mask.sum())
    assert torch.equal(hc.circuit_mask, hc.circuit(hc.info["n_kept"], by="signed"))
