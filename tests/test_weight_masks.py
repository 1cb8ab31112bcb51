"""Weight masks: exact round trips, masks landing on the weights the forward uses, ablation modes,
Lagrangian density control, continuous-sparsification binarization, and pinned error messages."""

from __future__ import annotations

import re

import pytest
import torch

from edgepatch.errors import EdgepatchError, UnknownNameError
from edgepatch.masks import ContinuousSparsification, mask_fn
from edgepatch.models import random_model
from edgepatch.tasks import induction
from edgepatch.weight_masks import (
    WeightMaskResult,
    WeightMasks,
    apply_subnetwork,
    maskable_parameters,
    plot_weight_sweep,
    sweep_weight_sparsity,
    train_weight_masks,
    weight_masks,
)

from conftest import ANY_CLASS, assert_unchanged, model_snapshot, requires

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35], [89, 79, 32, 38, 46, 26]])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tl_weight(model, name: str) -> torch.Tensor:
    """The TransformerLens view of a (possibly masked) weight, in either model class."""
    if hasattr(model, "tl_parameters"):
        return model.tl_parameters()[name].detach()
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr).detach()


def data_for_training():
    return induction(101, n=8, seq_len=4, seed=0)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fn", ["identity", "hard_concrete", "continuous"])
def test_all_masks_one_leave_logits_unchanged(fresh_model, fn):
    ref = fresh_model(TOKENS)
    targets = ["blocks.*.attn.W_*", "blocks.*.mlp.W_*", "blocks.*.ln?.w"]
    with weight_masks(fresh_model, targets, mask_fn=fn, include_bias=True) as masks:
        masks.eval()
        assert len(masks) > 10
        out = fresh_model(TOKENS)
    assert (out - ref).abs().max() <= 1e-6


def test_round_trip_restores_identity_values_classes_flags(fresh_model):
    before = model_snapshot(fresh_model)
    params_before = {n: p for n, p in fresh_model.named_parameters()}
    with weight_masks(fresh_model, "blocks.*.mlp.W_in", granularity="row") as masks:
        inside = model_snapshot(fresh_model)
        assert inside["classes"] != before["classes"]  # parametrize swapped the owning modules' classes
        assert not any(p.requires_grad for p in fresh_model.parameters())
        assert not any(p is q for p in masks.parameters() for q in fresh_model.parameters())
        fresh_model(TOKENS).sum().backward()
    assert_unchanged(fresh_model, before)
    for n, p in fresh_model.named_parameters():
        assert p is params_before[n]


@pytest.mark.parametrize("mode", ["keep", "ablate", "reinit", "random"])
def test_every_exit_path_restores(fresh_model, mode):
    before = model_snapshot(fresh_model)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_masks(fresh_model, ["blocks.0.attn.W_Q", "blocks.1.mlp.W_out"]):
            fresh_model(TOKENS)
            raise RuntimeError("boom")
    assert_unchanged(fresh_model, before)
    sub = {"blocks.0.mlp.W_in": torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) < 0.3}
    with pytest.raises(RuntimeError, match="boom"):
        with apply_subnetwork(fresh_model, sub, mode=mode):
            raise RuntimeError("boom")
    assert_unchanged(fresh_model, before)
    with pytest.raises(EdgepatchError):  # a failure while entering (second target unknown) leaves nothing behind
        with weight_masks(fresh_model, ["blocks.0.attn.W_Q", "blocks.0.attn.W_X"]):
            pass
    assert_unchanged(fresh_model, before)


