"""Plotly figures: faithfulness curves, circuits drawn on the model's layout, ROC curves.

Context
-------
Three pictures cover most circuit-discovery reports:

- :func:`plot_faithfulness`: normalized faithfulness (or the raw metric) of each method's top-k circuits
  against the number of edges, on a log axis, with the random-edge baseline as a shaded band;
- :func:`plot_circuit`: the circuit on the model's layout, layers left to right (``input`` at the far left,
  ``logits`` at the far right), heads stacked by index with the MLP below them; an edge is blue when its
  score is positive and red when negative, as wide as its ``|score|``; hovering shows edge names and scores;
- :func:`plot_roc`: ROC curves of several rankings against a known circuit.

plotly is imported inside the functions, and no global plotly setting (templates, renderers) is changed:
figures get their style from their own layout. :func:`save_figure` writes standalone HTML (plotly.js
embedded, so it opens offline) or PNG (needs the optional ``kaleido`` package and a Chrome it can drive;
without them it warns and returns False).

Example
-------
>>> import torch
>>> from edgepatch.sweep import SweepResult
>>> r = SweepResult([1, 10], [1, 10], torch.tensor([[0.5], [1.0]]), torch.tensor([1.0]), torch.tensor([0.0]),
...                 torch.tensor([[0.0, 0.5]]), n_edges=10, method="EAP")
>>> fig = plot_faithfulness({"EAP": r})
>>> [t.name for t in fig.data]
['random baseline', 'EAP']
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import Tensor

from edgepatch.errors import EdgepatchError, suggest
from edgepatch.graph import Graph
from edgepatch.scores import EdgeScores, require_edge_scores

__all__ = ["plot_faithfulness", "plot_circuit", "plot_roc", "save_figure"]

POSITIVE = "#1f77b4"  # blue
NEGATIVE = "#d62728"  # red
NEUTRAL = "#7f7f7f"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


MAX_LINE_TRACES = 400  # plot_circuit: above this many lines, one trace per colour and width level
_WIDTH_LEVELS = 8


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - plotly is a dependency
        raise ImportError("edgepatch.plots needs plotly: pip install plotly") from None
    return go


def _as_named(results: Any, what: str) -> dict[str, Any]:
    if isinstance(results, Mapping):
        if not results:
            raise EdgepatchError(f"{what}: got an empty dict; give {{'method name': value, ...}}.")
        return {str(k): v for k, v in results.items()}
    name = getattr(results, "method", None) or "result"
    return {str(name): results}


# ------------------------------------------------------------------------------------------------------
# Faithfulness curves
# ------------------------------------------------------------------------------------------------------
def plot_faithfulness(
    results: Mapping[str, Any] | Any,
    normalized: bool = True,
    log_x: bool = True,
    show_baseline: bool = True,
    title: str | None = None,
) -> Any:
    """Faithfulness curves: one line per method (named by the dict key), x = edges in the circuit; a result
    of one circuit size (a single circuit) is one star.

    ``normalized``: normalized faithfulness (else the raw mean metric). ``log_x``: log x axis (circuits of 0
    edges are left out, a log axis cannot show them). ``show_baseline``: the random-circuit band (min to max
    over the draws) of every result swept with ``random_baseline > 0``, a filled trace named
    ``"random baseline"`` (``"random baseline (NAME)"`` when several results have one).

    >>> import torch
    >>> from edgepatch.sweep import SweepResult
    >>> r = SweepResult([0, 5], [0, 5], torch.tensor([[0.0], [1.0]]), torch.tensor([1.0]), torch.tensor([0.0]),
    ...                 torch.zeros(0, 2), n_edges=5)
    >>> fig = plot_faithfulness({"A": r, "B": r}, log_x=False)
    >>> [(t.name, list(t.x)) for t in fig.data]
    [('A', [0, 5]), ('B', [0, 5])]
    """
    from edgepatch.sweep import SweepResult

    go = _go()
    named = _as_named(results, "plot_faithfulness")
    for name, r in named.items():
        if not isinstance(r, SweepResult):
            raise EdgepatchError(
                f"plot_faithfulness: {name!r} is a {type(r).__name__}, not a SweepResult (from ep.sweep(...))."
            )
    fig = go.Figure()
    with_baseline = [n for n, r in named.items() if r.random_values.shape[0] > 0] if show_baseline else []
    for i, name in enumerate(with_baseline):
        r = named[name]
        rnd = (r.random_normalized if normalized else r.random_values).double()
        xs, lo, hi = _sorted_points(r.effective_counts, rnd.min(0).values.tolist(), log_x, rnd.max(0).values.tolist())
        label = "random baseline" if len(with_baseline) == 1 else f"random baseline ({name})"
        fig.add_trace(go.Scatter(
            x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", mode="lines", line=dict(width=0),
            fillcolor="rgba(127,127,127,0.25)", name=label, hoverinfo="skip", legendgroup=label,
        ))
    for i, (name, r) in enumerate(named.items()):
        y = (r.normalized if normalized else r.mean).tolist()
        xs, ys = _sorted_points(r.effective_counts, y, log_x)
        single = len(xs) == 1  # one circuit (e.g. read from a file): a point, drawn large enough to see
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers" if single else "lines+markers", name=name,
            line=dict(color=_PALETTE[i % len(_PALETTE)]),
            marker=dict(symbol="star", size=14) if single else None,
            hovertemplate=f"{name}<br>%{{x:,}} edges<br>{'faithfulness' if normalized else r.metric} %{{y:.3f}}"
                          "<extra></extra>",
        ))
    first = next(iter(named.values()))
    ylabel = "normalized faithfulness" if normalized else first.metric
    layout: dict[str, Any] = dict(
        title=title or f"Faithfulness ({first.direction}, {first.ablation} ablation)",
        xaxis=dict(title="edges in circuit", type="log" if log_x else "linear"),
        yaxis=dict(title=ylabel), template="plotly_white", hovermode="closest",
    )
    fig.update_layout(**layout)
    if normalized:
        for level in (0.0, 1.0):
            fig.add_hline(y=level, line=dict(color=NEUTRAL, width=1, dash="dot"))
    return fig


def _sorted_points(counts: list[int], y: list[float], log_x: bool, y2: list[float] | None = None) -> Any:
    pts = sorted({k: i for i, k in enumerate(counts)}.items())
    pts = [(k, i) for k, i in pts if not (log_x and k <= 0)]
    xs = [k for k, _ in pts]
    ys = [y[i] for _, i in pts]
    if y2 is None:
        return xs, ys
    return xs, ys, [y2[i] for _, i in pts]


# ------------------------------------------------------------------------------------------------------
# Circuit layout
# ------------------------------------------------------------------------------------------------------
_HEAD = re.compile(r"a(\d+)\.h(\d+)")
_KV = re.compile(r"a(\d+)\.kv(\d+)")


def _node_xy(name: str, graph: Graph) -> tuple[float, float]:
    spec = graph.spec
    mid = (spec.n_heads - 1) / 2
    if name == "input":
        return -1.0, mid
    if name == "logits":
        return float(spec.n_layers), mid
    m = _HEAD.fullmatch(name)
    if m:
        return float(m.group(1)), float(m.group(2))
    m = re.fullmatch(r"m(\d+)", name)
    if m:
        return float(m.group(1)) + 0.5, float(spec.n_heads)
    raise EdgepatchError(f"plot_circuit: cannot place node {name!r}.")


def _dest_nodes(dest: str, graph: Graph) -> list[str]:
    """The node(s) a destination belongs to: q/k/v collapse onto their head; a grouped key/value destination
    belongs to every query head of its group."""
    base = dest.split("<")[0]
    m = _KV.fullmatch(base)
    if m:
        group = graph.spec.n_heads // graph.spec.n_kv_heads
        g = int(m.group(2))
        return [f"a{m.group(1)}.h{h}" for h in range(g * group, (g + 1) * group)]
    return [base]


def plot_circuit(
    scores_or_mask: EdgeScores | Tensor,
    graph: Graph | None = None,
    k: int | None = None,
    by: str = "abs",
    title: str | None = None,
    max_width: float = 8.0,
    min_width: float = 0.5,
) -> Any:
    """Draw a circuit on the model's layout (see the module docstring).

    ``scores_or_mask``: ``EdgeScores`` (draws the top ``k`` edges by ``by``; with ``k=None`` its
    ``circuit_mask`` if it has one, else the top 50) or a ``[n_src, n_dest]`` mask / weight tensor with
    ``graph=`` (draws its nonzero edges; a float tensor also gives colours and widths). Edges into the q, k
    and v inputs of one head are drawn as one line to the head (colour and width of the strongest; the hover
    lists all). Nodes: every head and MLP as a faint marker, the circuit's nodes highlighted.

    Traces: one line per drawn (source node, destination node) pair, named ``"src->dest"``; ``"edge info"``
    (hover markers at the middle of each line); ``"nodes"``; ``"circuit nodes"``. Above
    ``MAX_LINE_TRACES`` (400) lines, which a browser draws slowly one trace each, the lines are grouped into
    one trace per colour and width level (8 levels of ``|score|``; named e.g. ``"positive edges, width 4.2"``);
    hovering works the same.

    >>> import torch
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> fig = plot_circuit(g.mask_from_edges(["input->a0.h1<q>", "input->a0.h1<k>", "a0.h1->m1"]), graph=g)
    >>> sorted(t.name for t in fig.data if t.mode == "lines")
    ['a0.h1->m1', 'input->a0.h1']
    """
    go = _go()
    if isinstance(scores_or_mask, EdgeScores):
        require_edge_scores(scores_or_mask, "plot_circuit")
        graph = scores_or_mask.graph
        values = scores_or_mask.scores
        if k is None and scores_or_mask.circuit_mask is not None:
            mask = scores_or_mask.circuit_mask.bool() & graph.valid
        else:
            mask = scores_or_mask.circuit(min(50, graph.n_edges) if k is None else k, by=by)  # type: ignore[arg-type]
        signed = True
    elif isinstance(scores_or_mask, Tensor):
        if graph is None:
            raise EdgepatchError("plot_circuit(mask) needs the graph: plot_circuit(mask, graph=graph).")
        graph.check_shape(scores_or_mask, "mask")
        t = scores_or_mask.detach().cpu()
        signed = t.is_floating_point() and not bool(((t == 0) | (t == 1)).all())
        values = t.float()
        mask = (t != 0) & graph.valid
        if k is not None:
            mask = EdgeScores(values, graph).circuit(k, by=by) & mask
    else:
        raise EdgepatchError(
            f"plot_circuit needs EdgeScores or a [n_src, n_dest] mask tensor (with graph=); got {type(scores_or_mask).__name__}."
        )
    if graph.level == "node":
        mask = graph.expand(mask)
        values = graph.expand(values)
        graph = graph.engine_graph

    # collapse destinations onto nodes
    lines: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for s, d in mask.nonzero().tolist():
        src, dest = graph.src_names[s], graph.dest_names[d]
        v = float(values[s, d])
        for node in _dest_nodes(dest, graph):
            lines.setdefault((src, node), []).append((f"{src}->{dest}", v))
    vmax = max((abs(v) for es in lines.values() for _, v in es if not math.isnan(v)), default=0.0) or 1.0

    fig = go.Figure()
    mid_x, mid_y, mid_text = [], [], []
    grouped = len(lines) > MAX_LINE_TRACES
    groups: dict[tuple[str, int], tuple[list[float | None], list[float | None]]] = {}
    for (src, node), es in lines.items():
        strongest = max((v for _, v in es), key=lambda v: -1 if math.isnan(v) else abs(v))
        color = (POSITIVE if strongest >= 0 else NEGATIVE) if signed else POSITIVE
        strength = abs(strongest) / vmax if signed and not math.isnan(strongest) else 0.5
        (x0, y0), (x1, y1) = _node_xy(src, graph), _node_xy(node, graph)
        if grouped:  # one trace per colour and width level: thousands of traces stall the browser
            xs, ys = groups.setdefault((color, min(int(strength * _WIDTH_LEVELS), _WIDTH_LEVELS - 1)), ([], []))
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        else:
            width = min_width + (max_width - min_width) * strength
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", name=f"{src}->{node}",
                                     line=dict(color=color, width=width), opacity=0.7, hoverinfo="skip",
                                     showlegend=False))
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_text.append("<br>".join(f"{n}: {v:.4g}" if signed else n for n, v in es))
    for (color, level), (xs, ys) in sorted(groups.items()):
        width = min_width + (max_width - min_width) * (level + 0.5) / _WIDTH_LEVELS
        kind = ("negative edges" if color == NEGATIVE else "positive edges") if signed else "edges"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{kind}, width {width:.2g}",
                                 line=dict(color=color, width=width), opacity=0.7, hoverinfo="skip",
                                 showlegend=False))
    fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", name="edge info", text=mid_text,
                             hovertemplate="%{text}<extra></extra>", marker=dict(size=6, opacity=0.0),
                             showlegend=False))

    all_nodes = ["input"] + list(graph.src_names[1:]) + ["logits"]
    used = {n for pair in lines for n in pair}
    for trace_name, names, style in (
        ("nodes", all_nodes, dict(size=7, color="#d9d9d9")),
        ("circuit nodes", [n for n in all_nodes if n in used], dict(size=12, color="#404040")),
    ):
        xy = [_node_xy(n, graph) for n in names]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text" if trace_name == "circuit nodes" else "markers",
            text=names if trace_name == "circuit nodes" else None, textposition="top center", name=trace_name,
            hovertext=names, hoverinfo="text", marker=style, showlegend=False,
        ))
    spec = graph.spec
    n_kept = int(mask.sum())
    fig.update_layout(
        title=title or f"Circuit: {n_kept:,} of {graph.n_edges:,} edges ({spec.name})",
        xaxis=dict(title="layer", tickmode="array", tickvals=[-1, *range(spec.n_layers), spec.n_layers],
                   ticktext=["input", *map(str, range(spec.n_layers)), "logits"], zeroline=False, showgrid=False),
        yaxis=dict(title="head (MLP below)", autorange="reversed", zeroline=False, showgrid=False,
                   tickmode="array", tickvals=[*range(spec.n_heads)] + ([] if spec.attn_only else [spec.n_heads]),
                   ticktext=[f"h{h}" for h in range(spec.n_heads)] + ([] if spec.attn_only else ["MLP"])),
        template="plotly_white", hovermode="closest", showlegend=False,
    )
    return fig


# ------------------------------------------------------------------------------------------------------
# ROC
# ------------------------------------------------------------------------------------------------------
def plot_roc(
    scores: Mapping[str, EdgeScores] | EdgeScores,
    true_edges: Tensor | Iterable[str],
    by: str = "abs",
    title: str | None = None,
) -> Any:
    """ROC curves of several rankings against the true circuit ``true_edges`` (bool mask or edge names).
    One trace per method, named ``"NAME (AUC 0.873)"``, plus a dashed ``"chance"`` diagonal.

    >>> import torch
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> truth = g.mask_from_edges(["a0.h1->m1"])
    >>> fig = plot_roc({"perfect": EdgeScores(truth.float(), g)}, truth)
    >>> [t.name for t in fig.data]
    ['perfect (AUC 1.000)', 'chance']
    """
    try:
        from edgepatch.evaluation import roc
    except ImportError:  # pragma: no cover - evaluation ships with edgepatch
        raise ImportError("plot_roc needs edgepatch.evaluation.roc") from None
    go = _go()
    named = _as_named(scores, "plot_roc")
    fig = go.Figure()
    for i, (name, s) in enumerate(named.items()):
        if not isinstance(s, EdgeScores):
            raise EdgepatchError(f"plot_roc: {name!r} is a {type(s).__name__}, not EdgeScores.")
        fpr, tpr, auc = roc(s, true_edges, by=by)
        fig.add_trace(go.Scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines", name=f"{name} (AUC {auc:.3f})",
                                 line=dict(color=_PALETTE[i % len(_PALETTE)], shape="linear"),
                                 hovertemplate=f"{name}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(color=NEUTRAL, dash="dash", width=1), hoverinfo="skip"))
    fig.update_layout(title=title or "ROC against the true circuit", template="plotly_white",
                      xaxis=dict(title="false positive rate", range=[0, 1]),
                      yaxis=dict(title="true positive rate", range=[0, 1.02]))
    return fig


# ------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------
def save_figure(fig: Any, path: str | Path) -> bool:
    """Save a figure as standalone ``.html`` (plotly.js embedded: opens offline, no CDN) or ``.png``
    (needs ``kaleido`` and a Chrome it can drive; otherwise warns and returns False). Returns True when
    the file was written.

    >>> import tempfile, os
    >>> import plotly.graph_objects as go
    >>> p = os.path.join(tempfile.mkdtemp(), "fig.html")
    >>> save_figure(go.Figure(), p), os.path.exists(p)
    (True, True)
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".html", ".png"):
        raise EdgepatchError(
            f"save_figure: unsupported file type {p.suffix or '(none)'!r} for {str(p)!r}.{suggest(suffix, ['.html', '.png'])} "
            f"Use .html (interactive, offline) or .png (needs kaleido)."
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        fig.write_html(str(p), include_plotlyjs=True, full_html=True)
        return True
    try:
        import kaleido  # noqa: F401
    except ImportError:
        warnings.warn(f"save_figure: PNG export needs the kaleido package (pip install kaleido); {str(p)!r} was not "
                      f"written. Save as .html instead.", RuntimeWarning, stacklevel=2)
        return False
    try:
        fig.write_image(str(p))
    except Exception as err:  # kaleido present but no usable browser, etc.
        warnings.warn(f"save_figure: PNG export failed ({type(err).__name__}: {err}); {str(p)!r} was not written. "
                      f"Save as .html instead.", RuntimeWarning, stacklevel=2)
        return False
    return True
