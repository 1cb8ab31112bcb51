"""Shared benchmark helpers: timing medians, peak memory, one JSON line per benchmark.

Benchmarks report *ratios within one run* (patched / plain forward, same model, same batch): absolute
times on shared machines are noise. Run them with ``python benchmarks/<name>.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch


def parse_args(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-class", default=None, choices=["hooked", "bridge"],
                   help="default: hooked where the installed TransformerLens has it (2.x, 3.x), else bridge (4.x)")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", default=None,
                   help="a real model for ep.load_model (e.g. smollm2-135m) instead of --preset's random weights")
    if extra:
        extra(p)
    args = p.parse_args()
    if args.model_class is None:
        from edgepatch.models import model_classes

        args.model_class = model_classes()[0]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    return args


def setup(args: argparse.Namespace) -> tuple[Any, Any, torch.Generator, Any]:
    """The benchmarks' subject: a random-weight model of ``args.preset`` and ``args.model_class`` on
    ``args.device`` (or the real model ``args.model``), its graph, a generator seeded 0, and random prompt
    pairs of ``args.batch`` x ``args.seq`` tokens (one answer and one wrong token each)."""
    import edgepatch as ep

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = ep.load_model(args.model, device=args.device, model_class=args.model_class, dtype=dtype)
    else:
        model = ep.random_model(args.preset, model_class=args.model_class, device=args.device, dtype=dtype)
    graph = ep.build_graph(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    corrupt = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    answers = torch.randint(0, vocab, (args.batch, 1), generator=gen)
    wrong = torch.randint(0, vocab, (args.batch, 1), generator=gen)
    data = ep.PromptPairs.from_tokens(clean, corrupt, answers, wrong).to(args.device)
    return model, graph, gen, data


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, device: str = "cpu", warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak CUDA allocation (GPU), in MB."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # the high-water mark since the last reset_peak (Linux)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split(":")[1].split()[0]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def reset_peak(device: str = "cpu") -> None:
    """Start a new peak measurement (CUDA stats; on Linux CPUs the kernel's resident high-water mark)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def current_memory_mb(device: str = "cpu") -> float:
    """Memory in use now: resident set (CPU) or allocated CUDA memory."""
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split(":")[1].split()[0]) / 1024
    except OSError:
        pass
    return float("nan")


def emit(name: str, args: argparse.Namespace, **fields: Any) -> None:
    device = args.device
    rec = {
        "benchmark": name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "model": f"{args.model} ({args.model_class})" if args.model else f"{args.preset} ({args.model_class}, random weights)",
        "batch": f"{args.batch}x{args.seq}",
        "dtype": args.dtype,
        "torch": torch.__version__,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()},
    }
    print(json.dumps(rec))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu", warmup: int = 1,
                baseline: str = "plain") -> tuple[dict[str, float], dict[str, float]]:
    """Time several functions round-robin (one call of each per round), so that load from other
    processes hits all of them alike. Returns (median seconds, median per-round ratio to ``baseline``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median([a / b for a, b in zip(v, times[baseline])]) for k, v in times.items() if k != baseline}
    return med, ratios
