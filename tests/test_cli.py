"""The `edgepatch` command end to end: outputs, resume after an interruption, bad options."""

from __future__ import annotations

import json

import pytest

from edgepatch import cli

FAST = ["--model", "random:tiny", "--task", "induction", "--n-prompts", "6", "--batch-size", "4",
        "--counts", "log", "--no-progress", "--threads", "2"]


def test_sweep_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["sweep", *FAST, "--method", "eap", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"scores_eap.safetensors", "scores_eap.json", "faithfulness.html", "run.json", "sweep_eap"} <= names
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["options"]["method"] == "eap"
    assert {"torch", "transformer-lens", "edgepatch"} <= set(record["versions"])
    assert record["peak_memory_mb"] > 0 and record["timings"]["total_s"] > 0
    text = capsys.readouterr().out
    assert "normalized faithfulness per edge count" in text and "CPR" in text and "eap" in text
    assert "<script src=\"http" not in (out / "faithfulness.html").read_text()[:200000]
    import torch

    import edgepatch as ep

    mib = torch.load(out / "mib_eap.pt", weights_only=True)  # written by this test's run
    want = ep.io.to_mib_pt(ep.io.load_scores(out / "scores_eap"), tmp_path / "want.pt")
    assert torch.equal(mib["edges_scores"], want["edges_scores"]) and mib["dst_nodes"] == want["dst_nodes"]
    assert mib["edges_scores"].abs().sum() > 0


