"""Resumable progress for long runs (sweeps, EAP / EAP-IG, exact patching, ACDC, learned masks):
fingerprints of what a run depends on, and progress files written atomically.

A run with ``out=folder`` writes its settings (``<what>.json``) once and its progress
(``progress.safetensors``) as it goes, to a temporary file moved into place, so an interruption never
leaves a half-written file. Run again with the same folder and settings and it skips the work already
done; other settings raise an error naming what differs. Progress files are safetensors (no pickle).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, short_repr
from edgepatch.graph import Graph, model_spec


def hash_tensor(h: "hashlib._Hash", t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    if t.dtype == torch.bfloat16:
        t = t.float()
    h.update(t.numpy().tobytes())


def hash_obj(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, Tensor):
        hash_tensor(h, obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            hash_obj(h, v)
    else:
        h.update(repr(obj).encode())


def digest(*objs: Any) -> str:
    """A short hash of tensors and plain values (16 hex digits)."""
    h = hashlib.sha256()
    for obj in objs:
        hash_obj(h, obj)
    return h.hexdigest()[:16]


def data_hash(data: PromptPairs) -> str:
    return digest(data.clean, data.corrupt, data.answers, data.wrong, data.answer_pos, data.attention_mask, data.meta)


def model_checksum(model: Any) -> str:
    """The parameters' count and a digest of every parameter's name, shape, dtype, sum and norm (float64,
    rounded to 9 digits so that a resumed run with other threads, which may sum in another order, still
    matches): any changed weight changes it. It reads every parameter twice (~0.1 s for GPT-2 small on CPU),
    never copies one; not a hash of every byte (two different weights with equal sums and norms pass)."""
    named = list(model.named_parameters())
    h = hashlib.sha256()
    for name, p in named:
        p = p.detach()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.is_floating_point() and p.numel():
            stats = torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)])
            h.update(",".join(f"{v:.9g}" for v in stats.tolist()).encode())
    return f"{sum(p.numel() for _, p in named)},{h.hexdigest()[:16]}"


def metric_id(metric: Any) -> str:
    """A metric as a fingerprint entry: a built-in metric's name; for a callable, its name and a digest of its
    code (bytecode, constants, names, nested functions) and of the numbers, strings and tensors it closes
    over or takes as defaults, so that a resumed run refuses a changed function of the same name. What the
    function reads from globals, dicts, lists or other objects is not covered."""
    from edgepatch.metrics import METRICS, metric_label

    if isinstance(metric, str):
        return metric
    name = metric_label(metric)
    entry = METRICS.get(name)
    if entry is not None and (entry is metric or (isinstance(entry, type) and type(metric) is entry)):
        return name  # a registered metric passed as itself: the same as its name
    h = hashlib.sha256()
    _hash_callable(h, metric, depth=0)
    return f"{name}#{h.hexdigest()[:12]}"


def _hash_callable(h: "hashlib._Hash", fn: Any, depth: int) -> None:
    if depth > 4:
        return
    if isinstance(fn, functools.partial):
        _hash_callable(h, fn.func, depth + 1)
        _hash_plain(h, (fn.args, tuple(sorted(fn.keywords.items()))), depth)
        return
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    code = getattr(fn, "__code__", None)
    if code is None:  # an object with __call__: its class's code and its attributes
        h.update(type(fn).__qualname__.encode())
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
        attrs = getattr(fn, "__dict__", None)
        if isinstance(attrs, dict):
            _hash_plain(h, tuple((str(k), attrs[k]) for k in sorted(attrs, key=str)), depth)
    if code is not None:
        _hash_code(h, code)
    _hash_plain(h, getattr(fn, "__defaults__", None), depth)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            _hash_plain(h, cell.cell_contents, depth)
        except ValueError:  # an empty cell
            pass


def _hash_code(h: "hashlib._Hash", code: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):  # a nested function's code (its repr holds a memory address)
            _hash_code(h, c)
        elif isinstance(c, frozenset):  # (its repr's order varies with string hashing)
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def _hash_plain(h: "hashlib._Hash", v: Any, depth: int) -> None:
    """Values that cannot change in place (numbers, strings, tuples of them) and tensors by value; functions
    by their code; anything else (a dict or list the function keeps as a cache or counter) by its type
    only, so that a resumed run does not refuse a function whose state moved on."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        h.update(repr(v).encode())
    elif isinstance(v, Tensor):
        hash_tensor(h, v)
    elif isinstance(v, tuple):
        for x in v:
            _hash_plain(h, x, depth)
    elif callable(v) and not isinstance(v, type):
        _hash_callable(h, v, depth + 1)
    else:
        h.update(type(v).__qualname__.encode())


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then move it into place: an interruption leaves the
    old file or the new one, never half of one. The temporary name is unique to the call, so processes that
    write the same file at once (two notebooks, a shared cache) never write into each other's; it is removed
    if ``write`` fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                             str(tmp), metadata=metadata))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def open_progress(out_dir: Path, fingerprint: dict[str, Any], state: dict[str, Tensor], what: str = "sweep") -> Path:
    """Create ``out_dir`` or resume from it: load matching progress into ``state`` (in place); raise on
    other settings. Returns the progress file's path (see :func:`save_progress`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgepatchError(f"out={str(out_dir)!r} is a file; give a folder for the {what}'s progress and result.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "progress.safetensors"
    if path.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["edgepatch"])
                saved = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise EdgepatchError(
                f"Cannot read the {what} progress in {str(path)!r} ({err}). Delete the folder {str(out_dir)!r} (or "
                f"use another out=) to start over."
            ) from None
        shown = fingerprint_diff(meta.get("fingerprint", {}), fingerprint)
        if shown:
            article = "an" if what[0].lower() in "aeiou" else "a"
            raise EdgepatchError(
                f"out={str(out_dir)!r} holds {article} {what} with different settings ({shown}). Use another out "
                f"folder for these settings, or delete {str(out_dir)!r} to start over."
            )
        for k, v in saved.items():
            if k in state and state[k].shape == v.shape:
                state[k] = v.to(state[k].dtype)
    else:
        atomic_write_text(out_dir / f"{what.replace(' ', '_').lower()}.json", json.dumps({"fingerprint": fingerprint}, indent=1))
    return path


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The entries of two fingerprints that differ, as ``key: saved ..., now ...`` (at most four), for an error
    message; ``""`` when they are equal."""
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: saved {short_repr(old.get(k))}, now {short_repr(new.get(k))}" for k in diffs[:4])
    return shown + ("; ..." if len(diffs) > 4 else "")


