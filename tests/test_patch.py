"""The patching engine against an independent, slow reference and the invariants of DESIGN.md §3."""

from __future__ import annotations

import re

import pytest
import torch

import edgepatch as ep
from edgepatch import patching
from edgepatch.errors import EdgepatchError
from edgepatch.masks import mask_fn, train_masks

from conftest import ANY_CLASS, MODEL_CASES, assert_unchanged, cached_model, model_id, model_snapshot, requires, spread_norms

ATOL = 1e-4


def tokens(model, batch=3, pos=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)


# ---------------------------------------------------------------------------------------------------
# The reference: one destination and one source at a time, with TransformerLens's own hook API
# ---------------------------------------------------------------------------------------------------
def src_layer(name: str) -> tuple[int, str]:
    if name == "input":
        return -1, "input"
    m = re.fullmatch(r"a(\d+)\.h(\d+)", name)
    if m:
        return int(m.group(1)), "attn"
    return int(name[1:]), "mlp"


def reference_edge_exists(model, src: str, dest: str) -> bool:
    """The rule of DESIGN.md §1, written independently of edgepatch.graph."""
    layer, kind = src_layer(src)
    if dest == "logits":
        return True
    if dest.startswith("m"):
        d_layer = int(dest[1:])
        parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
        return layer < d_layer or (layer == d_layer and kind == "attn" and not parallel)
    d_layer = int(re.match(r"a(\d+)", dest).group(1))
    return layer < d_layer


def head_out(model, layer, z):
    """Per-head outputs by an explicit loop over heads (the engine uses one einsum), as the residual stream
    adds them: Granite's blocks multiply the attention output by the config's ``residual_multiplier``."""
    W_O = model.blocks[layer].attn.W_O
    n_heads, d_head = W_O.shape[0], W_O.shape[1]
    z = z.reshape(*z.shape[:2], n_heads, d_head)
    scale = getattr(getattr(getattr(model, "original_model", None), "config", None), "residual_multiplier", 1.0)
    return {f"a{layer}.h{h}": scale * (z[:, :, h, :] @ W_O[h]) for h in range(n_heads)}


def record_sources(model, toks):
    """Source outputs of a plain run, by name."""
    out = {}
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: out.__setitem__("input", x.detach().clone()))]
    for layer in range(model.cfg.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: out.update(
            {k: v.detach().clone() for k, v in head_out(model, layer, z).items()})))
        if not getattr(model.cfg, "attn_only", False):
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda x, hook, layer=layer: out.__setitem__(f"m{layer}", x.detach().clone())))
    with model.hooks(fwd_hooks=hooks):
        model(toks)
    return out


def reference_patched(model, graph, W, clean, corrupt):
    """x_d = r_d - sum_s (1 - w_sd)(o_s - â_s), one destination and one source at a time."""
    abl = record_sources(model, corrupt)
    cur: dict = {}
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    split = graph.split_qkv

    def fix(x, dest):
        d = graph.dest_names.index(dest)
        for s_name in graph.src_names:
            if not reference_edge_exists(model, s_name, dest):
                continue
            s = graph.src_names.index(s_name)
            x = x - (1 - W[s, d]) * (cur[s_name] - abl[s_name])
        return x

    def dest_name(layer, kind, j):
        if kind == "q" or n_kv == n_heads:
            return f"a{layer}.h{j}<{kind}>" if split else f"a{layer}.h{j}"
        return f"a{layer}.kv{j}<{kind}>" if split else f"a{layer}.kv{j}"

    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: cur.__setitem__("input", x))]
    split_inputs = _splits_qkv_inputs(model)
    mlp_in_fires = _hook_mlp_in_fires(model)
    busy = []  # per-head projections below run the model's own modules, whose hooks must not recurse
    for layer in range(model.cfg.n_layers):
        for kind in "qkv":
            if split_inputs:
                def qkv_hook(x, hook, layer=layer, kind=kind):
                    return torch.stack([fix(x[:, :, j], dest_name(layer, kind, j)) for j in range(x.shape[2])], dim=2)
                hooks.append((f"blocks.{layer}.hook_{kind}_input", qkv_hook))
                continue

            def proj_hook(y, hook, layer=layer, kind=kind):
                # TransformerLens cannot give this attention per-head inputs: project each head's own
                # patched input with the block's normalization and projection module, keep that head
                if busy:
                    return None
                block = model.blocks[layer]
                heads = []
                busy.append(1)
                try:
                    for j in range(y.shape[2]):
                        full = getattr(block.attn, kind)(block.ln1(fix(cur[f"r{layer}"], dest_name(layer, kind, j))))
                        heads.append(full.reshape(*y.shape)[:, :, j])
                finally:
                    busy.pop()
                return torch.stack(heads, dim=2)
            hooks.append((f"blocks.{layer}.attn.hook_{kind}", proj_hook))
        hooks.append((f"blocks.{layer}.hook_resid_pre", lambda x, hook, layer=layer: cur.__setitem__(f"r{layer}", x)))
        hooks.append((f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: cur.update(head_out(model, layer, z))))
        if not getattr(model.cfg, "attn_only", False):
            block = model.blocks[layer]
            if mlp_in_fires:
                hooks.append((f"blocks.{layer}.hook_mlp_in", lambda x, hook, layer=layer: fix(x, f"m{layer}")))
            elif hasattr(block, "ln2"):  # the MLP branch's normalization reads the residual (Bloom's bridge)
                hooks.append((f"blocks.{layer}.ln2.hook_in", lambda x, hook, layer=layer: fix(x, f"m{layer}")))
            else:  # parallel block whose MLP reads the attention's normalization: normalize its own input
                hooks.append((f"blocks.{layer}.mlp.hook_in",
                              lambda x, hook, layer=layer: model.blocks[layer].ln1(fix(cur[f"r{layer}"], f"m{layer}"))))
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda x, hook, layer=layer: cur.__setitem__(f"m{layer}", x)))
    last = model.cfg.n_layers - 1
    hooks.append((f"blocks.{last}.hook_resid_post", lambda x, hook: fix(x, "logits")))
    saved = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    if split_inputs:
        model.set_use_split_qkv_input(True)
    if not getattr(model.cfg, "attn_only", False):
        model.set_use_hook_mlp_in(True)
    try:
        with model.hooks(fwd_hooks=hooks):
            return model(clean)
    finally:
        model.set_use_split_qkv_input(saved[0])
        if not getattr(model.cfg, "attn_only", False):
            model.set_use_hook_mlp_in(saved[1])


def _splits_qkv_inputs(model) -> bool:
    """Whether TransformerLens gives every head its own q/k/v input (``hook_q_input``) holding the residual
    stream: not for a TransformerBridge attention that runs HuggingFace's projections on one shared input
    (GPT-J, OPT), nor for Bloom's bridge, whose split inputs hold the normalized residual."""
    validate = getattr(model, "_validate_attention_fork_supported", None)  # TransformerBridge 3.9+
    if validate is None:
        return True
    try:
        validate("use_split_qkv_input")
    except NotImplementedError:
        return False
    seen = {}
    _run_with_flag(model, "use_split_qkv_input", [
        (f"blocks.0.{name}", lambda x, hook, name=name: seen.setdefault(name, x.clone()))
        for name in ("hook_resid_pre", "hook_q_input")])
    return torch.equal(seen["hook_q_input"][:, :, 0], seen["hook_resid_pre"])


def _hook_mlp_in_fires(model) -> bool:
    """Whether ``hook_mlp_in`` fires in every block once switched on: not in TransformerBridge's parallel
    blocks whose MLP reads the attention's normalization (GPT-J, Phi, Falcon, Cohere), nor in Bloom's."""
    if getattr(model.cfg, "attn_only", False):
        return True
    fired = set()
    _run_with_flag(model, "use_hook_mlp_in", [(f"blocks.{layer}.hook_mlp_in", lambda x, hook, layer=layer: fired.add(layer))
                                              for layer in range(model.cfg.n_layers)])
    return len(fired) == model.cfg.n_layers


def _run_with_flag(model, flag: str, hooks) -> None:
    """One short forward with TransformerLens's ``flag`` on and ``hooks``; the flag restored after."""
    saved = getattr(model.cfg, flag)
    getattr(model, f"set_{flag}")(True)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokens(model, batch=1, pos=3))
    finally:
        getattr(model, f"set_{flag}")(saved)


def count_calls(monkeypatch, name: str) -> list:
    """Spy on the engine method ``name`` (a static method too): the returned list gets one entry per call."""
    calls: list = []
    static = isinstance(patching._Engine.__dict__[name], staticmethod)
    original = getattr(patching._Engine, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(patching._Engine, name, staticmethod(counted) if static else counted)
    return calls


# ---------------------------------------------------------------------------------------------------
# Graph structure
# ---------------------------------------------------------------------------------------------------
def test_gpt2_small_counts():
    spec = ep.graph.ModelSpec("gpt2", 12, 12, 12, 768, 64, 50257, False, False)
    split = ep.graph.graph_from_spec(spec, split_qkv=True)
    joint = ep.graph.graph_from_spec(spec, split_qkv=False)
    assert (split.n_src, split.n_dest, split.n_edges) == (157, 445, 32491)
    assert (joint.n_src, joint.n_dest, joint.n_edges) == (157, 157, 11611)
    node = ep.graph.graph_from_spec(spec, level="node")
    assert (node.n_src, node.n_dest, len(node.edge_names)) == (157, 1, 157)
    assert repr(split) == "Graph(gpt2, 157 src x 445 dest, 32,491 edges)"


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
@pytest.mark.parametrize("split", [True, False])
def test_validity_matches_reference_rule(case, split):
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    for s, src in enumerate(g.src_names):
        for d, dest in enumerate(g.dest_names):
            assert bool(g.valid[s, d]) == reference_edge_exists(model, src, dest), (src, dest)
    # names <-> indices round trip
    for i in range(0, g.n_edges, 7):
        assert g.edge(g.edge_names[i]) == tuple(g.edge_index[i].tolist())


def test_parallel_and_gqa_names():
    par = ep.build_graph(cached_model("tiny-parallel", ANY_CLASS))
    assert par.valid[par.src_index("a1.h0"), par.dest_index("m1")].item() is False
    seq = ep.build_graph(cached_model("tiny", ANY_CLASS))
    assert seq.valid[seq.src_index("a1.h0"), seq.dest_index("m1")].item() is True
    gqa = ep.build_graph(cached_model("tiny-gqa", ANY_CLASS))
    assert "a0.kv1<k>" in gqa.dest_names and "a0.h5<q>" in gqa.dest_names and "a0.h5<k>" not in gqa.dest_names
    assert gqa.n_dest == 2 * (6 + 2 + 2 + 1) + 1


# ---------------------------------------------------------------------------------------------------
# Invariants 1-4
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [True, False])
def test_all_ones_is_clean_and_all_zeros_is_corrupt(any_model, split):
    model = any_model
    g = ep.build_graph(model, split_qkv=split)
    clean, corrupt = tokens(model, seed=1), tokens(model, seed=2)
    with torch.no_grad():
        lc, lx = model(clean), model(corrupt)
        abl = ep.source_activations(model, g, corrupt)
        with ep.patch(model, g, torch.ones(g.n_src, g.n_dest), abl):
            l1 = model(clean)
        with ep.patch(model, g, torch.zeros(g.n_src, g.n_dest), abl):
            l0 = model(clean)
    assert (l1 - lc).abs().max() <= 1e-5
    assert (l0 - lx).abs().max() <= 1e-4
    assert (lc - lx).abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("split", [True, False])
