"""Planted circuits: small transformers whose true circuit is known, to test circuit discovery against.

Context
-------
Circuit-discovery methods are usually judged by faithfulness (how well the found circuit reproduces the
model), because the true circuit of a trained model is unknown. A *planted* model turns that around: its
weights are set by hand so that the computation reaching the logits flows along a chosen random set of
edges and nowhere else. Every method can then be scored like a classifier against that ground truth
(:func:`edgepatch.evaluation.roc`).

Construction (``layer_norm=False``)
-----------------------------------
- **Wiring.** Every destination reads a random subset of its possible sources (each with probability
  ``density``): every head reads at least one value source, its query and key inputs are either both
  empty (a content-independent, uniform causal pattern) or both non-empty; every MLP and the logits read
  at least one source. A node (head or MLP) is *active* when its output reaches the logits through wired
  edges; the **true circuit** is every wired edge into an active node or into ``logits``. It is connected:
  every active node reads, through value and MLP inputs, a chain that starts at ``input``. Wired edges
  into inactive nodes are *distractors*: those nodes compute real, input-dependent outputs that nothing on
  the way to the logits reads (``distractors=False`` zeroes them instead).
- **Subspaces.** The residual stream is a direct sum of one block of coordinates per source: token and
  position embeddings write only to ``input``'s block, head ``a{L}.h{H}`` only to its own (the columns of
  its ``W_O``), MLP ``m{L}`` only to its own (``W_out``). All biases are zero except ``b_in`` (inside the
  MLP, not in the residual stream).
- **Reads.** A destination's projection (``W_Q``/``W_K``/``W_V`` of a head, ``W_in`` of an MLP, ``W_U``)
  is zero on every row outside the blocks of its wired sources. So ablating an edge from a source that a
  destination does not read changes only coordinates that the destination multiplies by exact zeros: the
  destination's output is bit-for-bit the same, and the effect on the metric is **exactly zero** (up to
  the last-bit differences of a batched matmul, ~1e-7 in float32; ~1e-15 with ``dtype=torch.float64``).
  This holds for any ablation (corrupted, zero, mean), any prompts, and on top of any circuit. Ablating a
  true edge changes what an active node computes and therefore the logits.
- **Scale.** Weights are random Gaussians, rescaled layer by layer on reference prompts so that every
  source writes a unit-norm output, attention scores have standard deviation ``attn_gain`` (soft,
  content-dependent patterns) and logits a standard deviation of about 3.

Because an off-circuit edge is ignored by a linear read, its gradient is exactly zero too: without
LayerNorm, attribution methods rank the planted circuit perfectly whenever no planted edge scores exactly
0. This variant checks methods for correctness; the LayerNorm variant below also separates them.

Task: clean and corrupted prompts are independent random token sequences; the answer is the token the
model predicts on the clean prompt, the wrong answer the one it predicts on the corrupted prompt (the clean
runner-up where they coincide); the metric is ``"logit_diff"`` at the last position. A true edge can
matter on every prompt and still average to ~0 (a key edge that moves attention one way on some prompts
and the other way on others), so :func:`planted_model` checks every true edge's exact effect on the mean
metric and redraws the planting (from the same seeded generator) until all exceed ``min_effect``.

LayerNorm (``layer_norm=True``)
-------------------------------
A LayerNorm reads its whole input through two statistics, the mean and the variance, so ablating an edge
from *any* source would normally rescale what every reader sees. The planted LN model keeps both
statistics exactly invariant:

1. every source writes a **zero-sum** vector (within its block), so the residual's mean is 0 on every run;
2. every source writes a vector of **constant norm**, the same at every position of every prompt:

   - ``input``: token embeddings are unit vectors, position embeddings are unit vectors on a separate
     sub-block (norm^2 = 2 everywhere);
   - MLPs use TransformerLens's ``act_fn="solu_ln"``, whose internal LayerNorm (``eps=0``, weight 1,
     bias 0) makes the hidden vector zero-mean with norm ``sqrt(d_mlp)``; ``W_out`` copies it, scaled to
     norm 1, into the MLP's block;
   - heads use **hard attention**: scores are scaled so large (std ~1e6) that the softmax is exactly
     one-hot in float64 (every other weight underflows to 0.0); keys always read ``input`` (so no two
     positions tie) and the prompts are chosen by rejection sampling so that the attention of every head
     is one-hot at every position on both the clean and the corrupted run. Values are isometries of
     constant-norm parts of the sources they read (each value source gets its own orthogonal slots of
     ``d_head``), so the head's output, one position's value mapped through an isometric ``W_O``, has
     norm 1. Inactive (distractor) heads attend by position only (to the same or the previous token), so
     no ablation changes their pattern.

A destination that does not read a source's block then sees exactly the same LayerNorm output when that
source's output is replaced by another vector of the same norm and mean: the corrupted run's output, by
construction. What is exact:

- with **corrupted-run ablation** (``ablation="corrupt"``, the default) on the **returned prompts**, every
  off-circuit edge has exactly zero effect (in exact arithmetic; in float64, the default dtype of this
  variant, measured effects are ~1e-15), alone and on top of **any circuit that keeps every true query
  and key edge** (so for ACDC, which keeps the true edges, and for any set of off-circuit edges);
- ablating a true query/key edge can make a true head's attention soft, so its output norm changes;
  on top of such a circuit, off-circuit edges are *not* guaranteed zero;
- **not exact** for zero or mean ablation (they change the norm; see the tests), nor on other prompts
  (attention may not be one-hot there).

Gradients see the LayerNorm coupling: attribution patching gives non-zero scores to off-circuit edges into
LN readers (a first-order term whose exact effect is zero) and exactly zero to true query/key edges (the
softmax is saturated), so gradient-based methods (EAP, EAP-IG, learned masks) rank this variant poorly
while exact patching and ACDC recover it. That is a property of the methods, not a planting error.

Limits: the LN variant is float64 by default (float32 leaves ~1e-7 rounding in the LayerNorm statistics);
a head reads at most ``d_head`` value dimensions (``d_head >= 3``); ``d_vocab >= seq_len`` (prompts have
no repeated token).

Example
-------
>>> p = planted_model(n_layers=2, n_heads=2, d_head=4, seed=0)
>>> p.graph
Graph(planted-2l2h-s0, 7 src x 15 dest, 46 edges)
>>> check = verify_planting(*p)
>>> check.max_off < 1e-6 < 1e-3 < check.min_on
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
from jaxtyping import Bool
from torch import Tensor

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError
from edgepatch.graph import Graph, ModelSpec, build_graph, graph_from_spec
from edgepatch.scores import EdgeScores

__all__ = ["planted_model", "verify_planting", "Planted", "PlantingCheck"]

_HARD_SCORE_STD = 1e6  # LN variant: attention score scale of true heads (one-hot softmax in float64)
_HARD_POS_MAX = 1e7  # LN variant: peak positional score of distractor heads
_LOGIT_STD = 3.0


class Planted(NamedTuple):
    """What :func:`planted_model` returns; unpacks as ``model, graph, true_edges, task, metric``.

    ``task.meta["planted"]`` holds the details: the wiring (every edge the model computes along, true or
    distractor), the active nodes, and the guarantee that holds."""

    model: Any
    graph: Graph
    true_edges: Bool[Tensor, "n_src n_dest"]
    task: PromptPairs
    metric: str


# ------------------------------------------------------------------------------------------------------
# Wiring
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Wiring:
    graph: Graph  # the split (q/k/v) edge graph
    parents: dict[int, list[int]]  # dest index -> wired source indices
    width: dict[int, int]  # LN: signal width of each source (what a value can read isometrically)
    active: set[int] = field(default_factory=set)  # source indices whose output reaches the logits

    def node_of(self, dest: int) -> int | None:
        """The source index that a destination belongs to (None for logits)."""
        name = self.graph.dest_names[dest]
        if name == "logits":
            return None
        return self.graph.src_index(name.split("<")[0])

    def mask(self, only_true: bool) -> Tensor:
        g = self.graph
        m = torch.zeros(g.n_src, g.n_dest, dtype=torch.bool)
        for d, ps in self.parents.items():
            node = self.node_of(d)
            if only_true and node is not None and node not in self.active:
                continue
            m[ps, d] = True
        return m


def _rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _choice(gen: torch.Generator, items: list[int]) -> int:
    return items[int(torch.randint(len(items), (), generator=gen))]


def _subset(gen: torch.Generator, cands: list[int], density: float) -> list[int]:
    return [c for c in cands if _rand(gen) < density]


def _sample_wiring(g: Graph, gen: torch.Generator, density: float, layer_norm: bool, d_head: int,
                   in_width: int, mlp_width: int) -> _Wiring:
    spec = g.spec
    parents: dict[int, list[int]] = {}
    width: dict[int, int] = {0: in_width}
    for layer in range(spec.n_layers):
        for h in range(spec.n_heads):
            name = f"a{layer}.h{h}"
            dq, dk, dv = (g.dest_index(f"{name}<{x}>") for x in "qkv")
            cands = list(range(int(g.n_pred[dv])))
            if layer_norm:  # value sources must fit in d_head, each in its own orthogonal slots
                perm = [cands[i] for i in torch.randperm(len(cands), generator=gen).tolist()]
                v, used = [], 0
                for p in perm:
                    if _rand(gen) < density and used + width[p] <= d_head:
                        v.append(p)
                        used += width[p]
                if not v:
                    v = [next(p for p in perm if width[p] <= d_head)]
                v.sort()
                width[g.src_index(name)] = sum(width[p] for p in v)
            else:
                v = _subset(gen, cands, density) or [_choice(gen, cands)]
            q, k = _subset(gen, cands, density), _subset(gen, cands, density)
            if layer_norm or bool(q) != bool(k):  # queries and keys: both empty or both not
                q = q or [_choice(gen, cands)]
                k = k or [_choice(gen, cands)]
            if layer_norm and 0 not in k:  # hard attention: keys read the input, so no two positions tie
                k = [0] + k
            parents[dq], parents[dk], parents[dv] = q, k, v
        dm = g.dest_index(f"m{layer}")
        cands = list(range(int(g.n_pred[dm])))
        parents[dm] = _subset(gen, cands, density) or [_choice(gen, cands)]
        width[g.mlp_src_index(layer)] = mlp_width
    dl = g.dest_index("logits")
    cands = list(range(g.n_src))
    parents[dl] = _subset(gen, cands, density) or [_choice(gen, cands)]
    w = _Wiring(g, parents, width)
    # active nodes: a reverse sweep (every reader of a node comes later in dest order than the node's own
    # destinations, so a node's status is final when its destinations are reached)
    active: set[int] = set()
    for d in reversed(range(g.n_dest)):
        node = w.node_of(d)
        if node is None or node in active:
            active.update(parents[d])
    w.active = active
    return w


# ------------------------------------------------------------------------------------------------------
# Linear-algebra helpers
# ------------------------------------------------------------------------------------------------------
def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _zero_sum_basis(k: int, gen: torch.Generator) -> Tensor:
    """``[k + 1, k]`` orthonormal columns spanning the zero-sum vectors of R^(k+1), randomly rotated."""
    a = torch.randn(k + 1, k, generator=gen, dtype=torch.float64)
    a = a - a.mean(0, keepdim=True)
    q, _ = torch.linalg.qr(a)
    return q @ _orthogonal(k, gen)


def _rotation(angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------
def planted_model(
    n_layers: int = 2,
    n_heads: int = 2,
    d_head: int = 4,
    *,
    layer_norm: bool = False,
    seed: int = 0,
    density: float = 0.35,
    split_qkv: bool = True,
    d_vocab: int = 32,
    seq_len: int = 6,
    n_prompts: int = 32,
    d_mlp: int | None = None,
    distractors: bool = True,
    attn_gain: float = 2.0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    min_effect: float | None = 1e-3,
    max_attempts: int = 20,
) -> Planted:
    """A small HookedTransformer whose computation reaches the logits only along a planted random circuit.

    Returns :class:`Planted` ``(model, graph, true_edges, task, metric)``: the model, its edge graph
    (``split_qkv`` as given), the true circuit as a bool ``[n_src, n_dest]`` mask, the prompts and the
    metric name (``"logit_diff"``). See the module docstring for the construction and what is exact.

    ``density``: probability that a destination reads each of its possible sources (larger = bigger
    circuits). ``distractors``: inactive nodes compute real outputs that the circuit ignores (True) or
    write zeros (False). ``attn_gain``: std of the attention scores (no-LN variant). ``dtype``: float32
    without LayerNorm, float64 with it, unless given.

    ``min_effect``: every true edge must change the mean metric by more than this when ablated alone (exact
    patching of the true edges; a random edge can matter on every prompt and still average to ~0, e.g. a
    key edge that moves attention both ways). A planting that fails is redrawn, up to ``max_attempts``
    times, from the same seeded generator (so the result is deterministic in ``seed``); ``None`` skips
    the check. ``task.meta["planted"]`` records the attempt and the weakest true effect.

    >>> model, graph, true_edges, task, metric = planted_model(n_layers=3, n_heads=2, seed=1)
    >>> int(true_edges.sum()) > 0, metric
    (True, 'logit_diff')
    """
    from edgepatch.models import _tl_version, model_classes

    if "hooked" not in model_classes():
        raise EdgepatchError(
            f"planted_model builds a HookedTransformer (hand-set weights, no normalization or a solu_ln MLP, which "
            f"no Hugging Face architecture behind a TransformerBridge has), and {_tl_version()} has none "
            f"(TransformerLens 4 removed it). Install transformer-lens 3.9, which has both model classes."
        )
    if not 1 <= n_layers <= 8:
        raise EdgepatchError(f"n_layers must be between 1 and 8; got {n_layers}.")
    if n_heads < 1:
        raise EdgepatchError(f"n_heads must be >= 1; got {n_heads}.")
    if not 0 < density <= 1:
        raise EdgepatchError(f"density must be in (0, 1]; got {density}.")
    if layer_norm and d_head < 3:
        raise EdgepatchError(f"layer_norm=True needs d_head >= 3 (values are isometries); got d_head={d_head}.")
    if layer_norm and d_vocab < seq_len:
        raise EdgepatchError(f"layer_norm=True samples prompts without repeated tokens: needs d_vocab >= seq_len; "
                             f"got d_vocab={d_vocab}, seq_len={seq_len}.")
    if d_vocab < 2 or seq_len < 2 or n_prompts < 1:
        raise EdgepatchError(f"need d_vocab >= 2, seq_len >= 2, n_prompts >= 1; got {d_vocab}, {seq_len}, {n_prompts}.")
    dtype = dtype or (torch.float64 if layer_norm else torch.float32)
    r_tok = min(3, d_head)  # LN: token signal width
    if d_mlp is None:
        d_mlp = min(4, d_head + 1) if layer_norm else 8
    if layer_norm and d_mlp - 1 > d_head:
        raise EdgepatchError(f"layer_norm=True needs d_mlp - 1 <= d_head; got d_mlp={d_mlp}, d_head={d_head}.")
    name = f"planted-{n_layers}l{n_heads}h{'-ln' if layer_norm else ''}-s{seed}"
    gen = torch.Generator().manual_seed(int(seed))
    opts = dict(n_layers=n_layers, n_heads=n_heads, d_head=d_head, layer_norm=layer_norm, density=density,
                split_qkv=split_qkv, d_vocab=d_vocab, seq_len=seq_len, n_prompts=n_prompts, d_mlp=d_mlp,
                distractors=distractors, attn_gain=attn_gain, dtype=dtype, device=device, r_tok=r_tok, name=name)
    weakest = math.nan
    for attempt in range(max_attempts):
        planted = _plant(gen, **opts)  # every attempt draws from the same generator: deterministic in seed
        if planted is None:  # LN: too few prompts with one-hot attention everywhere
            continue
        meta = planted.task.meta["planted"]
        meta.update(seed=seed, attempt=attempt)
        if min_effect is None:
            return planted
        from edgepatch.attribution import exact_patching

        eff = exact_patching(planted.model, planted.graph, planted.task, planted.metric,
                             edges=planted.true_edges, batch_size=n_prompts, progress=False)
        weakest = float(planted.graph.to_edges(eff.scores)[planted.graph.to_edges(planted.true_edges)].abs().min())
        meta["min_true_effect"] = weakest
        if weakest > min_effect:
            return planted
    raise EdgepatchError(
        f"planted_model: no planting among {max_attempts} attempts (seed={seed}) had every true edge's effect "
        f"above min_effect={min_effect} (last: {weakest:.3g}). Use another seed, more prompts (n_prompts), a "
        f"lower min_effect, or min_effect=None to skip the check."
    )


def _plant(gen: torch.Generator, *, n_layers: int, n_heads: int, d_head: int, layer_norm: bool, density: float,
           split_qkv: bool, d_vocab: int, seq_len: int, n_prompts: int, d_mlp: int, distractors: bool,
           attn_gain: float, dtype: torch.dtype, device: Any, r_tok: int, name: str) -> Planted | None:
    """One planting attempt (None when the LN variant finds too few prompts with one-hot attention)."""
    # ---- wiring ------------------------------------------------------------------------------------
    spec0 = ModelSpec(name, n_layers, n_heads, n_heads, 0, d_head, d_vocab, False, False)
    g0 = graph_from_spec(spec0, split_qkv=True)
    for _ in range(200):
        wiring = _sample_wiring(g0, gen, density, layer_norm, d_head, r_tok, d_mlp - 1)
        heads = [s for s in wiring.active if s not in _mlp_ids(g0) and s != 0]
        if any(wiring.parents[g0.dest_index(g0.src_names[s] + "<q>")] for s in heads):
            break
    else:  # pragma: no cover - only for absurd densities
        raise EdgepatchError(f"Could not plant a circuit with an attention head at density={density}; raise it.")
    if layer_norm:  # distractor heads attend by position only (input->q/k, position sub-block)
        for layer in range(n_layers):
            for h in range(n_heads):
                s = g0.src_index(f"a{layer}.h{h}")
                if s not in wiring.active:
                    wiring.parents[g0.dest_index(f"a{layer}.h{h}<q>")] = [0]
                    wiring.parents[g0.dest_index(f"a{layer}.h{h}<k>")] = [0]

    # ---- residual layout: one block per source -----------------------------------------------------
    sizes = []
    for s, src in enumerate(g0.src_names):
        if src == "input":
            sizes.append(r_tok + 1 + 3 if layer_norm else 4)
        elif src.startswith("m"):
            sizes.append(d_mlp if layer_norm else 4)
        else:
            sizes.append(wiring.width[s] + 1 if layer_norm else d_head)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    block = {s: slice(starts[s], starts[s] + sizes[s]) for s in range(len(sizes))}
    d_model = sum(sizes)

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, d_vocab=d_vocab,
        n_ctx=seq_len, act_fn="solu_ln" if layer_norm else "gelu",
        normalization_type="LN" if layer_norm else None, eps=0.0 if layer_norm else 1e-5,
        positional_embedding_type="standard", model_name=name, dtype=dtype, init_weights=False,
        device=str(device),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    model.eval()
    model.requires_grad_(False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.zero_()
            if n.endswith(".w"):  # LayerNorm weights
                p.fill_(1.0)
    builder = _Builder(model, g0, wiring, block, gen, layer_norm, distractors, r_tok, seq_len, attn_gain)
    builder.build()
    model.requires_grad_(True)

    # ---- prompts -----------------------------------------------------------------------------------
    task = builder.prompts(n_prompts)
    if task is None:
        return None
    graph = build_graph(model, split_qkv=split_qkv)
    true_edges = _to_graph(wiring.mask(only_true=True), g0, graph)
    task.meta["planted"] = {
        "layer_norm": layer_norm, "density": density, "distractors": distractors,
        "wired_edges": graph.edges_from_mask(_to_graph(wiring.mask(only_true=False), g0, graph)),
        "true_edges": graph.edges_from_mask(true_edges),
        "active_nodes": [g0.src_names[s] for s in sorted(wiring.active)],
        "exact_for": "corrupted-run ablation (ablation='corrupt') on these prompts" if layer_norm
                     else "any ablation (corrupt, zero, mean) and any prompts",
    }
    return Planted(model, graph, true_edges, task, "logit_diff")


def _mlp_ids(g: Graph) -> set[int]:
    return {g.mlp_src_index(layer) for layer in range(g.spec.n_layers)}


def _to_graph(mask_split: Tensor, g0: Graph, graph: Graph) -> Tensor:
    """A mask on the split wiring graph -> the model's graph (joint heads: union of q, k and v)."""
    out = torch.zeros(graph.n_src, graph.n_dest, dtype=torch.bool)
    for d, dn in enumerate(g0.dest_names):
        out[:, graph.dest_index(dn if graph.split_qkv else dn.split("<")[0])] |= mask_split[:, d]
    return out & graph.valid


