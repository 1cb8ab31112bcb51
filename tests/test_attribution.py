"""Attribution patching, integrated gradients and exact patching against autograd and patch()."""

from __future__ import annotations

import pytest
import torch

import edgepatch as ep
from edgepatch.attribution import attribute, eap, eap_ig, exact_patching
from edgepatch.errors import EdgepatchError
from edgepatch.metrics import get_metric
from edgepatch.tasks import induction

from conftest import ANY_CLASS, assert_unchanged, cached_model, model_snapshot, requires, spread_norms


def data_for(model, n=6, seq_len=4, seed=0):
    return induction(int(model.cfg.d_vocab), n=n, seq_len=seq_len, seed=seed)


def autograd_reference(model, graph, data, metric="logit_diff"):
    """-dMetric/dw at w = 1, by autograd through patch() (the mean over prompts)."""
    met = get_metric(metric)
    abl = ep.source_activations(model, graph, data.corrupt)
    W = torch.ones(graph.n_src, graph.n_dest, requires_grad=True)
    with ep.patch(model, graph, W, abl):
        met(model(data.clean), data).mean().backward()
    return -W.grad


@pytest.mark.parametrize("case", [("tiny", "hooked"), ("tiny", "bridge"), ("tiny-gqa", "hooked"),
                                  ("tiny-gqa", "bridge"), ("tiny-parallel", "bridge")])
@pytest.mark.parametrize("split", [True, False])
def test_eap_equals_autograd_gradient(case, split):
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    data = data_for(model)
    s = eap(model, g, data, "logit_diff", batch_size=4, progress=False)  # two batches: sums must combine
    ref = autograd_reference(model, g, data)
    v = g.valid
    assert torch.allclose(s.scores[v], ref[v], rtol=1e-5, atol=1e-6 * float(ref[v].abs().max()))
    assert float(ref[v].abs().max()) > 1e-4
    assert torch.isnan(s.scores[~v]).all()


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_eap_with_scaled_and_shifted_normalizations(model_class):
    """EAP applies the Jacobian of each layer's normalization, recomputed from its parameters, to the
    heads' gradients; random models have scales 1 and shifts 0, so give them random ones."""
    model = ep.random_model("tiny", model_class=model_class, seed=3)
    assert spread_norms(model, 4) > 0
    g = ep.build_graph(model)
    data = data_for(model)
    s = eap(model, g, data, "logit_diff", batch_size=4, progress=False)
    ref = autograd_reference(model, g, data)
    v = g.valid
    assert torch.allclose(s.scores[v], ref[v], rtol=1e-5, atol=1e-6 * float(ref[v].abs().max()))
    assert float(ref[v].abs().max()) > 1e-4


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_ig_with_one_step_equals_eap(model_class):
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    data = data_for(model)
    base = eap(model, g, data, progress=False).scores
    v = g.valid
    for variant in ("inputs", "activations"):
        ig = eap_ig(model, g, data, steps=1, variant=variant, progress=False).scores
        assert torch.allclose(ig[v], base[v], rtol=1e-5, atol=1e-7), variant


