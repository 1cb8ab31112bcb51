"""One-number summaries of faithfulness curves: areas under the curve, and MIB's CPR and CMD.

Context
-------
A sweep (:func:`edgepatch.sweep`) gives the normalized faithfulness ``f(x)`` of the top-k circuits at edge
fractions ``x = k / n_edges``. Summaries integrate it with the trapezoid rule:

- :func:`area_under_curve`: ``∫ f dx`` over the swept fractions, divided by the x range (so it is the
  curve's mean height: 1 for a ranking whose every circuit is as good as the model). ``log_x=True``
  integrates over ``ln x`` instead, which weights small circuits as much as large ones (points at x = 0
  are dropped, as a log axis cannot show them). ``normalize_x=False`` gives the raw area.

- MIB (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", circuit localization track)
  evaluates circuits at the edge fractions ``0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1``
  (``int(fraction * n_edges)`` edges each) and reports, with the trapezoid rule over x = those fractions
  on a linear axis and without normalizing x (as ``evaluate_area_under_curve`` in MIB-circuit-track does):

  * :func:`cpr`, *circuit performance ratio*: ``∫ f dx``, the area under the faithfulness curve
    (higher is better). MIB computes it from circuits ranked by the signed score (``by="signed"``).
  * :func:`cmd`, *circuit-model difference*: ``∫ |1 - f| dx``, the area between the curve and 1
    (lower is better). MIB computes it from circuits ranked by ``|score|`` (``by="abs"``, the default).

  Both need a sufficiency sweep over those counts: ``sweep(..., counts="mib")``. MIB prunes each top-k
  circuit to its connected part before evaluating it: ``sweep(..., prune=True)`` does the same
  (:func:`edgepatch.prune_circuit`). Under the corrupted-run ablation pruning changes no value; under
  mean or zero ablation it does, so pass ``prune=True`` to compare with MIB's numbers.

Example
-------
>>> import torch
>>> from edgepatch.sweep import SweepResult
>>> r = SweepResult(counts=[0, 5, 10], effective_counts=[0, 5, 10], values=torch.tensor([[0.0], [1.0], [2.0]]),
...                 clean=torch.tensor([2.0]), ablated=torch.tensor([0.0]), random_values=torch.zeros(0, 3), n_edges=10)
>>> area_under_curve(r)  # f = 0, 0.5, 1 at x = 0, 0.5, 1
0.5
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from edgepatch.errors import EdgepatchError

__all__ = ["area_under_curve", "cpr", "cmd", "summarize", "trapezoid"]


def trapezoid(x: list[float], y: list[float]) -> float:
    """``∫ y dx`` by the trapezoid rule over points sorted by x.

    >>> trapezoid([0, 1, 3], [1, 1, 0])
    2.0
    """
    if len(x) != len(y):
        raise EdgepatchError(f"trapezoid: x has {len(x)} points but y has {len(y)}.")
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def _curve(result: Any, normalized: bool) -> tuple[list[float], list[float]]:
    """(x = edge fraction, y) sorted by x, one point per distinct effective count."""
    y_all = (result.normalized if normalized else result.mean).tolist()
    points: dict[float, float] = {}
    for k, y in zip(result.effective_counts, y_all):
        points[k / result.n_edges] = y
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def area_under_curve(result: Any, log_x: bool = False, normalized: bool = True, normalize_x: bool = True) -> float:
    """Trapezoid area under the faithfulness curve of a :class:`SweepResult` over x = edge fraction
    (``log_x``: over ``ln`` of it, dropping x = 0), divided by the x range unless ``normalize_x=False``.
    ``normalized=False`` integrates the raw mean metric instead of the normalized faithfulness.

    >>> import torch
    >>> from edgepatch.sweep import SweepResult
    >>> r = SweepResult([1, 10, 100], [1, 10, 100], torch.tensor([[0.0], [1.0], [1.0]]), torch.tensor([1.0]),
    ...                 torch.tensor([0.0]), torch.zeros(0, 3), n_edges=100)
    >>> area_under_curve(r, log_x=True)  # f = 0, 1, 1 at equally spaced ln x
    0.75
    """
    xs, ys = _curve(result, normalized)
    if log_x:
        pts = [(math.log(x), y) for x, y in zip(xs, ys) if x > 0]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(xs) < 2:
        raise EdgepatchError(
            f"area_under_curve needs at least two distinct edge counts{' above 0' if log_x else ''}; the sweep has "
            f"effective counts {result.effective_counts}. Sweep more counts, e.g. counts='log'."
        )
    area = trapezoid(xs, ys)
    return area / (xs[-1] - xs[0]) if normalize_x else area


def _mib_curve(result: Any, what: str) -> tuple[list[float], list[float]]:
    from edgepatch.sweep import MIB_FRACTIONS

    expected = [int(f * result.n_edges) for f in MIB_FRACTIONS]
    if list(result.counts) != expected:
        raise EdgepatchError(
            f"{what} is defined over MIB's edge fractions {list(MIB_FRACTIONS)}, i.e. counts {expected} for "
            f"{result.n_edges:,} edges, but this sweep has counts {list(result.counts)[:12]}. Run "
            f"ep.sweep(..., counts='mib')."
        )
    if result.direction != "sufficiency":
        warnings.warn(f"{what} is defined for sufficiency sweeps; this sweep measures {result.direction}.",
                      RuntimeWarning, stacklevel=3)
    return list(MIB_FRACTIONS), result.normalized.tolist()


def cpr(result: Any) -> float:
    """MIB's CPR: trapezoid area under the normalized faithfulness over MIB's edge fractions (x linear,
    0.001 .. 1, not rescaled); higher is better. Needs ``sweep(..., counts="mib")``."""
    x, f = _mib_curve(result, "CPR")
    return trapezoid(x, f)


def cmd(result: Any) -> float:
    """MIB's CMD: trapezoid area of ``|1 - f|`` over MIB's edge fractions (x linear, 0.001 .. 1); lower is
    better (0: every circuit as faithful as the model). Needs ``sweep(..., counts="mib")``."""
    x, f = _mib_curve(result, "CMD")
    return trapezoid(x, [abs(1.0 - v) for v in f])


def summarize(result: Any) -> dict[str, float]:
    """``auc`` (linear x), ``auc_log`` (log x), and ``cpr`` / ``cmd`` when the sweep used MIB's counts.

    >>> import torch
    >>> from edgepatch.sweep import SweepResult
    >>> r = SweepResult([1, 10], [1, 10], torch.tensor([[1.0], [1.0]]), torch.tensor([1.0]), torch.tensor([0.0]),
    ...                 torch.zeros(0, 2), n_edges=10)
    >>> summarize(r)
    {'auc': 1.0, 'auc_log': 1.0}
    """
    out = {"auc": area_under_curve(result), "auc_log": area_under_curve(result, log_x=True)}
    from edgepatch.sweep import MIB_FRACTIONS

    if list(result.counts) == [int(f * result.n_edges) for f in MIB_FRACTIONS]:
        out["cpr"] = cpr(result)
        out["cmd"] = cmd(result)
    return out