class _Builder:
    """Sets the weights layer by layer, rescaling on reference prompts (see the module docstring)."""

    def __init__(self, model: Any, g: Graph, wiring: _Wiring, block: dict[int, slice], gen: torch.Generator,
                 layer_norm: bool, distractors: bool, r_tok: int, seq_len: int, attn_gain: float) -> None:
        self.model, self.g, self.w, self.block, self.gen = model, g, wiring, block, gen
        self.ln, self.distractors, self.r_tok, self.seq_len, self.attn_gain = layer_norm, distractors, r_tok, seq_len, attn_gain
        self.dtype = model.cfg.dtype
        self.read_basis: dict[int, Tensor] = {}  # LN: [block size, width] isometric read of each source
        self.ref = self.tokens(64)

    # ---- helpers -----------------------------------------------------------------------------------
    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def set_(self, param: Tensor, index: Any, value: Tensor) -> None:
        param.data[index] = value.to(param.dtype)

    def tokens(self, n: int) -> Tensor:
        V = self.model.cfg.d_vocab
        if self.ln:  # no repeated token within a prompt (repeated keys would tie the hard attention)
            return torch.stack([torch.randperm(V, generator=self.gen)[: self.seq_len] for _ in range(n)])
        return torch.randint(V, (n, self.seq_len), generator=self.gen)

    def keeps(self, s: int) -> bool:
        """Does source s compute a real output (active, or a distractor)?"""
        return s == 0 or s in self.w.active or self.distractors

    def cache(self, names: list[str]) -> dict[str, Tensor]:
        dev = next(self.model.parameters()).device
        _, c = self.model.run_with_cache(self.ref.to(dev), names_filter=lambda n: n in names)
        return {k: v.double().cpu() for k, v in c.items()}

    # ---- build -------------------------------------------------------------------------------------
    @torch.no_grad()
    def build(self) -> None:
        self.embeddings()
        for layer in range(self.model.cfg.n_layers):
            self.attention(layer)
            self.mlp(layer)
        self.unembed()

    def embeddings(self) -> None:
        m, b = self.model, self.block[0]
        V, n_ctx = m.cfg.d_vocab, m.cfg.n_ctx
        if not self.ln:
            self.set_(m.embed.W_E, (slice(None), b), self.randn(V, 4) / 2)
            self.set_(m.pos_embed.W_pos, (slice(None), b), self.randn(n_ctx, 4) / 4)
            return
        r = self.r_tok
        tok = self.randn(V, r)
        tok = tok / tok.norm(dim=1, keepdim=True)
        e_tok = _zero_sum_basis(r, self.gen)  # [r + 1, r]
        e_pos = _zero_sum_basis(2, self.gen)  # [3, 2]
        theta = math.pi / n_ctx
        ang = torch.arange(n_ctx, dtype=torch.float64) * theta
        u = torch.stack([ang.cos(), ang.sin()], 1)
        W_E = torch.zeros(V, b.stop - b.start, dtype=torch.float64)
        W_E[:, : r + 1] = tok @ e_tok.T
        W_pos = torch.zeros(n_ctx, b.stop - b.start, dtype=torch.float64)
        W_pos[:, r + 1 :] = u @ e_pos.T
        self.set_(m.embed.W_E, (slice(None), b), W_E)
        self.set_(m.pos_embed.W_pos, (slice(None), b), W_pos)
        read = torch.zeros(b.stop - b.start, r, dtype=torch.float64)
        read[: r + 1] = e_tok
        self.read_basis[0] = read
        self.e_pos, self.theta = e_pos, theta

    def attention(self, layer: int) -> None:
        m, g, w = self.model, self.g, self.w
        attn = m.blocks[layer].attn
        H, d_head = m.cfg.n_heads, m.cfg.d_head
        heads = [g.src_index(f"a{layer}.h{h}") for h in range(H)]
        positional: dict[int, int] = {}
        for h, s in enumerate(heads):
            if not self.keeps(s):
                continue
            name = g.src_names[s]
            pq, pk, pv = (w.parents[g.dest_index(f"{name}<{x}>")] for x in "qkv")
            if self.ln and s not in w.active:  # distractor: attend to the same / previous position
                shift = int(torch.randint(2, (), generator=self.gen))
                pb = self.block[0]
                pos_rows = slice(pb.start + self.r_tok + 1, pb.stop)
                self.set_(attn.W_K, (h, pos_rows, slice(0, 2)), self.e_pos)
                self.set_(attn.W_Q, (h, pos_rows, slice(0, 2)), self.e_pos @ _rotation(shift * self.theta))
                positional[h] = shift
            else:
                for W, ps in ((attn.W_Q, pq), (attn.W_K, pk)):
                    for p in ps:
                        b = self.block[p]
                        self.set_(W, (h, b, slice(None)), self.randn(b.stop - b.start, d_head) / math.sqrt(len(ps)))
            if self.ln:  # values: isometries of the sources' constant-norm parts, in orthogonal slots
                slot = 0
                for p in pv:
                    basis = self.read_basis[p]
                    width = basis.shape[1]
                    self.set_(attn.W_V, (h, self.block[p], slice(slot, slot + width)), basis @ _orthogonal(width, self.gen))
                    slot += width
            else:
                for p in pv:
                    b = self.block[p]
                    self.set_(attn.W_V, (h, b, slice(None)), self.randn(b.stop - b.start, d_head) / math.sqrt(len(pv)))
        # rescale queries (score std / positional peak) and write W_O (unit-norm outputs)
        c = self.cache([f"blocks.{layer}.attn.hook_attn_scores", f"blocks.{layer}.attn.hook_v"])
        scores = c[f"blocks.{layer}.attn.hook_attn_scores"]  # [batch, head, q, k]
        v = c[f"blocks.{layer}.attn.hook_v"]  # [batch, pos, head, d_head]
        for h, s in enumerate(heads):
            if not self.keeps(s):
                continue
            sc = scores[:, h]
            sc = sc[torch.isfinite(sc)]
            if h in positional:
                target = _HARD_POS_MAX / float(sc.abs().max())
            elif sc.abs().max() > 0:
                target = (_HARD_SCORE_STD if self.ln else self.attn_gain) / float(sc.std())
            else:
                target = 1.0
            attn.W_Q.data[h] *= target
            norms = v[:, :, h].norm(dim=-1)
            b = self.block[s]
            if self.ln:
                # constant on prompts where every earlier head is one-hot (the median is one of them)
                rms = float(norms.median())
                width = self.w.width[s]
                basis = _zero_sum_basis(width, self.gen)  # [width + 1, width]
                self.set_(attn.W_O, (h, slice(0, width), b), basis.T / rms)
                self.read_basis[s] = basis
            else:
                rms = float(norms.pow(2).mean().sqrt())
                self.set_(attn.W_O, (h, slice(None), b), _orthogonal(d_head, self.gen) / rms)

    def mlp(self, layer: int) -> None:
        m, g = self.model, self.g
        mlp = m.blocks[layer].mlp
        s = g.mlp_src_index(layer)
        d_mlp = m.cfg.d_mlp
        if not self.keeps(s):  # writes zeros; b_in != 0 keeps solu_ln's variance (eps = 0) away from 0/0
            self.set_(mlp.b_in, slice(None), self.randn(d_mlp))
            return
        ps = self.w.parents[g.dest_index(f"m{layer}")]
        for p in ps:
            b = self.block[p]
            self.set_(mlp.W_in, (b, slice(None)), self.randn(b.stop - b.start, d_mlp))
        pre = self.cache([f"blocks.{layer}.mlp.hook_pre"])[f"blocks.{layer}.mlp.hook_pre"]
        mlp.W_in.data *= 1.0 / float(pre.std())
        self.set_(mlp.b_in, slice(None), self.randn(d_mlp) * 0.5)
        b = self.block[s]
        if self.ln:  # the solu_ln hidden vector is zero-mean with norm sqrt(d_mlp): copy it, at norm 1
            self.set_(mlp.W_out, (slice(None), b), torch.eye(d_mlp, dtype=torch.float64) / math.sqrt(d_mlp))
            self.read_basis[s] = self._mlp_read(d_mlp)
            return
        self.set_(mlp.W_out, (slice(None), b), self.randn(d_mlp, b.stop - b.start))
        out = self.cache([f"blocks.{layer}.hook_mlp_out"])[f"blocks.{layer}.hook_mlp_out"]
        mlp.W_out.data /= float(out.norm(dim=-1).pow(2).mean().sqrt())

    @staticmethod
    def _mlp_read(d_mlp: int) -> Tensor:
        """An orthonormal basis of the zero-sum vectors of R^d_mlp (the MLP's output span)."""
        a = torch.eye(d_mlp, dtype=torch.float64)[:, : d_mlp - 1] - 1.0 / d_mlp
        q, _ = torch.linalg.qr(a)
        return q

    def unembed(self) -> None:
        m, g = self.model, self.g
        ps = self.w.parents[g.dest_index("logits")]
        for p in ps:
            b = self.block[p]
            self.set_(m.unembed.W_U, (b, slice(None)), self.randn(b.stop - b.start, m.cfg.d_vocab))
        dev = next(m.parameters()).device
        logits = m(self.ref.to(dev)).double().cpu()
        m.unembed.W_U.data *= _LOGIT_STD / float(logits.std())

    # ---- prompts -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prompts(self, n: int) -> PromptPairs | None:
        m = self.model
        dev = next(m.parameters()).device
        clean_rows: list[Tensor] = []
        corrupt_rows: list[Tensor] = []
        tries = 0
        while sum(len(r) for r in clean_rows) < n:
            tries += 1
            if tries > 20:
                return None
            clean, corrupt = self.tokens(4 * n), self.tokens(4 * n)
            ok = torch.ones(len(clean), dtype=torch.bool)
            if self.ln:
                ok = self._hard(clean.to(dev)) & self._hard(corrupt.to(dev))
            clean_rows.append(clean[ok])
            corrupt_rows.append(corrupt[ok])
        clean = torch.cat(clean_rows)[:n].to(dev)
        corrupt = torch.cat(corrupt_rows)[:n].to(dev)
        lc = m(clean)[:, -1].double()
        lx = m(corrupt)[:, -1].double()
        answers = lc.argmax(-1)
        wrong = lx.argmax(-1)
        same = wrong == answers
        wrong[same] = lc.topk(2, dim=-1).indices[same, 1]
        return PromptPairs.from_tokens(clean, corrupt, answers, wrong)

    def _hard(self, tokens: Tensor) -> Tensor:
        """Per prompt: is every real head's attention exactly one-hot at every position?"""
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.model.cfg.n_layers)]
        _, c = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        ok = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
        for layer in range(self.model.cfg.n_layers):
            pat = c[names[layer]]  # [batch, head, q, k]
            for h in range(self.model.cfg.n_heads):
                if self.keeps(self.g.src_index(f"a{layer}.h{h}")):
                    ok &= (pat[:, h].amax(-1) == 1.0).all(-1)
        return ok.cpu()