def test_nesting_same_parameter_errors_different_parameters_nest(fresh_model):
    before = model_snapshot(fresh_model)
    with weight_masks(fresh_model, "blocks.0.attn.W_Q", mask_fn="identity"):
        with pytest.raises(EdgepatchError, match=r"'blocks.0.attn.W_Q' is already masked by an open weight_masks"):
            with weight_masks(fresh_model, "blocks.*.attn.W_Q"):
                pass
        with pytest.raises(EdgepatchError, match="already masked"):
            with apply_subnetwork(fresh_model, {"blocks.0.attn.W_Q": torch.tensor(True)}):
                pass
        with weight_masks(fresh_model, "blocks.0.mlp.W_in") as inner:
            with apply_subnetwork(fresh_model, {"blocks.1.mlp.W_in": torch.tensor(False)}):
                fresh_model(TOKENS)
            assert inner.names == ["blocks.0.mlp.W_in"]
        fresh_model(TOKENS)
    assert_unchanged(fresh_model, before)


def test_gradients_reach_only_the_masks(fresh_model):
    data = data_for_training()
    params = list(fresh_model.parameters())
    with weight_masks(fresh_model, ["blocks.*.attn.W_V", "blocks.0.mlp.W_in"], mask_fn="sigmoid", init=0.9) as masks:
        fresh_model(data.clean)[:, -1].logsumexp(-1).mean().backward()
        grads = [m.grad for m in masks.parameters()]
    assert all(g is not None and bool(g.ne(0).any()) for g in grads)
    assert all(p.grad is None for p in params)
    assert all(p.grad is None for p in fresh_model.parameters())