def test_ig_converges_and_is_exact_where_metric_is_linear():
    # No final LayerNorm: the logit difference is linear in the final residual, so for edges into
    # `logits` every method must give the exact patching effect.
    requires("hooked")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=101, n_ctx=32,
                                  attn_only=True, normalization_type=None, seed=3)
    model = HookedTransformer(cfg).eval()
    g = ep.build_graph(model)
    data = data_for(model, n=8)
    exact = exact_patching(model, g, data, progress=False)
    to_logits = torch.zeros_like(g.valid)
    to_logits[:, g.dest_index("logits")] = True
    for scores in (eap(model, g, data, progress=False),
                   eap_ig(model, g, data, steps=3, progress=False),
                   eap_ig(model, g, data, variant="clean-corrupted", progress=False)):
        assert torch.allclose(scores.scores[to_logits], exact.scores[to_logits], atol=1e-5), scores.method
    # (IG over the weights is not exact here: along its path the heads' own outputs are interpolated too.)
    # Integrated gradients over the weights: the Riemann sums converge, and the scores add up to the
    # total effect metric(corrupt) - metric(clean) (completeness).
    met = get_metric("logit_diff")
    with torch.no_grad():
        total = float(met(model(data.corrupt), data).mean() - met(model(data.clean), data).mean())
    errors = []
    for steps in (1, 4, 32):
        ig = eap_ig(model, g, data, steps=steps, variant="activations", progress=False)
        errors.append(abs(float(ig.flat.sum()) - total))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.05 * abs(total) + 1e-4


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_exact_patching_matches_single_edge_patch(model_class):
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    data = data_for(model, n=5)
    exact = exact_patching(model, g, data, "logit_diff", edges_per_forward=7, batch_size=3, progress=False)
    met = get_metric("logit_diff")
    abl = ep.source_activations(model, g, data.corrupt)
    with torch.no_grad():
        full = met(model(data.clean), data).mean()
        gen = torch.Generator().manual_seed(0)
        for i in torch.randperm(g.n_edges, generator=gen)[:12].tolist():
            s, d = g.edge_index[i].tolist()
            W = torch.ones(g.n_src, g.n_dest)
            W[s, d] = 0
            with ep.patch(model, g, W, abl):
                want = met(model(data.clean), data).mean() - full
            assert abs(float(exact.scores[s, d]) - float(want)) <= 1e-5, g.edge_names[i]
    assert exact.flat.abs().max() > 1e-4


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_per_position_exact_patching_matches_single_pair_patches(model_class):
    """Per position, exact patching ablates one (slot, edge) pair at a time, many per forward (folded slot
    tables, per-prompt ablation repeated, batches of prompts). Against patch() with per-position weights
    where only that pair is 0, pair by pair (tokens in no slot keep every edge); with one slot holding
    every token it is edge-level exact patching; the ``edges`` mask may be per slot."""
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    data = data_for(model, n=5, seq_len=4)
    slots = torch.zeros_like(data.clean)
    slots[:, -1] = 1
    slots[0, 1] = -1
    gen = torch.Generator().manual_seed(1)
    chosen = torch.zeros(2, g.n_src, g.n_dest, dtype=torch.bool)
    for i in torch.randperm(2 * g.n_edges, generator=gen)[:16].tolist():
        s, d = g.edge_index[i % g.n_edges].tolist()
        chosen[i // g.n_edges, s, d] = True
    exact = exact_patching(model, g, data, "logit_diff", edges_per_forward=5, batch_size=3, positions=slots,
                           slot_names=["rest", "end"], edges=chosen, progress=False)
    assert exact.slots == ("rest", "end") and int(torch.isfinite(exact.scores).sum()) == 16
    met = get_metric("logit_diff")
    abl = ep.source_activations(model, g, data.corrupt)
    with torch.no_grad():
        full = met(model(data.clean), data).mean()
        for slot, s, d in chosen.nonzero().tolist():
            W = torch.ones(2, g.n_src, g.n_dest)
            W[slot, s, d] = 0
            with ep.patch(model, g, W, abl, positions=slots):
                want = met(model(data.clean), data).mean() - full
            assert abs(float(exact.scores[slot, s, d]) - float(want)) <= 1e-5, (slot, g.src_names[s], g.dest_names[d])
    assert exact.scores[chosen].abs().max() > 1e-4
    one = exact_patching(model, g, data, "logit_diff", positions=torch.zeros_like(data.clean), progress=False)
    edge = exact_patching(model, g, data, "logit_diff", progress=False)
    assert torch.allclose(one.scores[0], edge.scores, atol=1e-5, equal_nan=True)
    with pytest.raises(EdgepatchError, match=r"edges has shape \[3, 4\]; expected a bool mask \[n_src, n_dest\]"):
        exact_patching(model, g, data, edges=torch.ones(3, 4, dtype=torch.bool), positions=slots, progress=False)


def test_exact_patching_resumes_after_an_interruption(tmp_path, monkeypatch):
    """exact_patching(out=...) keeps its progress: interrupted after some forwards, the same call resumes
    with the rest only and gives the uninterrupted scores; a finished run is read back without forwards;
    other settings are refused, naming what differs. Per position too."""
    from edgepatch import attribution as attribution_mod
    from edgepatch import progress

    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model, n=5)
    slots = torch.zeros_like(data.clean)
    slots[:, -1] = 1
    monkeypatch.setattr(progress, "SAVE_EVERY_S", 0.0)  # save after every forward
    real = attribution_mod.patch
    for kw in ({}, {"positions": slots}):
        out = tmp_path / ("pos" if kw else "edge")
        opts = dict(edges_per_forward=13, batch_size=3, progress=False, **kw)
        full = exact_patching(model, g, data, "logit_diff", **opts)
        n_forwards = full.info["forwards"]
        calls = []

        def interrupt_after_three(*args, **kwargs):
            if len(calls) == 3:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(attribution_mod, "patch", interrupt_after_three)
        with pytest.raises(KeyboardInterrupt):
            exact_patching(model, g, data, "logit_diff", out=out, **opts)
        monkeypatch.setattr(attribution_mod, "patch", real)
        resumed = exact_patching(model, g, data, "logit_diff", out=out, **opts)
        assert resumed.info["forwards"] == n_forwards - 3
        assert torch.equal(resumed.scores.nan_to_num(7), full.scores.nan_to_num(7))
        again = exact_patching(model, g, data, "logit_diff", out=out, **opts)
        assert again.info["forwards"] == 0 and torch.equal(again.scores.nan_to_num(7), full.scores.nan_to_num(7))
    with pytest.raises(EdgepatchError, match=r"holds an exact patching with different settings \(edges_per_forward: "
                                             r"saved 13, now 7\)\. Use another out folder"):
        exact_patching(model, g, data, "logit_diff", edges_per_forward=7, batch_size=3, out=tmp_path / "edge",
                       progress=False)


