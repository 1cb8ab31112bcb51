"""Everything on a CUDA device: patching, gradients, attribution, sweeps, ACDC, learned masks, baselines,
weight masks and the command line, each against an independent reference on the CPU.

Skipped where no GPU is present (CI has none). ``EDGEPATCH_TEST_GPU=cpu`` runs the module on the CPU,
which checks the tests themselves on a machine without a GPU (then the "GPU" and CPU sides agree
trivially in places; the references below are independent either way).

The reference of each test runs on a float32 model on the CPU. On the GPU, float32 matrix products
do not use TF32 unless the user enables it (PyTorch's default), so the tolerances are those of
test_patch.py, with a relative part for sums over the vocabulary.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, MODEL_CASES, assert_unchanged, class_or_other, model_id, model_snapshot, requires
from edgepatch.attribution import eap, eap_ig, exact_patching
from edgepatch.metrics import get_metric

from test_attribution import autograd_reference, data_for
from test_patch import _PerToken, _reference_circuits, _reference_with_values, reference_patched, tokens

DEV = os.environ.get("EDGEPATCH_TEST_GPU", "cuda")
pytestmark = pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device (EDGEPATCH_TEST_GPU=cpu checks these tests on the CPU)")
ATOL = 1e-4


def pair(preset, model_class, seed=0, **kw):
    """The same random model on the CPU and on the GPU."""
    requires(model_class)
    cpu = ep.random_model(preset, model_class=model_class, seed=seed, **kw)
    gpu = ep.random_model(preset, model_class=model_class, seed=seed, device=DEV, **kw)
    return cpu, gpu


def on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEV).type


def close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL, rtol: float = 1e-5) -> None:
    got, want = got.detach().cpu().float(), want.detach().cpu().float()
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= atol + rtol * float(want.abs().max()), err


# ---------------------------------------------------------------------------------------------------
# Patching: invariants 1-2 and the reference, every model shape, q/k/v split and joint
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [True, False], ids=["split", "joint"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_patching_on_the_gpu_matches_the_reference(case, split):
    cpu, gpu = pair(*case)
    g = ep.build_graph(gpu, split_qkv=split)
    clean, corrupt = tokens(cpu, seed=1), tokens(cpu, seed=2)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        abl = ep.source_activations(gpu, g, corrupt.to(DEV))
        assert on_gpu(abl.values)
        with ep.patch(gpu, g, W.to(DEV), abl):
            got = gpu(clean.to(DEV))
        with ep.patch(gpu, g, torch.ones_like(W), abl):
            ones = gpu(clean.to(DEV))
        with ep.patch(gpu, g, torch.zeros_like(W), abl):
            zeros = gpu(clean.to(DEV))
        want = reference_patched(cpu, g, W, clean, corrupt)
        plain, corrupted = cpu(clean), cpu(corrupt)
    assert on_gpu(got)
    close(got, want)
    close(ones, plain)
    close(zeros, corrupted)
    assert float((want - plain).abs().max()) > 100 * ATOL  # the weights matter: the test can fail


@pytest.mark.parametrize("model_class", ["bridge", "hooked"])
@pytest.mark.parametrize("device", [DEV, None], ids=["device", "default"])
def test_loading_a_local_folder_puts_every_weight_on_the_device(tmp_path, model_class, device):
    """``load_model(folder, device=...)`` (and, without a device, TransformerLens' default: CUDA when
    available) places every weight there, the bridge's too: TransformerLens boots a bridge on a given
    Hugging Face model where that model already is."""
    import transformers

    requires(model_class)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64))
    hf_model.eval().save_pretrained(tmp_path / "tiny")
    model = ep.load_model(tmp_path / "tiny", model_class=model_class, device=device)
    want = torch.device(DEV).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {want}
    toks = torch.tensor([[50256, 5335, 290, 1757]])
    with torch.no_grad():
        close(model(toks.to(want)), hf_model(toks).logits, atol=1e-5)


def test_weights_tokens_and_ablations_on_the_cpu_are_moved_to_the_models_device():
    """A user who builds weights with torch.rand (on the CPU) and passes a GPU model gets the same answer."""
    cpu, gpu = pair("tiny", ANY_CLASS)
    g = ep.build_graph(gpu)
    clean, corrupt = tokens(cpu, seed=1), tokens(cpu, seed=2)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        abl_cpu = ep.source_activations(cpu, g, corrupt)  # recorded on the CPU model
        with ep.patch(gpu, g, W, abl_cpu):
            got = gpu(clean)
        names = g.edge_names[::3]
        with ep.patch(gpu, g, names, abl_cpu):
            by_name = gpu(clean)
        want = reference_patched(cpu, g, W, clean, corrupt)
        want_names = reference_patched(cpu, g, g.mask_from_edges(names).float(), clean, corrupt)
    close(got, want)
    close(by_name, want_names)


def test_patch_leaves_a_gpu_model_unchanged(tmp_path):
    _, gpu = pair("tiny", ANY_CLASS, seed=1)
    with torch.no_grad():
        gpu(torch.zeros(1, 2, dtype=torch.long, device=DEV))
    before = model_snapshot(gpu)
    g = ep.build_graph(gpu)
    abl = ep.source_activations(gpu, g, tokens(gpu, seed=2).to(DEV))
    with ep.patch(gpu, g, torch.rand(g.n_src, g.n_dest, device=DEV), abl):
        gpu(tokens(gpu).to(DEV))
    with pytest.raises(RuntimeError, match="boom"):
        with ep.patch(gpu, g, torch.rand(g.n_src, g.n_dest), abl):
            raise RuntimeError("boom")
    assert_unchanged(gpu, before)


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_zero_and_mean_ablations_on_the_gpu(model_class):
    cpu, gpu = pair("tiny-gqa", model_class)
    g = ep.build_graph(gpu)
    clean, ref_tokens = tokens(cpu, seed=1), tokens(cpu, batch=5, seed=4)
    mask = torch.ones_like(ref_tokens)
    mask[0, -2:] = 0  # padding in one reference prompt: its positions take no part in the mean
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean_gpu = ep.mean_activations(gpu, g, ref_tokens.to(DEV), attention_mask=mask.to(DEV))
        mean_cpu = ep.mean_activations(cpu, g, ref_tokens, attention_mask=mask)
        close(mean_gpu.values, mean_cpu.values)
        for abl_gpu, abl_cpu in ((mean_gpu, mean_cpu), (ep.zero_ablation(g, device=DEV), ep.zero_ablation(g))):
            with ep.patch(gpu, g, W.to(DEV), abl_gpu):
                got = gpu(clean.to(DEV))
            full = abl_cpu.values.expand(-1, clean.shape[0], clean.shape[1], -1)
            close(got, _reference_with_values(cpu, g, W, clean, full))


def test_per_position_weights_and_folded_circuits_on_the_gpu():
    cpu, gpu = pair("tiny", ANY_CLASS)
    g = ep.build_graph(gpu)
    clean, corrupt = tokens(cpu, batch=2, pos=5, seed=1), tokens(cpu, batch=2, pos=5, seed=2)
    gen = torch.Generator().manual_seed(4)
    Wp = torch.rand(5, g.n_src, g.n_dest, generator=gen)
    Ws = torch.rand(3, g.n_src, g.n_dest, generator=gen)
    with torch.no_grad():
        abl = ep.source_activations(gpu, g, corrupt.to(DEV))
        with ep.patch(gpu, g, Wp.to(DEV), abl, positions="absolute"):
            per_pos = gpu(clean.to(DEV))
        with ep.patch(gpu, g, Ws.to(DEV), abl):
            folded = gpu(clean.to(DEV).repeat(3, 1))
        slots = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, -1, -1]])
        Wslot = Ws[:2]
        with ep.patch(gpu, g, Wslot, abl, positions=slots):  # slot table and weights on the CPU: moved
            by_slot = gpu(clean.to(DEV))
        # references: per-token weights [batch, pos, n_src, n_dest] through the one-destination reference
        Wt = Wp.unsqueeze(0).expand(2, -1, -1, -1)
        want_pos = reference_patched(cpu, g, _PerToken(Wt), clean, corrupt)
        idx = slots.clamp(min=0)
        Wt_slot = torch.where((slots >= 0)[:, :, None, None], Wslot[idx], torch.ones(g.n_src, g.n_dest))
        want_slot = reference_patched(cpu, g, _PerToken(Wt_slot), clean, corrupt)
        want_folded = _reference_circuits(cpu, g, Ws, clean, corrupt)
    close(per_pos, want_pos)
    close(by_slot, want_slot)
    close(folded, want_folded)


# ---------------------------------------------------------------------------------------------------
# Gradients and attribution
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [("tiny", "hooked"), ("tiny", "bridge"), ("tiny-gqa", "bridge"),
                                  ("tiny-parallel", "hooked")], ids=model_id)
def test_gradients_and_eap_on_the_gpu_match_autograd_on_the_cpu(case):
    cpu, gpu = pair(*case)
    g = ep.build_graph(gpu)
    data = data_for(cpu)
    want = autograd_reference(cpu, g, data)
    v = g.valid
    # autograd through patch() on the GPU, weights on the GPU
    abl = ep.source_activations(gpu, g, data.corrupt.to(DEV))
    W = torch.ones(g.n_src, g.n_dest, device=DEV, requires_grad=True)
    with ep.patch(gpu, g, W, abl):
        get_metric("logit_diff")(gpu(data.clean.to(DEV)), data.to(DEV)).mean().backward()
    scale = float(want[v].abs().max())
    assert scale > 1e-4
    close(-W.grad[v], want[v], atol=1e-5 * scale)
    # EAP's own backward pass, data left on the CPU (moved to the model's device)
    s = eap(gpu, g, data, "logit_diff", batch_size=4, progress=False)
    assert s.scores.device.type == "cpu"
    close(s.scores[v], want[v], atol=1e-5 * scale)
    assert torch.isnan(s.scores[~v]).all()


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_integrated_gradients_and_exact_patching_on_the_gpu(model_class):
    cpu, gpu = pair("tiny", model_class)
    g = ep.build_graph(gpu)
    data = data_for(cpu, n=5)
    ig_gpu = eap_ig(gpu, g, data, steps=3, batch_size=3, progress=False)
    ig_cpu = eap_ig(cpu, g, data, steps=3, batch_size=3, progress=False)  # (tested against references on the CPU)
    v = g.valid
    close(ig_gpu.scores[v], ig_cpu.scores[v], atol=1e-5 * float(ig_cpu.scores[v].abs().max()))
    exact = exact_patching(gpu, g, data, edges_per_forward=7, batch_size=3, progress=False)
    met = get_metric("logit_diff")
    abl = ep.source_activations(cpu, g, data.corrupt)
    with torch.no_grad():
        full = met(cpu(data.clean), data).mean()
        for i in torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:8].tolist():
            s, d = g.edge_index[i].tolist()
            W = torch.ones(g.n_src, g.n_dest)
            W[s, d] = 0
            with ep.patch(cpu, g, W, abl):  # one edge removed, on the CPU model
                want = met(cpu(data.clean), data).mean() - full
            assert abs(float(exact.scores[s, d]) - float(want)) <= 1e-4, g.edge_names[i]
    assert exact.flat.abs().max() > 1e-3


def test_baselines_on_the_gpu():
    cpu, gpu = pair("tiny-gqa", ANY_CLASS)
    g = ep.build_graph(gpu)
    data = data_for(cpu)
    for ablation in ("corrupt", "mean", "zero"):
        a = ep.activation_magnitude(gpu, g, data, ablation=ablation, progress=False)
        b = ep.activation_magnitude(cpu, g, data, ablation=ablation, progress=False)
        v = g.valid
        close(a.scores[v], b.scores[v], atol=1e-5 * float(b.scores[v].abs().max()))


# ---------------------------------------------------------------------------------------------------
# Sweeps and circuits
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_sweep_on_the_gpu_follows_plain_patches_on_the_cpu(model_class):
    cpu, gpu = pair("tiny", model_class)
    g = ep.build_graph(gpu)
    data = data_for(cpu, n=6)
    scores = ep.random_scores(g, seed=2)
    counts = [1, 5, 20, 60, g.n_edges]
    for direction in ("sufficiency", "necessity"):
        r = ep.sweep(gpu, g, scores, data, counts=counts, direction=direction, batch_size=4, progress=False)
        met = get_metric("logit_diff")
        abl = ep.source_activations(cpu, g, data.corrupt)
        with torch.no_grad():
            for i, n in enumerate(counts):
                top = scores.circuit(n).float()  # [n_src, n_dest] mask of the top n edges
                W = top if direction == "sufficiency" else 1 - top * g.valid
                with ep.patch(cpu, g, W, abl):
                    want = met(cpu(data.clean), data)  # per prompt
                close(r.values[i], want)
    circuit = g.edge_names[::7]
    one = ep.evaluate_circuit(gpu, g, circuit, data, progress=False)
    with torch.no_grad(), ep.patch(cpu, g, g.mask_from_edges(circuit).float(), abl):
        close(one.values[0], met(cpu(data.clean), data))


def test_acdc_on_the_gpu_finds_the_cpus_circuit():
    cls = ANY_CLASS
    cpu, gpu = pair("tiny", cls)
    g = ep.build_graph(gpu)
    data = data_for(cpu, n=6)
    threshold = {"hooked": 0.01, "bridge": 1e-5}[cls]
    a = ep.acdc(gpu, g, data, threshold=threshold, progress=False)
    b = ep.acdc(cpu, g, data, threshold=threshold, progress=False)
    kept = int(b.circuit_mask.sum())
    assert 0 < kept < g.n_edges  # neither empty nor full: the search decided something
    assert torch.equal(a.circuit_mask, b.circuit_mask)
    v = g.valid
    close(a.scores[v].nan_to_num(0), b.scores[v].nan_to_num(0), atol=1e-5)


def test_learned_masks_on_the_gpu():
    cls = class_or_other("bridge")
    cpu, gpu = pair("tiny", cls)
    g = ep.build_graph(gpu)
    data = data_for(cpu, n=8)
    before = model_snapshot(gpu)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if DEV.startswith("cuda") else None
    a = ep.learn_masks(gpu, g, data, target_sparsity=0.5, epochs=6, seed=3, batch_size=4, progress=False)
    b = ep.learn_masks(gpu, g, data, target_sparsity=0.5, epochs=6, seed=3, batch_size=4, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the user's random state is left alone, the GPU's too
    if cuda_rng is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert_unchanged(gpu, before)
    assert torch.equal(a.scores.nan_to_num(0), b.scores.nan_to_num(0))  # seeded on the GPU too
    assert a.scores.device.type == "cpu" and a.circuit_mask is not None
    assert 0 < int(a.circuit_mask.sum()) < g.n_edges
    # sigmoid masks draw no noise: the loss of the first step (one batch, before any update) is the same
    # number on both devices (the hard-concrete noise comes from each device's own generator)
    runs = [ep.learn_masks(m, g, data, mask_fn="sigmoid", init=0.5, epochs=1, batch_size=8,
                          progress=False) for m in (gpu, cpu)]
    first = [r.info["history"][0]["faithfulness"] for r in runs]
    assert first[0] == pytest.approx(first[1], rel=1e-4, abs=1e-6)
    assert first[1] > 1e-3  # masks at 0.5: the patched model is far from the model


def test_weight_masks_on_the_gpu():
    """A weight subnetwork trained on the GPU: the model comes back unchanged, and the metric it reports for
    the subnetwork is that of the CPU model with the complement's weights zeroed by hand."""
    cpu, gpu = pair("tiny", "hooked", seed=1)  # (the bridge's parameters have other names)
    data = data_for(cpu, n=6)
    before = model_snapshot(gpu)
    res = ep.train_weight_masks(gpu, data, ["blocks.*.attn.W_Q", "blocks.0.mlp.W_in"], target_sparsity=0.5,
                                epochs=20, progress=False)
    assert_unchanged(gpu, before)
    assert 0 < res.n_kept < res.n_total
    with torch.no_grad():
        for name, keep in res.subnetwork.items():
            cpu.get_parameter(name).mul_(keep.cpu().to(torch.float32))
        want = float(get_metric("logit_diff")(cpu(data.clean), data).mean())
    assert res.metric_subnetwork == pytest.approx(want, abs=1e-4)
    assert abs(res.metric_full - want) > 1e-3  # zeroing the complement changed something: the test can fail


