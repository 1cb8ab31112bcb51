"""Faithfulness sweep vs plain forwards (issue #4). Target: sweep time / (10 x plain forward) <= 0.6.

GPT-2-small-shaped model with random weights, batch 8 x 16 tokens, CPU with 2 threads by default.
The sweep evaluates 10 log-spaced edge counts (1 .. 32,491) of attribution scores (``edgepatch.attribution.eap``
when available, else ``torch.randn`` scores; the JSON says which) on one batch, with corrupted-run ablation
and ``logit_diff``: one clean forward, one corrupted forward (the ablation), and the circuits folded into the
batch. Plain forwards and sweeps are timed alternately in the same process: each sweep is compared with the
median of the two plain forwards before and after it, and the reported ratio is the median over repeats
(machine speed drifts a lot when other jobs share the cores); ``ratio_cpu_time`` is the same in process
CPU time.
Prints one JSON line.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from common import current_memory_mb, emit, parse_args, peak_memory_mb, reset_peak, setup, sync
from edgepatch.scores import EdgeScores
from edgepatch.sweep import edge_counts, sweep


def main() -> None:
    args = parse_args(lambda p: p.add_argument("--counts", type=int, default=10))
    dev = args.device
    model, graph, gen, data = setup(args)

    try:
        from edgepatch.attribution import eap

        scores = eap(model, graph, data, metric="logit_diff", batch_size=args.batch, progress=False)
        score_source = "edgepatch.attribution.eap"
    except ImportError:
        scores = EdgeScores(torch.randn(graph.n_src, graph.n_dest, generator=gen), graph, method="random")
        score_source = "torch.randn"
    counts = edge_counts(graph, "log", n=args.counts)

    def plain() -> None:
        with torch.no_grad():
            model(data.clean)
        sync(dev)

    def run_sweep() -> None:
        sweep(model, graph, scores, data, counts=counts, metric="logit_diff", batch_size=args.batch, progress=False)
        sync(dev)

    memory_before = current_memory_mb(dev)
    reset_peak(dev)
    for _ in range(2):  # warm-up
        plain()
        run_sweep()
    plain_t, sweep_t, ratios, cpu_ratios = [], [], [], []

    def timed(fn) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    for _ in range(args.repeats):  # plain x 2, sweep, plain x 2: each sweep against the forwards around it
        around = [timed(plain) for _ in range(2)]
        s_wall, s_cpu = timed(run_sweep)
        around += [timed(plain) for _ in range(2)]
        p_wall = statistics.median(a[0] for a in around)
        p_cpu = statistics.median(a[1] for a in around)
        plain_t += [a[0] for a in around]
        sweep_t.append(s_wall)
        ratios.append(s_wall / (len(counts) * p_wall))
        cpu_ratios.append(s_cpu / (len(counts) * p_cpu))
    plain_s, sweep_s = statistics.median(plain_t), statistics.median(sweep_t)
    result = sweep(model, graph, scores, data, counts=counts, batch_size=args.batch, progress=False)
    emit(
        "sweep",
        args,
        scores=score_source,
        counts=counts,
        circuits_evaluated=len(set(result.effective_counts) - {0, graph.n_edges}),
        plain_forward_s=plain_s,
        sweep_s=sweep_s,
        ratio_sweep_vs_10_forwards=statistics.median(ratios),
        ratio_per_repeat=[round(r, 3) for r in ratios],
        target_ratio=0.6,
        ratio_cpu_time=statistics.median(cpu_ratios),
        peak_memory_mb=peak_memory_mb(dev),
        memory_before_timing_mb=memory_before,
        peak_memory_note="peak of the timed phase; model and scores were already loaded (memory_before_timing_mb)",
    )


if __name__ == "__main__":
    main()