@pytest.mark.parametrize("method, kw", [("eap", {}), ("eap-ig", {"steps": 3}),
                                        ("eap-ig", {"steps": 2, "variant": "activations"}),
                                        ("eap", {"positions": "absolute"})])
def test_attribution_resumes_after_an_interruption(tmp_path, monkeypatch, method, kw):
    """EAP and EAP-IG with out=... keep the scores summed over the batches done: interrupted in a batch, the
    same call resumes with that batch and gives the uninterrupted scores exactly; a finished run is read
    back without a forward; other settings are refused, naming what differs."""
    from edgepatch import progress
    from edgepatch.metrics import logit_diff

    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model, n=5)
    points = kw.get("steps", 1)
    calls = []
    stop_at = [None]

    def counted(logits, batch):  # logit_diff, one call per batch and integration point
        if stop_at[0] is not None and len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return logit_diff(logits, batch)

    opts = dict(method=method, batch_size=2, progress=False, **kw)  # 3 batches
    full = attribute(model, g, data, counted, **opts)
    assert len(calls) == 3 * points
    monkeypatch.setattr(progress, "SAVE_EVERY_S", 0.0)
    calls.clear()
    stop_at[0] = points + points // 2  # in the second batch
    with pytest.raises(KeyboardInterrupt):
        attribute(model, g, data, counted, out=tmp_path, **opts)
    calls.clear()
    stop_at[0] = None
    resumed = attribute(model, g, data, counted, out=tmp_path, **opts)
    assert len(calls) == 2 * points  # the first batch is not run again
    assert torch.equal(resumed.scores.nan_to_num(7), full.scores.nan_to_num(7))
    assert resumed.slots == full.slots
    calls.clear()
    again = attribute(model, g, data, counted, out=tmp_path, **opts)
    assert calls == [] and torch.equal(again.scores.nan_to_num(7), full.scores.nan_to_num(7))
    with pytest.raises(EdgepatchError, match=r"holds an EAP[-A-Z]* run with different settings \(batch_size: saved 2, "
                                             r"now 3\)"):
        attribute(model, g, data, counted, out=tmp_path, **{**opts, "batch_size": 3})


def test_exact_with_kl_and_a_callable_metric():
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model, n=4)
    kl = exact_patching(model, g, data, "kl_div", progress=False)
    assert (kl.flat >= -1e-6).all()  # KL to the clean run can only grow when an edge is ablated

    def top_logit(logits, data):
        return logits[torch.arange(len(data)), data.answer_pos].max(-1).values

    s = attribute(model, g, data, metric=top_logit, method="exact", progress=False)
    assert s.metric == "top_logit" and torch.isfinite(s.flat).all()


def test_node_level_attribution_sums_edges():
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    node = ep.build_graph(model, level="node")
    data = data_for(model)
    e = eap(model, g, data, progress=False).scores
    n = eap(model, node, data, progress=False).scores
    assert torch.allclose(n[:, 0], e.nan_to_num(0).sum(1), atol=1e-6)