# ------------------------------------------------------------------------------------------ layouts
def _patched(model, hook_name, fn):
    return model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, fn)])


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_masks_land_on_the_weights_the_forward_uses(model_class):
    """Zeroing one head / neuron of a weight through a mask equals the hook-level effect of that zero."""
    model = random_model("tiny", model_class=model_class, seed=2)
    b_v = tl_weight(model, "blocks.0.attn.b_V")
    b_in = tl_weight(model, "blocks.1.mlp.b_in")

    def set_v(v, hook):
        v[:, :, 1] = b_v[1]
        return v

    def zero_z(z, hook):
        z[:, :, 2] = 0
        return z

    def set_pre(pre, hook):
        pre[..., 5] = b_in[5]
        return pre

    def zero_post(post, hook):
        post[..., 7] = 0
        return post

    cases = [
        ("blocks.0.attn.W_V", (4, 1, 1), 1, "blocks.0.attn.hook_v", set_v),
        ("blocks.1.attn.W_O", (4, 1, 1), 2, "blocks.1.attn.hook_z", zero_z),
        ("blocks.1.mlp.W_in", (1, 64), 5, "blocks.1.mlp.hook_pre", set_pre),
        ("blocks.0.mlp.W_out", (64, 1), 7, "blocks.0.mlp.hook_post", zero_post),
    ]
    for name, unit_shape, unit, hook_name, fn in cases:
        keep = torch.ones(unit_shape, dtype=torch.bool)
        keep.view(-1)[unit] = False
        expected = _patched(model, hook_name, fn)
        with apply_subnetwork(model, {name: keep}, mode="keep"):
            got = model(TOKENS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
        granularity = "head" if "attn" in name else "row"
        with weight_masks(model, name, mask_fn="identity", granularity=granularity) as masks:
            assert masks.unit_shapes[name] == unit_shape
            with torch.no_grad():
                masks[name].view(-1)[unit] = 0.0
            got = model(TOKENS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_bridge_and_hooked_share_names_and_shapes():
    requires("hooked")
    requires("bridge")
    hooked, bridge = random_model("tiny", model_class="hooked"), random_model("tiny", model_class="bridge")
    names = ["blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.1.mlp.W_in", "blocks.1.mlp.W_out", "blocks.0.attn.b_K"]
    for name in names:
        assert maskable_parameters(hooked)[name] == maskable_parameters(bridge)[name]
    with weight_masks(bridge, names, granularity="row", include_bias=True) as masks:
        assert masks.shapes["blocks.0.attn.W_Q"] == torch.Size([4, 32, 8])
        assert masks.unit_shapes["blocks.0.attn.W_Q"] == (4, 1, 8)
        assert "blocks.0.attn.b_O" in masks.names and "blocks.0.attn.b_Q" in masks.names


def test_grouped_query_hooked_masks_key_value_heads():
    requires("hooked")
    model = random_model("tiny-gqa", model_class="hooked")
    with weight_masks(model, "blocks.0.attn.W_[KV]", granularity="head") as masks:
        assert masks.unit_shapes == {"blocks.0.attn.W_K": (2, 1, 1), "blocks.0.attn.W_V": (2, 1, 1)}
        masks.eval()
        model(TOKENS)


# ------------------------------------------------------------------------------------------ ablation modes
def _subnetwork(shape=(32, 64), p=0.3, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("name, shape", [("blocks.0.mlp.W_in", (32, 64)), ("blocks.1.attn.W_Q", (4, 32, 8))])
@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_ablation_modes_do_what_they_say(model_class, name, shape):
    model = random_model("tiny", model_class=model_class, seed=1)
    sub = _subnetwork(shape)
    original = tl_weight(model, name).clone()
    assert bool(original.ne(0).all())
    n_sub, n_all = int(sub.sum()), sub.numel()

    with apply_subnetwork(model, {name: sub}, mode="keep") as kept:
        w = tl_weight(model, name)
        assert torch.equal(kept[name], sub)
        assert int((w == 0).sum()) == n_all - n_sub
        assert torch.equal(w[sub], original[sub])

    with apply_subnetwork(model, {name: sub}, mode="ablate") as kept:
        w = tl_weight(model, name)
        assert torch.equal(kept[name], ~sub)
        assert int((w == 0).sum()) == n_sub
        assert torch.equal(w[~sub], original[~sub])

    with apply_subnetwork(model, {name: sub}, mode="reinit", seed=3) as kept:
        w = tl_weight(model, name).clone()
        assert torch.equal(w[sub], original[sub])
        assert bool((w[~sub] != original[~sub]).all())
        assert abs(float(w[~sub].std()) / float(original.std()) - 1) < 0.15
    with apply_subnetwork(model, {name: sub}, mode="reinit", seed=3):
        assert torch.equal(tl_weight(model, name), w)  # seeded
    with apply_subnetwork(model, {name: sub}, mode="reinit", seed=4):
        assert not torch.equal(tl_weight(model, name), w)

    with apply_subnetwork(model, {name: sub}, mode="random", seed=0) as kept:
        r = kept[name]
        w = tl_weight(model, name)
        assert int(r.sum()) == n_sub and not bool((r & sub).any())
        assert int((w == 0).sum()) == n_all - n_sub
        assert torch.equal(w[r], original[r])
    with apply_subnetwork(model, {name: sub}, mode="random", seed=0) as again:
        assert torch.equal(again[name], r)
    with apply_subnetwork(model, {name: sub}, mode="random", seed=1) as other:
        assert not torch.equal(other[name], r)
    assert torch.equal(tl_weight(model, name), original)


def test_random_control_samples_whole_units_from_masks():
    model = random_model("tiny")
    masks = WeightMasks({"blocks.0.mlp.W_out": (64, 32)}, granularity="row", mask_fn="identity")
    with torch.no_grad():
        masks["blocks.0.mlp.W_out"][20:] = 0.0  # keep neurons 0..19
    with apply_subnetwork(model, masks, mode="random", seed=0) as kept:
        r = kept["blocks.0.mlp.W_out"]
    rows = r.any(dim=1)
    assert torch.equal(r, rows[:, None].expand(64, 32))  # whole neurons
    assert int(rows.sum()) == 20 and not bool(rows[:20].any())


def test_random_control_needs_a_large_enough_complement():
    model = random_model("tiny")
    sub = {"blocks.0.mlp.W_in": _subnetwork(p=0.8)}
    with pytest.raises(EdgepatchError, match=r"mode='random' draws a random subnetwork as large as the learned one "
                                             r"from its complement, but 'blocks.0.mlp.W_in' keeps \d+ weights and "
                                             r"its complement has only \d+"):
        with apply_subnetwork(model, sub, mode="random"):
            pass


# ------------------------------------------------------------------------------------------ training
def test_lagrangian_hard_concrete_lands_on_target_density():
    model = random_model("tiny")
    res = train_weight_masks(model, data_for_training(), ["blocks.*.mlp.W_in", "blocks.*.attn.W_Q"],
                             target_sparsity=0.9, epochs=220, progress=False)
    assert isinstance(res, WeightMaskResult)
    assert abs(res.density - 0.1) <= 0.1 * 0.1, res
    assert abs(res.history["expected_density"][-1] - 0.1) <= 0.1 * 0.1
    assert res.n_kept == sum(int(b.sum()) for b in res.subnetwork.values())
    assert set(res.sparsity) == set(res.subnetwork) and set(res.layer_sparsity) == {0, 1}
    assert len(res.history["loss"]) == 220 and res.history["lambda2"][-1] > 0
    assert all(b.dtype == torch.bool and b.shape == res.masks.shapes[n] for n, b in res.subnetwork.items())
    with apply_subnetwork(model, res, mode="keep") as kept:
        assert all(torch.equal(kept[n], b) for n, b in res.subnetwork.items())
        with torch.no_grad():
            assert float(model(TOKENS).abs().sum()) > 0
    with weight_masks(model, masks=res.masks) as again:  # trained masks apply again, by name
        assert again is res.masks and again.density() == res.density


def test_objective_metric_batches_and_reuse_errors():
    model = random_model("tiny")
    res = train_weight_masks(model, data_for_training(), "blocks.0.mlp.W_out", metric="kl_div", objective="metric",
                             batch_size=3, epochs=2, progress=False)
    assert len(res.history["loss"]) == 2 * 3 and res.metric_name == "kl_div" and res.metric_full == pytest.approx(0)
    other = random_model("tiny", d_mlp=48)
    with pytest.raises(EdgepatchError, match=re.escape("masks['blocks.0.mlp.W_out'] was built for shape [64, 32] but "
                                                       "the model's parameter is [48, 32]")):
        with weight_masks(other, masks=res.masks):
            pass


def test_lagrangian_sigmoid_l1_lands_on_target_density():
    model = random_model("tiny")
    res = train_weight_masks(model, data_for_training(), "blocks.*.mlp.W_out", mask_fn="sigmoid",
                             granularity="row", target_sparsity=0.5, epochs=150, progress=False)
    assert abs(res.density - 0.5) <= 0.05, res
    assert res.masks.granularity == {"blocks.0.mlp.W_out": "row", "blocks.1.mlp.W_out": "row"}


def test_plain_l1_penalty_shrinks_the_subnetwork():
    model = random_model("tiny")
    weak = train_weight_masks(model, data_for_training(), "blocks.0.mlp.W_in", mask_fn="sigmoid", init=0.9,
                              penalty_weight=0.0, epochs=30, progress=False)
    strong = train_weight_masks(model, data_for_training(), "blocks.0.mlp.W_in", mask_fn="sigmoid", init=0.9,
                                penalty_weight=1.0, epochs=30, progress=False)
    assert strong.history["expected_density"][-1] < weak.history["expected_density"][-1] - 0.2


def test_continuous_sparsification_becomes_binary():
    model = random_model("tiny", model_class=ANY_CLASS)
    # (the bridge's random model, HF's smaller initialization, moves the loss less: a weaker penalty)
    res = train_weight_masks(model, data_for_training(), "blocks.*.mlp.W_in", mask_fn="continuous", init=0.6,
                             penalty_weight={"hooked": 0.5, "bridge": 0.005}[ANY_CLASS], epochs=40, final_temperature=200.0, progress=False)
    temps, undecided = res.history["temperature"], res.history["undecided"]
    assert temps[0] == pytest.approx(1.0) and temps[-1] == pytest.approx(200.0)
    assert undecided[0] > 0.9 and undecided[-1] < 0.01
    assert 0 < res.n_kept < res.n_total


def test_continuous_temperature_alone_binarizes_fixed_logits():
    masks = WeightMasks({"blocks.0.mlp.W_in": (32, 64)}, mask_fn="continuous")
    with torch.no_grad():
        masks["blocks.0.mlp.W_in"].copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))
    fractions = []
    for epoch in range(90):
        masks.function.temperature = ContinuousSparsification.schedule(epoch, 90, 200.0)
        fractions.append(masks.undecided())
    assert fractions[0] > 0.9 and fractions[-1] < 0.03
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))