# ------------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------------
@dataclass
class PlantingCheck:
    """Result of :func:`verify_planting`; unpacks as ``max_off, min_on``.

    ``max_off``: the largest ``|effect|`` of ablating one edge outside the true circuit (``worst_off`` names
    it); ``min_on``: the smallest ``|effect|`` of a true edge (``weakest_on``); ``effects``: exact patching
    scores of every edge."""

    max_off: float
    min_on: float
    worst_off: str
    weakest_on: str
    effects: EdgeScores

    def ok(self, tol: float = 1e-6, margin: float = 1e-3) -> bool:
        """Every off-circuit effect below ``tol`` and every true edge's effect above ``margin``."""
        return self.max_off < tol and self.min_on > margin

    def __iter__(self) -> Iterator[float]:
        return iter((self.max_off, self.min_on))

    def __repr__(self) -> str:
        return (f"PlantingCheck(max_off={self.max_off:.3g} ({self.worst_off}), "
                f"min_on={self.min_on:.3g} ({self.weakest_on}))")


def verify_planting(model: Any, graph: Graph, true_edges: Tensor, task: PromptPairs, metric: Any = "logit_diff",
                    *, ablation: Any = "corrupt", batch_size: int = 64) -> PlantingCheck:
    """Exact patching of every edge (:func:`edgepatch.attribution.exact_patching`): the largest effect of an
    edge outside ``true_edges`` and the smallest effect of an edge inside.

    >>> p = planted_model(seed=3)
    >>> max_off, min_on = verify_planting(*p)
    >>> max_off < 1e-6, min_on > 1e-3
    (True, True)
    """
    from edgepatch.attribution import exact_patching

    graph.check_shape(true_edges, "true_edges")
    truth = graph.to_edges(true_edges.bool().cpu())
    effects = exact_patching(model, graph, task, metric, ablation=ablation, batch_size=batch_size, progress=False)
    flat = effects.flat.abs().double()
    names = graph.edge_names
    off = flat.masked_fill(truth, -1.0)
    on = flat.masked_fill(~truth, math.inf)
    i_off, i_on = int(off.argmax()), int(on.argmin())
    return PlantingCheck(
        max_off=max(float(off[i_off]), 0.0), min_on=float(on[i_on]) if truth.any() else math.nan,
        worst_off=names[i_off] if (~truth).any() else "", weakest_on=names[i_on] if truth.any() else "",
        effects=effects,
    )