def test_random_weights_match_reference(any_model, split):
    model = any_model
    g = ep.build_graph(model, split_qkv=split)
    clean, corrupt = tokens(model, seed=3), tokens(model, seed=4)
    gen = torch.Generator().manual_seed(5)
    for kind in ("uniform", "subset"):
        W = torch.rand(g.n_src, g.n_dest, generator=gen)
        if kind == "subset":
            W = (W < 0.5).float()
        with torch.no_grad():
            abl = ep.source_activations(model, g, corrupt)
            with ep.patch(model, g, W, abl):
                got = model(clean)
            want = reference_patched(model, g, W, clean, corrupt)
            plain = model(clean)
        assert (got - want).abs().max() <= ATOL
        assert (want - plain).abs().max() > 1e-3


def assert_node_patching_replaces_sources(model, g, abl, clean, corrupt, srcs):
    """DESIGN.md §3.3: w = 0 on every edge out of each source in ``srcs`` equals replacing that source's
    output by its corrupted-run value with TransformerLens hooks."""
    with torch.no_grad():
        cache = {}
        with model.hooks(fwd_hooks=[(n, lambda x, hook, n=n: cache.__setitem__(n, x.clone()))
                                    for n in ("blocks.0.hook_resid_pre", "blocks.0.attn.hook_z",
                                              "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out")]):
            model(corrupt)
        for src in srcs:
            W = torch.ones(g.n_src, g.n_dest)
            W[g.src_index(src)] = 0
            with ep.patch(model, g, W, abl):
                got = model(clean)
            layer, kind = src_layer(src)
            if kind == "input":
                hook = ("blocks.0.hook_resid_pre", lambda x, hook: cache["blocks.0.hook_resid_pre"])
            elif kind == "mlp":
                hook = (f"blocks.{layer}.hook_mlp_out", lambda x, hook: cache[f"blocks.{layer}.hook_mlp_out"])
            else:
                h = int(src.split(".h")[1])
                name = f"blocks.{layer}.attn.hook_z"

                def hook_fn(z, hook, h=h, name=name):
                    n_heads = model.cfg.n_heads
                    zz = z.reshape(*z.shape[:2], n_heads, -1).clone()
                    zz[:, :, h] = cache[name].reshape(*z.shape[:2], n_heads, -1)[:, :, h]
                    return zz.reshape(z.shape)

                hook = (name, hook_fn)
            with model.hooks(fwd_hooks=[hook]):
                want = model(clean)
            assert (got - want).abs().max() <= ATOL, src


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_node_patching_equals_replacing_the_source(case):
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, seed=6), tokens(model, seed=7)
    srcs = ["input", "a0.h1", "a1.h0"] + ([] if getattr(model.cfg, "attn_only", False) else ["m0"])
    with torch.no_grad():
        abl = ep.source_activations(model, g, corrupt)
        assert_node_patching_replaces_sources(model, g, abl, clean, corrupt, srcs)
        # node-level graph: the same through one weight per source
        node = ep.build_graph(model, level="node")
        w = torch.ones(node.n_src)
        w[node.src_index("a0.h1")] = 0
        with ep.patch(model, node, w, abl):
            got_node = model(clean)
        W = torch.ones(g.n_src, g.n_dest)
        W[g.src_index("a0.h1")] = 0
        with ep.patch(model, g, W, abl):
            got_edge = model(clean)
    assert (got_node - got_edge).abs().max() <= 1e-6


def test_head_outputs_sum_to_attention_output(any_model):
    model = any_model
    cache = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[
        ("blocks.0.attn.hook_z", lambda x, hook: cache.__setitem__("z", x)),
        ("blocks.0.hook_attn_out", lambda x, hook: cache.__setitem__("out", x)),
    ]):
        model(tokens(model))
    heads = head_out(model, 0, cache["z"])
    b_O = getattr(model.blocks[0].attn, "b_O", None)
    total = sum(heads.values()) + (0 if b_O is None else b_O)
    assert (total - cache["out"]).abs().max() <= 1e-5

@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_hooks_that_change_sources_count_however_they_are_added(model_class):
    """A user's hooks that change a source's output (the input, a head's z, an MLP's output) change what the
    engine records as that source, whether they were put on before ``patch``, inside it with
    ``model.hooks``, or by ``run_with_hooks`` (which calls ``forward`` itself): the engine's recording hooks
    run after them. Once, hooks added inside ``patch`` ran after the recording: the residual stream carried
    the changed output and the destinations subtracted the unchanged one. Reference: the slow reference
    with the same hooks on (its recording hooks come after them)."""
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, seed=45), tokens(model, seed=46)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(47))
    W[g.src_index("m0")] = 0  # and a source none reads: its change must cancel out of every destination

    def head0(z, hook):
        z = z.clone()
        z[:, :, 0] = 3 * z[:, :, 0]
        return z

    user = [("blocks.0.hook_resid_pre", lambda x, hook: x + 0.5), ("blocks.1.attn.hook_z", head0),
            ("blocks.0.hook_mlp_out", lambda x, hook: 3 * x)]
    with torch.no_grad(), model.hooks(fwd_hooks=user):
        want = reference_patched(model, g, W, clean, corrupt)
        abl = ep.source_activations(model, g, corrupt)
    got = {}
    with torch.no_grad():
        with ep.patch(model, g, W, abl):
            with model.hooks(fwd_hooks=user):
                got["model.hooks inside"] = model(clean)
            got["run_with_hooks inside"] = model.run_with_hooks(clean, fwd_hooks=user)
        with model.hooks(fwd_hooks=user), ep.patch(model, g, W, abl):
            got["model.hooks outside"] = model(clean)
    with ep.patch(model, g, W.clone().requires_grad_(True), abl), model.hooks(fwd_hooks=user):
        got["with gradients"] = model(clean).detach()
    for how, logits in got.items():
        assert (logits - want).abs().max() <= ATOL, how
    assert not any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_hooks_already_on_the_model_see_and_change_the_patched_values(model_class):
    """A user's hooks put on before ``patch`` at a destination's hook point (q/k/v, the MLP input, the final
    residual) see the patched forward's full values there, as hooks added inside ``patch`` do, and what
    they return is what the destination receives (once they saw q/k/v with no positions and their changes
    were overwritten). Reference: zeroing layer 0's values zeroes its heads' ``z``, which the slow reference
    gets from a hook on ``hook_z`` (a source: recorded after the user's hook, by the engine and the
    reference alike). EAP then scores every edge into layer 0's heads exactly 0: nothing there depends on
    them."""
    from edgepatch.tasks import induction

    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, seed=41), tokens(model, seed=42)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(43))
    W[g.src_index("a0.h1")] = 0  # and a sparse corner: a head that no destination reads

    def zero(x, hook):
        return torch.zeros_like(x)

    last = model.cfg.n_layers - 1
    watched = ("blocks.1.attn.hook_q", "blocks.1.attn.hook_v", "blocks.0.hook_mlp_in", f"blocks.{last}.hook_resid_post")
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero)]):
        want = reference_patched(model, g, W, clean, corrupt)
    before: dict = {}
    flag = model.cfg.use_hook_mlp_in
    try:
        model.set_use_hook_mlp_in(True)  # (TransformerLens's own switch for hooks there)
        model.add_hook("blocks.0.attn.hook_v", zero)
        for name in watched:
            model.add_hook(name, lambda x, hook, name=name: before.__setitem__(name, x.detach().clone()))
        abl = ep.source_activations(model, g, corrupt)
        for grad in (False, True):
            inside: dict = {}
            with torch.set_grad_enabled(grad), ep.patch(model, g, W.clone().requires_grad_(grad), abl):
                with model.hooks(fwd_hooks=[(n, lambda x, hook, n=n: inside.__setitem__(n, x.detach().clone()))
                                            for n in watched]):
                    got = model(clean).detach()
            assert (got - want).abs().max() <= ATOL, grad
            for name in watched:
                assert before[name].shape == inside[name].shape, (grad, name)
                assert (before[name] - inside[name]).abs().max() <= 1e-6, (grad, name)
        data = induction(model.cfg.d_vocab, n=3, seq_len=3, seed=44)
        scores = ep.attribute(model, g, data, method="eap", progress=False).scores
    finally:
        model.reset_hooks(including_permanent=False)
        model.set_use_hook_mlp_in(flag)
    scores = torch.where(g.valid, scores, 0.0)  # (NaN where no edge exists)
    layer0 = [d for d, name in enumerate(g.dest_names) if name.startswith("a0.")]
    assert scores[:, layer0].abs().max() == 0
    assert scores[:, [d for d in range(g.n_dest) if d not in layer0]].abs().max() > 0