def test_mask_fn_context_swaps_the_function_of_weight_masks():
    masks = WeightMasks({"blocks.0.mlp.W_in": (32, 64)}, mask_fn="sigmoid")
    with mask_fn("identity", masks=masks):
        assert masks.function.name == "identity"
    assert masks.function.name == "sigmoid"


def test_sweep_and_plot():
    model = random_model("tiny")
    sweep = sweep_weight_sparsity(model, data_for_training(), "blocks.0.mlp.W_in", sparsities=[0.5, 0.9],
                                  epochs=60, progress=False)
    assert sweep.n_total == 2048 and len(sweep.metric) == 2 and sweep.n_kept[0] > sweep.n_kept[1]
    assert sweep.achieved_sparsity[1] == pytest.approx(0.9, abs=0.1)  # 60 epochs: roughly on target
    assert sweep.metric_full == sweep.results[0].metric_full and len(sweep.faithfulness) == 2
    fig = plot_weight_sweep({"hard concrete": sweep}, x="sparsity", y="metric")
    assert list(fig.data[0].x) == sweep.achieved_sparsity and fig.data[0].name == "hard concrete"


# ------------------------------------------------------------------------------------------ errors
def test_unknown_target_suggests_close_names():
    model = random_model("tiny")
    with pytest.raises(UnknownNameError, match=re.escape("Unknown weight-mask target 'blocks.0.attn.W_X': no parameter "
                                                         "of random-tiny matches it. Did you mean 'blocks.0.attn.W_")):
        with weight_masks(model, ["blocks.0.attn.W_Q", "blocks.0.attn.W_X"]):
            pass
    with pytest.raises(UnknownNameError, match=re.escape("'blocks.*.mlp.b_*': no parameter of random-tiny matches "
                                                         "it (biases need include_bias=True)")):
        with weight_masks(model, "blocks.*.mlp.b_*"):
            pass


