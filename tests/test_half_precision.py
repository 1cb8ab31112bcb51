"""Models in bfloat16 and float16 (how large models are usually run): patching and attribution are as
accurate as the model itself in that precision.

Half precision cannot meet the float32 tolerances of test_patch.py. The bound here is derived from the
model: the engine's error against the float32 reference may be at most twice the larger of the errors
of (a) the same slow reference run in half precision and (b) the plain half-precision forward, both
against float32. Each test also asserts that the effect it measures is at least ten times that bound,
so an engine that patched nothing (or scored nothing) could not pass. Float64 models, at the end, are held
to float64's precision."""

from __future__ import annotations

import pytest
import torch

import edgepatch as ep
from conftest import class_or_other, requires
from edgepatch.attribution import eap

from test_attribution import autograd_reference, data_for
from test_patch import reference_patched, tokens

HALF = [torch.bfloat16, torch.float16]
CASES = [("tiny", "hooked"), ("tiny", "bridge"), ("tiny-gqa", "bridge"), ("tiny-parallel", "hooked")]


def _pair(preset, model_class, dtype):
    """The same random model in float32 and in ``dtype``."""
    requires(model_class)
    return (ep.random_model(preset, model_class=model_class, seed=0),
            ep.random_model(preset, model_class=model_class, seed=0, dtype=dtype))


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_patching_in_half_precision(case, dtype):
    m32, mh = _pair(*case, dtype)
    g32, gh = ep.build_graph(m32), ep.build_graph(mh)
    clean, corrupt = tokens(mh, seed=3), tokens(mh, seed=4)
    W = torch.rand(gh.n_src, gh.n_dest, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        abl = ep.source_activations(mh, gh, corrupt)
        assert abl.values.dtype == dtype
        with ep.patch(mh, gh, W, abl):
            got = mh(clean)
        with ep.patch(mh, gh, torch.ones_like(W), abl):
            ones = mh(clean)
        with ep.patch(mh, gh, torch.zeros_like(W), abl):
            zeros = mh(clean)
        plain_h, corrupt_h = mh(clean), mh(corrupt)
        want = reference_patched(m32, g32, W, clean, corrupt)
        ref_h = reference_patched(mh, gh, W, clean, corrupt)
        plain32 = m32(clean)
    assert got.dtype == dtype
    bound = 2 * max(_err(ref_h, want), _err(plain_h, plain32))
    assert _err(got, want) <= bound
    assert _err(want, plain32) > 10 * bound  # the patching effect dwarfs half precision's error
    assert torch.equal(ones, plain_h)  # all edges kept: the model's own forward, bit for bit
    assert _err(zeros, corrupt_h) <= bound


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_attribution_in_half_precision(model_class, dtype):
    """EAP on a half-precision model against autograd through ``patch`` on the float32 model: within a
    small multiple (4) of how far autograd through ``patch`` on the half-precision model is. The two
    compute the same gradient along different paths (EAP applies the normalization's Jacobian itself), so
    their rounding errors differ in place, not in scale."""
    m32, mh = _pair("tiny", model_class, dtype)
    g32, gh = ep.build_graph(m32), ep.build_graph(mh)
    data = data_for(mh)
    got = eap(mh, gh, data, "logit_diff", batch_size=4, progress=False).scores
    want = autograd_reference(m32, g32, data)
    ref_h = autograd_reference(mh, gh, data)
    v = gh.valid
    bound = 4 * _err(ref_h[v], want[v])
    assert got.dtype == torch.float32
    assert _err(got[v], want[v]) <= bound
    assert float(want[v].abs().max()) > 10 * bound


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sweep_in_half_precision(dtype):
    """A sweep on a half-precision model follows the float32 model's faithfulness curve."""
    m32, mh = _pair("tiny", class_or_other("bridge"), dtype)
    g32, gh = ep.build_graph(m32), ep.build_graph(mh)
    data = data_for(mh)
    scores = eap(m32, g32, data, "logit_diff", batch_size=4, progress=False)
    counts = [1, 10, 100, g32.n_edges]
    r32 = ep.sweep(m32, g32, scores, data, counts=counts, metric="logit_diff", progress=False)
    rh = ep.sweep(mh, gh, scores, data, counts=counts, metric="logit_diff", progress=False)
    with torch.no_grad():
        spread = _err(mh(data.clean)[:, -1], m32(data.clean)[:, -1])  # the model's own half-precision error
    assert rh.values.dtype == r32.values.dtype  # metrics are accumulated in full precision
    assert _err(rh.values, r32.values) <= 4 * spread
    assert _err(r32.values[0], r32.values[-1]) > 10 * 4 * spread


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_float64_models_patch_and_attribute_exactly(model_class):
    """A float64 model (for exact checks, as planted models use) patches and attributes in float64, against
    the slow reference and autograd on the same model at float64's precision. Once, the bridge's
    normalization of the mixed inputs took float32 weights with float64 inputs and every patched forward
    with gradients, or with a circuit, stopped with torch's mixed-dtype error."""
    requires(model_class)
    model = ep.random_model("tiny", model_class=model_class, seed=0, dtype=torch.float64)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, seed=3), tokens(model, seed=4)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        abl = ep.source_activations(model, g, corrupt)
        with ep.patch(model, g, W, abl):
            got = model(clean)
        want = reference_patched(model, g, W, clean, corrupt)
        plain = model(clean)
    assert got.dtype == torch.float64
    assert _err(got, want) <= 1e-10 < 1e-3 <= _err(want, plain)
    data = data_for(model)
    scores = eap(model, g, data, "logit_diff", batch_size=4, progress=False).scores
    ref = autograd_reference(model, g, data)
    v = g.valid
    assert _err(scores[v], ref[v]) <= 1e-6 * float(ref[v].abs().max())  # (scores are accumulated in float32)