# ---------------------------------------------------------------------------------------------------
# Weights as names, ablations, per-position weights, circuits in the batch, gradients
# ---------------------------------------------------------------------------------------------------
def test_edge_names_as_weights():
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    keep = ["input->a0.h0<q>", "a0.h1->m1", "m1->logits"]
    clean, corrupt = tokens(model), tokens(model, seed=9)
    W = g.mask_from_edges(keep).float()
    assert W.sum() == 3
    abl = ep.source_activations(model, g, corrupt)
    with torch.no_grad():
        with ep.patch(model, g, keep, abl):
            a = model(clean)
        with ep.patch(model, g, W, abl):
            b = model(clean)
    assert torch.equal(a, b)
    assert g.edges_from_mask(W.bool()) == sorted(keep, key=g.edge_names.index)


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_source_activations_of_some_rows(model_class):
    # A forward of clean and corrupted prompts together that records only the corrupted rows' sources
    # (what sweeps do) gives the same ablation as a forward of the corrupted prompts alone.
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model), tokens(model, seed=9)
    alone = ep.source_activations(model, g, corrupt)
    part, logits = ep.source_activations(model, g, torch.cat([clean, corrupt]), rows=slice(3, 6), logits_at=None)
    assert part.values.shape == alone.values.shape and part.values.is_contiguous()
    torch.testing.assert_close(part.values, alone.values, atol=1e-5, rtol=0)
    assert alone.projections and part.projections.keys() == alone.projections.keys()
    for key, want in alone.projections.items():
        assert part.projections[key].is_contiguous()
        torch.testing.assert_close(part.projections[key], want, atol=1e-5, rtol=0)
    assert logits.shape[0] == 6  # the logits keep every row
    with torch.no_grad():
        torch.testing.assert_close(logits[:3], model(clean), atol=1e-4, rtol=0)
    with pytest.raises(EdgepatchError, match=r"rows must be a slice of the batch with step 1.*got \[3, 4\]"):
        ep.source_activations(model, g, corrupt, rows=[3, 4])


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_zero_and_mean_ablation(model_class):
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    clean = tokens(model)
    W = (torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    ref_toks = tokens(model, batch=5, seed=11)
    mask = torch.ones(ref_toks.shape, dtype=torch.bool)
    mask[0, 4:] = False  # padding is excluded from the mean
    with torch.no_grad():
        acts = ep.source_activations(model, g, ref_toks).values  # [n_src, 5, pos, d]
        mean = ep.mean_activations(model, g, ref_toks, attention_mask=mask)
        want = (acts * mask[None, :, :, None]).sum((1, 2)) / mask.sum()
        assert torch.allclose(mean.values[:, 0, 0], want, atol=1e-5)
        pos_mean = ep.mean_activations(model, g, ref_toks, per_position=True)
        assert torch.allclose(pos_mean.values[:, 0], acts.mean(1), atol=1e-5)
        for abl in (ep.zero_ablation(g), mean, pos_mean):
            # the reference with broadcast ablation: all-zero weights == every source replaced by â
            with ep.patch(model, g, W, abl):
                got = model(clean)
            full = abl.values.expand(-1, clean.shape[0], clean.shape[1], -1)
            want = _reference_with_values(model, g, W, clean, full)
            assert (got - want).abs().max() <= ATOL


def _reference_with_values(model, g, W, clean, values):
    """reference_patched, with ablated values given instead of a corrupted run."""
    original = record_sources
    try:
        globals()["record_sources"] = lambda m, t: {n: values[i] for i, n in enumerate(g.src_names)}
        return reference_patched(model, g, W, clean, None)
    finally:
        globals()["record_sources"] = original


class _PerToken:
    """Per-token weights ``[batch, pos, n_src, n_dest]`` indexed like the reference indexes ``W[s, d]``."""

    def __init__(self, Wt):
        self.Wt = Wt

    def __getitem__(self, sd):
        s, d = sd
        return self.Wt[:, :, s, d].unsqueeze(-1)


def _reference_circuits(model, g, Ws, clean, ablation):
    """The reference for each circuit of ``Ws`` (``[C, n_src, n_dest]``), concatenated as the batch of
    ``clean.repeat(C, 1)``; ``ablation``: the corrupted tokens, or a broadcasting Ablation."""
    if isinstance(ablation, torch.Tensor):
        return torch.cat([reference_patched(model, g, w, clean, ablation) for w in Ws])
    full = ablation.values.expand(-1, clean.shape[0], clean.shape[1], -1)
    return torch.cat([_reference_with_values(model, g, w, clean, full) for w in Ws])

def test_per_position_weights():
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=2, pos=5), tokens(model, batch=2, pos=5, seed=3)
    abl = ep.source_activations(model, g, corrupt)
    gen = torch.Generator().manual_seed(1)
    Wp = torch.rand(5, g.n_src, g.n_dest, generator=gen)
    with torch.no_grad():
        with ep.patch(model, g, Wp, abl, positions="absolute"):
            got = model(clean)
        # position p only sees weights Wp[p]: compare each position with a uniform-weight run
        for p in range(5):
            with ep.patch(model, g, Wp[p], abl):
                want_p = model(clean)[:, p]
            # causal: position p's logits depend on weights at positions <= p, so use equal weights below p
            Wq = Wp.clone()
            Wq[: p + 1] = Wp[p]
            with ep.patch(model, g, Wq, abl, positions="absolute"):
                got_p = model(clean)[:, p]
            assert (got_p - want_p).abs().max() <= ATOL
        # slot tensors: two named slots, -1 leaves a token clean
        slots = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, -1, -1]])
        Ws = torch.stack([torch.zeros(g.n_src, g.n_dest), torch.ones(g.n_src, g.n_dest)])
        with ep.patch(model, g, Ws, abl, positions=slots):
            got_s = model(clean)
        with ep.patch(model, g, torch.zeros(g.n_src, g.n_dest), abl):
            all_abl = model(clean)
    assert (got_s[:, 0] - all_abl[:, 0]).abs().max() <= ATOL  # both prompts' position 0 use slot 0 (ablated)
    assert got.shape == (2, 5, model.cfg.d_vocab)


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_circuits_folded_into_batch(model_class):
    model = cached_model("tiny-gqa", model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model), tokens(model, seed=8)
    abl = ep.source_activations(model, g, corrupt)
    W = torch.rand(4, g.n_src, g.n_dest, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ep.patch(model, g, W, abl):
            got = model(clean.repeat(4, 1)).view(4, *clean.shape, -1)
        for c in range(4):
            with ep.patch(model, g, W[c], abl):
                assert (got[c] - model(clean)).abs().max() <= ATOL


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_gradient_matches_finite_differences(model_class):
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=2), tokens(model, batch=2, seed=5)
    abl = ep.source_activations(model, g, corrupt)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    Wg = W.clone().requires_grad_(True)
    with ep.patch(model, g, Wg, abl):
        out = model(clean)[:, -1, :5].sum()
    out.backward()
    for s, d in g.edge_index[torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(4))[:5]].tolist():
        vals = []
        for delta in (-1e-2, 1e-2):
            Wd = W.clone()
            Wd[s, d] += delta
            with torch.no_grad(), ep.patch(model, g, Wd.clamp(0, 1), abl):
                vals.append(model(clean)[:, -1, :5].sum())
        step = float((W[s, d] + 1e-2).clamp(max=1) - (W[s, d] - 1e-2).clamp(min=0))
        fd = (vals[1] - vals[0]) / step
        assert abs(fd - Wg.grad[s, d]) <= 2e-3 + 2e-2 * abs(fd), (s, d)


# ---------------------------------------------------------------------------------------------------
# Invariant 7: every context restores the model, also after an exception, and nests
# ---------------------------------------------------------------------------------------------------
def test_patch_restores_model_and_nests(fresh_model):
    model = fresh_model
    g = ep.build_graph(model)
    clean, corrupt = tokens(model), tokens(model, seed=2)
    abl = ep.source_activations(model, g, corrupt)
    before = model_snapshot(model)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(clean)
        with ep.patch(model, g, W, abl):
            outer = model(clean)
            with ep.patch(model, g, torch.zeros(g.n_src, g.n_dest), abl):
                inner = model(clean)
                with pytest.raises(RuntimeError, match="boom"):
                    with ep.patch(model, g, torch.ones(g.n_src, g.n_dest), abl):
                        raise RuntimeError("boom")
                assert torch.allclose(model(clean), inner)  # inner is active again after the failed one
            assert torch.allclose(model(clean), outer)  # outer is restored after inner exits
        assert torch.allclose(model(clean), plain)
    assert_unchanged(model, before)
    assert torch.allclose(inner, model(corrupt), atol=1e-4)


def test_nested_patches_with_different_split_modes(monkeypatch):
    """Where the engine falls back to split q/k/v inputs, a patch that leaves attention alone runs with that
    mode off, one that patches attention with it on. Nested either way, the outer patch gives the same
    logits before and after the inner one (its hooks are reinstalled while the inner flags still hold)."""
    model = cached_model("tiny", "hooked")
    g = ep.build_graph(model)
    clean = tokens(model)
    abl = ep.source_activations(model, g, tokens(model, seed=2))
    gen = torch.Generator().manual_seed(3)
    attn = torch.rand(g.n_src, g.n_dest, generator=gen)  # patches attention inputs: split mode on
    mlp_only = torch.ones(g.n_src, g.n_dest)  # attention inputs kept: split mode off
    mlp_only[:, g.dest_index("m1")] = torch.rand(g.n_src, generator=gen)
    monkeypatch.setattr(patching, "projections_of", lambda model: None)
    with torch.no_grad():
        for outer_w, inner_w in ((attn, mlp_only), (mlp_only, attn)):
            with ep.patch(model, g, outer_w, abl):
                first = model(clean)
                with ep.patch(model, g, inner_w, abl):
                    model(clean)
                assert (model(clean) - first).abs().max() <= 1e-6
            with ep.patch(model, g, outer_w, abl):
                assert (model(clean) - first).abs().max() <= 1e-6


def test_flags_restored_when_user_set_them(monkeypatch):
    requires("hooked")
    model = ep.random_model("tiny", model_class="hooked", seed=2)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(False)
    g = ep.build_graph(model)
    abl = ep.zero_ablation(g)
    # patched heads are recomputed at their q/k/v projections: split inputs are turned off inside
    with ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
        assert not model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in
    assert model.cfg.use_split_qkv_input is True and model.cfg.use_hook_mlp_in is False
    # an architecture without that path falls back to TransformerLens's split inputs
    with monkeypatch.context() as mp:
        mp.setattr(patching, "projections_of", lambda model: None)
        model.set_use_split_qkv_input(False)
        with ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
            assert model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in
        assert model.cfg.use_split_qkv_input is False and model.cfg.use_hook_mlp_in is False
        model.set_use_split_qkv_input(True)
    # attention inputs all kept: the engine does not need (costly) split inputs, and turns them off inside
    W = torch.ones(g.n_src, g.n_dest)
    W[:, g.dest_index("logits")] = 0
    with ep.patch(model, g, W, abl):
        assert not model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
    assert model.cfg.use_split_qkv_input is True and model.cfg.use_hook_mlp_in is False


def test_train_masks_and_mask_fn_restore_and_nest(fresh_model):
    model = fresh_model
    g = ep.build_graph(model)
    clean = tokens(model)
    abl = ep.source_activations(model, g, tokens(model, seed=3))
    before = model_snapshot(model)
    with train_masks(model, g, abl, mask_fn="sigmoid", init=0.9) as masks:
        assert all(not p.requires_grad for p in model.parameters())
        opt = torch.optim.Adam(masks.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            loss = model(clean)[:, -1].logsumexp(-1).mean() + 1e-2 * masks.penalty()
            loss.backward()
            opt.step()
        assert masks.logits.grad is not None and masks.logits.grad.abs().sum() > 0
        with mask_fn("hard_concrete", masks=masks, beta=0.5) as f:
            assert masks.function is f
            with mask_fn("identity", masks=masks):
                assert masks.function.name == "identity"
            assert masks.function is f
        assert masks.function.name == "sigmoid"
        with pytest.raises(ValueError, match="inside"):
            with train_masks(model, g, abl, mask_fn="continuous", temperature=2.0):
                raise ValueError("inside")
        assert all(not p.requires_grad for p in model.parameters())  # the outer mode still holds
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(model, before)


def test_mask_functions():
    p = torch.tensor([-3.0, 0.0, 3.0])
    from edgepatch.masks import ContinuousSparsification, HardConcrete, Sigmoid, make_mask_fn

    assert torch.allclose(Sigmoid()(p, True), torch.sigmoid(p))
    hc = HardConcrete()
    eval_w = hc(p, training=False)
    assert eval_w[0] == 0 and eval_w[2] == 1  # stretched and clamped
    torch.manual_seed(0)
    samples = torch.stack([hc(p, training=True) for _ in range(200)])
    assert ((samples == 0) | (samples == 1)).float().mean() > 0.3  # hard-concrete puts mass at 0 and 1
    cs = ContinuousSparsification(temperature=1.0)
    assert torch.equal(cs(p, training=False), torch.tensor([0.0, 0.0, 1.0]))
    cs.temperature = 200.0
    assert torch.allclose(cs(torch.tensor([-0.1, 0.1]), True), torch.tensor([0.0, 1.0]), atol=1e-6)
    assert abs(ContinuousSparsification.schedule(89, 90, 200.0) - 200.0) < 1e-9
    assert ContinuousSparsification.schedule(0, 90, 200.0) == 1.0
    for name in ("sigmoid", "hard_concrete", "continuous"):
        f = make_mask_fn(name)
        assert abs(float(f(torch.tensor(f.init_value(0.8)), training=False)) - 0.8) < 1e-3 or name == "continuous"
    with pytest.raises(ValueError, match=r"Unknown mask function 'sigmod'.*Did you mean 'sigmoid'"):
        make_mask_fn("sigmod")


# ---------------------------------------------------------------------------------------------------
# Bad input: clear messages, model unchanged afterwards
# ---------------------------------------------------------------------------------------------------
def test_errors_leave_model_unchanged(fresh_model):
    model = fresh_model
    g = ep.build_graph(model)
    clean, corrupt = tokens(model), tokens(model, seed=1)
    abl = ep.source_activations(model, g, corrupt)
    before = model_snapshot(model)

    with pytest.raises(ep.UnknownNameError, match=r"Unknown destination 'm9' in Graph\(random-tiny, 11 src x 27 dest, 110 edges\). Did you mean 'm1', 'm0'"):
        with ep.patch(model, g, ["a0.h1->m9"], abl):
            pass
    with pytest.raises(ep.UnknownNameError, match=r"Unknown source 'a0.h7' in Graph\(random-tiny.*Did you mean 'a0.h3', 'a0.h2', 'a0.h1'\? Sources are named 'input'"):
        g.edge("a0.h7->m1")
    with pytest.raises(ep.UnknownNameError, match=r"There is no edge 'm1->a0.h0<q>'"):
        g.edge("m1->a0.h0<q>")
    with pytest.raises(EdgepatchError, match=r"weights has shape \[3, 4\]; expected \[n_src, n_dest\] = \[11, 27\]"):
        with ep.patch(model, g, torch.ones(3, 4), abl):
            pass
    W = torch.ones(g.n_src, g.n_dest)
    W[0, 0] = float("nan")
    with pytest.raises(EdgepatchError, match=r"weights contain 1 NaN value\(s\) \(first at 'input->a0.h0<q>'\)"):
        with ep.patch(model, g, W, abl):
            pass
    with pytest.raises(EdgepatchError, match=r"weights must lie in \[0, 1\]"):
        with ep.patch(model, g, 2 * torch.ones(g.n_src, g.n_dest), abl):
            pass
    with pytest.raises(EdgepatchError, match=r"ablated activations have batch x pos = 3 x 6.*tokens of shape \[3, 7\]"):
        with ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
            model(tokens(model, pos=7))
    with pytest.raises(EdgepatchError, match=r"edgepatch needs a TransformerLens HookedTransformer or TransformerBridge; got an object of type torch.nn.modules.linear.Linear"):
        ep.build_graph(torch.nn.Linear(2, 2))
    other = cached_model("tiny-3l", ANY_CLASS)
    g_other = ep.build_graph(other)
    with pytest.raises(EdgepatchError, match=r"graph was built for random-tiny-3l \(3 layers x 3 heads, d_model 24\).*Build the graph from this model"):
        with ep.patch(model, g, torch.ones(g.n_src, g.n_dest), abl):
            with ep.patch(model, g_other, torch.ones(g_other.n_src, g_other.n_dest), ep.zero_ablation(g_other)):
                pass
    with pytest.raises(EdgepatchError, match=r"weights is a single string 'a0.h1->m1'; pass a list"):
        with ep.patch(model, g, "a0.h1->m1", abl):
            pass
    with pytest.raises(EdgepatchError, match=r"weights is a dict of 2 edges; edgepatch does not guess what the other "
                                             r"edges get\. .*W\[graph\.edge\(name\)\] = value .* list\(d\)"):
        with ep.patch(model, g, {"a0.h1->m1": 0.0, "m1->logits": 0.5}, abl):  # (once: both kept, values ignored)
            pass
    # a callable's weights are checked in every forward, as a tensor's are once (once: not at all, a wrong
    # shape failed deep in the engine and NaN or 5.0 ran)
    for fn, message in ((lambda: torch.ones(g.n_dest, g.n_src), r"weights has shape \[\d+, \d+\]; expected \[n_src, n_dest\]"),
                        (lambda: None, r"the weights callable returned NoneType; it must return a weight tensor"),
                        (lambda: torch.full((g.n_src, g.n_dest), float("nan")), r"weights contain \d+ NaN value"),
                        (lambda: torch.full((g.n_src, g.n_dest), 5.0), r"weights must lie in \[0, 1\]")):
        with pytest.raises(EdgepatchError, match=message):
            with ep.patch(model, g, fn, abl):
                model(clean)
    with pytest.raises(EdgepatchError, match=r"tokens must be token ids"):
        ep.source_activations(model, g, torch.rand(2, 3))
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(clean), model(clean))


