"""Ground truth (issue #5): how well each circuit-discovery method recovers a planted circuit.

For a family of planted-circuit models (:mod:`edgepatch.planted`: several sizes and seeds, with and without
LayerNorm) every method scores every edge, and the ranking is compared with the planted circuit by the area
under its ROC curve (:func:`edgepatch.evaluation.roc`; 1 = every planted edge ranks above every other edge,
0.5 = chance). Methods that return a circuit (ACDC, learned masks) also report whether it is exactly the
planted set. Prints one JSON line per model x method, then a table of mean AUCs and times.

    python benchmarks/bench_planted.py                      # default family
    python benchmarks/bench_planted.py --sizes 2x2 --seeds 1 --methods eap,eap-ig

Methods run through ``edgepatch.attribute(model, graph, data, metric, method=...)``; a method whose module
is not importable yet is skipped with a note. Times are wall-clock seconds of the ``attribute`` call on this
machine (CPU, ``--threads``): compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from edgepatch.attribution import _methods, attribute
from edgepatch.evaluation import circuit_recovery, roc
from edgepatch.planted import planted_model, verify_planting

DEFAULT_METHODS = "eap,eap-ig,acdc,learned"


def method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    if method == "acdc":  # off-circuit effects are < 1e-6, planted ones > 1e-3: any threshold between
        return {"threshold": args.acdc_threshold}
    if method in ("learned", "edge-pruning", "subnetwork-probing"):
        return {"epochs": args.epochs}
    if method.startswith("eap-ig"):
        return {"steps": args.ig_steps}
    return {}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2x2,3x2,3x3", help="comma-separated LAYERSxHEADS")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ln", default="both", choices=["both", "on", "off"])
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--epochs", type=int, default=100, help="learned masks")
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--acdc-threshold", type=float, default=1e-4)
    p.add_argument("--verify", action="store_true", help="also check the planting with exact patching")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    available = _methods()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skipped = [m for m in methods if m not in available]
    for m in skipped:
        print(f"# note: unknown method {m!r} (expected one of {sorted(available)}); skipped")
    methods = [m for m in methods if m in available]
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    lns = {"both": [False, True], "on": [True], "off": [False]}[args.ln]
    rows: list[dict[str, Any]] = []
    for ln in lns:
        for n_layers, n_heads in sizes:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                model, graph, truth, task, metric = planted_model(
                    n_layers=n_layers, n_heads=n_heads, seed=seed, layer_norm=ln, n_prompts=args.n_prompts)
                build_s = time.perf_counter() - t0
                base = {"benchmark": "planted", "model": graph.spec.name, "layer_norm": ln, "layers": n_layers,
                        "heads": n_heads, "seed": seed, "n_edges": graph.n_edges, "n_true": int(truth.sum()),
                        "build_s": round(build_s, 3)}
                if args.verify:
                    check = verify_planting(model, graph, truth, task, metric)
                    base.update(max_off_effect=check.max_off, min_true_effect=check.min_on)
                for method in methods:
                    t = time.perf_counter()
                    scores = attribute(model, graph, task, metric, method=method, progress=False,
                                       **method_options(method, args))
                    seconds = time.perf_counter() - t
                    rec = {**base, "method": method, "auc": round(roc(scores, truth, by="auto").auc, 4),
                           "seconds": round(seconds, 3)}
                    if scores.circuit_mask is not None:
                        r = circuit_recovery(scores, truth)
                        rec.update(exact_circuit=r["exact"], precision=round(r["precision"], 3),
                                   recall=round(r["recall"], 3))
                    print(json.dumps(rec), flush=True)
                    rows.append(rec)
    table(rows, methods, args)


def table(rows: list[dict[str, Any]], methods: list[str], args: argparse.Namespace) -> None:
    """Mean AUC (and exact-circuit rate, mean seconds) per method x (LayerNorm, size)."""
    groups = sorted({(r["layer_norm"], r["layers"], r["heads"]) for r in rows})
    head = ["method"] + [f"{'LN ' if ln else ''}{L}x{H}" for ln, L, H in groups] + ["all", "mean s"]
    lines = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = [m]
        for g in groups:
            sel = [r for r in rs if (r["layer_norm"], r["layers"], r["heads"]) == g]
            auc = statistics.mean(r["auc"] for r in sel)
            exact = [r["exact_circuit"] for r in sel if "exact_circuit" in r]
            cells.append(f"{auc:.3f}" + (f" ({sum(exact)}/{len(exact)})" if exact else ""))
        cells.append(f"{statistics.mean(r['auc'] for r in rs):.3f}")
        cells.append(f"{statistics.mean(r['seconds'] for r in rs):.2f}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print()
    print(f"Mean ROC AUC against the planted circuit ({args.seeds} seeds per size; (k/n): circuits exactly "
          f"the planted set). CPU {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}.")
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for cells in lines:
        print(fmt.format(*cells))


if __name__ == "__main__":
    main()