def test_bad_granularity_and_head_on_non_head_parameter():
    model = random_model("tiny")
    with pytest.raises(EdgepatchError, match=re.escape("Unknown granularity 'neuron'; expected 'element', 'row' or "
                                                       "'head'. ('row' is one mask per neuron / hidden unit.)")):
        with weight_masks(model, "blocks.0.mlp.W_in", granularity="neuron"):
            pass
    with pytest.raises(EdgepatchError, match=re.escape("granularity='head' needs an attention parameter with a head "
                                                       "axis (W_Q, W_K, W_V, W_O, b_Q, b_K, b_V); 'blocks.0.attn.b_O' "
                                                       "has shape [32].")):
        with weight_masks(model, "blocks.0.attn.b_O", granularity="head"):
            pass
    with pytest.raises(EdgepatchError, match=re.escape("'blocks.0.mlp.W_in' has shape [32, 64]")):
        with weight_masks(model, "blocks.0.*.W_*", granularity="head"):
            pass
    with weight_masks(model, "blocks.0.*.W_*", granularity={"*.attn.*": "head", "*.mlp.*": "row"}) as masks:
        assert masks.unit_shapes["blocks.0.attn.W_O"] == (4, 1, 1)
        assert masks.unit_shapes["blocks.0.mlp.W_out"] == (64, 1)