def _path_cases(g, gen):
    return [torch.rand(g.n_src, g.n_dest, generator=gen),
            (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.05).float(),  # sparse: additive form
            (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.95).float(),  # dense: subtractive form
            torch.zeros(g.n_src, g.n_dest),  # every attention input from the corrupted run's cache
            (torch.rand(3, g.n_src, g.n_dest, generator=gen) < 0.1).float()]  # circuits folded


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
@pytest.mark.parametrize("split", [True, False])
def test_split_input_fallback_agrees(case, split, monkeypatch):
    """Architectures whose q/k/v the engine cannot recompute at the projections fall back to
    TransformerLens's split inputs; both paths must give the same logits (with and without gradients)."""
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    clean, corrupt = tokens(model), tokens(model, seed=13)
    abl = ep.source_activations(model, g, corrupt)
    for W in _path_cases(g, torch.Generator().manual_seed(8)):
        toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
        got = {}
        for path in ("projections", "split"):
            with monkeypatch.context() as mp:
                if path == "split":
                    mp.setattr(patching, "projections_of", lambda model: None)
                with ep.patch(model, g, W, abl):
                    with torch.no_grad():
                        got[path] = model(toks)
                    got[path + " (grad)"] = model(toks).detach()  # parameters require grad: dense path
        for key in ("split", "projections (grad)", "split (grad)"):
            assert (got[key] - got["projections"]).abs().max() <= ATOL, key


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_sparse_and_dense_paths_agree(case):
    """Without gradients the engine gathers only the sources a hook uses (additive or subtractive form);
    with gradients it uses the dense product. Both must give the same logits."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model), tokens(model, seed=12)
    abl = ep.source_activations(model, g, corrupt)
    for W in _path_cases(g, torch.Generator().manual_seed(7)):
        toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
        with ep.patch(model, g, W, abl):
            with torch.no_grad():
                sparse = model(toks)
            dense = model(toks).detach()  # parameters require grad: the dense path
        assert (sparse - dense).abs().max() <= ATOL


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
@pytest.mark.parametrize("split", [True, False])
def test_engine_projections_of_all_heads_agree(case, split):
    """In a layer with some patched head, the engine computes q/k/v of every head itself and passes the
    model's own projections no positions; likewise the attention output, from the per-head outputs it
    records anyway. Unless another hook (forward or backward) watches the attention input or ``z``: then
    the model's own computation runs and only patched heads are replaced. Both must give the reference's
    logits, with clean, fully ablated (served from the corrupted run) and mixed heads in the same layer."""
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    clean, corrupt = tokens(model, seed=21), tokens(model, seed=22)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(23))
    for d, name in enumerate(g.dest_names):
        if re.match(r"a\d+\.(h|kv)0\b", name):
            W[:, d] = 1.0  # clean head
        elif re.match(r"a\d+\.(h|kv)1\b", name):
            W[:, d] = 0.0  # fully ablated head
    abl = ep.source_activations(model, g, corrupt)
    proj = patching.projections_of(model)
    n_layers = model.cfg.n_layers
    input_names = [proj.input_hooks(layer) for layer in range(n_layers)] if proj else []
    out_hooks = [proj.output_hooks(layer) for layer in range(n_layers)] if proj else []
    hook_names = [n for names in input_names for n in names]
    hook_names += [names[0] for names in out_hooks if names is not None]  # hook_z
    last_inputs = [names[-1] for names in input_names if names]  # e.g. v's input only, of q/k/v's three
    seen: list[int] = []

    def watch(t, hook):
        seen.append(t.shape[1])

    got = {}
    with torch.no_grad():
        for mode in ("engine", "watched", "watched in the backward pass", "one input watched"):
            with ep.patch(model, g, W, abl):
                engine = patching.active_patch(model)
                watched = last_inputs if mode == "one input watched" else [] if mode == "engine" else hook_names
                for name in watched:
                    model.hook_dict[name].add_hook(watch, dir="bwd" if "backward" in mode else "fwd")
                try:
                    got[mode] = model(clean)
                    owned, summed = set(engine.owned), set(engine.summed)
                finally:
                    model.reset_hooks(including_permanent=False)
            every = set(range(n_layers))
            assert owned == (every if mode == "engine" and any(input_names) else set()), mode
            assert summed == (every if mode in ("engine", "one input watched") and any(out_hooks) else set()), mode
        want = reference_patched(model, g, W, clean, corrupt)
    if any(hook_names):  # a watcher of the attention input or of z sees every token
        assert seen and all(p == clean.shape[1] for p in seen)
    for mode in got:
        assert (got[mode] - want).abs().max() <= ATOL, mode
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_difference_buffer_is_reused_and_never_read_stale(model_class):
    """Forwards without gradients keep their CPU scratch buffers (differences, head outputs, the mixed
    head inputs) on the model for the next forward (a fresh one page-faults every time). The reused
    storage holds an earlier forward's values: poison it with NaN, and a smaller forward must still match
    the reference, and an earlier output must not change."""
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    gen = torch.Generator().manual_seed(31)
    big, small = tokens(model, batch=4, pos=7, seed=32), tokens(model, batch=2, pos=5, seed=33)
    big_c, small_c = tokens(model, batch=4, pos=7, seed=34), tokens(model, batch=2, pos=5, seed=35)
    ep.release_buffers(model)
    with torch.no_grad():
        W1 = torch.rand(g.n_src, g.n_dest, generator=gen)
        with ep.patch(model, g, W1, ep.source_activations(model, g, big_c)):
            first = model(big)
        kept = first.clone()
        spares = dict(patching._SLOTS[model].spares)
        d, h = model.cfg.d_model, model.cfg.n_heads
        # random weights mix every q/k/v input; the last layer's product also holds its MLP input and the logits'
        assert {k: v.numel() for k, v in spares.items()} == {
            "differences": 4 * 7 * g.n_src * d, "head outputs": h * 4 * 7 * d, "mixed": 4 * 7 * (3 * h + 2) * d}
        for t in spares.values():
            t.fill_(float("nan"))
        W2 = torch.rand(g.n_src, g.n_dest, generator=gen)
        with ep.patch(model, g, W2, ep.source_activations(model, g, small_c)):
            got = model(small)
        after = patching._SLOTS[model].spares
        assert {k: v.data_ptr() for k, v in after.items()} == {k: v.data_ptr() for k, v in spares.items()}  # reused
        want = reference_patched(model, g, W2, small, small_c)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= ATOL
    assert torch.equal(first, kept)  # the first output does not alias the reused buffers
    ep.release_buffers(model)
    assert not patching._SLOTS[model].spares


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_gathered_sources_buffer_is_reused_and_never_read_stale(model_class, monkeypatch):
    """A sparse circuit's mixing gathers the sources it reads into a scratch buffer kept on the model
    (27 MB for GPT-2 small at 8 x 16 tokens). Poisoned with NaN between two forwards of different
    circuits, the second must still match the reference. The mixing is forced onto the gathering path
    (no edge-by-edge additions), and the spy checks it was taken."""
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    monkeypatch.setattr(patching, "_EDGE_COST", 10**9)
    gathers = count_calls(monkeypatch, "_gather")
    clean, corrupt = tokens(model, batch=3, pos=6, seed=39), tokens(model, batch=3, pos=6, seed=40)
    abl = ep.source_activations(model, g, corrupt)
    gen = torch.Generator().manual_seed(41)
    ep.release_buffers(model)
    with torch.no_grad():
        for i, kept in enumerate(([0, 2], [0, 4])):
            # two sources read (the input and a first-layer head), the rest ablated: the second layer's
            # product reads fewer than half of its six sources, so it gathers them
            W = torch.zeros(g.n_src, g.n_dest)
            W[kept] = torch.rand(len(kept), g.n_dest, generator=gen)
            with ep.patch(model, g, W, abl):
                got = model(clean)
            assert (got - reference_patched(model, g, W, clean, corrupt)).abs().max() <= ATOL, i
            spares = patching._SLOTS[model].spares
            assert "gathered" in spares
            spares["gathered"].fill_(float("nan"))
    assert gathers
    ep.release_buffers(model)


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_kept_ablation_storage_serves_one_call(model_class):
    """A sweep hands each batch's ablation storage back to the model (``keep_buffer``) for the next
    batch's ``source_activations``. One kept storage serves one call: two later calls never share it,
    and the second does not overwrite the first's values."""
    model = cached_model("tiny", model_class)
    g = ep.build_graph(model)
    a, b = tokens(model, batch=3, pos=6, seed=42), tokens(model, batch=3, pos=6, seed=43)
    ep.release_buffers(model)
    first = ep.source_activations(model, g, a)
    want = first.values.clone()
    kept = first.values.data_ptr()
    patching.keep_buffer(model, "ablation", first.values)
    del first
    x = ep.source_activations(model, g, a)
    y = ep.source_activations(model, g, b)
    assert x.values.data_ptr() == kept  # the kept storage was taken
    assert y.values.untyped_storage().data_ptr() != x.values.untyped_storage().data_ptr()
    assert torch.equal(x.values, want)
    assert not torch.equal(y.values, want)
    ep.release_buffers(model)
    assert not patching._SLOTS[model].spares


