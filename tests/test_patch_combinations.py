"""Randomized combinations of what test_patch.py checks one at a time, against the same slow reference:
model (the tiny presets, Gemma 2, HuggingFace architectures through the bridge) x split q/k/v x batch
shape (including more than one token block) x ablation (corrupted run, mean, per-position mean, zero) x
weights (dense, sparse 0/1, the engine's shortcut cases, a mix of 0, 1 and fractions) x mode (one
circuit, circuits folded into the batch, per-position slots, with gradients).

The trials are drawn from a fixed seed, so a failure reproduces; its message names the combination.
Zero ablation keeps every edge into the logits: where every edge into a normalization's input is zero-
ablated, that input is the residual stream minus all of its parts, zero up to rounding, and the
normalization amplifies the rounding (any implementation differs from any other there)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import edgepatch as ep

from conftest import MODEL_CASES, cached_model
from test_patch import (ATOL, _gemma2, _hf_bridge, _PerToken, _reference_with_values, _shortcut_cases, reference_patched,
                        tokens)

_HF = ["qwen2", "gptj", "bloom", "falcon", "gemma3", "olmo2", "opt", "phi", "gpt_bigcode", "cohere"]
_MODELS = [("preset", c) for c in MODEL_CASES] + [("gemma2", c) for c in ("hooked", "bridge")] + [("hf", a) for a in _HF]
N_TRIALS = 400


_MODEL_CACHE: dict = {}


def _model(kind, arg):
    if (kind, arg) not in _MODEL_CACHE:
        _MODEL_CACHE[(kind, arg)] = (cached_model(*arg) if kind == "preset" else _gemma2(arg) if kind == "gemma2"
                                     else _hf_bridge(arg))
    return _MODEL_CACHE[(kind, arg)]


def _weights(g, gen, rng, kind, n_layers, keep_logits):
    if kind == "shortcut" and "m0" in g.src_names:
        W = rng.choice(_shortcut_cases(g, gen, n_layers))
    elif kind == "binary":
        W = (torch.rand(g.n_src, g.n_dest, generator=gen) < rng.choice([0.05, 0.3, 0.7, 0.95])).float()
    elif kind == "mixed":
        W = torch.rand(g.n_src, g.n_dest, generator=gen)
        W[torch.rand(g.n_src, g.n_dest, generator=gen) < 0.4] = 0
        W[torch.rand(g.n_src, g.n_dest, generator=gen) < 0.3] = 1
    else:
        W = torch.rand(g.n_src, g.n_dest, generator=gen)
    if keep_logits:
        W[:, g.dest_index("logits")] = 1
    return W


def _reference(model, g, W, clean, corrupt, abl):
    if abl.kind == "corrupt":
        return reference_patched(model, g, W, clean, corrupt)
    return _reference_with_values(model, g, W, clean, abl.values.expand(-1, *clean.shape, -1))


def _trials():
    rng = random.Random(20261124)
    out = []
    for i in range(N_TRIALS):
        kind, arg = rng.choice(_MODELS)
        t = dict(model=(kind, arg), split=rng.random() < 0.7, shape=rng.choice([(1, 3), (2, 5), (3, 6), (12, 14)]),
                 ablation=rng.choice(["corrupt", "corrupt", "mean", "pos_mean"] + (["zero"] if kind == "preset" else [])),
                 mode=rng.choice(["single", "single", "circuits", "positions", "grad"]),
                 weights=rng.choice(["dense", "binary", "shortcut", "mixed"]), seed=rng.randrange(10**6))
        out.append(t)
    return out


def _id(t) -> str:
    kind, arg = t["model"]
    name = "-".join(arg) if kind == "preset" else f"{kind}-{arg}" if kind == "gemma2" else arg
    b, p = t["shape"]
    return f"{name}-{'split' if t['split'] else 'joint'}-{b}x{p}-{t['ablation']}-{t['mode']}-{t['weights']}-{t['seed']}"


@pytest.mark.parametrize("trial", _trials(), ids=_id)
def test_random_combination_matches_reference(trial):
    model = _model(*trial["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Gemma 2/3, OLMo 2: heads do not add up (build_graph warns)
        g = ep.build_graph(model, split_qkv=trial["split"])
    rng = random.Random(trial["seed"])
    gen = torch.Generator().manual_seed(trial["seed"])
    b, p = trial["shape"]
    p = min(p, int(model.cfg.n_ctx))
    clean, corrupt = tokens(model, batch=b, pos=p, seed=trial["seed"] % 997), tokens(model, batch=b, pos=p, seed=1 + trial["seed"] % 997)
    kind = trial["ablation"]
    if kind == "corrupt":
        abl = ep.source_activations(model, g, corrupt)
    elif kind == "zero":
        abl = ep.zero_ablation(g)
    else:
        abl = ep.mean_activations(model, g, tokens(model, batch=3, pos=p, seed=7), per_position=kind == "pos_mean")
    L = model.cfg.n_layers

    def weights():
        return _weights(g, gen, rng, trial["weights"], L, keep_logits=kind == "zero")

    mode = trial["mode"]
    if mode in ("single", "grad"):
        W = weights()
        want = _reference(model, g, W, clean, corrupt, abl)
        Wp = W.clone().requires_grad_(mode == "grad")
        with ep.patch(model, g, Wp, abl), torch.set_grad_enabled(mode == "grad"):
            got = model(clean)
        if mode == "grad":
            got.sum().backward()
            assert Wp.grad is not None and bool(Wp.grad[g.valid].ne(0).any())
    elif mode == "circuits":
        Ws = torch.stack([weights() for _ in range(rng.choice([2, 3]))])
        want = torch.cat([_reference(model, g, w, clean, corrupt, abl) for w in Ws])
        with ep.patch(model, g, Ws, abl), torch.no_grad():
            got = model(clean.repeat(len(Ws), 1))
    else:  # per-position slots; -1 leaves a token unpatched (weights 1)
        S = rng.choice([2, 3])
        slots = torch.randint(-1, S, (b, p), generator=gen)
        Ws = torch.stack([weights() for _ in range(S)])
        Wt = torch.ones(b, p, g.n_src, g.n_dest)
        Wt[slots >= 0] = Ws[slots[slots >= 0]]
        want = _reference(model, g, _PerToken(Wt), clean, corrupt, abl)
        with ep.patch(model, g, Ws, abl, positions=slots), torch.no_grad():
            got = model(clean)
    assert (got - want).abs().max() <= ATOL
