"""EAP and EAP-IG cost vs a plain forward (issue #3).

Targets: EAP <= 5x a plain forward (auto-circuit: 41x), peak memory <= 1.6 GB (auto-circuit: 4.1 GB),
EAP-IG with k steps <= (k + 1) x EAP. GPT-2-small-shaped random model, batch 8 x 16, CPU 2 threads.
Prints one JSON line. ``peak_memory_mb_eap`` is the process's resident high-water mark during EAP
(CPU; peak CUDA allocation on GPU), so it includes the model's weights and the runtime
(``memory_mb_before_eap``); ``eap_extra_memory_mb`` is what EAP itself adds.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import edgepatch as ep
from common import current_memory_mb, emit, interleaved, parse_args, peak_memory_mb, reset_peak, setup


def main() -> None:
    args = parse_args(lambda p: p.add_argument("--ig-steps", type=int, default=5))
    dev = args.device
    model, graph, _, data = setup(args)
    opts = dict(batch_size=args.batch, progress=False)
    with torch.no_grad():
        model(data.clean)  # warm up: the plain forward's own buffers
    reset_peak(dev)
    before = current_memory_mb(dev)  # the process with the model loaded
    ep.eap(model, graph, data, "logit_diff", **opts)
    peak_eap = peak_memory_mb(dev)
    k = args.ig_steps

    def plain():
        with torch.no_grad():
            model(data.clean)

    med, ratios = interleaved({
        "plain": plain,
        "eap": lambda: ep.eap(model, graph, data, "logit_diff", **opts),
        "eap_ig": lambda: ep.eap_ig(model, graph, data, "logit_diff", steps=k, **opts),
    }, args.repeats, dev)
    emit(
        "attribution",
        args,
        n_edges=graph.n_edges,
        plain_s=med["plain"],
        eap_s=med["eap"],
        eap_ig_s=med["eap_ig"],
        ig_steps=k,
        eap_over_plain=ratios["eap"],
        eap_ig_over_eap=med["eap_ig"] / med["eap"],
        eap_ig_limit=k + 1,
        target_eap_over_plain=5.0,
        peak_memory_mb_eap=peak_eap,
        memory_mb_before_eap=before,
        eap_extra_memory_mb=peak_eap - before,
        target_peak_memory_mb=1600,
    )


if __name__ == "__main__":
    main()