def test_buffers_over_the_limit_are_not_kept(monkeypatch):
    """The scratch buffers held on the model while idle total at most ``_KEEP_BYTES``: a larger one is freed
    after its forward; of the smaller, those kept first (the differences) stay and one that would pass the
    total (the mixed inputs) is freed. Sizes from the graph: the differences of 4 x 7 and 2 x 5 tokens, the
    limit set between the two."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    d = model.cfg.d_model
    ep.release_buffers(model)
    small_bytes, big_bytes = 2 * 5 * g.n_src * d * 4, 4 * 7 * g.n_src * d * 4
    monkeypatch.setattr(patching, "_KEEP_BYTES", (small_bytes + big_bytes) // 2)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(36))
    with torch.no_grad():
        for (batch, pos), kept in (((4, 7), False), ((2, 5), True)):
            toks = tokens(model, batch=batch, pos=pos, seed=37)
            with ep.patch(model, g, W, ep.source_activations(model, g, tokens(model, batch=batch, pos=pos, seed=38))):
                model(toks)
            spares = patching._SLOTS[model].spares
            assert ("differences" in spares) == kept, (batch, pos)
            if kept:
                assert spares["differences"].numel() * 4 == small_bytes
                # random weights mix every q/k/v input, the MLP input and the logits: 3h + 2 rows per token
                mixed_bytes = 2 * 5 * (3 * model.cfg.n_heads + 2) * d * 4
                assert small_bytes + mixed_bytes > patching._KEEP_BYTES and "mixed" not in spares
                assert sum(t.untyped_storage().nbytes() for t in spares.values()) <= patching._KEEP_BYTES
    ep.release_buffers(model)


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_mixing_edge_by_edge_agrees_with_the_product(case, monkeypatch):
    """Without gradients on CPU, a sparse layer's inputs are mixed one edge at a time instead of by a
    matrix product. Forced either way (also in token blocks, and with circuits folded into the batch),
    both must match the independent reference, and the forced run must have taken its path."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=44), tokens(model, batch=3, pos=6, seed=45)
    abl = ep.source_activations(model, g, corrupt)
    calls = count_calls(monkeypatch, "_mixed_by_edge")
    gen = torch.Generator().manual_seed(46)
    cases = _path_cases(g, gen) + [(torch.rand(2, g.n_src, g.n_dest, generator=gen) < 0.3).float()]
    for W in cases:
        toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
        if W.ndim == 3:
            want = torch.cat([reference_patched(model, g, W[i], clean, corrupt) for i in range(W.shape[0])])
        else:
            want = reference_patched(model, g, W, clean, corrupt)
        for edge_cost, chunk in ((0, 128), (0, 5), (10**9, 128)):
            monkeypatch.setattr(patching, "_EDGE_COST", edge_cost)
            monkeypatch.setattr(patching, "_COPY_COST", 0)
            monkeypatch.setattr(patching, "_CHUNK_TOKENS", chunk)
            calls.clear()
            with ep.patch(model, g, W, abl), torch.no_grad():
                got = model(toks)
            assert (got - want).abs().max() <= ATOL, (edge_cost, chunk)
            mixes = bool(((W != 0) & (W != 1)).any() or ((W == 1).any() and (W == 0).any()))
            assert bool(calls) == (edge_cost == 0 and mixes), (edge_cost, chunk)


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_per_position_mixing_edge_by_edge_agrees_with_the_product(case, monkeypatch):
    """The same with per-position weights: each (source, destination) pair is added once, every token
    scaled by its own slot's weight. Slots differ per token (-1: unpatched); forced either way, in one
    token block and in blocks of 5, against the reference per token."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=47), tokens(model, batch=3, pos=6, seed=48)
    abl = ep.source_activations(model, g, corrupt)
    calls = count_calls(monkeypatch, "_mixed_by_slot_edge")
    gen = torch.Generator().manual_seed(49)
    slots = torch.randint(0, 3, (3, 6), generator=gen)
    sparse = (torch.rand(3, g.n_src, g.n_dest, generator=gen) < 0.2).float()
    mixed = torch.where(sparse == 1, torch.rand(3, g.n_src, g.n_dest, generator=gen), 1 - sparse)
    for Ws, unpatched in ((sparse, False), (mixed, False), (mixed, True)):
        sl = slots.clone()
        if unpatched:
            sl[1, 2:4] = -1
        Wt = torch.ones(3, 6, g.n_src, g.n_dest)
        Wt[sl >= 0] = Ws[sl[sl >= 0]]
        want = reference_patched(model, g, _PerToken(Wt), clean, corrupt)
        for edge_cost, chunk in ((0, 128), (0, 5), (10**9, 128)):
            monkeypatch.setattr(patching, "_SLOT_EDGE_COST", edge_cost)
            monkeypatch.setattr(patching, "_COPY_COST", 0)
            monkeypatch.setattr(patching, "_CHUNK_TOKENS", chunk)
            calls.clear()
            with ep.patch(model, g, Ws, abl, positions=sl), torch.no_grad():
                got = model(clean)
            assert (got - want).abs().max() <= ATOL, (edge_cost, chunk, unpatched)
            assert bool(calls) == (edge_cost == 0), (edge_cost, chunk, unpatched)


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_token_blocks_agree_with_one_block(case, monkeypatch):
    """Without gradients, a layer's attention inputs are mixed, normalized and projected block by block of
    tokens (never straddling two circuits folded into the batch). Blocks of 5 tokens (3 x 6 tokens per
    circuit: blocks of 5, 5, 5, 3) must give the dense path's logits for every kind of weights, and
    every run must have gone through the blocks."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=41), tokens(model, batch=3, pos=6, seed=42)
    abl = ep.source_activations(model, g, corrupt)
    calls = count_calls(monkeypatch, "_mix_project_chunked")
    monkeypatch.setattr(patching, "_CHUNK_TOKENS", 5)
    gen = torch.Generator().manual_seed(43)
    cases = _path_cases(g, gen) + [torch.rand(3, g.n_src, g.n_dest, generator=gen),
                                   (torch.rand(2, g.n_src, g.n_dest, generator=gen) < 0.3).float()]
    for W in cases:
        toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
        calls.clear()
        with ep.patch(model, g, W, abl):
            with torch.no_grad():
                blocks = model(toks)
            dense = model(toks).detach()  # parameters require grad: the dense path, one block
        assert (blocks - dense).abs().max() <= ATOL
        assert calls or bool((W == 0).all())  # all-zero weights: every input from the cache, nothing mixed


def _norm_variant(case):
    """A fresh model for ``case``: a MODEL_CASES entry, or ("tiny", "LNPre" / "RMSPre"), a
    HookedTransformer whose normalizations have no parameters (as from_pretrained's fold_ln gives)."""
    preset, kind = case
    if kind in ("LNPre", "RMSPre"):
        requires("hooked")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=16,
                                      act_fn="gelu_new", normalization_type=kind, seed=7)
        return HookedTransformer(cfg).eval()
    return ep.random_model(preset, model_class=kind, seed=7)


@pytest.mark.parametrize("case", MODEL_CASES + [("tiny", "LNPre"), ("tiny", "RMSPre")], ids=model_id)
def test_normalizations_with_scales_and_shifts(case, monkeypatch):
    """The engine recomputes the attention-input normalization of patched heads from the module's
    parameters (Projections.norm). Random models have scales 1 and shifts 0, under which dropping either
    would go unseen: with random ones, and for the parameter-free normalizations of fold_ln, the logits
    must match the reference without gradients (one block of tokens and blocks of 5) and with them."""
    model = _norm_variant(case)
    assert spread_norms(model, 8) > 0 or case[1] in ("LNPre", "RMSPre")
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=47), tokens(model, batch=3, pos=6, seed=48)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(49))
    abl = ep.source_activations(model, g, corrupt)
    want = reference_patched(model, g, W, clean, corrupt)
    for chunk in (128, 5):
        monkeypatch.setattr(patching, "_CHUNK_TOKENS", chunk)
        with ep.patch(model, g, W, abl):
            with torch.no_grad():
                got = model(clean)
            assert (got - want).abs().max() <= ATOL, chunk
            assert (model(clean) - want).abs().max() <= ATOL  # parameters require grad: the dense path


def _mlp_cases(g, gen, n_layers):
    """Weights where MLPs are silent (no outgoing edge), read only ablated inputs, or neither, per circuit."""
    base = (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.5).float()
    silent, deaf = base.clone(), base.clone()
    silent[g.src_index("m0")] = 0  # m0 is read by nobody
    deaf[:, g.dest_index(f"m{n_layers - 1}")] = 0  # the last MLP reads only ablated inputs
    both = deaf.clone()
    both[g.src_index("m0")] = 0
    return [silent, deaf, both, torch.zeros(g.n_src, g.n_dest),
            torch.stack([torch.zeros(g.n_src, g.n_dest), base, silent]),  # circuits: all, none, one skipped
            torch.stack([deaf, deaf])]


def _shortcut_cases(g, gen, n_layers):
    """Dense random weights where the engine may take a shortcut: an MLP nobody reads (m0), an MLP and all of
    a layer's attention inputs that read only ablated inputs (the last layer's). Every other weight is in
    (0, 1), so upstream sources differ from their ablated values and a wrong shortcut shows in the logits
    (0/1 weights can hide it: an unread last MLP cancels whatever it outputs)."""
    last = n_layers - 1
    cases = []
    for what in ("silent m0", "deaf mlp", "deaf heads"):
        W = torch.rand(g.n_src, g.n_dest, generator=gen) * 0.9 + 0.05
        if what == "silent m0":
            W[g.src_index("m0")] = 0
        elif what == "deaf mlp":
            W[:, g.dest_index(f"m{last}")] = 0
        else:
            W[:, [d for d, name in enumerate(g.dest_names) if name.startswith(f"a{last}.")]] = 0
        cases.append(W)
    return cases


