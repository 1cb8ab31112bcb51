"""The ``edgepatch`` command: from a model and a task to scores, sweeps and faithfulness plots.

Examples::

    edgepatch sweep --model smollm2-135m --task ioi --method eap-ig --counts mib --out runs/ioi
    edgepatch compare --model smollm2-135m --task ioi --methods eap,eap-ig --out runs/ioi
    edgepatch info --model smollm2-135m

Every run writes into ``--out``: ``scores_<method>.safetensors`` (+ ``.json``), the sweep state
``sweep_<method>/`` (resumable), ``faithfulness.html`` (and ``.png`` when kaleido can render),
``circuit_<method>.html`` (the smallest circuit reaching 80% normalized faithfulness), ``mib_<method>.pt``
(the scores in MIB / EAP-IG's graph format, to submit or to load with EAP-IG's ``Graph.from_pt``) and
``run.json`` (versions, options, timings, peak memory). ``--method file:PATH`` sweeps scores from a file
instead (MIB / EAP-IG graph ``.json`` / ``.pt``, or edgepatch's ``.safetensors``), named ``file-<stem>``; with
``compare`` it puts another tool's circuits on the same axes, e.g. ``--methods eap-ig,file:theirs.pt``. A file
that holds one circuit and no ranking (MIB's ``in_graph`` alone) is evaluated at its own size: one point (a
star) beside the curves, and a table of its own. Interrupt with Ctrl-C and run the same command again to
continue where it stopped (``--no-resume`` starts over): saved scores are not recomputed, and sweeps and
the scoring of every method but the two quick baselines (``random``, ``activation-magnitude``) resume from
their progress files (``<method>/``). With ``--positions absolute|named`` (EAP, EAP-IG, exact, ACDC,
learned masks), circuits are (position slot, edge) pairs and every file name ends in ``_pos-absolute`` or
``_pos-named``, so edge and per-position runs share a folder; ``file:PATH`` then takes edgepatch's
per-position scores (``scores_<method>_pos-named.safetensors``, or ``ep.io.save_scores``) computed with the
same positions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

TASKS = ("ioi", "greater-than", "induction", "sva")
METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "exact", "acdc", "learned", "random",
           "activation-magnitude")
# methods that keep their progress in the run's folder (random and activation-magnitude take seconds)
RESUMING = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "exact", "acdc", "learned")
POSITION_METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "exact", "acdc", "learned")  # --positions


class CliError(Exception):
    """A bad option: printed without a traceback, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepatch", description="Circuit discovery by edge patching.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="smollm2-135m",
                        help="a TransformerLens name (gpt2, ...), a local HF folder, 'smollm2-135m' (offline), "
                             "or 'random:<preset>' (random weights, e.g. random:tiny)")
        sp.add_argument("--model-class", default="auto", choices=["auto", "hooked", "bridge"])
        sp.add_argument("--task", default="ioi", help=f"one of {', '.join(TASKS)}")
        sp.add_argument("--metric", default="logit_diff", help="logit_diff, prob_diff, kl_div, answer_logprob, ...")
        sp.add_argument("--ablation", default="corrupt", choices=["corrupt", "mean", "pos_mean", "zero"])
        sp.add_argument("--counts", default="mib", help="mib, log, all, groups, or comma-separated ints/fractions")
        sp.add_argument("--direction", default="sufficiency", choices=["sufficiency", "necessity"])
        sp.add_argument("--n-prompts", type=int, default=32)
        sp.add_argument("--batch-size", type=int, default=16)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--steps", type=int, default=5, help="integrated-gradient steps (eap-ig)")
        sp.add_argument("--random-baseline", type=int, default=0, help="random circuits per count (a band)")
        sp.add_argument("--joint-qkv", action="store_true", help="one destination per head instead of q/k/v")
        sp.add_argument("--positions", default=None, choices=["absolute", "named"],
                        help="per-position circuits of (position slot, edge) pairs: one slot per token index, or "
                             "the task's named positions (ioi: IO, S1, S1+1, S2, END, other); not for the baselines")
        sp.add_argument("--prune", action="store_true",
                        help="evaluate each circuit's connected part, as MIB does (edgepatch.prune_circuit)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--out", default=None, help="output folder (default: runs/<model>-<task>)")
        sp.add_argument("--resume", dest="resume", action="store_true", default=True)
        sp.add_argument("--no-resume", dest="resume", action="store_false")
        sp.add_argument("--no-progress", dest="progress", action="store_false", default=True)
        sp.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    s = sub.add_parser("sweep", help="score edges with one method and sweep circuit sizes")
    common(s)
    s.add_argument("--method", default="eap-ig",
                   help=f"one of {', '.join(METHODS)}; or file:PATH to sweep scores from a file (MIB / EAP-IG graph "
                        f".json or .pt, or edgepatch's .safetensors), or to evaluate the one circuit it holds")
    c = sub.add_parser("compare", help="run several methods and overlay their faithfulness curves")
    common(c)
    c.add_argument("--methods", default="eap,eap-ig",
                   help="comma-separated methods; file:PATH adds scores or a circuit from a file (e.g. "
                        "eap-ig,file:theirs.pt)")
    i = sub.add_parser("info", help="load a model and print its graph")
    i.add_argument("--model", default="smollm2-135m")
    i.add_argument("--model-class", default="auto", choices=["auto", "hooked", "bridge"])
    i.add_argument("--device", default=None)
    return p


