"""ROC evaluation against a known circuit: hand-computed curves (with a tie), input forms, errors."""

from __future__ import annotations

import math

import pytest
import torch

from edgepatch.errors import EdgepatchError
from edgepatch.evaluation import RocCurve, circuit_recovery, plot_roc, roc
from edgepatch.graph import ModelSpec, graph_from_spec
from edgepatch.scores import EdgeScores


def tiny_graph():
    """One attention-only layer with one head: 2 sources, 5 edges (hand-checkable)."""
    spec = ModelSpec("hand", n_layers=1, n_heads=1, n_kv_heads=1, d_model=4, d_head=4, d_vocab=5,
                     parallel=False, attn_only=True)
    return graph_from_spec(spec)


EDGES = ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->logits", "a0.h0->logits"]
TRUE = ["input->a0.h0<q>", "input->a0.h0<v>", "a0.h0->logits"]  # P = 3 positives, N = 2 negatives


def scores_of(graph, values):
    flat = torch.tensor(values, dtype=torch.float32)
    return EdgeScores(graph.from_edges(flat, fill=float("nan")), graph, method="hand")


def test_graph_is_the_hand_example():
    assert list(tiny_graph().edge_names) == EDGES


def test_roc_by_abs_with_a_tie():
    g = tiny_graph()
    #            q (P)  k (N)  v (P)  in->logits (N)  h->logits (P)
    s = scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])
    curve = roc(s, TRUE)
    # |score| groups, best first: {.9: P}, {.5: N and P, a tie}, {.1: N}, {.05: P}
    # points: (0, 0) -> (0, 1/3) -> (1/2, 2/3) diagonally across the tie -> (1, 2/3) -> (1, 1)
    assert curve.fpr.tolist() == pytest.approx([0, 0, 1 / 2, 1, 1])
    assert curve.tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert curve.thresholds.tolist() == pytest.approx([math.inf, 0.9, 0.5, 0.1, 0.05])
    # trapezoids: 0 + (1/2)(1/3 + 2/3)/2 + (1/2)(2/3) + 0 = 1/4 + 1/3 = 7/12;
    # Mann-Whitney: q beats both negatives (2), v ties k (1/2) and beats in->logits (1), h->logits beats none
    assert curve.auc == pytest.approx(7 / 12)
    assert curve.by == "abs"


def test_roc_signed_and_neg():
    g = tiny_graph()
    s = scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])
    # signed order: q .9 (P), v .5 (P), in .1 (N), h .05 (P), k -.5 (N): pairs won 2 + 2 + 1 of 6
    assert roc(s, TRUE, by="signed").auc == pytest.approx(5 / 6)
    assert roc(s, TRUE, by="neg").auc == pytest.approx(1 / 6)


def test_roc_unscored_edges_rank_last_tied():
    g = tiny_graph()
    s = scores_of(g, [0.9, -0.5, 0.5, float("nan"), float("nan")])  # in->logits (N), h->logits (P) unscored
    curve = roc(s, TRUE)
    # {.9: P}, {.5: N, P}, {NaN: N, P}: (0,0) (0,1/3) (1/2,2/3) (1,1)
    assert curve.tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert curve.fpr.tolist() == pytest.approx([0, 0, 1 / 2, 1])
    assert curve.thresholds[-1].item() == -math.inf
    assert curve.auc == pytest.approx((1 / 2) * (1 / 3 + 2 / 3) / 2 + (1 / 2) * (2 / 3 + 1) / 2)


def test_roc_all_tied_is_the_diagonal():
    g = tiny_graph()
    curve = roc(scores_of(g, [1.0] * 5), TRUE)
    assert curve.fpr.tolist() == [0.0, 1.0] and curve.tpr.tolist() == [0.0, 1.0]
    assert curve.auc == 0.5


def test_roc_thresholds_count_the_edges_above_them():
    g = tiny_graph()
    values = [0.3, -0.7, 0.3, 0.2, -0.1]
    s = scores_of(g, values)
    curve = roc(s, TRUE)
    key = torch.tensor(values).abs()
    truth = torch.tensor([n in TRUE for n in EDGES])
    for thr, tpr, fpr in zip(curve.thresholds.tolist(), curve.tpr.tolist(), curve.fpr.tolist()):
        above = key >= thr
        assert tpr == pytest.approx(float((above & truth).sum()) / 3)
        assert fpr == pytest.approx(float((above & ~truth).sum()) / 2)


def test_true_edges_forms_agree():
    g = tiny_graph()
    s = scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])
    by_names = roc(s, TRUE).auc
    mask = g.mask_from_edges(TRUE)
    assert roc(s, mask).auc == by_names
    assert roc(s, g.to_edges(mask)).auc == by_names


def test_roc_curve_is_backward_compatible():
    g = tiny_graph()
    curve = roc(scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05]), TRUE)
    assert isinstance(curve, RocCurve)
    fpr, tpr, auc = curve  # the earlier (fpr, tpr, auc) tuple
    assert auc == curve.auc and curve[2] == curve.auc
    assert torch.equal(fpr, curve.fpr) and torch.equal(tpr, curve.tpr)
    assert repr(curve) == "RocCurve(auc=0.5833, 5 points, by='abs')"


def test_auto_ranks_importance_scores_signed():
    g = tiny_graph()
    s = scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])
    s.info["score_kind"] = "importance"
    assert roc(s, TRUE, by="auto").by == "signed"
    assert roc(s, TRUE, by="auto").auc == pytest.approx(5 / 6)
    s.info["score_kind"] = "ablation_effect"
    assert roc(s, TRUE, by="auto").by == "abs"


def test_roc_errors():
    g = tiny_graph()
    s = scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])
    with pytest.raises(EdgepatchError, match="by must be one of .*got 'absolute'"):
        roc(s, TRUE, by="absolute")
    with pytest.raises(EdgepatchError, match="wrap a tensor"):
        roc(s.scores, TRUE)
    with pytest.raises(EdgepatchError, match="true_edges marks 5 of 5 edges"):
        roc(s, EDGES)
    with pytest.raises(EdgepatchError, match="Unknown source 'a1.h0'"):
        roc(s, ["a1.h0->logits"])


def test_circuit_recovery():
    g = tiny_graph()
    found = g.mask_from_edges(["input->a0.h0<q>", "input->a0.h0<v>", "input->logits"])
    r = circuit_recovery(found, TRUE, g)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert not r["exact"]
    s = scores_of(g, [1.0] * 5)
    s.circuit_mask = g.mask_from_edges(TRUE)
    assert circuit_recovery(s, TRUE)["exact"]
    with pytest.raises(EdgepatchError, match="has no circuit_mask"):
        circuit_recovery(scores_of(g, [1.0] * 5), TRUE)


def test_plot_roc_delegates_to_plots():
    pytest.importorskip("plotly")
    g = tiny_graph()
    fig = plot_roc({"hand": scores_of(g, [0.9, -0.5, 0.5, 0.1, 0.05])}, TRUE)
    assert [t.name for t in fig.data] == ["hand (AUC 0.583)", "chance"]
    assert list(fig.data[0].x) == pytest.approx([0, 0, 0.5, 1, 1])
