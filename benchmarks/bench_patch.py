"""Patched forward vs plain forward (issue #2). Target: every ratio <= 1.3 (auto-circuit: 10.8x).

GPT-2-small-shaped model with random weights, batch 8 x 16 tokens, CPU with 2 threads by default.
Prints one JSON line: median seconds of the plain forward and of the patched forward with (a) all
weights 1, (b) random weights in [0, 1], (c) a random 1% circuit; the per-round ratios patched/plain
(interleaved rounds, so background load hits both alike); peak memory.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import edgepatch as ep
from common import emit, interleaved, parse_args, peak_memory_mb, reset_peak, setup


def main() -> None:
    args = parse_args()
    dev = args.device
    model, graph, gen, data = setup(args)
    clean, corrupt = data.clean, data.corrupt
    abl = ep.source_activations(model, graph, corrupt)
    weights = {
        "ones": torch.ones(graph.n_src, graph.n_dest),
        "random": torch.rand(graph.n_src, graph.n_dest, generator=gen),
        "circuit_1pct": (torch.rand(graph.n_src, graph.n_dest, generator=gen) < 0.01).float(),
    }

    def patched(w):
        def run():
            with ep.patch(model, graph, w, abl):
                model(clean)
        return run

    reset_peak(dev)
    with torch.no_grad():
        fns = {"plain": lambda: model(clean), **{k: patched(w.to(dev)) for k, w in weights.items()}}
        med, ratios = interleaved(fns, args.repeats, dev)
    emit(
        "patched_forward",
        args,
        plain_s=med["plain"],
        **{f"patched_{k}_s": med[k] for k in weights},
        **{f"ratio_{k}": ratios[k] for k in weights},
        target_ratio=1.3,
        peak_memory_mb=peak_memory_mb(dev),
    )


if __name__ == "__main__":
    main()