def _check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    from edgepatch.errors import suggest

    key = value.lower().replace("_", "-")
    if key not in choices:
        raise CliError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}.{suggest(key, choices)}")
    return key


FILE = "file:"  # --method file:PATH: scores from a file instead of a method
_FILE_SUFFIXES = (".pt", ".json", ".safetensors")


def _method(value: str) -> str:
    """A ``--method(s)`` entry: a method name, or ``file:PATH`` (checked here, before the model loads)."""
    if not value.startswith(FILE):
        return _check_choice("method", value, METHODS)
    path = Path(value[len(FILE):]).expanduser()
    if not value[len(FILE):]:
        raise CliError("--method file:PATH needs a path, e.g. file:runs/eap-ig/graph.pt.")
    if path.suffix.lower() not in _FILE_SUFFIXES:
        raise CliError(f"--method {value}: expected a MIB / EAP-IG graph file (.json or .pt) or edgepatch scores "
                       f"(.safetensors); got a {path.suffix or 'suffix-less'} file.")
    if not path.is_file():
        raise CliError(f"--method {value}: no such file.")
    return f"{FILE}{path}"


def _label(method: str) -> str:
    """The name a method's files, table row and curve get: ``file-<stem>`` for ``file:PATH``."""
    if not method.startswith(FILE):
        return method
    stem = Path(method[len(FILE):]).name
    for suffix in _FILE_SUFFIXES:
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    return "file-" + ("".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "scores")


def _file_scores(method: str, graph: Any, positions: str | None, data: Any) -> tuple[Any, int | None]:
    """The scores of ``file:PATH`` (MIB / EAP-IG graph JSON or tensors, or scores edgepatch saved), and, when
    the file holds a circuit but no ranking (MIB's ``in_graph`` alone, or scores that are one value inside
    the circuit and another outside), that circuit's edge count: the command then evaluates that one
    circuit instead of sweeping sizes. Per-position scores need ``positions`` (``--positions``) that give
    ``data`` their slots."""
    import torch

    from edgepatch import io as epio
    from edgepatch.errors import EdgepatchError
    from edgepatch.scores import EdgeScores

    path = Path(method[len(FILE):])
    try:
        if path.suffix.lower() == ".pt":
            scores = epio.from_mib_pt(path, graph)
        elif path.suffix.lower() == ".json" and not path.with_suffix(".safetensors").exists():
            scores = epio.from_mib_json(path, graph)
        else:  # edgepatch's own scores (.safetensors, or the .json beside it)
            scores = epio.load_scores(path, graph=graph)
    except EdgepatchError as err:
        raise CliError(f"--method {method}: {err}") from None
    _check_file_positions(method, scores, positions, data)

    def constant(v: Any) -> bool:
        v = v[~v.isnan()]
        return v.numel() == 0 or bool((v == v[0]).all())

    mask = scores.circuit_mask
    kept = graph.to_edges(mask).reshape(-1) if mask is not None else None  # (item order, as scores.flat)
    # no ranking: one value everywhere, or one inside the circuit and one outside (a circuit saved as 1 / 0)
    if constant(scores.flat) or (kept is not None and constant(scores.flat[kept]) and constant(scores.flat[~kept])):
        if mask is None:
            raise CliError(f"--method {method}: every edge has the same score (or none), and the file marks no "
                           f"circuit (MIB's in_graph), so there is neither a ranking to sweep nor a circuit to "
                           f"evaluate.")
        n = int(kept.sum())
        if n == 0:
            raise CliError(f"--method {method}: the file's circuit (MIB's in_graph) is empty; there is nothing to "
                           f"evaluate.")
        # (ep.evaluate_circuit reads only circuit_mask; 1 inside / 0 outside gives the circuit plot its top n
        # edges at full width, whatever constant the file held)
        ranked = torch.where(mask, torch.ones(()), torch.zeros(()))
        return EdgeScores(ranked, graph, method=_label(method), metric=scores.metric, info=scores.info,
                          circuit_mask=mask, slots=scores.slots), n
    return EdgeScores(scores.scores, graph, method=_label(method), metric=scores.metric, info=scores.info,
                      circuit_mask=scores.circuit_mask, slots=scores.slots), None