def test_algorithms_leave_model_unchanged(fresh_model):
    model = fresh_model
    g = ep.build_graph(model)
    data = data_for(model)
    before = model_snapshot(model)
    for method, opts in (("eap", {}), ("eap-ig", {"steps": 2}), ("eap-ig-activations", {"steps": 2}),
                         ("clean-corrupted", {}), ("exact", {})):
        attribute(model, g, data, method=method, progress=False, **opts)
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"Unknown method 'eapig'.*Did you mean 'eap-ig'"):
        attribute(model, g, data, method="eapig")
    with pytest.raises(ValueError, match=r"Unknown ablation 'corupt'.*Did you mean 'corrupt'"):
        eap(model, g, data, ablation="corupt", progress=False)
    assert_unchanged(model, before)


def test_options_a_method_does_not_take_are_named():
    """An option the method does not take is an error that names the method's options, before any
    work is done, instead of Python's TypeError from inside the method."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model)
    with pytest.raises(EdgepatchError, match=r"method='learned' has no option 'steps'\. Did you mean 'epochs'[^?]*\? "
                                             r"Its options: mask_fn, .*epochs.*progress, .*out\."):
        attribute(model, g, data, method="learned", steps=5)
    with pytest.raises(EdgepatchError, match=r"method='eap' has no option 'batchsize'\. Did you mean 'batch_size'"):
        attribute(model, g, data, method="eap", batchsize=4)
    with pytest.raises(EdgepatchError, match=r"method='eap-ig-inputs' sets variant='inputs' itself; got "
                                             r"variant='activations' too\. Use method='eap-ig' with variant='activations'"):
        attribute(model, g, data, method="eap-ig-inputs", variant="activations")
    # a name that only sets a default keeps it overridable; "random" takes (and ignores) the common options
    s = attribute(model, g, data, method="edge-pruning", mask_fn="sigmoid", epochs=2, progress=False)
    assert s.info["mask_fn"] == "sigmoid"
    r = attribute(model, g, data, method="random", seed=3, ablation="zero", batch_size=2, progress=False)
    assert torch.equal(r.flat, ep.baselines.random_scores(g, seed=3).flat)


def test_zero_and_mean_ablation_attribution():
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model)
    met = get_metric("logit_diff")
    for kind in ("zero", "mean"):
        s = eap(model, g, data, ablation=kind, progress=False)
        from edgepatch.attribution import AblationSource

        abl = AblationSource(model, g, data, kind)(data, slice(None))
        W = torch.ones(g.n_src, g.n_dest, requires_grad=True)
        with ep.patch(model, g, W, abl):
            met(model(data.clean), data).mean().backward()
        v = g.valid
        ref = -W.grad[v]  # same tolerance as the main EAP == autograd test: 1e-6 of the largest score
        assert torch.allclose(s.scores[v], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), kind


def test_eap_with_kl_warns_that_its_gradient_is_zero():
    """KL to the clean run is at its minimum where EAP takes the gradient: the scores vanish, and EAP says
    so; EAP-IG's scores do not."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model)
    with pytest.warns(RuntimeWarning, match="Use method='eap-ig'"):
        s = eap(model, g, data, "kl_div", progress=False)
    ig = ep.eap_ig(model, g, data, "kl_div", steps=3, progress=False)
    v = g.valid
    assert s.scores[v].abs().max() <= 1e-5 * max(1.0, float(ig.scores[v].abs().max()))
    assert ig.scores[v].abs().max() > 1e-4