def test_bridge_refusals_are_explained():
    requires("bridge")
    gpt2 = random_model("tiny", model_class="bridge")
    with pytest.raises(EdgepatchError, match=r"Cannot mask 'embed.W_E' of this TransformerBridge: its parameter is "
                                             r"shared by 2 modules \(tied weights"):
        with weight_masks(gpt2, "embed.W_E"):
            pass
    gqa = random_model("tiny-gqa", model_class="bridge")
    with pytest.raises(EdgepatchError, match=re.escape("Cannot mask 'blocks.0.attn.W_K' [6, 36, 6] of this "
                                                       "TransformerBridge: it repeats or combines entries")):
        with weight_masks(gqa, "blocks.0.attn.W_K"):
            pass
    with pytest.raises(EdgepatchError, match=re.escape("Cannot mask 'blocks.0.attn.b_Q': this TransformerBridge "
                                                       "computes it as a constant")):
        with weight_masks(gqa, "blocks.0.attn.b_Q"):
            pass
    with weight_masks(gqa, "blocks.0.attn.W_Q", include_bias=True) as masks:  # the constant b_Q is skipped
        assert masks.names == ["blocks.0.attn.W_Q"]


def test_subnetwork_input_errors():
    model = random_model("tiny")
    with pytest.raises(EdgepatchError, match=re.escape("subnetwork['blocks.0.mlp.W_in'] must be a bool tensor "
                                                       "(True = in the subnetwork), got dtype torch.float32")):
        with apply_subnetwork(model, {"blocks.0.mlp.W_in": torch.ones(32, 64)}):
            pass
    with pytest.raises(EdgepatchError, match=re.escape("subnetwork['blocks.0.mlp.W_in'] has shape [64, 32] but the "
                                                       "parameter is [32, 64]")):
        with apply_subnetwork(model, {"blocks.0.mlp.W_in": torch.ones(64, 32, dtype=torch.bool)}):
            pass
    with pytest.raises(EdgepatchError, match=r"Unknown mode 'inverse'; expected one of 'keep', 'ablate', 'reinit', "
                                             r"'random'"):
        with apply_subnetwork(model, {"blocks.0.mlp.W_in": torch.tensor(True)}, mode="inverse"):
            pass
    with pytest.raises(EdgepatchError, match=r"target_sparsity must be in \[0, 1\)"):
        train_weight_masks(model, data_for_training(), "blocks.0.mlp.W_in", target_sparsity=1.5)


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
@pytest.mark.parametrize("objective, metric", [("kl", "kl_div"), ("metric", "logit_diff")])
def test_answer_only_logits_train_exactly_like_full_logits(monkeypatch, model_class, objective, metric):
    """Training and evaluation unembed only the answer positions when the loss reads nothing else (the KL
    objective, a built-in metric). Against the same run on every position's logits (the loss then gathers
    the answer positions itself): the same losses step by step and the same metrics."""
    import importlib

    wm = importlib.import_module("edgepatch.weight_masks")  # (the module: edgepatch.weight_masks is the function)
    requires(model_class)
    opts = dict(metric=metric, objective=objective, mask_fn="sigmoid", epochs=3, batch_size=4, progress=False)
    runs = []
    for full in (False, True):
        if full:
            every = wm._task_logits
            monkeypatch.setattr(wm, "_task_logits", lambda model, part, answer_only: every(model, part, False))
        model = random_model("tiny", model_class=model_class, seed=0)
        runs.append(train_weight_masks(model, data_for_training(), "blocks.0.mlp.W_out", **opts))
    fast, full = runs
    assert len(fast.history["loss"]) == 3 * 2
    assert fast.history["loss"] == pytest.approx(full.history["loss"], abs=1e-5)
    assert fast.history["task_loss"] == pytest.approx(full.history["task_loss"], abs=1e-5)
    assert fast.metric_full == pytest.approx(full.metric_full, abs=1e-5)
    assert fast.metric_subnetwork == pytest.approx(full.metric_subnetwork, abs=1e-5)
    assert len(set(fast.history["task_loss"])) > 1  # (the masks moved: the comparison is not of constants)