def save_progress(path: Path, state: dict[str, Tensor], fingerprint: dict[str, Any], **extra: Any) -> None:
    atomic_save(state, path, {"edgepatch": json.dumps({"fingerprint": fingerprint, **extra})})


SAVE_EVERY_S = 5.0  # runs that save after every step of work (exact patching, ACDC): at most this often


def resumable(out: Any, state: dict[str, Tensor], what: str,
              fingerprint: Callable[[], dict[str, Any]]) -> Callable[..., None]:
    """Resume from the folder ``out`` (``state`` loaded in place, see :func:`open_progress`) and return the
    function that saves ``state`` there: at most every ``SAVE_EVERY_S`` seconds, and always with
    ``final=True``. ``fingerprint`` is called only with ``out`` (it reads the model's parameters). Without
    ``out``, a function that does nothing."""
    if out is None:
        return lambda final=False: None
    fingerprint_ = fingerprint()
    path = open_progress(Path(out), fingerprint_, state, what=what)
    last = [time.perf_counter()]

    def save(final: bool = False) -> None:
        if final or time.perf_counter() - last[0] >= SAVE_EVERY_S:
            save_progress(path, state, fingerprint_)
            last[0] = time.perf_counter()

    return save


def run_fingerprint(model: Any, graph: Graph, data: PromptPairs, ablation: Any, **settings: Any) -> dict[str, Any]:
    """What every resumable run depends on (the graph, the model, the prompts, the ablation), plus its own
    ``settings`` (a metric among them: :func:`metric_id`). The model's entry reads every parameter
    (:func:`model_checksum`)."""
    return {"graph": repr(graph), "split_qkv": graph.split_qkv, "level": graph.level,
            "model": f"{model_spec(model)}|{model_checksum(model)}", "data": data_hash(data),
            "ablation": ablation_id(ablation), **settings}


def positions_id(slots: Tensor | None, names: Any) -> dict[str, Any] | None:
    """Per-position runs' fingerprint entry: the slot names and a hash of the prompts' slot table (None
    for edge runs)."""
    return None if slots is None else {"slots": list(names or ()), "tokens": digest(slots)}


def ablation_id(ablation: Any) -> str:
    """An ablation as a fingerprint entry: its name, or its kind and a hash of a given Ablation's values."""
    values = getattr(ablation, "values", None)
    return f"{ablation.kind}:{digest(values)}" if isinstance(values, Tensor) else str(ablation)
