"""Metrics on hand-built logits, with expected values derived by hand in each test."""

import math
import re
import warnings

import pytest
import torch

from conftest import MODEL_CASES, assert_unchanged, cached_model, model_id, model_snapshot
from edgepatch.baselines import _resolve_metric
from edgepatch.data import PromptPairs
from edgepatch.metrics import (
    METRICS,
    KLDivergence,
    accuracy,
    answer_logprob,
    answer_prob,
    get_metric,
    kl_div,
    logit_diff,
    normalized_faithfulness,
    prob_diff,
    prob_diff_years,
)


@pytest.fixture
def toy():
    """2 prompts, 2 positions, vocab 3. Prompt 1 is one token long (answer_pos 0), prompt 0 two (pos 1)."""
    data = PromptPairs.from_tokens(
        clean=[[0, 1], [2, 0]], corrupt=[[1, 1], [1, 0]], answers=[0, 2], wrong=[1, 0],
        attention_mask=[[1, 1], [1, 0]],
    )
    logits = torch.tensor([
        [[9.0, 9.0, 9.0], [3.0, 1.0, 0.0]],   # prompt 0 scored at pos 1: answer 0 -> 3, wrong 1 -> 1
        [[1.0, 5.0, 4.0], [9.0, 9.0, 9.0]],   # prompt 1 scored at pos 0: answer 2 -> 4, wrong 0 -> 1
    ])
    return logits, data


def test_logit_diff_hand_values(toy):
    logits, data = toy
    assert data.answer_pos.tolist() == [1, 0]
    torch.testing.assert_close(logit_diff(logits, data), torch.tensor([3.0 - 1.0, 4.0 - 1.0]))


def test_logit_diff_means_over_several_answers_and_wrong():
    data = PromptPairs.from_tokens([[0]], [[0]], answers=[[0, 1]], wrong=[[2, 3]])
    logits = torch.tensor([[[4.0, 2.0, 1.0, -1.0]]])
    # mean(4, 2) - mean(1, -1) = 3 - 0
    torch.testing.assert_close(logit_diff(logits, data), torch.tensor([3.0]))


def test_logit_diff_gradient_is_plus_minus_one_at_answer_pos(toy):
    logits, data = toy
    logits = logits.clone().requires_grad_(True)
    logit_diff(logits, data).sum().backward()
    expected = torch.zeros_like(logits)
    expected[0, 1, 0], expected[0, 1, 1] = 1.0, -1.0
    expected[1, 0, 2], expected[1, 0, 0] = 1.0, -1.0
    torch.testing.assert_close(logits.grad, expected)


def test_probability_metrics_hand_values(toy):
    logits, data = toy
    # prompt 0 at pos 1: logits (3, 1, 0) -> probs e^3, e^1, e^0 over Z0
    z0 = math.exp(3) + math.exp(1) + 1
    # prompt 1 at pos 0: logits (1, 5, 4)
    z1 = math.exp(1) + math.exp(5) + math.exp(4)
    p_ans = torch.tensor([math.exp(3) / z0, math.exp(4) / z1])
    p_wrong = torch.tensor([math.exp(1) / z0, math.exp(1) / z1])
    torch.testing.assert_close(answer_prob(logits, data), p_ans)
    torch.testing.assert_close(answer_logprob(logits, data), p_ans.log())
    torch.testing.assert_close(prob_diff(logits, data), p_ans - p_wrong)


def test_answer_prob_sums_several_answers():
    data = PromptPairs.from_tokens([[0]], [[0]], answers=[[0, 1]], wrong=[3])
    uniform = torch.zeros(1, 1, 4)
    torch.testing.assert_close(answer_prob(uniform, data), torch.tensor([0.5]))
    torch.testing.assert_close(answer_logprob(uniform, data), torch.tensor([math.log(0.5)]))
    torch.testing.assert_close(prob_diff(uniform, data), torch.tensor([0.25]))


def test_accuracy_strict_and_several_wrong():
    data = PromptPairs.from_tokens([[0], [0], [0]], [[0], [0], [0]], answers=[0, 0, 0], wrong=[[1, 2]] * 3)
    logits = torch.tensor([[[3.0, 1.0, 2.0]], [[2.0, 1.0, 2.0]], [[1.0, 0.0, 5.0]]])
    # beats both | ties one (not strictly greater) | loses to one
    torch.testing.assert_close(accuracy(logits, data), torch.tensor([1.0, 0.0, 0.0]))


def test_kl_zero_for_identical_logits(toy):
    logits, data = toy
    metric = KLDivergence(logits)
    torch.testing.assert_close(metric(logits, data), torch.zeros(2))