def _record_mlp_rows(monkeypatch) -> dict[int, int]:
    """layer -> the batch rows each MLP ran on (its input hook's output) in the last patched forward."""
    rows: dict[int, int] = {}
    original = patching._Engine._make_mlp_in_hook

    def recording(self, layer, patched):
        hook = original(self, layer, patched)

        def wrapped(module, inp, x):
            y = hook(module, inp, x)
            rows[layer] = (x if y is None else y).shape[0]
            return y
        return wrapped

    monkeypatch.setattr(patching._Engine, "_make_mlp_in_hook", recording)
    return rows


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c[0] != "tiny-attn-only"], ids=model_id)  # MLPs
def test_mlps_taken_as_ablated_where_their_output_is_known(case, monkeypatch):
    """Without gradients, an MLP is not run (for the circuits of the batch that allow it) where no
    destination reads its output, or, under corrupted-run ablation, where it reads only ablated inputs:
    its output is then the ablated one. Against the reference, for corrupted-run, mean and zero ablation
    (where only the first rule holds), single circuits and circuits folded into the batch; the MLP must
    have run on fewer rows exactly where a rule applies; and a hook inside an MLP turns it off."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    L = model.cfg.n_layers
    clean, corrupt = tokens(model, batch=3, pos=6, seed=51), tokens(model, batch=3, pos=6, seed=52)
    gen = torch.Generator().manual_seed(53)
    rows = _record_mlp_rows(monkeypatch)
    corrupt_abl = ep.source_activations(model, g, corrupt)
    mean_abl = ep.mean_activations(model, g, tokens(model, batch=5, pos=6, seed=54))
    for abl in (corrupt_abl, mean_abl, ep.zero_ablation(g)):
        for W in _mlp_cases(g, gen, L):
            toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
            Ws = W if W.ndim == 3 else W[None]
            want = _reference_circuits(model, g, Ws, clean, corrupt if abl is corrupt_abl else abl)
            rows.clear()
            with ep.patch(model, g, W, abl), torch.no_grad():
                got = model(toks)
            assert (got - want).abs().max() <= ATOL
            for layer in range(L):
                src, dest = g.src_index(f"m{layer}"), g.dest_index(f"m{layer}")
                silent = (Ws[:, src][:, g.valid[src]] == 0).all(-1)
                deaf = (Ws[:, : int(g.engine_graph.n_pred[dest]), dest] == 0).all(-1)
                skip = silent | deaf if abl is corrupt_abl else silent
                assert rows[layer] == toks.shape[0] // len(Ws) * int((~skip).sum()), (abl.kind, layer)
    # a hook inside the MLP sees every row: the engine runs the MLP on all of them
    W = _mlp_cases(g, gen, L)[3]  # all ablated: every MLP could be skipped
    want = reference_patched(model, g, W, clean, corrupt)
    for watched in ("blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post", "blocks.0.ln2", "blocks.0.mlp"):
        seen_rows = []
        handle = patching._hook_point(model, watched).register_forward_hook(
            lambda m, i, o: seen_rows.append(o.shape[0]))
        try:
            with ep.patch(model, g, W, corrupt_abl), torch.no_grad():
                got = model(clean)
        finally:
            handle.remove()
        assert seen_rows == [clean.shape[0]], watched
        assert rows[0] == clean.shape[0] and rows[L - 1] == 0, watched  # only the watched MLP runs
        assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c[0] != "tiny-attn-only"], ids=model_id)  # MLPs
def test_per_position_mlps_taken_as_ablated_row_by_row(case, monkeypatch):
    """Per-position weights as a per-position sweep folds them: each batch row holds one circuit, whose
    slots give its last token and its other tokens their own weights. Without gradients, an MLP is not run
    on the rows where the rules of the test above hold for the slot of every token of the row (never for a
    row with an unpatched token, -1, which reads every source). Against the reference, per token."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    L = model.cfg.n_layers
    b, p = 3, 6
    clean, corrupt = tokens(model, batch=b, pos=p, seed=55), tokens(model, batch=b, pos=p, seed=56)
    gen = torch.Generator().manual_seed(57)
    rows = _record_mlp_rows(monkeypatch)
    silent, deaf, both, zeros = _mlp_cases(g, gen, L)[:4]
    base = (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.5).float()
    # circuit c takes slots 2c (all but the last token) and 2c + 1 (the last token)
    circuits = [(zeros, zeros), (silent, both), (deaf, deaf), (silent, base), (both, both)]
    Ws = torch.stack([w for pair in circuits for w in pair])
    C = len(circuits)
    slots = torch.zeros(C * b, p, dtype=torch.long)
    for c in range(C):
        slots[c * b : (c + 1) * b, :-1], slots[c * b : (c + 1) * b, -1] = 2 * c, 2 * c + 1
    slots[-1, 2] = -1  # the last circuit's last row: one token unpatched
    Wt = torch.ones(C * b, p, g.n_src, g.n_dest)
    Wt[slots >= 0] = Ws[slots[slots >= 0]]
    toks, corrupt_toks = clean.repeat(C, 1), corrupt.repeat(C, 1)
    corrupt_abl = ep.source_activations(model, g, corrupt_toks)
    mean_abl = ep.mean_activations(model, g, tokens(model, batch=5, pos=p, seed=58))
    for abl in (corrupt_abl, mean_abl):
        if abl is corrupt_abl:
            want = reference_patched(model, g, _PerToken(Wt), toks, corrupt_toks)
        else:
            want = _reference_with_values(model, g, _PerToken(Wt), toks, abl.values.expand(-1, C * b, p, -1))
        rows.clear()
        with ep.patch(model, g, Ws, abl, positions=slots), torch.no_grad():
            got = model(toks)
        assert (got - want).abs().max() <= ATOL, abl.kind
        for layer in range(L):
            src, dest = g.src_index(f"m{layer}"), g.dest_index(f"m{layer}")
            skip = (Ws[:, src][:, g.valid[src]] == 0).all(-1)
            if abl is corrupt_abl:
                skip |= (Ws[:, : int(g.engine_graph.n_pred[dest]), dest] == 0).all(-1)
            row_skip = torch.where(slots >= 0, skip[slots.clamp(min=0)], False).all(1)
            assert rows[layer] == int((~row_skip).sum()), (abl.kind, layer)
            if layer == 0:
                assert 0 < rows[layer] < C * b, abl.kind  # the cases skip some rows and run others


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_folded_circuits_mix_only_their_own_heads(case, monkeypatch):
    """Circuits folded into the batch (a sweep's forward) differ: a head one circuit patches may be clean
    or fully ablated in another. Without gradients, each circuit mixes and projects only the heads it
    patches; its other heads take the clean projection or the corrupted run's. Against the reference, under
    corrupted-run and mean ablation (no corrupted projections to take), for circuits from empty to
    complete; the circuit-by-circuit path must have run where the engine computes the layer's heads."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=81), tokens(model, batch=3, pos=6, seed=82)
    gen = torch.Generator().manual_seed(83)
    sparse = (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.15).float()
    few_ablated = 1 - (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.1).float()
    Ws = torch.stack([torch.zeros(g.n_src, g.n_dest), sparse, few_ablated,
                      torch.rand(g.n_src, g.n_dest, generator=gen), torch.ones(g.n_src, g.n_dest)])
    calls = count_calls(monkeypatch, "_project_per_circuit")
    corrupt_abl = ep.source_activations(model, g, corrupt)
    mean_abl = ep.mean_activations(model, g, tokens(model, batch=5, pos=6, seed=84))
    for abl in (corrupt_abl, mean_abl):
        want = _reference_circuits(model, g, Ws, clean, corrupt if abl is corrupt_abl else abl)
        for chunk in (128, 5):  # one block of tokens per circuit, and blocks within a circuit
            monkeypatch.setattr(patching, "_CHUNK_TOKENS", chunk)
            with ep.patch(model, g, Ws, abl), torch.no_grad():
                got = model(clean.repeat(len(Ws), 1))
            assert (got - want).abs().max() <= ATOL, (abl.kind, chunk)
    proj = patching.projections_of(model)
    assert bool(calls) == (proj is not None and bool(proj.input_hooks(0)))


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_folded_per_position_circuits_mix_only_their_own_heads(case, monkeypatch):
    """Per-position circuits folded into the batch (a per-position sweep's forward): weights ``[C, slots,
    n_src, n_dest]`` with the prompts' ``positions``, on ``tokens.repeat(C, 1)``. Without gradients each
    circuit mixes only the heads its slots patch (pair by pair: only the pairs its slots patch), and takes
    the corrupted run's projections where every slot ablates a head's input (only where every token is in
    a slot). Against the per-token reference, under corrupted-run and mean ablation, with and without a
    token in no slot, in one block of tokens per circuit and in blocks within a circuit; the
    circuit-by-circuit path must have run where the engine computes the layer's heads. Gradients flow
    through the same weights."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    b, p = 3, 6
    clean, corrupt = tokens(model, batch=b, pos=p, seed=91), tokens(model, batch=b, pos=p, seed=92)
    gen = torch.Generator().manual_seed(93)
    ones, zeros = torch.ones(g.n_src, g.n_dest), torch.zeros(g.n_src, g.n_dest)
    sparse = (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.15).float()
    few_ablated = 1 - (torch.rand(g.n_src, g.n_dest, generator=gen) < 0.1).float()
    W4 = torch.stack([torch.stack(pair) for pair in [(zeros, zeros), (sparse, few_ablated),
                                                      (torch.rand(g.n_src, g.n_dest, generator=gen), ones),
                                                      (ones, sparse)]])  # [C, 2 slots, n_src, n_dest]
    C = len(W4)
    calls = count_calls(monkeypatch, "_project_per_circuit")
    corrupt_abl = ep.source_activations(model, g, corrupt)
    mean_abl = ep.mean_activations(model, g, tokens(model, batch=5, pos=p, seed=94))
    toks = clean.repeat(C, 1)
    for free in (False, True):
        slots = torch.zeros(b, p, dtype=torch.long)
        slots[:, -1] = 1  # the last token, and the rest
        if free:
            slots[1, 2] = -1  # a token in no slot: every circuit's weights 1 there
        Wt = torch.ones(C, b, p, g.n_src, g.n_dest)
        for c in range(C):
            Wt[c][slots >= 0] = W4[c][slots[slots >= 0]]
        Wt = Wt.flatten(0, 1)  # per token of tokens.repeat(C, 1)
        wants = {}
        for abl in (corrupt_abl, mean_abl):
            if abl is corrupt_abl:
                want = reference_patched(model, g, _PerToken(Wt), toks, corrupt.repeat(C, 1))
            else:
                want = _reference_with_values(model, g, _PerToken(Wt), toks, abl.values.expand(-1, C * b, p, -1))
            wants[abl.kind] = want
            # one block of tokens per circuit, blocks within a circuit; mixing pair by pair forced
            for chunk, pair_cost in ((128, patching._SLOT_EDGE_COST), (5, patching._SLOT_EDGE_COST), (128, 0)):
                monkeypatch.setattr(patching, "_CHUNK_TOKENS", chunk)
                monkeypatch.setattr(patching, "_SLOT_EDGE_COST", pair_cost)
                with ep.patch(model, g, W4, abl, positions=slots), torch.no_grad():
                    got = model(toks)
                assert (got - want).abs().max() <= ATOL, (free, abl.kind, chunk, pair_cost)
        Wg = W4.clone().requires_grad_(True)
        with ep.patch(model, g, Wg, corrupt_abl, positions=slots):
            out = model(toks)
        assert (out.detach() - wants["corrupt"]).abs().max() <= ATOL, free
        out[:, -1].sum().backward()
        assert Wg.grad is not None and bool(Wg.grad[1].abs().sum() > 0)
    proj = patching.projections_of(model)
    assert bool(calls) == (proj is not None and bool(proj.input_hooks(0)))


