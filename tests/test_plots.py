"""Figures (trace names and counts), offline HTML export, and ROC curves with ties."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import cached_model
from edgepatch.errors import EdgepatchError
from edgepatch.evaluation import roc
from edgepatch.graph import build_graph
from edgepatch.scores import EdgeScores
from edgepatch.sweep import SweepResult


def result(counts, f, draws=0, n_edges=100, method="m"):
    gen = torch.Generator().manual_seed(0)
    return SweepResult(list(counts), list(counts), torch.tensor(f, dtype=torch.float64)[:, None],
                       torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                       torch.rand(draws, len(counts), generator=gen, dtype=torch.float64), n_edges=n_edges, method=method)


def graph_of(preset="tiny", split=True, level="edge"):
    return build_graph(cached_model(preset, "hooked"), split_qkv=split, level=level)


# ------------------------------------------------------------------------------------------------------
# Faithfulness curves
# ------------------------------------------------------------------------------------------------------
def test_plot_faithfulness_traces():
    from edgepatch.plots import plot_faithfulness

    a = result([0, 1, 10, 100], [0.0, 0.2, 0.7, 1.0], draws=3)
    b = result([1, 10, 100], [0.1, 0.5, 1.0])
    fig = plot_faithfulness({"EAP": a, "EAP-IG": b})
    assert [t.name for t in fig.data] == ["random baseline", "EAP", "EAP-IG"]
    band, eap, ig = fig.data
    assert band.fill == "toself"
    assert list(eap.x) == [1, 10, 100]  # count 0 is left out on a log axis
    assert list(eap.y) == pytest.approx([0.2, 0.7, 1.0])
    assert list(band.x) == [1, 10, 100, 100, 10, 1]
    rnd = a.random_normalized
    assert list(band.y) == pytest.approx(rnd.max(0).values[1:].tolist() + rnd.min(0).values[1:].flip(0).tolist())
    assert fig.layout.xaxis.type == "log"
    lin = plot_faithfulness({"EAP": a}, log_x=False, show_baseline=False, normalized=False)
    assert [t.name for t in lin.data] == ["EAP"] and list(lin.data[0].x) == [0, 1, 10, 100]
    assert lin.layout.xaxis.type == "linear"


def test_plot_faithfulness_one_band_per_result_when_several():
    from edgepatch.plots import plot_faithfulness

    fig = plot_faithfulness({"A": result([1, 10], [0, 1], draws=2), "B": result([1, 10], [0, 1], draws=2)})
    assert [t.name for t in fig.data] == ["random baseline (A)", "random baseline (B)", "A", "B"]
    single = plot_faithfulness(result([1, 10], [0, 1], method="EAP"))  # a bare result is named by its method
    assert [t.name for t in single.data] == ["EAP"]


def test_plot_faithfulness_rejects_other_objects():
    from edgepatch.plots import plot_faithfulness

    with pytest.raises(EdgepatchError, match="'x' is a list, not a SweepResult"):
        plot_faithfulness({"x": [1, 2]})


# ------------------------------------------------------------------------------------------------------
# Circuit plots
# ------------------------------------------------------------------------------------------------------
def line_traces(fig):
    return {t.name: t for t in fig.data if t.mode == "lines"}


def test_plot_circuit_collapses_qkv_and_colours_by_sign():
    from edgepatch.plots import NEGATIVE, POSITIVE, plot_circuit

    graph = graph_of()
    scores = torch.zeros(graph.n_src, graph.n_dest)
    for name, v in [("input->a0.h1<q>", 0.5), ("input->a0.h1<v>", -2.0), ("a0.h1->m1", 1.0), ("m0->logits", 0.25)]:
        s, d = graph.edge(name)
        scores[s, d] = v
    fig = plot_circuit(EdgeScores(scores, graph), k=4)
    lines = line_traces(fig)
    assert sorted(lines) == ["a0.h1->m1", "input->a0.h1", "m0->logits"]
    assert lines["input->a0.h1"].line.color == NEGATIVE  # the strongest of q (+0.5) and v (-2.0)
    assert lines["a0.h1->m1"].line.color == POSITIVE
    assert lines["input->a0.h1"].line.width > lines["a0.h1->m1"].line.width > lines["m0->logits"].line.width
    info = next(t for t in fig.data if t.name == "edge info")
    assert len(info.x) == 3
    assert any("input->a0.h1<q>: 0.5" in t and "input->a0.h1<v>: -2" in t for t in info.text)
    nodes = next(t for t in fig.data if t.name == "circuit nodes")
    assert set(nodes.text) == {"input", "a0.h1", "m0", "m1", "logits"}
    xy = dict(zip(nodes.text, zip(nodes.x, nodes.y)))
    assert xy["input"][0] == -1 and xy["logits"][0] == 2  # input far left, logits far right
    assert xy["a0.h1"] == (0, 1) and xy["m1"][1] == 4  # heads by index, MLP below them


def test_plot_circuit_mask_gqa_and_defaults():
    from edgepatch.plots import plot_circuit

    graph = graph_of("tiny-gqa")  # kv1 is shared by query heads 3, 4, 5
    fig = plot_circuit(graph.mask_from_edges(["input->a0.kv1<k>", "a0.h0->a1.h2<q>"]), graph=graph)
    assert sorted(line_traces(fig)) == ["a0.h0->a1.h2", "input->a0.h3", "input->a0.h4", "input->a0.h5"]
    s = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph)
    assert len(line_traces(plot_circuit(s, k=1))) >= 1
    assert "50 of" in plot_circuit(s).layout.title.text  # default: the top 50
    s.circuit_mask = graph.mask_from_edges(["a0.h0->a1.h2<q>"])
    assert sorted(line_traces(plot_circuit(s))) == ["a0.h0->a1.h2"]  # a method's own circuit
    with pytest.raises(EdgepatchError, match="needs the graph"):
        plot_circuit(graph.valid)


def test_plot_circuit_groups_many_lines_into_few_traces(monkeypatch):
    from edgepatch import plots

    graph = graph_of()
    s = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=torch.Generator().manual_seed(0)), graph)
    single = plots.plot_circuit(s, k=60)  # one trace per line (below the limit)
    want = {}
    for t in line_traces(single).values():
        want[(t.x[0], t.y[0], t.x[1], t.y[1])] = (t.line.color, t.line.width)
    assert len(want) > 20
    monkeypatch.setattr(plots, "MAX_LINE_TRACES", 20)
    grouped = plots.plot_circuit(s, k=60)
    traces = list(line_traces(grouped).values())
    assert len(traces) <= 2 * plots._WIDTH_LEVELS
    got = {}
    for t in traces:
        assert len(t.x) % 3 == 0 and t.x[2::3] == (None,) * (len(t.x) // 3)
        for i in range(0, len(t.x), 3):
            got[(t.x[i], t.y[i], t.x[i + 1], t.y[i + 1])] = (t.line.color, t.line.width)
    assert got.keys() == want.keys()  # every line drawn once, in its own colour
    assert all(got[k][0] == want[k][0] for k in want)
    for a in want:  # widths keep their order, up to one level
        for b in want:
            if want[a][1] > want[b][1] + (8.0 - 0.5) / plots._WIDTH_LEVELS:
                assert got[a][1] > got[b][1]
    info = next(t for t in grouped.data if t.name == "edge info")
    assert sorted(info.text) == sorted(next(t for t in single.data if t.name == "edge info").text)


def test_plot_circuit_node_level_and_joint():
    from edgepatch.plots import plot_circuit

    node = graph_of(level="node")
    s = EdgeScores(torch.randn(node.n_src, 1), node)
    fig = plot_circuit(s, k=2)
    assert len(line_traces(fig)) > 0
    joint = graph_of(split=False)
    fig = plot_circuit(joint.mask_from_edges(["a0.h1->a1.h0"]), graph=joint)
    assert sorted(line_traces(fig)) == ["a0.h1->a1.h0"]


# ------------------------------------------------------------------------------------------------------
# ROC
# ------------------------------------------------------------------------------------------------------
def test_roc_hand_values_with_ties():
    graph = graph_of()
    names = graph.edge_names
    flat = torch.zeros(graph.n_edges)
    truth = [names[0], names[1]]
    flat[0], flat[1], flat[2] = 3.0, 1.0, 1.0  # positives: best, and tied with one negative
    s = EdgeScores(graph.from_edges(flat), graph)
    fpr, tpr, auc = roc(s, truth)
    n_neg = graph.n_edges - 2
    # points: (0,0), (0,.5) after the best, (1/n_neg, 1) after the tie, (1, 1) after the rest (all tied at 0)
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert fpr.tolist() == pytest.approx([0.0, 0.0, 1 / n_neg, 1.0])
    # Mann-Whitney: pos 1 beats all; pos 2 beats n_neg - 1 and ties one (1/2)
    assert auc == pytest.approx((n_neg + (n_neg - 1) + 0.5) / (2 * n_neg))
    _, _, inverse = roc(EdgeScores(graph.from_edges(-flat), graph), truth, by="signed")
    assert inverse < 0.5
    mask_auc = roc(s, graph.mask_from_edges(truth))[2]
    assert mask_auc == auc


def test_roc_errors():
    graph = graph_of()
    s = EdgeScores(torch.randn(graph.n_src, graph.n_dest), graph)
    with pytest.raises(EdgepatchError, match="roc needs both circuit and non-circuit edges"):
        roc(s, [])
    with pytest.raises(EdgepatchError, match="true_edges has shape \\[3\\]"):
        roc(s, torch.ones(3, dtype=torch.bool))


def test_plot_roc_traces():
    from edgepatch.plots import plot_roc

    graph = graph_of()
    truth = graph.mask_from_edges(["a0.h1->m1", "input->a1.h0<k>"])
    fig = plot_roc({"perfect": EdgeScores(truth.float(), graph), "flat": EdgeScores(torch.zeros_like(truth.float()), graph)},
                   truth)
    assert [t.name for t in fig.data] == ["perfect (AUC 1.000)", "flat (AUC 0.500)", "chance"]


# ------------------------------------------------------------------------------------------------------
# Saving, and no global side effects
# ------------------------------------------------------------------------------------------------------
def test_save_html_is_offline(tmp_path):
    from edgepatch.plots import plot_faithfulness, save_figure

    fig = plot_faithfulness({"EAP": result([1, 10, 100], [0.1, 0.5, 1.0], draws=2)})
    path = tmp_path / "sub" / "faith.html"
    assert save_figure(fig, path) is True
    html = path.read_text()
    assert "random baseline" in html and "EAP" in html
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js is embedded, not loaded from a CDN
    assert len(html) > 1_000_000  # the embedded library


def test_save_png_without_kaleido_warns(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from edgepatch.plots import save_figure

    monkeypatch.setitem(sys.modules, "kaleido", None)
    with pytest.warns(RuntimeWarning, match="PNG export needs the kaleido package"):
        assert save_figure(go.Figure(), tmp_path / "f.png") is False
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(EdgepatchError, match="unsupported file type '.svgz'"):
        save_figure(go.Figure(), tmp_path / "f.svgz")


def test_plots_do_not_touch_global_plotly_settings():
    import plotly.io as pio

    before = (pio.templates.default, pio.renderers.default)
    import edgepatch.plots as plots

    plots.plot_faithfulness({"A": result([1, 10], [0.0, 1.0])})
    plots.plot_circuit(graph_of().mask_from_edges(["a0.h1->m1"]), graph=graph_of())
    assert (pio.templates.default, pio.renderers.default) == before