def test_kl_hand_value():
    data = PromptPairs.from_tokens([[0]], [[0]], [0], [1])
    clean = torch.tensor([[0.5, 0.25, 0.25]]).log()[:, None, :]
    patched = torch.tensor([[0.25, 0.5, 0.25]]).log()[:, None, :]
    # KL(p || q) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2
    expected = torch.tensor([0.25 * math.log(2)])
    torch.testing.assert_close(KLDivergence(clean)(patched, data), expected)
    # clean logits already at answer_pos ([batch, d_vocab]) give the same value
    torch.testing.assert_close(KLDivergence(clean[:, 0])(patched, data), expected)
    # direction: KL(clean || patched), not KL(patched || clean). With q = (0.8, 0.1, 0.1):
    # KL(p || q) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1);  KL(q || p) = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25)
    q = torch.tensor([[0.8, 0.1, 0.1]]).log()[:, None, :]
    p_q = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.25 / 0.1)
    q_p = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.1 / 0.25)
    assert abs(p_q - q_p) > 0.01
    torch.testing.assert_close(KLDivergence(clean)(q, data), torch.tensor([p_q]))
    torch.testing.assert_close(KLDivergence(q)(clean, data), torch.tensor([q_p]))


def test_kl_reads_answer_pos_and_is_differentiable(toy):
    logits, data = toy
    other = logits.clone()
    other[0, 0] = torch.tensor([0.0, 50.0, 0.0])  # not an answer position: no effect
    torch.testing.assert_close(KLDivergence(logits)(other, data), torch.zeros(2))
    patched = torch.randn(2, 2, 3, requires_grad=True)
    KLDivergence(logits)(patched, data).sum().backward()
    assert patched.grad is not None and patched.grad[0, 0].abs().sum() == 0


def test_kl_prepare_and_errors(toy):
    logits, data = toy
    base = get_metric("kl_div")
    assert isinstance(base, KLDivergence) and not base.prepared
    assert base.needs_clean and not base.higher_is_better
    with pytest.raises(RuntimeError, match=r"not prepared .*prepare\(clean_logits\)"):
        base(logits, data)
    ready = base.prepare(logits)
    assert ready.prepared and not base.prepared  # prepare returns a new metric
    with pytest.raises(ValueError, match=r"clean_logits \(1, 2, 3\) do not match .*\(2, 2, 3\)"):
        KLDivergence(logits[:1])(logits, data)
    with pytest.raises(ValueError, match=r"clean_logits must be \[batch, pos, d_vocab\] or \[batch, d_vocab\]"):
        KLDivergence(torch.zeros(3))
    assert kl_div is KLDivergence


def test_prob_diff_years_hand_values():
    meta = {"year": torch.tensor([50, 10]), "year_tokens": torch.arange(99, -1, -1)}  # token id v is year 99 - v
    data = PromptPairs.from_tokens([[0], [0]], [[0], [0]], [0, 0], [1, 1], meta=meta, per_prompt_keys=["year"])
    logits = torch.zeros(2, 1, 100)
    # prompt 0, uniform: 49 years above 50 (51..99), 51 at or below -> 0.49 - 0.51
    # prompt 1: all mass on token id 89 = year 10 (not > 10) -> -1
    logits[1, 0, 89] = 100.0
    torch.testing.assert_close(prob_diff_years(logits, data), torch.tensor([-0.02, -1.0]))
    logits[1, 0, 89], logits[1, 0, 88] = 0.0, 100.0  # year 11 > 10 -> +1
    torch.testing.assert_close(prob_diff_years(logits, data)[1], torch.tensor(1.0))


def test_prob_diff_years_needs_meta(toy):
    logits, data = toy
    with pytest.raises(ValueError, match=r"needs data.meta\['year'\].*greater_than"):
        prob_diff_years(logits, data)


def test_logits_shape_errors(toy):
    logits, data = toy
    with pytest.raises(ValueError, match=r"logits of shape \[batch, pos, d_vocab\], got \(2, 3\)"):
        logit_diff(logits[:, 0], data)
    with pytest.raises(ValueError, match="logits have batch 1 but the data has 2 prompts"):
        logit_diff(logits[:1], data)
    with pytest.raises(ValueError, match="token id 2 is outside the logits' vocabulary of 2"):
        logit_diff(logits[..., :2], data)