def test_folded_per_position_circuits_bad_input():
    """Per-position circuits folded into the batch: the batch must repeat the prompts of ``positions`` once
    per circuit, the ablation must be the unrepeated prompts', and the slots must be a tensor."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=2, pos=5), tokens(model, batch=2, pos=5, seed=3)
    abl = ep.source_activations(model, g, corrupt)
    before = model_snapshot(model)
    W4 = torch.rand(3, 2, g.n_src, g.n_dest, generator=torch.Generator().manual_seed(5))
    slots = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(EdgepatchError, match=r"weights hold 3 per-position circuits .* positions 2 prompts x 5 "
                                             r"tokens, but the model is run on tokens of shape \[2, 5\]\. Run "
                                             r"tokens\.repeat\(3, 1\)"):
        with ep.patch(model, g, W4, abl, positions=slots), torch.no_grad():
            model(clean)
    with pytest.raises(EdgepatchError, match=r"the ablated activations have batch 6, but the batch holds 3 "
                                             r"circuits x 2 prompts; compute the ablation on the 2 unrepeated"):
        with ep.patch(model, g, W4, ep.source_activations(model, g, corrupt.repeat(3, 1)), positions=slots), \
                torch.no_grad():
            model(clean.repeat(3, 1))
    with pytest.raises(EdgepatchError, match=r"need positions as a \[batch, pos\] tensor of slots .* "
                                             r"torch\.arange\(pos\)\.expand\(batch, pos\)"):
        with ep.patch(model, g, torch.ones(3, 5, g.n_src, g.n_dest), abl, positions="absolute"):
            pass
    with pytest.raises(EdgepatchError, match=r"positions refers to slot 2 but weights has only 2 slots"):
        with ep.patch(model, g, W4, abl, positions=slots + 2):
            pass
    assert_unchanged(model, before)


def _bridge_of(name: str, hf_model):
    """``hf_model`` (a HuggingFace causal LM) in a TransformerBridge with the adapter of hub model ``name``,
    GPT-2's offline tokenizer, the bridge's set-up warnings silenced."""
    import warnings

    requires("bridge")
    from transformer_lens.model_bridge import TransformerBridge

    from edgepatch.tokenizers import gpt2_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=gpt2_tokenizer())


def _gemma2(model_class: str):
    """A tiny Gemma-2-shaped model (normalizations before and after attention and MLP), random weights with
    random normalization scales."""
    if model_class == "hooked":
        requires("hooked")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=16,
                                      act_fn="gelu_pytorch_tanh", normalization_type="RMS", gated_mlp=True,
                                      use_normalization_before_and_after=True, positional_embedding_type="rotary",
                                      rotary_dim=8, n_key_value_heads=2, seed=3)
        model = HookedTransformer(cfg).eval()
    else:
        import transformers

        torch.manual_seed(3)
        cfg = transformers.Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=16, sliding_window=8)
        model = _bridge_of("google/gemma-2-2b", transformers.Gemma2ForCausalLM(cfg).eval())
    assert spread_norms(model, 5) > 0
    return model


def _mixture_of_experts(model_class: str):
    """A tiny Mixtral-shaped model (each MLP a router over 4 experts, 2 per token), random weights."""
    import warnings

    if model_class == "hooked":
        requires("hooked")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=16,
                                      act_fn="silu", normalization_type="RMS", gated_mlp=True, num_experts=4,
                                      experts_per_token=2, n_key_value_heads=2, positional_embedding_type="rotary",
                                      rotary_dim=8, seed=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return HookedTransformer(cfg).eval()
    import transformers

    torch.manual_seed(3)
    cfg = transformers.MixtralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=16, num_local_experts=4, num_experts_per_tok=2)
    return _bridge_of("mistralai/Mixtral-8x7B-v0.1", transformers.MixtralForCausalLM(cfg).eval())


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_mixture_of_experts_mlps(model_class, monkeypatch):
    """Mixture-of-experts MLPs (a router picks experts per token): patching matches the reference for random
    weights and for circuits whose MLPs the engine skips, where the router then sees fewer rows, or none
    (every circuit skips the MLP)."""
    model = _mixture_of_experts(model_class)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=71), tokens(model, batch=3, pos=6, seed=72)
    abl = ep.source_activations(model, g, corrupt)
    gen = torch.Generator().manual_seed(73)
    rows = _record_mlp_rows(monkeypatch)
    ran_on = set()
    for W in _mlp_cases(g, gen, model.cfg.n_layers) + [torch.rand(g.n_src, g.n_dest, generator=gen)]:
        Ws = W if W.ndim == 3 else W[None]
        with ep.patch(model, g, W, abl), torch.no_grad():
            got = model(clean.repeat(len(Ws), 1))
        assert (got - _reference_circuits(model, g, Ws, clean, corrupt)).abs().max() <= ATOL
        ran_on.update(r / (len(Ws) * clean.shape[0]) for r in rows.values())  # the share of the batch
    assert 0 in ran_on and 1 in ran_on and any(0 < r < 1 for r in ran_on)  # no rows, some, all


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_gemma2_normalizations_after_attention_and_mlp(model_class):
    """Gemma 2 normalizes the attention and MLP outputs before adding them to the residual stream. MLP
    sources are the normalized outputs (``hook_mlp_out``), head sources ``z_h W_O^h`` before the
    normalization, where heads do not add up (see the README's supported models). The engine must follow
    that rule everywhere, also for a head that no destination reads (it is computed here, not skipped),
    for random weights and for circuits whose MLPs are skipped; all weights 0 give the corrupted run. A
    destination whose weights are all 0 does not read its corrupted-run input here (upstream heads that
    differ from their ablated values do not cancel), so its MLP runs and its q/k/v are computed, not taken
    from the corrupted run (this was wrong before: ``_shortcut_cases``)."""
    model = _gemma2(model_class)
    with pytest.warns(UserWarning, match="heads' outputs do not add up"):
        g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=55), tokens(model, batch=3, pos=6, seed=56)
    abl = ep.source_activations(model, g, corrupt)
    gen = torch.Generator().manual_seed(57)
    silent_head = torch.ones(g.n_src, g.n_dest)
    silent_head[g.src_index("a0.h1")] = 0  # every edge out of one head ablated
    for W in _mlp_cases(g, gen, model.cfg.n_layers)[:4] + [torch.rand(g.n_src, g.n_dest, generator=gen),
                                                            silent_head] + _shortcut_cases(g, gen, model.cfg.n_layers):
        with ep.patch(model, g, W, abl), torch.no_grad():
            got = model(clean)
        assert (got - reference_patched(model, g, W, clean, corrupt)).abs().max() <= ATOL
    with ep.patch(model, g, torch.zeros(g.n_src, g.n_dest), abl), torch.no_grad():
        assert (model(clean) - model(corrupt)).abs().max() <= ATOL
    # every MLP could be skipped, but a hook inside the normalization of the MLP's output sees every row
    seen = []
    hp = patching._hook_point(model, "blocks.0.ln2_post.hook_normalized")
    handle = hp.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        with ep.patch(model, g, torch.zeros(g.n_src, g.n_dest), abl), torch.no_grad():
            model(clean)
    finally:
        handle.remove()
    assert seen == [clean.shape[0]]


@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
def test_heads_nobody_reads_are_not_computed(case, monkeypatch):
    """Without gradients, heads whose outgoing weights are all 0 (in every circuit of the batch) cancel out
    of every destination's input: the engine does not compute their outputs and lets the ablated ones
    stand in, for the residual stream too. Against the reference, under corrupted-run and mean ablation,
    single and folded circuits. Where a hook watches the heads' values z, the model computes the
    attention output itself from the real heads, so the engine must then compute them all."""
    model = cached_model(*case)
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=61), tokens(model, batch=3, pos=6, seed=62)
    gen = torch.Generator().manual_seed(63)
    calls = count_calls(monkeypatch, "_some_head_outputs")
    H = model.cfg.n_heads
    silent = [g.src_index(f"a0.h{h}") for h in range(H - 1)] + [g.src_index(f"a1.h{H - 1}")]
    base = (torch.rand(3, g.n_src, g.n_dest, generator=gen) < 0.5).float()
    base[:, silent] = 0
    cases = [base[0], base, torch.zeros(g.n_src, g.n_dest)]
    corrupt_abl = ep.source_activations(model, g, corrupt)
    mean_abl = ep.mean_activations(model, g, tokens(model, batch=5, pos=6, seed=64))
    for abl in (corrupt_abl, mean_abl):
        for W in cases:
            Ws = W if W.ndim == 3 else W[None]
            toks = clean.repeat(len(Ws), 1)
            want = _reference_circuits(model, g, Ws, clean, corrupt if abl is corrupt_abl else abl)
            for watch in (False, True):
                calls.clear()
                seen = []
                with ep.patch(model, g, W, abl), torch.no_grad():
                    handle = patching._hook_point(model, "blocks.0.attn.hook_z").register_forward_hook(
                        lambda m, i, o: seen.append(o.shape)) if watch else None
                    try:
                        got = model(toks)
                    finally:
                        if handle is not None:
                            handle.remove()
                assert (got - want).abs().max() <= ATOL, (abl.kind, watch)
                proj = patching.projections_of(model)
                if proj is not None and proj.output_hooks(0) is not None:  # the engine sums the heads
                    assert len(calls) == (1 if watch else 2), (abl.kind, watch)  # layers 0 and 1; 1 watched
                if watch:
                    assert seen and seen[0][0] == toks.shape[0]


# ---------------------------------------------------------------------------------------------------
# HuggingFace architectures through TransformerBridge
# ---------------------------------------------------------------------------------------------------
# (hub name the bridge maps to an adapter, config class, model class, config fields beyond the shared ones)
_HF_ARCHITECTURES = {
    "qwen2": ("Qwen/Qwen2-0.5B", "Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen/Qwen3-0.6B", "Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, pad_token_id=0)),
    "phi": ("microsoft/phi-2", "PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "gptj": ("EleutherAI/gpt-j-6b", "GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "opt": ("facebook/opt-125m", "OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "bloom": ("bigscience/bloom-560m", "BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    "stablelm": ("stabilityai/stablelm-2-1_6b", "StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=4)),
    "olmo": ("allenai/OLMo-1B-hf", "OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=4)),
    "olmo2": ("allenai/OLMo-2-0425-1B", "Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=4)),
    "gemma": ("google/gemma-2b", "GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=8)),
    "gemma3": ("google/gemma-3-1b-pt", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=1, head_dim=8, sliding_window=8)),
    "falcon": ("tiiuae/falcon-7b", "FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)),
    "gpt_bigcode": ("bigcode/gpt_bigcode-santacoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
    "cohere": ("CohereForAI/c4ai-command-r-v01", "CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, logit_scale=1.0)),
    "granite": ("ibm-granite/granite-3.0-2b-base", "GraniteConfig", "GraniteForCausalLM",
                dict(num_key_value_heads=2, residual_multiplier=0.22, embedding_multiplier=3.0,
                     attention_multiplier=0.2, logits_scaling=2.5)),
    "granitemoe": ("ibm-granite/granite-3.0-1b-a400m-base", "GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.3,
                        embedding_multiplier=2.0)),
}


def _hf_bridge(arch: str):
    """A tiny random-weight HuggingFace model of ``arch`` (2 layers, 4 heads, d_model 32) in a TransformerBridge,
    with random normalization scales."""
    import transformers

    name, config_class, model_class, extra = _HF_ARCHITECTURES[arch]
    cfg = getattr(transformers, config_class)(**{**dict(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         max_position_embeddings=64), **extra})
    cfg.architectures = [model_class]  # as in a hub config: the bridge picks its adapter by it
    torch.manual_seed(11)
    model = _bridge_of(name, getattr(transformers, model_class)(cfg).eval())
    spread_norms(model, 5)
    return model


@pytest.mark.parametrize("arch", list(_HF_ARCHITECTURES))
def test_huggingface_architectures_through_the_bridge(arch, monkeypatch):
    """Across the architectures TransformerBridge wraps: per-head q/k norms (Qwen 3, OLMo 2 over all heads),
    fused q/k/v (Phi-3, Bloom, Falcon), parallel attention and MLP (GPT-J, Phi, Falcon, Cohere), ALiBi
    (Bloom), multi-query attention (Falcon, GPT-BigCode), post-norm blocks (OLMo 2, whose
    ``original_architecture`` is None when the bridge wraps a model object), MLPs run on flattened tokens
    (OPT), attention that TransformerLens cannot split per head (GPT-J, OPT: the reference then projects each
    head's own input): all weights 1 give the plain forward, all 0 the corrupted one, random weights the
    reference, with and without gradients."""
    import warnings

    model = _hf_bridge(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OLMo 2: heads are taken before its output normalization
        g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=81), tokens(model, batch=3, pos=6, seed=82)
    abl = ep.source_activations(model, g, corrupt)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(83))
    want = reference_patched(model, g, W, clean, corrupt)
    before = model_snapshot(model)
    with torch.no_grad():
        plain, corrupted = model(clean), model(corrupt)
        assert (want - plain).abs().max() > 100 * ATOL  # the weights matter
        for weights, expected in ((torch.ones_like(W), plain), (torch.zeros_like(W), corrupted), (W, want)):
            with ep.patch(model, g, weights, abl):
                assert (model(clean) - expected).abs().max() <= ATOL
        # the engine's shortcuts (MLPs not run, q/k/v taken from the corrupted run) where they apply, and
        # only there (OLMo 2, Gemma 3: heads do not add up)
        rows = _record_mlp_rows(monkeypatch)
        for i, Ws in enumerate(_shortcut_cases(g, torch.Generator().manual_seed(84), model.cfg.n_layers)):
            want_s = reference_patched(model, g, Ws, clean, corrupt)
            with ep.patch(model, g, Ws, abl):
                assert (model(clean) - want_s).abs().max() <= ATOL
            if i == 0:  # m0 unread: not run, except where a foreign hook sits in the MLP (Falcon's bridge clones
                # its output from a hook; OPT's MLP bridge contains the attention's hook points)
                assert rows[0] == (clean.shape[0] if arch in ("falcon", "opt") else 0)
    Wg = W.clone().requires_grad_()
    with ep.patch(model, g, Wg, abl):
        got = model(clean)
    assert (got - want).abs().max() <= ATOL
    got.sum().backward()
    assert Wg.grad is not None and bool(Wg.grad[g.valid].ne(0).any())
    # DESIGN.md §3.3, which reads no destination hook point: a destination the model never feeds through
    # its hook (Bloom's bridge fires no hook_mlp_in) or feeds the wrong tensor would show here
    # (heads whose sum is normalized before the residual stream adds it do not add up: no node patching)
    srcs = ["input", "m0"] + ([] if arch in ("gemma3", "olmo2") else ["a0.h1"])
    assert_node_patching_replaces_sources(model, g, abl, clean, corrupt, srcs)
    assert_unchanged(model, before)


def test_a_hook_point_the_model_never_runs_is_an_error_not_a_wrong_result(monkeypatch):
    """TransformerBridge runs no ``hook_mlp_in`` in parallel blocks whose MLP reads the attention's
    normalization (Phi here); edgepatch fires it itself. Without that, the patched forward must stop with an
    error naming the hook point, instead of returning logits with those MLP inputs silently unpatched, and
    leave the model as it was."""
    model = _hf_bridge("phi")
    g = ep.build_graph(model)
    abl = ep.source_activations(model, g, tokens(model, seed=96))
    before = model_snapshot(model)
    monkeypatch.setattr(patching, "_capture_bridge_mlp_inputs", lambda model: [])
    with pytest.raises(EdgepatchError, match=r"ran no hook at blocks\.0\.hook_mlp_in, blocks\.1\.hook_mlp_in in this "
                                             r"forward.*ParallelBlockBridge.*report"):
        with ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
            model(tokens(model, seed=97))
    assert_unchanged(model, before)


def test_a_source_the_model_never_records_is_an_error(monkeypatch):
    """source_activations must not return uninitialized memory for a source whose hook point never ran."""
    model = cached_model("tiny", ANY_CLASS)
    g = ep.build_graph(model)
    hooks = patching._source_hooks
    monkeypatch.setattr(patching, "_source_hooks", lambda *a, **k: [h for h in hooks(*a, **k) if "blocks.1.hook_mlp_out" not in h[0]])
    with pytest.raises(EdgepatchError, match=r"ran no hook for m1, so their activations were not recorded"):
        ep.source_activations(model, g, tokens(model))


def test_a_hook_on_a_scaled_blocks_mlp_output_sees_the_mlp_run(monkeypatch):
    """Granite's block-level ``hook_mlp_out`` (the scaled output, which only TransformerLens's hooks see)
    counts as a hook of the user's on the MLP: an unread MLP is then run, not skipped, and the values stay
    the reference's."""
    model = _hf_bridge("granite")
    g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=3, pos=6, seed=85), tokens(model, batch=3, pos=6, seed=86)
    abl = ep.source_activations(model, g, corrupt)
    W = torch.rand(g.n_src, g.n_dest, generator=torch.Generator().manual_seed(87))
    W[g.src_index("m0")] = 0  # no destination reads m0: skipped, unless someone watches it
    want = reference_patched(model, g, W, clean, corrupt)
    rows = _record_mlp_rows(monkeypatch)
    seen = []
    with torch.no_grad():
        with ep.patch(model, g, W, abl):
            assert (model(clean) - want).abs().max() <= ATOL
        assert rows[0] == 0
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: seen.append(x.shape[0]))]):
            with ep.patch(model, g, W, abl):
                assert (model(clean) - want).abs().max() <= ATOL
    assert rows[0] == clean.shape[0] and seen == [clean.shape[0]]