def _check_file_positions(method: str, scores: Any, positions: str | None, data: Any) -> None:
    """A file's scores and ``--positions`` must agree: edge scores without it; per-position scores (edgepatch's
    own files) with the positions they were computed with, which give this data the same slots."""
    from edgepatch.attribution import position_slots

    if not scores.per_position:
        if positions is not None:
            raise CliError(f"--method {method}: the file holds edge scores, not (position slot, edge) pairs; leave "
                           f"out --positions, or give scores computed with positions.")
        return
    if positions is None:
        raise CliError(f"--method {method}: the file holds per-position scores (slots {list(scores.slots)[:8]}); "
                       f"add the --positions (absolute or named) they were computed with.")
    _, names = position_slots(positions, data)
    if tuple(names or ()) != tuple(scores.slots):
        raise CliError(f"--method {method}: the file's slots are {list(scores.slots)[:8]} but --positions {positions} "
                       f"gives {list(names or ())[:8]} for this task's prompts; give the positions (and a task with "
                       f"the prompt length) the scores were computed with.")


def _counts(arg: str) -> Any:
    """``--counts``: a spec name, or comma-separated edge counts (ints) and fractions (floats in (0, 1))."""
    def number(part: str) -> int | float:
        part = part.strip()
        try:
            return int(part)
        except ValueError:
            return float(part)

    if "," not in arg:
        try:
            return [number(arg)]
        except ValueError:
            from edgepatch.sweep import COUNT_SPECS

            return _check_choice("counts", arg, COUNT_SPECS)  # a spec name
    out: list[Any] = []
    for part in arg.split(","):
        try:
            out.append(number(part))
        except ValueError:
            raise CliError(f"--counts {arg!r}: {part.strip()!r} is not a number; give comma-separated edge counts "
                           f"and fractions, e.g. --counts 10,100,0.05, or one of mib, log, all, groups.") from None
    return out


def _device(arg: str | None) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {arg}: CUDA is not available on this machine; use --device cpu.")
    return arg


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Any:
    """``--no-progress`` also silences transformers' / the hub's loading bars (restored afterwards)."""
    if enabled:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load(args: argparse.Namespace, device: str) -> Any:
    import edgepatch as ep

    if args.model.startswith("random:"):
        return ep.random_model(args.model.split(":", 1)[1], model_class=args.model_class, device=device)
    return ep.load_model(args.model, device=device, model_class=args.model_class)


def _task(args: argparse.Namespace, model: Any) -> Any:
    import edgepatch as ep

    tok = getattr(model, "tokenizer", None)
    name = args.task
    if name == "induction":
        vocab = tok if tok is not None else int(model.cfg.d_vocab)
        return ep.tasks.induction(vocab if tok is not None else int(model.cfg.d_vocab), n=args.n_prompts, seed=args.seed)
    if tok is None:
        raise CliError(f"--task {name} needs a tokenizer, but the model has none; use --task induction.")
    fn = {"ioi": ep.tasks.ioi, "greater-than": ep.tasks.greater_than, "sva": ep.tasks.sva}[name]
    return fn(tok, n=args.n_prompts, seed=args.seed)