def test_a_metric_that_gives_nan_is_reported():
    """A metric that gives NaN makes NaN scores: attribute warns, and the reprs say NaN (once they showed
    "|score| max 0" and "faithfulness 0.00..0.00")."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model)

    def nan_metric(logits, data):
        return logits[:, -1, 0] * float("nan")

    for method in ("eap", "exact"):
        with pytest.warns(RuntimeWarning, match=rf"attribute\('{method}'\): {g.n_edges} of {g.n_edges} scores are NaN"):
            s = attribute(model, g, data, metric=nan_metric, method=method, progress=False)
        assert repr(s).endswith(f"|score| max 0, {g.n_edges} NaN)")
    r = ep.sweep(model, g, s, data, counts=[1, 5], metric=nan_metric, progress=False)
    assert repr(r).endswith("faithfulness - (2 NaN))")
    assert "NaN" not in repr(attribute(model, g, data, method="eap", progress=False))


@pytest.mark.parametrize("method", ["eap", "eap-ig", "exact"])
@pytest.mark.parametrize("batch_size", [0, 2.0, True])
def test_batch_size_is_checked(method, batch_size):
    """(Once: 0 raised ZeroDivisionError, 2.0 a TypeError deep inside, True ran as a batch of 1.)"""
    model = cached_model("tiny", ANY_CLASS)
    with pytest.raises(EdgepatchError, match=rf"batch_size must be a positive int; got {batch_size!r}\."):
        attribute(model, ep.build_graph(model), data_for(model), method=method, batch_size=batch_size, progress=False)


def test_gradient_methods_refuse_a_metric_without_gradient(fresh_model):
    """Accuracy (a step function) and a callable that detaches its result give no gradient: EAP, EAP-IG,
    learned masks and weight masks stop with an error that says why and what to use (once EAP raised torch's
    "element 0 of tensors does not require grad" and learned masks trained on a zero gradient), and leave
    the model as it was. Exact patching, which only evaluates the metric, takes them."""
    g = ep.build_graph(fresh_model)
    data = data_for(fresh_model)
    before = model_snapshot(fresh_model)
    logit_diff = get_metric("logit_diff")

    def detached(logits, data):
        return logit_diff(logits, data).detach()

    for metric, why in (("accuracy", "a step function of the logits"), (detached, "does not depend on the logits")):
        for method, kw in (("eap", {}), ("eap-ig", {"steps": 2}), ("learned", {"epochs": 1})):
            with pytest.raises(EdgepatchError, match=rf"needs the gradient of the metric, but '\w+' has none: .*{why}"
                                                     rf".*'logit_diff'"):
                attribute(fresh_model, g, data, metric=metric, method=method, progress=False, **kw)
            assert_unchanged(fresh_model, before)
        with pytest.raises(EdgepatchError, match=r"weight masks needs the gradient of the metric"):
            ep.train_weight_masks(fresh_model, data, metric=metric, objective="metric", epochs=1, progress=False)
        assert_unchanged(fresh_model, before)
        attribute(fresh_model, g, data, metric=metric, method="exact", progress=False)


# ---------------------------------------------------------------------------------------------------
# Per-position scores
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [("tiny", "hooked"), ("tiny", "bridge"), ("tiny-gqa", "bridge"),
                                  ("tiny-parallel", "hooked")])
@pytest.mark.parametrize("split", [True, False])
def test_per_position_eap_equals_autograd_through_per_position_patching(case, split):
    """Per-position EAP: -dMetric/dW at W = 1 for weights W [n_slots, n_src, n_dest] patched with the same
    positions (autograd through patch), for named slots with tokens in no slot (-1) and for absolute
    positions; the slots of absolute positions sum to plain EAP; EAP-IG with one step equals EAP."""
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    data = data_for(model)
    n, p = data.clean.shape
    slots = torch.randint(-1, 3, (n, p), generator=torch.Generator().manual_seed(1))
    met = get_metric("logit_diff")
    abl = ep.source_activations(model, g, data.corrupt)
    for positions, names in ((slots, ["IO", "S", "END"]), ("absolute", None)):
        s = eap(model, g, data, "logit_diff", batch_size=4, progress=False, positions=positions, slot_names=names)
        S = 3 if names else p
        assert s.scores.shape == (S, g.n_src, g.n_dest) and s.slots == tuple(names or map(str, range(p)))
        W = torch.ones(S, g.n_src, g.n_dest, requires_grad=True)
        with ep.patch(model, g, W, abl, positions=positions):
            met(model(data.clean), data).mean().backward()
        ref, v = -W.grad, g.valid.expand(S, -1, -1)
        assert torch.allclose(s.scores[v], ref[v], rtol=1e-5, atol=1e-6 * float(ref[v].abs().max()))
        assert float(ref[v].abs().max()) > 1e-4
        for variant in ("inputs", "activations"):
            ig = eap_ig(model, g, data, "logit_diff", steps=1, variant=variant, batch_size=4, progress=False,
                        positions=positions, slot_names=names)
            assert torch.allclose(ig.scores[v], s.scores[v], rtol=1e-5, atol=1e-6 * float(ref[v].abs().max()))
    plain = eap(model, g, data, "logit_diff", batch_size=4, progress=False).scores[g.valid]
    assert torch.allclose(s.scores.nan_to_num(0).sum(0)[g.valid], plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))


def test_per_position_scores_rank_slot_edge_pairs():
    """Per-position scores rank (slot, edge) pairs: names ``edge@slot``, circuits ``[n_slots, n_src, n_dest]``
    for patch(positions=...), one slot as edge scores, and clear errors where positions make no sense."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    data = data_for(model)
    slots = torch.zeros_like(data.clean)
    slots[:, -1] = 1
    s = attribute(model, g, data, method="eap", positions=slots, slot_names=["prefix", "end"], progress=False)
    assert s.per_position and s.n_items == 2 * g.n_edges and "2 position slots" in repr(s)
    flat = s.flat
    assert torch.equal(flat[: g.n_edges].nan_to_num(0), s.scores[0][g.valid].nan_to_num(0))  # slot-major
    best = s.top_k(3)
    order = flat.abs().argsort(descending=True)[:3].tolist()
    assert [name for name, _ in best] == [s.item_names[i] for i in order]
    assert all("@" in name for name, _ in best)
    c = s.circuit(5)
    assert c.shape == (2, g.n_src, g.n_dest) and int(c.sum()) == 5 and not bool((c & ~g.valid).any())
    assert torch.equal(s.circuits([2, 5])[1], c) and bool((s.circuits([2, 5])[0] <= c).all())
    end = s.slot("end")
    assert torch.equal(end.scores.nan_to_num(0), s.scores[1].nan_to_num(0)) and not end.per_position
    assert s.to_dict()[f"{g.edge_names[0]}@end"] == pytest.approx(float(s.scores[1][tuple(g.edge_index[0])]))
    abl = ep.source_activations(model, g, data.corrupt)
    with ep.patch(model, g, c.float(), abl, positions=slots), torch.no_grad():
        model(data.clean)  # a per-position circuit is per-position weights
    with pytest.raises(EdgepatchError, match="prune=True: MIB's pruning"):
        s.circuit(5, prune=True)
    with pytest.raises(EdgepatchError, match="Unknown slot 'END'"):
        s.slot("END")
    with pytest.raises(EdgepatchError, match="to_mib_json .* not per-position scores"):
        ep.io.to_mib_json(s)
    with pytest.raises(EdgepatchError, match=r"positions has shape \[6, 3\]; expected \[n_prompts, pos\]"):
        eap(model, g, data, positions=slots[:, :3], progress=False)
    with pytest.raises(EdgepatchError, match="slot_names must give one distinct name per slot"):
        eap(model, g, data, positions=slots, slot_names=["only one"], progress=False)
    with pytest.raises(EdgepatchError, match="method='activation-magnitude' has no option 'positions'"):
        attribute(model, g, data, method="activation-magnitude", positions=slots)
    with pytest.raises(EdgepatchError, match=r"positions='named' takes each token's slot from the data .* does not "
                                             r"have; tasks.ioi names IO, S1, S1\+1, S2 and END"):
        eap(model, g, data, positions="named", progress=False)


