"""Invariants on the real pretrained SmolLM2-135M-Instruct (grouped-query attention, 30 layers)."""

from __future__ import annotations

import pytest
import torch

import edgepatch as ep

pytestmark = pytest.mark.slow


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module", params=["bridge", "hooked", pytest.param("bridge-cuda", marks=_CUDA),
                                        pytest.param("hooked-cuda", marks=_CUDA)])
def smol(request):
    model_class, _, device = request.param.partition("-")
    model = ep.load_model("smollm2-135m", model_class=model_class, device=device or "cpu")
    where = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert where == {device or "cpu"}, f"asked for {device or 'cpu'}, got weights on {where}"
    return model


def test_graph_of_smollm2(smol):
    g = ep.build_graph(smol)
    # 30 layers x (9 query heads + MLP) + input; destinations: 9 q + 3 k + 3 v + MLP per layer + logits
    assert (g.n_src, g.n_dest) == (301, 481)
    assert "a29.kv2<v>" in g.dest_names


def test_invariants_on_real_weights(smol):
    g = ep.build_graph(smol)
    data = ep.tasks.ioi(smol.tokenizer, n=4, seed=0).to(next(smol.parameters()).device)
    with torch.no_grad():
        clean, corrupt = smol(data.clean), smol(data.corrupt)
        abl = ep.source_activations(smol, g, data.corrupt)
        with ep.patch(smol, g, torch.ones(g.n_src, g.n_dest), abl):
            ones = smol(data.clean)
        with ep.patch(smol, g, torch.zeros(g.n_src, g.n_dest), abl):
            zeros = smol(data.clean)
    assert (ones - clean).abs().max() <= 1e-5
    assert (zeros - corrupt).abs().max() <= 1e-3 * max(1.0, float(corrupt.abs().max()) / 10)
    assert ep.metrics.logit_diff(clean, data).mean() > 1.0  # the pretrained model does IOI


def test_eap_equals_autograd_on_real_weights(smol):
    g = ep.build_graph(smol)
    data = ep.tasks.ioi(smol.tokenizer, n=2, seed=1).to(next(smol.parameters()).device)
    s = ep.eap(smol, g, data, progress=False)
    abl = ep.source_activations(smol, g, data.corrupt)
    W = torch.ones(g.n_src, g.n_dest, requires_grad=True)  # on the CPU whatever the model's device
    with ep.patch(smol, g, W, abl):
        ep.metrics.logit_diff(smol(data.clean), data).mean().backward()
    v = g.valid
    assert torch.allclose(s.scores[v], -W.grad[v], rtol=1e-4, atol=1e-5 * float(W.grad[v].abs().max()))