def test_registry_attributes_and_get_metric():
    assert set(METRICS) >= {"logit_diff", "answer_prob", "answer_logprob", "prob_diff", "kl_div", "accuracy",
                            "prob_diff_years"}
    for name in METRICS:
        m = get_metric(name)
        assert isinstance(m.higher_is_better, bool) and isinstance(m.needs_clean, bool)
        assert m.needs_clean == (name == "kl_div")
    assert get_metric("logit_diff") is logit_diff
    fn = lambda logits, data: logits[:, -1, 0]  # noqa: E731
    checked = get_metric(fn)
    logits = torch.randn(3, 4, 5)
    assert torch.equal(checked(logits, None), fn(logits, None)) and get_metric(checked) is checked


def test_metrics_you_write_must_give_one_value_per_prompt():
    """A metric that reduces over the batch itself, or returns another shape, gets a clear error where it
    is called (a sweep would otherwise give every prompt the batch's value); the metric's attributes and
    prepare() pass through, and what prepare() returns is checked too."""
    logits = torch.randn(3, 4, 5)
    for bad, shape in ((lambda lg, d: lg[:, -1, 0].mean(), "a tensor of shape []"),
                       (lambda lg, d: lg[:, -1, :1], "a tensor of shape [3, 1]"),
                       (lambda lg, d: 1.0, "a float")):
        with pytest.raises(ValueError, match=re.escape(f"returned {shape}; expected one value per prompt, shape [3]")):
            get_metric(bad)(logits, None)

    class Distance:  # a KL-like metric of your own: compares with the clean run
        higher_is_better, needs_clean = False, True

        def __init__(self, clean=None):
            self.clean = clean

        def prepare(self, clean):
            return Distance(clean)

        def __call__(self, lg, d):
            return (lg[:, -1] - self.clean[:, -1]).norm(dim=-1).sum() if d == "sum" else \
                (lg[:, -1] - self.clean[:, -1]).norm(dim=-1)

    m = get_metric(Distance)  # a class: instantiated
    assert m.__name__ == "Distance" and _resolve_metric(Distance())[1] == "Distance"
    assert m.higher_is_better is False and m.needs_clean is True and m.clean is None
    ready = m.prepare(logits)
    assert ready.clean is logits and torch.equal(ready(logits, None), torch.zeros(3))
    with pytest.raises(ValueError, match="The metric Distance returned a tensor of shape"):
        ready(logits, "sum")


def test_get_metric_unknown_name_suggests():
    with pytest.raises(ValueError, match=r"Unknown metric 'logit_dif'\. Did you mean 'logit_diff'.*Known metrics: "
                                         r"accuracy, answer_logprob"):
        get_metric("logit_dif")
    with pytest.raises(ValueError, match=r"Unknown metric 'zzz'\. Known metrics"):
        get_metric("zzz")
    with pytest.raises(TypeError, match="metric must be a name or a callable"):
        get_metric(3)


def test_normalized_faithfulness_floats_and_tensors():
    assert normalized_faithfulness(1.5, 2.0, 0.5) == pytest.approx(2 / 3)
    assert normalized_faithfulness(2.0, 2.0, 0.5) == 1.0
    assert normalized_faithfulness(0.5, 2.0, 0.5) == 0.0
    out = normalized_faithfulness(torch.tensor([1.0, 4.0]), 3.0, torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))


def test_normalized_faithfulness_nan_and_single_warning():
    with pytest.warns(RuntimeWarning, match="clean == ablated"):
        assert math.isnan(normalized_faithfulness(1.0, 2.0, 2.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = normalized_faithfulness(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0]),
                                      torch.tensor([0.0, 2.0, 2.0]))
    assert len(caught) == 1 and "2 of 3 entries" in str(caught[0].message)
    assert out[0] == 0.5 and out[1:].isnan().all()