def test_compare_overlays_methods(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *FAST, "--methods", "eap,random", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert [r["method"] for r in record["results"]] == ["eap", "random"]
    html = (out / "faithfulness.html").read_text()
    assert "EAP" in html and "RANDOM" in html


def test_scores_from_files_sweep_like_the_method_that_made_them(tmp_path, capsys):
    """``file:PATH`` sweeps another tool's scores: MIB / EAP-IG tensors and JSON, and edgepatch's own files. The
    same scores written in each format give the curve of the method that computed them."""
    import torch

    import edgepatch as ep

    out = tmp_path / "run"
    assert cli.main(["sweep", *FAST, "--method", "eap", "--out", str(out)]) == 0
    ep.io.to_mib_json(ep.io.load_scores(out / "scores_eap"), tmp_path / "theirs.json")
    files = [f"file:{out / 'mib_eap.pt'}", f"file:{tmp_path / 'theirs.json'}", f"file:{out / 'scores_eap.safetensors'}"]
    cmp = tmp_path / "cmp"
    assert cli.main(["compare", *FAST, "--methods", ",".join(["eap", *files]), "--out", str(cmp)]) == 0
    rows = json.loads((cmp / "run.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["eap", "file-mib_eap", "file-theirs", "file-scores_eap"]
    for r in rows[1:]:
        assert r["faithfulness"] == rows[0]["faithfulness"] and r["clean"] == rows[0]["clean"]
    names = {p.name for p in cmp.iterdir()}
    assert {"sweep_file-mib_eap", "sweep_file-theirs"} <= names
    assert not any(n.startswith(("mib_file", "scores_file")) for n in names)  # nothing re-exported
    assert "file-theirs" in capsys.readouterr().out
    # scores without a ranking and without a circuit
    graph = ep.io.load_scores(out / "scores_eap").graph
    flat = ep.EdgeScores(torch.ones(graph.n_src, graph.n_dest), graph)
    ep.io.to_mib_pt(flat, tmp_path / "flat.pt")
    assert cli.main(["sweep", *FAST, "--method", f"file:{tmp_path / 'flat.pt'}", "--out", str(tmp_path / "f")]) == 2
    assert "neither a ranking to sweep nor a circuit to evaluate" in capsys.readouterr().err
    # a file made for another model
    other = tmp_path / "other.pt"
    ep.io.to_mib_pt(ep.random_scores(ep.build_graph(ep.random_model("tiny-gqa"))), other)
    assert cli.main(["sweep", *FAST, "--method", f"file:{other}", "--out", str(tmp_path / "o")]) == 2
    assert "describes a model with n_heads=6" in capsys.readouterr().err


def test_per_position_score_files_sweep_with_their_positions(tmp_path, capsys):
    """edgepatch's per-position scores from a file sweep with --positions as the method that made them; the
    positions must match the file (and edge files take none). A per-position circuit file (ACDC's, or 1 / 0)
    is evaluated at its size, with its slots."""
    import re

    import torch

    import edgepatch as ep

    out = tmp_path / "run"
    assert cli.main(["sweep", *FAST, "--method", "eap", "--positions", "absolute", "--out", str(out)]) == 0
    theirs = out / "scores_eap_pos-absolute.safetensors"
    cmp = tmp_path / "cmp"
    assert cli.main(["compare", *FAST, "--methods", f"eap,file:{theirs}", "--positions", "absolute",
                     "--out", str(cmp)]) == 0
    rows = json.loads((cmp / "run_pos-absolute.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["eap", "file-scores_eap_pos-absolute"]
    assert rows[1]["faithfulness"] == rows[0]["faithfulness"] and rows[1]["counts"] == rows[0]["counts"]
    capsys.readouterr()
    for extra, message in (([], r"holds per-position scores \(slots \['0', '1', .*add the --positions"),
                           (["--positions", "named"], r"only the ioi task names its positions")):
        code = cli.main(["sweep", *FAST, "--method", f"file:{theirs}", *extra, "--out", str(tmp_path / "x")])
        assert code == 2 and re.search(message, capsys.readouterr().err), extra
    scores = ep.io.load_scores(theirs)
    fewer = ep.EdgeScores(scores.scores[:3], scores.graph, slots=scores.slots[:3])
    ep.io.save_scores(fewer, tmp_path / "fewer")
    assert cli.main(["sweep", *FAST, "--method", f"file:{tmp_path / 'fewer.safetensors'}", "--positions", "absolute",
                     "--out", str(tmp_path / "y")]) == 2
    assert re.search(r"the file's slots are \['0', '1', '2'\] but --positions absolute gives \['0', '1', '2', '3'",
                     capsys.readouterr().err)
    # an edge file with --positions
    graph = scores.graph
    ep.io.to_mib_pt(ep.random_scores(graph), tmp_path / "edges.pt")
    assert cli.main(["sweep", *FAST, "--method", f"file:{tmp_path / 'edges.pt'}", "--positions", "absolute",
                     "--out", str(tmp_path / "z")]) == 2
    assert "the file holds edge scores, not (position slot, edge) pairs" in capsys.readouterr().err
    # one per-position circuit (1 inside, 0 outside), evaluated at its size with its slots
    mask = torch.zeros(scores.scores.shape, dtype=torch.bool)
    for name in ("input->logits", "m1->logits", "input->m1"):
        mask[-1, graph.src_index(name.split("->")[0]), graph.dest_index(name.split("->")[1])] = True
    ep.io.save_scores(ep.EdgeScores(mask.float(), graph, slots=scores.slots, circuit_mask=mask), tmp_path / "mine")
    assert cli.main(["sweep", *FAST, "--method", f"file:{tmp_path / 'mine.safetensors'}", "--positions", "absolute",
                     "--out", str(tmp_path / "c")]) == 0
    row = json.loads((tmp_path / "c" / "run_pos-absolute.json").read_text())["results"][0]
    assert row["circuit"] and row["counts"] == [3]
    model = ep.random_model("tiny", seed=0)  # what --model random:tiny loads, and FAST's task
    data = ep.tasks.induction(int(model.cfg.d_vocab), n=6, seed=0)
    ref = ep.evaluate_circuit(model, graph, mask, data, positions="absolute")
    assert row["faithfulness"][0] == pytest.approx(float(ref.normalized[0]), abs=1e-5)


def _faithfulness_by_hand(mask_edges: list[str]) -> tuple[float, float, float]:
    """Clean, ablated and normalized faithfulness of one circuit for FAST's model and task, computed here with
    plain ``ep.patch`` forwards (corrupted-run ablation, logit difference, mean over the prompts)."""
    import torch

    import edgepatch as ep

    model = ep.random_model("tiny", seed=0)  # what --model random:tiny loads
    graph = ep.build_graph(model)
    data = ep.tasks.induction(int(model.cfg.d_vocab), n=6, seed=0)  # --task induction --n-prompts 6 --seed 0
    met = ep.get_metric("logit_diff")
    abl = ep.source_activations(model, graph, data.corrupt)
    with torch.no_grad():
        clean = float(met(model(data.clean), data).mean())
        with ep.patch(model, graph, torch.zeros(graph.n_src, graph.n_dest), abl):
            ablated = float(met(model(data.clean), data).mean())
        with ep.patch(model, graph, graph.mask_from_edges(mask_edges).float(), abl):
            kept = float(met(model(data.clean), data).mean())
    return clean, ablated, (kept - ablated) / (clean - ablated)


def test_a_circuit_file_is_evaluated_at_its_size(tmp_path, capsys):
    """A file that holds a circuit but no ranking (MIB's ``in_graph`` alone, or 1 inside / 0 outside) is one
    point: the command evaluates that circuit, beside the other methods' curves, and draws it."""
    import edgepatch as ep

    edges = ["input->a0.h0<v>", "a0.h0->m1", "input->m1", "m1->logits", "input->logits"]
    graph = ep.build_graph(ep.random_model("tiny", seed=0))
    ep.io.to_mib_pt(graph.mask_from_edges(edges), tmp_path / "theirs.pt", graph=graph)
    ep.io.to_mib_json(graph.mask_from_edges(edges), tmp_path / "mine.json", graph=graph)
    out = tmp_path / "cmp"
    methods = f"eap,file:{tmp_path / 'theirs.pt'},file:{tmp_path / 'mine.json'}"
    assert cli.main(["compare", *FAST, "--methods", methods, "--out", str(out)]) == 0
    rows = json.loads((out / "run.json").read_text())["results"]
    assert [(r["method"], r["circuit"]) for r in rows] == [("eap", False), ("file-theirs", True), ("file-mine", True)]
    assert len(rows[0]["counts"]) > 1
    clean, ablated, faith = _faithfulness_by_hand(edges)
    for r in rows[1:]:
        assert r["counts"] == [len(edges)]
        assert r["clean"] == pytest.approx(clean, abs=1e-5) and r["ablated"] == pytest.approx(ablated, abs=1e-5)
        assert r["faithfulness"][0] == pytest.approx(faith, abs=1e-4)
    text = capsys.readouterr().out
    assert "circuits from files" in text and "k=" in text  # the curve's table and the circuits' table
    html = (out / "faithfulness.html").read_text()
    assert '"symbol":"star"' in html.replace(" ", "")
    assert (out / f"circuit_{rows[1]['method']}.html").exists()
    # alone, with --prune: the connected part (a0.h0 reads only a value edge from input; all of it connects)
    assert cli.main(["sweep", *FAST, "--method", f"file:{tmp_path / 'theirs.pt'}", "--prune",
                     "--out", str(tmp_path / "alone")]) == 0
    text = capsys.readouterr().out
    assert "k=" not in text and f"{len(edges)} ({len(edges)} connected)" in text


def test_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "resume"
    import sys

    sweep_mod = sys.modules["edgepatch.sweep"]

    real = sweep_mod.sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "sweep", interrupted)
    assert cli.main(["sweep", *FAST, "--method", "eap", "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (out / "scores_eap.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(sweep_mod, "sweep", real)
    import edgepatch as ep

    calls = []
    original = ep.attribute
    monkeypatch.setattr(ep, "attribute", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert cli.main(["sweep", *FAST, "--method", "eap", "--out", str(out)]) == 0
    assert calls == []  # the scores were not recomputed
    assert "scores loaded" in capsys.readouterr().out


def test_resumed_scores_must_come_from_the_same_settings(tmp_path, capsys):
    """The command reuses a method's saved scores only when they were computed with the same model, prompts
    and scoring options, which it saves with them: scores from other settings, or saved without them (by an
    earlier edgepatch), are refused with what differs, never reused silently; --no-resume recomputes."""
    import edgepatch as ep

    out = tmp_path / "run"
    argv = ["sweep", *FAST, "--method", "eap-ig", "--out", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "scores loaded" in capsys.readouterr().out
    for change, what in ((["--steps", "3"], "steps: saved 5, now 3"), (["--n-prompts", "5"], "data: saved"),
                         (["--metric", "prob_diff"], "metric: saved 'logit_diff', now 'prob_diff'"),
                         (["--ablation", "zero"], "ablation: saved 'corrupt', now 'zero'")):
        assert cli.main([*argv, *change]) == 2, change
        err = capsys.readouterr().err
        assert what in err and "from other settings" in err and "Use another --out" in err, err
    scores = ep.io.load_scores(out / "scores_eap-ig")
    del scores.info["settings"]
    ep.io.save_scores(scores, out / "scores_eap-ig")
    assert cli.main(argv) == 2
    assert "saved without their settings" in capsys.readouterr().err
    assert cli.main([*argv, "--no-resume"]) == 0
    assert ep.io.load_scores(out / "scores_eap-ig").info["settings"]["steps"] == 5
    assert cli.main(argv) == 0  # the recomputed scores carry their settings again


def test_per_position_sweeps(tmp_path, capsys, monkeypatch):
    """--positions: absolute slots on any task; the ioi task's named slots (a tiny random model with GPT-2's
    vocabulary and tokenizer stands in for a real one). Per-position files sit beside the edge run's."""
    out = tmp_path / "pos"
    assert cli.main(["sweep", *FAST, "--method", "eap", "--positions", "absolute", "--out", str(out)]) == 0
    assert cli.main(["sweep", *FAST, "--method", "eap", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"scores_eap_pos-absolute.safetensors", "sweep_eap_pos-absolute", "faithfulness_pos-absolute.html",
            "run_pos-absolute.json", "scores_eap.safetensors", "run.json", "mib_eap.pt"} <= names
    assert not any("mib" in n and "pos" in n for n in names)  # MIB's format has no positions
    import edgepatch as ep

    record = json.loads((out / "run_pos-absolute.json").read_text())
    slots = ep.io.load_scores(out / "scores_eap_pos-absolute").slots
    assert slots == tuple(str(i) for i in range(len(slots))) and len(slots) > 1  # one per token index
    assert record["status"] == "done" and record["n_pairs"] == len(slots) * record["n_edges"]

    monkeypatch.setattr(cli, "_load", lambda args, device: ep.random_model("tiny", d_vocab=50257))  # + tokenizer
    capsys.readouterr()
    argv = ["sweep", "--model", "x", "--task", "ioi", "--n-prompts", "4", "--counts", "10,100", "--no-progress",
            "--method", "eap", "--positions", "named", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert json.loads((out / "run_pos-named.json").read_text())["counts"] == [10, 100]  # --counts 10,100
    assert cli._counts("1e-3") == [0.001] and cli._counts("7") == [7] and cli._counts("MIB") == "mib"
    assert "(position slot, edge) pairs (named positions)" in text or "none of the swept sizes" in text
    scores = ep.io.load_scores(out / "scores_eap_pos-named")
    assert scores.slots == ("IO", "S1", "S1+1", "S2", "END", "other")


def test_interrupted_exact_patching_resumes(tmp_path, monkeypatch, capsys):
    """Exact patching keeps its progress in the run's folder: the command interrupted while it scores says
    so, and the same command again runs only the forwards not done; a method without progress says that it
    starts over."""
    from edgepatch import attribution as attribution_mod
    from edgepatch import progress

    out = tmp_path / "exact"
    monkeypatch.setattr(progress, "SAVE_EVERY_S", 0.0)
    real = attribution_mod.patch
    calls = []

    def interrupt_after_one(*args, **kwargs):  # (two batches of prompts, all edges in one forward each)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution_mod, "patch", interrupt_after_one)
    argv = ["sweep", *FAST, "--method", "exact", "--out", str(out)]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "starts over" not in err
    assert (out / "exact" / "progress.safetensors").exists()
    calls.clear()
    monkeypatch.setattr(attribution_mod, "patch", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.main(argv) == 0
    total = len(calls)
    calls.clear()
    assert cli.main([*argv, "--no-resume", "--out", str(tmp_path / "fresh")]) == 0
    assert total == len(calls) - 1 and total >= 1  # the forward done before the interruption is not run again

    import edgepatch as ep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ep, "attribute", interrupted)
    assert cli.main(["sweep", *FAST, "--method", "activation-magnitude", "--out", str(tmp_path / "am")]) == 130
    assert ("The scoring with activation-magnitude that was running keeps no progress and starts over"
            in capsys.readouterr().err)
    for method in ("eap", "acdc", "learned"):
        assert cli.main(["sweep", *FAST, "--method", method, "--out", str(tmp_path / method)]) == 130
        assert "starts over" not in capsys.readouterr().err


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_random_models_run_the_tasks_their_vocabulary_allows(tmp_path, model_class):
    """random:tiny (101 tokens) has no tokenizer in either class, so induction draws from its vocabulary (the
    bridge used to carry GPT-2's tokenizer, whose ids overflowed it); the ioi task then says what is missing."""
    out = tmp_path / model_class
    assert cli.main(["sweep", *FAST, "--method", "eap", "--model-class", model_class, "--out", str(out)]) == 0
    assert cli.main(["sweep", *FAST[:2], "--task", "ioi", "--model-class", model_class, "--no-progress",
                     "--out", str(out)]) == 2


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--counts", "10,1o0"], r"--counts '10,1o0': '1o0' is not a number; give comma-separated"),
    (["sweep", "--counts", "loog"], r"unknown counts 'loog'; expected one of .* Did you mean 'log'"),
    (["sweep", "--method", "random", "--positions", "absolute"], "--positions scores .* which random cannot; use eap"),
    (["sweep", "--method", "eap", "--positions", "named", "--task", "sva"], "only the ioi task names its positions"),
    (["sweep", "--method", "eap", "--positions", "absolute", "--prune"], "--prune: MIB's pruning"),
    (["sweep", "--method", "eapp"], "unknown method 'eapp'; expected one of .* Did you mean 'eap'"),
    (["sweep", "--task", "iio"], "unknown task 'iio'.* Did you mean 'ioi'"),
    (["sweep", "--n-prompts", "0"], "--n-prompts and --batch-size must be >= 1"),
    (["sweep", "--metric", "logit_dif"], "Did you mean 'logit_diff'"),
    (["sweep", "--method", "file:"], "file:PATH needs a path"),
    (["sweep", "--method", "file:nowhere/graph.pt"], "--method file:nowhere/graph.pt: no such file"),
])
def test_bad_options(argv, message, capsys, tmp_path):
    code = cli.main([*argv, "--model", "random:tiny", "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_bad_file_methods(tmp_path, capsys):
    import re

    for name in ("notes.md", "a/graph.pt", "b/graph.pt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    for argv, message in (
        (["sweep", "--method", f"file:{tmp_path / 'notes.md'}"], r"expected a MIB / EAP-IG graph file \(.json or .pt\) "
                                                                  r"or edgepatch scores \(.safetensors\); got a .md file"),
        (["compare", "--methods", f"file:{tmp_path / 'a/graph.pt'},file:{tmp_path / 'b/graph.pt'}"],
         "names 'file-graph' twice"),
        (["sweep", "--method", f"file:{tmp_path / 'a/graph.pt'}", "--task", "induction"],
         r"graph\.pt' is not a torch.save archive"),
    ):
        assert cli.main([*argv, "--model", "random:tiny", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        assert re.search(message, capsys.readouterr().err), argv


@pytest.mark.slow
def test_sweep_on_smollm2(tmp_path, capsys):
    out = tmp_path / "smol"
    assert cli.main(["sweep", "--model", "smollm2-135m", "--task", "ioi", "--method", "eap", "--counts", "mib",
                     "--n-prompts", "8", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["results"][0]["clean"] > 0  # the real model does IOI
    err = capsys.readouterr().err
    assert "it/s]" not in err and "s/it]" not in err, err[-500:]  # no progress bars, transformers' included
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # and transformers' setting is restored