def _score_settings(args: argparse.Namespace, method: str, model: Any, graph: Any, data: Any) -> dict[str, Any]:
    """What a method's scores depend on (the model, the graph, the prompts and the scoring options): saved
    with the scores, and compared before a resumed run reuses them."""
    from edgepatch.progress import run_fingerprint

    extra: dict[str, Any] = {"positions": args.positions}
    if method.startswith("eap-ig"):
        extra["steps"] = args.steps
    if method == "random":
        extra["seed"] = args.seed
    if method == "learned":  # (its minibatches; the other methods' scores do not depend on the batch size)
        extra["batch_size"] = args.batch_size
    return run_fingerprint(model, graph, data, args.ablation, method=method, metric=args.metric, **extra)


def _resumed_scores(path: Path, graph: Any, settings: dict[str, Any], run: Sequence[Path]) -> Any:
    """The scores saved at ``path`` by an earlier run with these ``settings``; None when the file cannot be
    read (they are computed again). Scores from other settings, or saved without them (by an earlier
    edgepatch), raise: the folder belongs to another run, whose files ``run`` the message names."""
    from edgepatch import io as epio
    from edgepatch.progress import fingerprint_diff

    try:
        scores = epio.load_scores(path, graph=graph)
    except Exception:
        return None
    saved = scores.info.get("settings")
    shown = fingerprint_diff(saved, settings) if isinstance(saved, dict) else "saved without their settings"
    if shown:
        raise CliError(
            f"{path}.safetensors holds {scores.method} scores from other settings ({shown}). Use another --out "
            f"for these settings, or delete {', '.join(str(p) for p in [path.with_suffix('.safetensors'), *run])} "
            f"to start over."
        )
    return scores


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("edgepatch", "torch", "transformer-lens", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _peak_mb(device: str) -> float | None:
    """Peak memory: CUDA allocations, or the process's resident high-water mark; None where the platform
    does not report it (Windows has no ``resource`` module)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _png_ok() -> bool:
    """PNG export needs kaleido (and a browser it can drive); HTML always works offline."""
    import importlib.util

    return importlib.util.find_spec("kaleido") is not None


def _maybe(fn: Any) -> float | None:
    """CPR/CMD exist only for sweeps over MIB's edge fractions (``--counts mib``)."""
    try:
        return float(fn())
    except Exception:
        return None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(line, widths)) for line in lines)


def _circuit_table(rows: list[dict[str, Any]]) -> str:
    """Circuits read from files (one size each): their size and normalized faithfulness."""
    lines = [["circuit", "clean", "ablated", "edges", "faithfulness"]]
    for r in rows:
        edges = f"{r['counts'][0]}" + (f" ({r['pruned_counts'][0]} connected)" if "pruned_counts" in r else "")
        lines.append([r["method"], f"{r['clean']:.3f}", f"{r['ablated']:.3f}", edges, f"{r['faithfulness'][0]:.3f}"])
    return _table(lines)