def test_metrics_on_a_real_model_forward():
    from edgepatch.models import random_model
    from edgepatch.tasks import induction

    model = random_model("tiny", seed=0)
    data = induction(model.cfg.d_vocab, n=4, seq_len=5, seed=0).validate(model)
    with torch.no_grad():
        clean = model(data.clean)
        corrupt = model(data.corrupt)
    for name in METRICS:
        metric = get_metric(name)
        if name == "prob_diff_years":
            continue
        if metric.needs_clean:
            metric = metric.prepare(clean)
        assert metric(corrupt, data).shape == (4,)
    torch.testing.assert_close(get_metric("kl_div").prepare(clean)(clean, data), torch.zeros(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_final_logits_equal_the_model_output(case):
    """final_logits skips HookedTransformer's per-forward copy of W_U and unembeds only the answer positions
    (a HookedTransformer by itself, a TransformerBridge through its own unembedding, given those positions
    only); the logits must not change, with or without gradients, with circuits folded into the batch (rows
    repeat the prompts), and no hook may stay behind. run_without_logits unembeds nothing."""
    from edgepatch.metrics import final_logits, run_without_logits

    model = cached_model(*case)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 5), generator=torch.Generator().manual_seed(0))
    ap = torch.tensor([4, 2, 0])
    with torch.no_grad():
        model(tokens)  # (TransformerBridge wires its own capture hooks on its first forward)
    before = model_snapshot(model)
    unembedded: list[tuple[int, ...]] = []  # what the model's unembedding module computed on (after pre-hooks)
    watch = model.unembed.register_forward_hook(lambda module, args, out: unembedded.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            b_U = getattr(getattr(model, "unembed", None), "b_U", None)
            saved = b_U.clone() if isinstance(b_U, torch.Tensor) else None
            try:
                if saved is not None:  # random models have a zero unembedding bias: make it count
                    b_U.add_(torch.randn(b_U.shape, generator=torch.Generator().manual_seed(1)))
                want = model(tokens)
                got = final_logits(model, tokens)
                unembedded.clear()
                at = final_logits(model, tokens, ap)
                folded = final_logits(model, tokens.repeat(2, 1), ap)
                assert all(shape[1] == 1 for shape in unembedded), unembedded
                unembedded.clear()
                assert run_without_logits(model, tokens) is None
                assert all(shape[1] == 0 for shape in unembedded), unembedded
            finally:
                if saved is not None:
                    b_U.copy_(saved)
    finally:
        watch.remove()
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert at.shape == (3, 1, model.cfg.d_vocab)
    assert (at[:, 0] - want[torch.arange(3), ap]).abs().max() <= 1e-5
    assert folded.shape == (6, 1, model.cfg.d_vocab)
    assert (folded[:, 0] - want[torch.arange(3), ap].repeat(2, 1)).abs().max() <= 1e-5
    emb = model.embed.W_E if hasattr(model, "embed") and hasattr(model.embed, "W_E") else None
    if emb is not None and emb.requires_grad:  # the gradient flows through the answer-only unembedding
        weights = torch.randn(3, model.cfg.d_vocab, generator=torch.Generator().manual_seed(2))
        model.zero_grad(set_to_none=True)  # (the model is shared: an earlier test may have left gradients)
        (model(tokens)[torch.arange(3), ap] * weights).sum().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
        expected = emb.grad.clone()
        model.zero_grad(set_to_none=True)
        (final_logits(model, tokens, ap)[:, 0] * weights).sum().backward()
        assert (emb.grad - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
        model.zero_grad(set_to_none=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("algorithm", ["acdc", "exact", "learn"])
def test_search_algorithms_unembed_only_the_answer_positions(cls, algorithm):
    """ACDC, exact patching and learned masks run many forwards of folded circuits; with a built-in metric,
    which reads the answer position only, no forward unembeds any other position (GPT-2's logits for ACDC's
    16 circuits x 64 prompts x 16 tokens would be 3.3 GB). A callable metric may read any position: it gets
    the full logits. (That the results do not change is checked against plain references in test_acdc,
    test_attribution and test_learned.)"""
    import edgepatch as ep
    from edgepatch.tasks import induction

    model = cached_model("tiny", cls)
    graph = ep.build_graph(model)
    data = induction(int(model.cfg.d_vocab), n=4, seq_len=4, seed=0)
    positions: list[int] = []  # the positions per row of every logits tensor the model computed
    watch = model.unembed.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))

    def run(metric):
        positions.clear()
        if algorithm == "acdc":
            ep.acdc(model, graph, data, metric, threshold=1e9, progress=False)  # (removes every edge tested)
        elif algorithm == "exact":
            edges = torch.zeros(graph.n_src, graph.n_dest, dtype=torch.bool)
            edges[0, :5] = True
            ep.attribution.exact_patching(model, graph, data, metric, edges=edges & graph.valid, progress=False)
        else:
            ep.learn_masks(model, graph, data, metric, epochs=2, progress=False)
        return list(positions)

    try:
        built_in = run("logit_diff" if algorithm != "learn" else "kl")
        callable_metric = run(lambda logits, d: logits[torch.arange(len(d)), d.answer_pos, d.answers[:, 0]])
    finally:
        watch.remove()
    # 0 positions: the ablation's run (no logits at all); a HookedTransformer's lean logits (see final_logits)
    # bypass its unembedding module, so only the bridge's must show up here
    assert all(p <= 1 for p in built_in) and (1 in built_in or cls == "hooked"), built_in
    seq = data.clean.shape[1]
    assert all(p in (0, seq) for p in callable_metric), callable_metric
    assert seq in callable_metric or (cls, algorithm) == ("hooked", "exact"), callable_metric