# ---------------------------------------------------------------------------------------------------
# The command line with --device
# ---------------------------------------------------------------------------------------------------
def test_command_line_on_the_gpu_agrees_with_the_cpu(tmp_path):
    from edgepatch import cli

    argv = ["sweep", "--model", "random:tiny", "--task", "induction", "--n-prompts", "6", "--batch-size", "4",
            "--counts", "1,10,50", "--no-progress", "--method", "eap"]
    assert cli.main([*argv, "--device", DEV, "--out", str(tmp_path / "gpu")]) == 0
    assert cli.main([*argv, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    rg = json.loads((tmp_path / "gpu" / "run.json").read_text())
    rc = json.loads((tmp_path / "cpu" / "run.json").read_text())
    assert rg["device"].startswith(DEV.split(":")[0]) and rc["device"] == "cpu"
    assert rg["peak_memory_mb"] > 0
    for a, b in zip(rg["results"], rc["results"]):
        assert a["clean"] == pytest.approx(b["clean"], abs=1e-4)
        assert a["faithfulness"] == pytest.approx(b["faithfulness"], abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Half precision on the GPU (how large models run there)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_patching_on_the_gpu(dtype):
    """The bound of test_half_precision.py: at most twice the larger of the half-precision reference's and
    the plain half-precision forward's errors against float32."""
    cls = class_or_other("bridge")
    requires(cls)
    m32 = ep.random_model("tiny", model_class=cls, seed=0)
    mh = ep.random_model("tiny", model_class=cls, seed=0, device=DEV, dtype=dtype)
    mh_cpu = ep.random_model("tiny", model_class=cls, seed=0, dtype=dtype)
    g = ep.build_graph(mh)
    clean, corrupt = tokens(m32, seed=3), tokens(m32, seed=4)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        abl = ep.source_activations(mh, g, corrupt.to(DEV))
        with ep.patch(mh, g, W, abl):
            got = mh(clean.to(DEV)).cpu()
        want = reference_patched(m32, g, W, clean, corrupt)
        ref_h = reference_patched(mh_cpu, g, W, clean, corrupt)
        plain_h, plain32 = mh(clean.to(DEV)).cpu(), m32(clean)
    err = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731
    bound = 2 * max(err(ref_h, want), err(plain_h, plain32))
    assert got.dtype == dtype
    assert err(got, want) <= bound
    assert err(want, plain32) > 10 * bound