def test_scaled_blocks_without_one_attention_and_one_mlp_are_refused():
    """Granite's scaled blocks are patched (the architecture tests above); GraniteMoeHybrid's blocks hold
    Mamba layers or add a shared MLP to the experts, whose sources edgepatch does not know: it stops with a
    clear error instead of patching with the wrong sources."""
    import transformers

    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=0, shared_intermediate_size=64,
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        residual_multiplier=0.22)
    cfg.architectures = ["GraniteMoeHybridForCausalLM"]
    torch.manual_seed(12)
    model = _bridge_of("ibm-granite/granite-4.0-h-tiny", transformers.GraniteMoeHybridForCausalLM(cfg).eval())
    with pytest.raises(EdgepatchError, match=r"sublayers other than one attention and one MLP .*MLP: 'shared_mlp'.*"
                                             r"does not support these blocks yet"):
        ep.build_graph(model)


def test_attention_that_cannot_be_split_per_head_gets_a_clear_error(monkeypatch):
    """An architecture whose heads edgepatch cannot project itself falls back to TransformerLens's split
    q/k/v inputs; where TransformerBridge cannot split that attention either (GPT-J's, here with the
    projections made unavailable), the user gets edgepatch's error, not TransformerLens's, and the model is
    left as it was."""
    model = _hf_bridge("gptj")
    g = ep.build_graph(model)
    abl = ep.source_activations(model, g, tokens(model, seed=91))
    before = model_snapshot(model)
    monkeypatch.setattr(patching, "projections_of", lambda model: None)
    with pytest.raises(EdgepatchError, match=r"cannot give each head of .* its own q/k/v input.*AttentionBridge"):
        with ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
            model(tokens(model, seed=92))
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", list(_HF_ARCHITECTURES))
def test_eap_equals_autograd_across_architectures(arch):
    """DESIGN.md §3.5 across the bridge's architectures: EAP scores are ``-dMetric/dw`` at ``w = 1``, the
    gradient through ``patch``, also where TransformerLens cannot split the attention per head (GPT-J, OPT:
    ACDC and the other methods must not ask it to) and for post-norm blocks (OLMo 2)."""
    import warnings

    model = _hf_bridge(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = ep.build_graph(model)
    clean, corrupt = tokens(model, batch=4, pos=6, seed=93), tokens(model, batch=4, pos=6, seed=94)
    gen = torch.Generator().manual_seed(95)
    data = ep.PromptPairs.from_tokens(clean, corrupt, torch.randint(0, 101, (4, 1), generator=gen),
                                      torch.randint(0, 101, (4, 1), generator=gen))
    scores = ep.attribute(model, g, data, metric="logit_diff", method="eap", progress=False).scores
    W = torch.ones(g.n_src, g.n_dest, requires_grad=True)
    with ep.patch(model, g, W, ep.source_activations(model, g, corrupt)):
        ep.get_metric("logit_diff")(model(clean), data).mean().backward()
    want = -W.grad[g.valid]
    assert (scores[g.valid] - want).abs().max() <= 1e-4 * want.abs().max()
    ep.acdc(model, g, data, metric="logit_diff", threshold=0.01, progress=False)  # runs (no split inputs asked)


# ---------------------------------------------------------------------------------------------------
# The GPU's way (source-major buffer, one product per layer, decisions on the CPU), checked on the CPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODEL_CASES, ids=model_id)
@pytest.mark.parametrize("split", [True, False])
def test_source_major_layout_matches_the_reference(case, split, monkeypatch):
    """Off the CPU the difference buffer is source-major and every layer's mixing one matrix product (see
    _Engine._mixed_source_major); forced here on the CPU, it must give the reference's logits for random
    weights, sparse and dense circuits, every input ablated, and circuits folded into the batch, and
    agree with the CPU's own layout."""
    model = cached_model(*case)
    g = ep.build_graph(model, split_qkv=split)
    clean, corrupt = tokens(model, seed=41), tokens(model, seed=42)
    abl = ep.source_activations(model, g, corrupt)
    gen = torch.Generator().manual_seed(43)
    cases = [torch.rand(g.n_src, g.n_dest, generator=gen), *_path_cases(g, gen)]
    for W in cases:
        toks = clean.repeat(W.shape[0], 1) if W.ndim == 3 else clean
        with torch.no_grad():
            with ep.patch(model, g, W, abl):
                cpu_layout = model(toks)
            with monkeypatch.context() as mp:
                mp.setattr(patching, "_SOURCE_MAJOR_ON_CPU", True)
                with ep.patch(model, g, W, abl):
                    got = model(toks)
        want = _reference_circuits(model, g, W, clean, corrupt) if W.ndim == 3 else \
            reference_patched(model, g, W, clean, corrupt)
        assert (got - want).abs().max() <= ATOL
        assert (got - cpu_layout).abs().max() <= ATOL


def test_a_device_forward_reads_no_values_of_the_device(monkeypatch):
    """On a GPU, reading a value of a device tensor (bool(), .item(), nonzero(), a CPU tensor meeting a
    device tensor in an operation) makes the CPU wait for every kernel queued so far; hundreds per forward
    left the GPU idle (GPT-2 small, 32 x 128 tokens, H100: patched / plain 7x). A model on the "meta"
    device has no values to read: a patched forward there (weights on the CPU, as sweeps pass them) must
    run through, every decision taken on the CPU copy of the weights. (HookedTransformer: the bridge does
    not run on "meta".)"""
    from torch.overrides import TorchFunctionMode

    requires("hooked")
    cheap = {"size", "dim", "__get__", "is_floating_point", "numel", "stride", "data_ptr", "storage_offset",
             "is_contiguous", "__len__", "element_size", "to", "cpu", "detach", "clone", "new_empty",
             "new_zeros", "new_ones", "new_tensor"}

    class NoMixing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") not in cheap:
                flat = [a for a in (*args, *kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
                kinds = {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
                assert not {"meta", "cpu"} <= kinds, f"a CPU tensor meets a device tensor in {func}"
            return func(*args, **kwargs)

    for preset in ("tiny", "tiny-gqa", "tiny-parallel"):
        model = ep.random_model(preset, model_class="hooked", device="meta")
        g = ep.build_graph(model)
        toks = torch.zeros(4, 6, dtype=torch.long, device="meta")
        abl = ep.source_activations(model, g, toks)
        gen = torch.Generator().manual_seed(44)
        for W in [torch.rand(g.n_src, g.n_dest, generator=gen), *_path_cases(g, gen)]:
            with torch.no_grad(), NoMixing(), ep.patch(model, g, W, abl):
                out = model(toks.repeat(W.shape[0], 1) if W.ndim == 3 else toks)
            assert out.device.type == "meta"
    # the check bites: decisions read from the device's copy of the weights fail here
    model = ep.random_model("tiny", model_class="hooked", device="meta")
    g = ep.build_graph(model)
    toks = torch.zeros(2, 3, dtype=torch.long, device="meta")
    abl = ep.source_activations(model, g, toks)
    monkeypatch.setattr(patching._Engine, "_wc", lambda self: self.W.detach())
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        with torch.no_grad(), ep.patch(model, g, torch.rand(g.n_src, g.n_dest), abl):
            model(toks)
