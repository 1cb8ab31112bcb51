"""Baselines: seeded random scores and activation magnitudes checked against hand-made hook references."""

from __future__ import annotations

import functools

import pytest
import torch

import edgepatch as ep
from conftest import ANY_CLASS, requires
from edgepatch.baselines import activation_magnitude, random_scores
from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError
from edgepatch.tasks import induction

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _model(preset: str, cls: str):
    requires(cls)
    return ep.random_model(preset, model_class=cls, seed=0)


def padded_data() -> PromptPairs:
    """Two prompts, the second right-padded: padding must not enter the mean."""
    d = induction(101, n=2, seq_len=4, seed=0)
    mask = torch.ones_like(d.clean, dtype=torch.bool)
    mask[1, -2:] = False
    return PromptPairs(clean=d.clean, corrupt=d.corrupt, answers=d.answers, wrong=d.wrong,
                       attention_mask=mask, answer_pos=torch.tensor([d.pos - 1, d.pos - 3]))


def test_random_scores_seeded_and_valid():
    graph = ep.build_graph(_model("tiny", ANY_CLASS))
    a, b, c = random_scores(graph, seed=0), random_scores(graph, seed=0), random_scores(graph, seed=1)
    assert torch.equal(a.flat, b.flat) and not torch.equal(a.flat, c.flat)
    assert bool(a.scores[~graph.valid].isnan().all()) and not bool(a.flat.isnan().any())
    assert a.method == "random" and a.info == {"seed": 0, "score_kind": "random"}
    assert len(set(a.flat.tolist())) == graph.n_edges  # no ties
    # the global RNG is not used
    state = torch.get_rng_state()
    random_scores(graph, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(EdgepatchError, match="graph must be an edgepatch Graph"):
        random_scores("gpt2")


def _reference_norms(model, graph, data, ablation: str) -> torch.Tensor:
    """Per-source mean ||o_s - â_s|| over real tokens, from TransformerLens's own cache."""
    _, clean = model.run_with_cache(data.clean)
    _, corrupt = model.run_with_cache(data.corrupt)

    def outputs(cache):
        outs = [cache["blocks.0.hook_resid_pre"][None]]
        for layer in range(model.cfg.n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"]
            W_O = model.blocks[layer].attn.W_O
            if z.ndim == 3:
                z = z.view(*z.shape[:2], W_O.shape[0], W_O.shape[1])
            outs.append(torch.einsum("bphk,hkm->hbpm", z, W_O))
            outs.append(cache[f"blocks.{layer}.hook_mlp_out"][None])
        return torch.cat(outs)  # [n_src, batch, pos, d_model]

    o = outputs(clean)
    if ablation == "zero":
        diff = o
    else:
        a = outputs(corrupt)
        diff = o - a
    norms = diff.norm(dim=-1)  # [n_src, batch, pos]
    mask = data.attention_mask.float()[None]
    return (norms * mask).sum((1, 2)) / mask.sum()


@pytest.mark.parametrize("cls", ["hooked", "bridge"])
@pytest.mark.parametrize("ablation", ["corrupt", "zero"])
def test_activation_magnitude_matches_cache_reference(cls, ablation):
    model = _model("tiny", cls)
    graph = ep.build_graph(model)
    data = padded_data()
    hooks_before = [(n, len(h._forward_hooks)) for n, h in model.hook_dict.items()]
    flags_before = {f: getattr(model.cfg, f, None) for f in ("use_split_qkv_input", "use_hook_mlp_in")}
    scores = activation_magnitude(model, graph, data, ablation=ablation, batch_size=1, progress=False)
    with torch.no_grad():
        ref = _reference_norms(model, graph, data, ablation)
    assert torch.allclose(scores.info["per_source"], ref, rtol=1e-4, atol=1e-5)
    # broadcast to every valid destination of the source
    expected = ref[:, None].expand(graph.n_src, graph.n_dest)
    assert torch.allclose(scores.scores[graph.valid], expected[graph.valid], rtol=1e-4, atol=1e-5)
    assert scores.info["score_kind"] == "magnitude" and scores.info["ablation"] == ablation
    assert [(n, len(h._forward_hooks)) for n, h in model.hook_dict.items()] == hooks_before
    assert {f: getattr(model.cfg, f, None) for f in flags_before} == flags_before
    # the input embedding differs only where clean and corrupt tokens differ
    if ablation == "corrupt":
        assert float(scores.info["per_source"][0]) > 0


def test_activation_magnitude_padding_is_ignored_and_mean_ablation():
    model = _model("tiny", ANY_CLASS)
    graph = ep.build_graph(model)
    data = padded_data()
    a = activation_magnitude(model, graph, data, ablation="zero", progress=False)
    # changing the padded tokens does not change the scores
    clean = data.clean.clone()
    clean[1, -2:] = 7
    data2 = PromptPairs(clean=clean, corrupt=data.corrupt, answers=data.answers, wrong=data.wrong,
                        attention_mask=data.attention_mask, answer_pos=data.answer_pos)
    b = activation_magnitude(model, graph, data2, ablation="zero", progress=False)
    assert torch.allclose(a.flat, b.flat)
    m = activation_magnitude(model, graph, data, ablation="mean", progress=False)
    assert m.info["ablation"] == "mean" and bool((m.flat > 0).all())
    abl = ep.zero_ablation(graph)
    z = activation_magnitude(model, graph, data, ablation=abl, progress=False)
    assert torch.allclose(z.flat, a.flat)


def test_activation_magnitude_gqa_and_errors():
    model = _model("tiny-gqa", ANY_CLASS)
    graph = ep.build_graph(model)
    s = activation_magnitude(model, graph, induction(101, n=3, seq_len=4), progress=False)
    assert s.scores.shape == (graph.n_src, graph.n_dest)
    assert not bool(s.flat.isnan().any())
    with pytest.raises(EdgepatchError, match="ablation must be one of"):
        activation_magnitude(model, graph, induction(101, n=3, seq_len=4), ablation="noise", progress=False)
    with pytest.raises(EdgepatchError, match="batch_size must be a positive int"):
        activation_magnitude(model, graph, induction(101, n=3, seq_len=4), batch_size=0, progress=False)