def test_named_positions_are_the_task_slot_table():
    """positions="named" (tasks.ioi's IO, S1, S1+1, S2, END and other) scores and sweeps exactly as the
    table and names it reads from the data, given explicitly."""
    from edgepatch.tokenizers import gpt2_tokenizer

    model = ep.random_model("tiny", d_vocab=50257)
    g = ep.build_graph(model)
    data = ep.tasks.ioi(gpt2_tokenizer(), n=4, seed=0)
    named = eap(model, g, data, positions="named", progress=False)
    given = eap(model, g, data, positions=data.meta["positions"], slot_names=data.meta["slot_names"], progress=False)
    assert named.slots == ("IO", "S1", "S1+1", "S2", "END", "other")
    assert torch.equal(named.scores.nan_to_num(0), given.scores.nan_to_num(0))
    a = ep.sweep(model, g, named, data, counts=[10, 100], positions="named", progress=False)
    b = ep.sweep(model, g, named, data, counts=[10, 100], positions=data.meta["positions"], progress=False)
    assert torch.equal(a.values, b.values)
    other = ep.tasks.ioi(gpt2_tokenizer(), n=4, seed=1)
    other.meta["slot_names"] = ("IO", "S1", "S1+1", "S2", "END", "rest")
    with pytest.raises(EdgepatchError, match=r"slot_names \['IO', 'S1', 'S1\+1', 'S2', 'END', 'other'\] differ from "
                                             r"the data's named slots"):
        ep.sweep(model, g, named, other, counts=[10], positions="named", progress=False)