def _summary_table(rows: list[dict[str, Any]], counts: list[int]) -> str:
    head = ["method", "clean", "ablated"] + [f"k={c}" for c in counts] + ["CPR", "CMD"]
    lines = [head]
    for r in rows:
        lines.append([r["method"], f"{r['clean']:.3f}", f"{r['ablated']:.3f}"] + [f"{v:.2f}" for v in r["faithfulness"]]
                     + [_fmt(r["cpr"]), _fmt(r["cmd"])])
    return _table(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    import edgepatch as ep
    from edgepatch import io as epio
    from edgepatch import plots
    from edgepatch.sweep import sweep as run_sweep

    if args.command == "info":
        device = _device(args.device)
        model = _load(args, device)
        print(ep.build_graph(model).summary())
        print(ep.build_graph(model, split_qkv=False))
        return 0

    methods = [args.method] if args.command == "sweep" else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [_method(m) for m in methods]
    labels = [_label(m) for m in methods]
    if len(set(labels)) < len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise CliError(f"--methods names {twice!r} twice (files are told apart by their names); rename a file or "
                       f"drop the repeat.")
    args.task = _check_choice("task", args.task, TASKS)
    counts = _counts(args.counts)
    if args.positions is not None:
        others = [m for m in methods if m not in POSITION_METHODS and not m.startswith(FILE)]
        if others:
            raise CliError(f"--positions scores (position slot, edge) pairs, which {', '.join(others)} cannot; use "
                           f"{', '.join(POSITION_METHODS)}, or leave --positions out.")
        if args.positions == "named" and args.task != "ioi":
            raise CliError(f"--positions named: only the ioi task names its positions (IO, S1, S1+1, S2, END); "
                           f"--task {args.task} has none. Use --positions absolute.")
        if args.prune:
            raise CliError("--prune: MIB's pruning is defined for circuits of edges, not of (position, edge) pairs; "
                           "leave out --prune or --positions.")
    if args.n_prompts < 1 or args.batch_size < 1:
        raise CliError(f"--n-prompts and --batch-size must be >= 1; got {args.n_prompts} and {args.batch_size}.")
    try:
        ep.get_metric(args.metric)  # fails early with suggestions
    except ValueError as err:
        raise CliError(f"--metric: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model_tag = args.model.replace("/", "_").replace(":", "-")
    out = Path(args.out or f"runs/{model_tag}-{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_pos-{args.positions}" if args.positions else ""  # per-position runs keep their own files
    record_path = out / f"run{tag}.json"
    record: dict[str, Any] = {"command": args.command, "options": vars(args), "versions": _versions(),
                              "device": device, "timings": {}, "status": "running"}
    t_start = time.perf_counter()

    t = time.perf_counter()
    with _loading_bars(args.progress):
        model = _load(args, device)
    record["timings"]["load_model_s"] = time.perf_counter() - t
    graph = ep.build_graph(model, split_qkv=not args.joint_qkv)
    data = _task(args, model)
    print(f"{graph!r} | task {args.task}: {len(data)} prompts x {data.clean.shape[1]} tokens | device {device}",
          flush=True)
    results: dict[str, Any] = {}
    rows = []
    stage = ""  # what runs now, for the message after an interruption
    try:
        for method, label in zip(methods, labels):
            scores_path = out / f"scores_{label}{tag}"
            t = time.perf_counter()
            scores, circuit_n = (_file_scores(method, graph, args.positions, data) if method.startswith(FILE)
                                 else (None, None))
            settings = None if scores is not None else _score_settings(args, method, model, graph, data)
            if scores is None and args.resume and (scores_path.with_suffix(".safetensors")).exists():
                scores = _resumed_scores(scores_path, graph, settings,
                                         [p for p in (out / f"{method}{tag}", out / f"sweep_{method}{tag}") if p.exists()])
                if scores is not None:
                    print(f"[{method}] scores loaded from {scores_path}.safetensors (resume)")
            if scores is None:
                opts: dict[str, Any] = dict(ablation=args.ablation, batch_size=args.batch_size, progress=args.progress)
                if method.startswith("eap-ig"):
                    opts["steps"] = args.steps
                if method in ("random",):
                    opts = {"seed": args.seed}
                if args.positions:
                    opts["positions"] = args.positions
                if method in RESUMING and args.resume:
                    opts["out"] = out / f"{method}{tag}"  # the scoring's progress
                stage = f"scoring with {method}"
                scores = ep.attribute(model, graph, data, metric=args.metric, method=method, **opts)
                scores.info["settings"] = settings  # what a resumed run checks before it reuses the file
                epio.save_scores(scores, scores_path)
            if not scores.per_position and label == method:  # MIB's submission format (Graph.from_pt reads it)
                epio.to_mib_pt(scores, out / f"mib_{method}.pt")
            record["timings"][f"{label}_scores_s"] = time.perf_counter() - t
            stage = ""
            t = time.perf_counter()
            options = dict(metric=args.metric, ablation=args.ablation, direction=args.direction,
                           random_baseline=args.random_baseline, seed=args.seed, batch_size=args.batch_size,
                           out=out / f"sweep_{label}{tag}" if args.resume else None, progress=args.progress,
                           prune=args.prune)
            if circuit_n is None:
                result = run_sweep(model, graph, scores, data, counts=counts, positions=args.positions, **options)
            else:  # a file's one circuit
                result = ep.evaluate_circuit(model, graph, scores, data, name=label, positions=args.positions, **options)
            record["timings"][f"{label}_sweep_s"] = time.perf_counter() - t
            results[label] = result
            faith = [float(v) for v in result.normalized]
            eff = [int(c) for c in result.effective_counts]
            rows.append({"method": label, "clean": float(result.clean_mean), "ablated": float(result.ablated_mean),
                         "faithfulness": faith, "counts": eff, "circuit": circuit_n is not None,
                         "cpr": _maybe(result.cpr), "cmd": _maybe(result.cmd),
                         "auc_log": _maybe(lambda: result.auc(log_x=True))})
            if args.prune:
                rows[-1]["pruned_counts"] = result.info["pruned_counts"]
            # the smallest circuit reaching 80% normalized faithfulness (a file's circuit: itself)
            reach = [c for c, f in zip(eff, faith) if f >= 0.8]
            rows[-1]["smallest_80pct"] = min(reach) if reach else None
            plotted = circuit_n if circuit_n is not None else (min(reach) if reach else None)
            if plotted and not scores.per_position:  # (the circuit plot draws edges, not (slot, edge) pairs)
                fig = plots.plot_circuit(scores, k=plotted)
                plots.save_figure(fig, out / f"circuit_{label}.html")
                if _png_ok():
                    plots.save_figure(fig, out / f"circuit_{label}.png")
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["timings"]["total_s"] = time.perf_counter() - t_start
        record_path.write_text(json.dumps(record, indent=2, default=str))
        lost = (f" The {stage} that was running keeps no progress and starts over."
                if stage and stage.split()[-1] not in RESUMING else "")
        print(f"\nInterrupted. Everything done so far is saved in {out}; run the same command again to resume.{lost}",
              file=sys.stderr)
        return 130
    fig = plots.plot_faithfulness({m.upper(): r for m, r in results.items()})
    plots.save_figure(fig, out / f"faithfulness{tag}.html")
    png = plots.save_figure(fig, out / f"faithfulness{tag}.png") if _png_ok() else False
    ranked = [r for r in rows if not r["circuit"]]
    circuits = [r for r in rows if r["circuit"]]
    swept = (ranked or rows)[0]["counts"]
    print()
    if ranked:
        print(f"metric {args.metric}, {args.direction}, ablation {args.ablation}; normalized faithfulness per edge "
              f"count:")
        print(_summary_table(ranked, swept))
    if circuits:
        if ranked:
            print()
        print(f"circuits from files (metric {args.metric}, {args.direction}, ablation {args.ablation}):")
        print(_circuit_table(circuits))
    n_items = next(iter(results.values())).n_edges  # edges, or (slot, edge) pairs per position
    unit = f"(position slot, edge) pairs ({args.positions} positions)" if args.positions else "edges"
    for r in ranked:
        k = r["smallest_80pct"]
        print(f"[{r['method']}] smallest circuit reaching 80% faithfulness: "
              + (f"{k} {unit} ({100 * k / n_items:.2f}% of {n_items:,})" if k else "none of the swept sizes"))
    record["status"] = "done"
    record["results"] = rows
    record["counts"] = swept
    record["n_edges"] = graph.n_edges
    if args.positions:
        record["n_pairs"] = n_items
    record["timings"]["total_s"] = time.perf_counter() - t_start
    record["peak_memory_mb"] = _peak_mb(device)
    record["files"] = sorted(p.name for p in out.iterdir())
    record_path.write_text(json.dumps(record, indent=2, default=str))
    mib = "" if args.positions else ", MIB graphs (mib_*.pt)"
    print(f"\nWrote {out}/: faithfulness{tag}.html{' + .png' if png else ''}, scores{mib}, sweeps, circuits, "
          f"{record_path.name} ({record['timings']['total_s']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except CliError as err:
        print(f"edgepatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except Exception as err:
        from edgepatch.errors import EdgepatchError

        if isinstance(err, EdgepatchError):
            print(f"edgepatch: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
