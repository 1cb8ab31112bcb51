"""The computational graph of a transformer, as sources, destinations and edges.

Context
-------
A transformer's residual stream is a sum: every attention head and every MLP *writes* its output into it,
and every later head and MLP *reads* the sum. So the model is a graph whose nodes are those writers
(**sources**) and readers (**destinations**), with an edge ``src->dest`` wherever ``src`` has written to the
stream before ``dest`` reads it. Patching one edge changes what one destination sees of one source
(see :mod:`edgepatch.patching`).

Names follow the MIB / EAP-IG convention, so graphs interoperate:

- sources: ``input`` (token + positional embeddings), ``a{L}.h{H}`` (head H of layer L, its output
  ``z_h @ W_O^h`` without ``b_O``), ``m{L}`` (MLP L's output); each as the residual stream adds it (Granite's
  blocks scale both by ``residual_multiplier`` first);
- destinations: ``a{L}.h{H}<q>``, ``<k>``, ``<v>`` (``split_qkv=True``) or ``a{L}.h{H}`` (``split_qkv=False``),
  ``m{L}`` (MLP input), ``logits`` (the final residual, before the final norm);
- edges: ``"a0.h3->a2.h1<q>"``.

Grouped-query attention: a model with fewer key/value heads than query heads reads one key input and one
value input per *key/value head*, shared by the query heads of its group. Those destinations are named
``a{L}.kv{G}<k>`` / ``a{L}.kv{G}<v>`` (and ``a{L}.kv{G}`` with ``split_qkv=False``, while query inputs
stay ``a{L}.h{H}``). :mod:`edgepatch.io` maps them to MIB's per-query-head names on export and import.

Intuition for the indexing: sources are ordered as the model computes them (``input``, layer 0's heads,
``m0``, layer 1's heads, ...), so the predecessors of every destination are a *prefix* of the sources.
Everything indexed by edges is one dense ``[n_src, n_dest]`` tensor plus the boolean validity mask
``graph.valid``; top-k, thresholds and sweeps are tensor ops on it.

Example
-------
>>> from edgepatch.models import random_model
>>> graph = build_graph(random_model("tiny"))
>>> graph
Graph(random-tiny, 11 src x 27 dest, 110 edges)
>>> graph.edge_names[0]
'input->a0.h0<q>'
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Literal, Mapping

import torch
from jaxtyping import Bool
from torch import Tensor

from edgepatch.errors import EdgepatchError, UnknownNameError, shape_str, suggest

Level = Literal["edge", "node"]


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts a graph depends on (two models with equal specs share graphs)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    parallel: bool
    attn_only: bool

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    def same_shape(self, other: "ModelSpec") -> bool:
        return dataclasses.replace(self, name="") == dataclasses.replace(other, name="")


SUPPORTED = "a TransformerLens HookedTransformer or TransformerBridge"


def model_spec(model: object) -> ModelSpec:
    """Read the architecture from a TransformerLens model; raise a clear error for anything else."""
    cfg = getattr(model, "cfg", None)
    # (a class-level check: TransformerBridge rebuilds hook_dict on every access, ~10 ms for GPT-2 small)
    has_hooks = hasattr(type(model), "hook_dict") or "hook_dict" in getattr(model, "__dict__", {})
    if cfg is None or not has_hooks or not hasattr(cfg, "n_layers"):
        raise EdgepatchError(
            f"edgepatch needs {SUPPORTED}; got an object of type {type(model).__module__}.{type(model).__qualname__}. "
            "Load the model with edgepatch.load_model(name), transformer_lens.HookedTransformer.from_pretrained(name), "
            "or wrap a HuggingFace model with TransformerBridge.boot_transformers(name, hf_model=model)."
        )
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    if n_heads % int(n_kv):
        raise EdgepatchError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}; unsupported model.")
    name = getattr(cfg, "model_name", None) or type(model).__name__
    blocks = getattr(model, "blocks", None)
    first = blocks[0] if blocks is not None and len(blocks) else None
    # Granite-family blocks scale each sublayer's output before the residual stream adds it; the engine's
    # sources are the scaled outputs (patching.residual_scale). Not where a block's sublayers are not one
    # attention and one MLP (GraniteMoeHybrid: Mamba layers, a shared MLP summed with the experts).
    if hasattr(first, "residual_contribution_scale") and (
            getattr(first, "scaled_attn_submodule", "attn") != "attn"
            or getattr(first, "scaled_mlp_submodule", "mlp") != "mlp"
            or any(getattr(block, "attn", None) is None for block in blocks)):
        raise EdgepatchError(
            f"{name}'s blocks are TransformerBridge's {type(first).__name__} with sublayers other than one "
            f"attention and one MLP (attention: {getattr(first, 'scaled_attn_submodule', None)!r}, MLP: "
            f"{getattr(first, 'scaled_mlp_submodule', None)!r}; GraniteMoeHybrid's Mamba layers or shared MLP). "
            "edgepatch does not support these blocks yet (its sources are the terms the residual stream adds "
            "up), so it stops here rather than return wrong results. Use another model, or open an issue for "
            "this architecture."
        )
    return ModelSpec(
        name=str(name),
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        d_vocab=int(getattr(cfg, "d_vocab_out", -1) if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        attn_only=bool(getattr(cfg, "attn_only", False)),
    )


@dataclass(frozen=True, eq=False)
class Graph:
    """Sources, destinations and edges of one model architecture (build it with :func:`build_graph`).

    Attributes: ``src_names``, ``dest_names``, ``edge_names``, ``n_src``, ``n_dest``, ``n_edges``,
    ``valid`` (``[n_src, n_dest]`` bool), ``n_pred`` (``[n_dest]``: destination d's predecessors are sources
    ``0 .. n_pred[d]-1``), ``spec`` (the architecture), ``split_qkv``, ``level``.
    At ``level="node"`` each source is one unit: ``dest_names == ("*",)`` and a weight ``[n_src, 1]`` applies
    to all of that source's outgoing edges (``edge_graph`` is the underlying edge-level graph).
    """

    spec: ModelSpec
    split_qkv: bool
    level: Level
    src_names: tuple[str, ...]
    dest_names: tuple[str, ...]
    n_pred: Tensor  # [n_dest] long
    edge_graph: "Graph | None" = field(default=None, repr=False)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def n_src(self) -> int:
        return len(self.src_names)

    @property
    def n_dest(self) -> int:
        return len(self.dest_names)

    @cached_property
    def valid(self) -> Bool[Tensor, "n_src n_dest"]:
        return torch.arange(self.n_src)[:, None] < self.n_pred[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.n_pred.sum())

    @cached_property
    def edge_index(self) -> Tensor:
        """``[n_edges, 2]`` (src index, dest index) of every edge, in ``edge_names`` order (row-major)."""
        return self.valid.nonzero()

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        if self.level == "node":
            return self.src_names
        s, d = self.edge_index.T.tolist()
        return tuple(f"{self.src_names[i]}->{self.dest_names[j]}" for i, j in zip(s, d))

    @cached_property
    def _src_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.src_names)}

    @cached_property
    def _dest_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.dest_names)}

    # ---- lookups -----------------------------------------------------------------------------------
    def src_index(self, name: str) -> int:
        try:
            return self._src_lookup[name]
        except KeyError:
            raise UnknownNameError(
                f"Unknown source {name!r} in {self!r}.{suggest(name, self.src_names)} "
                f"Sources are named 'input', 'a{{layer}}.h{{head}}' and 'm{{layer}}'."
            ) from None

    def dest_index(self, name: str) -> int:
        try:
            return self._dest_lookup[name]
        except KeyError:
            form = "'a{layer}.h{head}<q|k|v>'" if self.split_qkv else "'a{layer}.h{head}'"
            if self.spec.gqa:
                form += " (key/value inputs: 'a{layer}.kv{group}" + ("<k|v>'" if self.split_qkv else "'") + ")"
            import re

            hint = suggest(name, self.dest_names)
            m = re.fullmatch(r"a(\d+)\.h(\d+)(<[kv]>)?", name)
            if m and self.spec.gqa and (m.group(3) or not self.split_qkv) and int(m.group(2)) < self.spec.n_heads:
                kv = f"a{m.group(1)}.kv{int(m.group(2)) // (self.spec.n_heads // self.spec.n_kv_heads)}{m.group(3) or ''}"
                hint = f" With grouped-query attention, head {m.group(2)}'s key/value input is {kv!r}."
            raise UnknownNameError(
                f"Unknown destination {name!r} in {self!r}.{hint} "
                f"Destinations are named {form}, 'm{{layer}}' and 'logits'."
            ) from None

    def edge(self, name: str) -> tuple[int, int]:
        """(src index, dest index) of an edge name like ``'a0.h1->m2'`` (or a source name at node level)."""
        if self.level == "node":
            return self.src_index(name), 0
        if "->" not in name:
            raise UnknownNameError(
                f"{name!r} is not an edge name: expected 'source->destination', e.g. {self.edge_names[0]!r}."
            )
        src, dest = name.split("->", 1)
        s, d = self.src_index(src.strip()), self.dest_index(dest.strip())
        if not self.valid[s, d]:
            raise UnknownNameError(
                f"There is no edge {name!r} in {self!r}: {src!r} is computed after {dest!r} reads the residual "
                f"stream. Edges go from earlier layers to later ones (and from a layer's heads to its MLP in "
                f"sequential blocks)."
            )
        return s, d

    def mask_from_edges(self, names: Iterable[str]) -> Bool[Tensor, "n_src n_dest"]:
        """A ``[n_src, n_dest]`` bool mask with True on the named edges (unknown names raise)."""
        if isinstance(names, str):
            names = [names]
        if isinstance(names, Mapping):
            raise EdgepatchError(
                f"Got a dict of {len(names)} edges where edge names are expected; its values would be ignored. Pass "
                f"list(d) for its edges, or, for scores, EdgeScores(graph.from_edges(...), graph) and "
                f"scores.circuit(k) (or a threshold: [e for e, v in d.items() if v > t])."
            )
        mask = torch.zeros(self.n_src, self.n_dest, dtype=torch.bool)
        idx = [self.edge(n) for n in names]
        if idx:
            s, d = torch.tensor(idx).T
            mask[s, d] = True
        return mask

    def edges_from_mask(self, mask: Tensor) -> list[str]:
        """Edge names where ``mask`` (``[n_src, n_dest]``) is true, in ``edge_names`` order."""
        self.check_shape(mask, "mask")
        sel = mask.bool().cpu() & self.valid
        flat = sel[self.edge_index[:, 0], self.edge_index[:, 1]]
        names = self.edge_names
        return [names[i] for i in flat.nonzero().flatten().tolist()]

    def to_edges(self, dense: Tensor) -> Tensor:
        """Gather a ``[..., n_src, n_dest]`` tensor into ``[..., n_edges]`` (``edge_names`` order)."""
        s, d = self.edge_index.to(dense.device).T
        return dense[..., s, d]

    def from_edges(self, flat: Tensor, fill: float = 0.0) -> Tensor:
        """Scatter ``[..., n_edges]`` back to ``[..., n_src, n_dest]`` (invalid entries = ``fill``)."""
        out = flat.new_full((*flat.shape[:-1], self.n_src, self.n_dest), fill)
        s, d = self.edge_index.to(flat.device).T
        out[..., s, d] = flat
        return out

    def check_shape(self, t: Tensor, what: str = "weights") -> None:
        if tuple(t.shape[-2:]) != (self.n_src, self.n_dest):
            raise EdgepatchError(
                f"{what} has shape {shape_str(t.shape)}; expected [..., n_src, n_dest] = "
                f"[..., {self.n_src}, {self.n_dest}] for {self!r}. Build dense tensors with "
                f"torch.ones(graph.n_src, graph.n_dest) or from edge names with graph.mask_from_edges(names)."
            )

    def expand(self, weights: Tensor) -> Tensor:
        """Node-level weights ``[..., n_src, 1]`` -> edge-level ``[..., n_src, n_dest]`` (edge graphs: unchanged)."""
        if self.level == "edge":
            return weights
        assert self.edge_graph is not None
        return weights.expand(*weights.shape[:-1], self.edge_graph.n_dest)

    @property
    def engine_graph(self) -> "Graph":
        """The edge-level graph whose destinations the engine hooks."""
        return self if self.level == "edge" else self.edge_graph  # type: ignore[return-value]

    # ---- layout used by the engine -----------------------------------------------------------------
    def head_src_slice(self, layer: int) -> slice:
        start = 1 + layer * (self.spec.n_heads + (0 if self.spec.attn_only else 1))
        return slice(start, start + self.spec.n_heads)

    def mlp_src_index(self, layer: int) -> int:
        return self.head_src_slice(layer).stop

    def __repr__(self) -> str:
        unit = "edges" if self.level == "edge" else "nodes"
        n = self.n_edges if self.level == "edge" else self.n_src
        return f"Graph({self.spec.name}, {self.n_src} src x {self.n_dest} dest, {n:,} {unit})"

    def summary(self) -> str:
        """A few lines describing the graph (for notebooks and logs)."""
        s = self.spec
        lines = [
            repr(self),
            f"  model: {s.n_layers} layers x {s.n_heads} heads"
            + (f" ({s.n_kv_heads} key/value heads)" if s.gqa else "")
            + f", d_model {s.d_model}" + (", parallel attention+MLP" if s.parallel else "")
            + (", attention only" if s.attn_only else ""),
            f"  split_qkv={self.split_qkv}, level={self.level!r}",
        ]
        return "\n".join(lines)


def build_graph(model: object, split_qkv: bool = True, level: Level = "edge") -> Graph:
    """Build the edge graph of a TransformerLens model (DESIGN.md §1).

    ``split_qkv``: one destination per query/key/value input of each head (default, 32,491 edges on GPT-2
    small) or one per head (11,611). ``level="node"``: one unit per source (node patching).

    >>> from edgepatch.models import random_model
    >>> build_graph(random_model("tiny"), split_qkv=False).n_edges
    54
    """
    if level not in ("edge", "node"):
        raise EdgepatchError(f"level must be 'edge' or 'node', got {level!r}.")
    if not isinstance(split_qkv, bool):
        raise EdgepatchError(f"split_qkv must be True or False, got {split_qkv!r}.")
    spec = model_spec(model)
    if normalizes_attention_output(model):
        warnings.warn(
            f"build_graph: {spec.name} normalizes each layer's attention output before adding it to the "
            "residual stream (Gemma 2/3, OLMo 2), so the heads' outputs do not add up to what the residual "
            "stream receives. edgepatch takes a head's output before that normalization (z_h @ W_O^h): "
            "ablating every edge out of a head is then close to, not equal to, replacing the head's output. "
            "MLP edges are exact. Treat head-level results on this model as an approximation.",
            stacklevel=2,
        )
    return graph_from_spec(spec, split_qkv=split_qkv, level=level)


def is_post_norm(model: object) -> bool:
    """Whether TransformerLens lists the model's architecture as post-norm (OLMo 2/3: the normalization
    follows each sublayer instead of preceding it)."""
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # older TransformerLens: no post-norm architectures
        return False
    return bool(_architectures(model) & set(POST_NORM_ARCHITECTURES))


def _architectures(model: object) -> set[str]:
    """The HuggingFace architecture names the model says it has: a HookedTransformer's config has
    ``original_architecture``; a TransformerBridge's has ``architecture`` (``original_architecture`` is None
    when it was built from a HuggingFace model object), and its wrapped model says it too."""
    cfg = getattr(model, "cfg", None)
    names = {getattr(cfg, "original_architecture", None), getattr(cfg, "architecture", None)}
    hf = getattr(model, "original_model", None)
    if hf is not None:
        names.add(type(hf).__name__)
        names.update(getattr(getattr(hf, "config", None), "architectures", None) or ())
    return {n for n in names if isinstance(n, str)}


def normalizes_attention_output(model: object) -> bool:
    """Whether the model normalizes its attention outputs before the residual stream adds them."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "use_normalization_before_and_after", False) or is_post_norm(model):
        return True
    blocks = getattr(model, "blocks", None) or []
    return any(getattr(block, "ln1_post", None) is not None for block in blocks)


def graph_from_spec(spec: ModelSpec, split_qkv: bool = True, level: Level = "edge") -> Graph:
    if level == "node":
        edge = graph_from_spec(spec, split_qkv=split_qkv, level="edge")
        return Graph(spec, split_qkv, "node", edge.src_names, ("*",),
                     torch.tensor([edge.n_src], dtype=torch.long), edge_graph=edge)
    srcs: list[str] = ["input"]
    dests: list[str] = []
    n_pred: list[int] = []
    group = spec.n_heads // spec.n_kv_heads
    for layer in range(spec.n_layers):
        before = len(srcs)  # sources of earlier layers (and the input)
        heads = [f"a{layer}.h{h}" for h in range(spec.n_heads)]
        if split_qkv:
            for kind in "qkv":
                if kind == "q" or not spec.gqa:
                    names = [f"{h}<{kind}>" for h in heads]
                else:
                    names = [f"a{layer}.kv{g}<{kind}>" for g in range(spec.n_kv_heads)]
                dests += names
                n_pred += [before] * len(names)
        else:
            names = list(heads) + ([f"a{layer}.kv{g}" for g in range(spec.n_kv_heads)] if spec.gqa else [])
            dests += names
            n_pred += [before] * len(names)
        srcs += heads
        if not spec.attn_only:
            dests.append(f"m{layer}")
            n_pred.append(before if spec.parallel else len(srcs))
            srcs.append(f"m{layer}")
    dests.append("logits")
    n_pred.append(len(srcs))
    del group
    return Graph(spec, split_qkv, "edge", tuple(srcs), tuple(dests), torch.tensor(n_pred, dtype=torch.long))


_PLANS: "weakref.WeakKeyDictionary[Graph, tuple[tuple[str, Tensor, int], ...]]" = weakref.WeakKeyDictionary()


def dest_groups(graph: Graph) -> tuple[tuple[str, Tensor, int], ...]:
    """The engine's hook plan: (hook name, destination indices, predecessor count) for every hook that
    reads the residual stream, in forward order. For joint (``split_qkv=False``) graphs, q, k and v
    hooks share the head's destination. Built once per graph (2 ms for GPT-2 small, on every
    ``patch()`` otherwise); do not modify the index tensors."""
    plan = _PLANS.get(graph)
    if plan is None:
        plan = _PLANS[graph] = _dest_groups(graph)
    return plan


def _dest_groups(graph: Graph) -> tuple[tuple[str, Tensor, int], ...]:
    g = graph.engine_graph
    spec = g.spec
    plan: list[tuple[str, Tensor, int]] = []
    for layer in range(spec.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(spec.n_heads)]
        for kind in "qkv":
            if g.split_qkv:
                names = ([f"{h}<{kind}>" for h in heads] if kind == "q" or not spec.gqa
                         else [f"a{layer}.kv{i}<{kind}>" for i in range(spec.n_kv_heads)])
            else:
                names = heads if kind == "q" or not spec.gqa else [f"a{layer}.kv{i}" for i in range(spec.n_kv_heads)]
            idx = torch.tensor([g.dest_index(n) for n in names], dtype=torch.long)
            plan.append((f"blocks.{layer}.hook_{kind}_input", idx, int(g.n_pred[idx[0]])))
        if not spec.attn_only:
            d = g.dest_index(f"m{layer}")
            plan.append((f"blocks.{layer}.hook_mlp_in", torch.tensor([d]), int(g.n_pred[d])))
    d = g.dest_index("logits")
    plan.append((f"blocks.{spec.n_layers - 1}.hook_resid_post", torch.tensor([d]), int(g.n_pred[d])))
    return tuple(plan)


def dest_owners(graph: Graph) -> list[list[int]]:
    """For every destination, the source(s) of the node that reads it: the head ``a{L}.h{H}`` for its
    query/key/value input, all heads of group ``G`` for a grouped-query key/value input ``a{L}.kv{G}``,
    ``m{L}`` for the MLP input, none for ``logits`` (node-level graphs: none)."""
    if graph.level == "node":
        return [[]]
    group = graph.spec.n_heads // graph.spec.n_kv_heads
    owners: list[list[int]] = []
    for name in graph.dest_names:
        base = re.sub(r"<[qkv]>$", "", name)
        m = re.fullmatch(r"a(\d+)\.kv(\d+)", base)
        if name == "logits":
            owners.append([])
        elif m:
            layer, g = int(m.group(1)), int(m.group(2))
            owners.append([graph.src_index(f"a{layer}.h{h}") for h in range(g * group, (g + 1) * group)])
        else:
            owners.append([graph.src_index(base)])
    return owners


_OWNERS: "weakref.WeakKeyDictionary[Graph, Tensor]" = weakref.WeakKeyDictionary()


def _owner_matrix(graph: Graph) -> Tensor:
    """``[n_src, n_dest]`` bool: source s is the node that reads destination d (see :func:`dest_owners`)."""
    owned = _OWNERS.get(graph)
    if owned is None:
        owned = torch.zeros(graph.n_src, graph.n_dest, dtype=torch.bool)
        for d, srcs in enumerate(dest_owners(graph)):
            owned[srcs, d] = True
        _OWNERS[graph] = owned
    return owned


def prune_circuit(graph: Graph, circuit: Tensor) -> Tensor:
    """The connected part of ``circuit`` (bool ``[..., n_src, n_dest]``, True = edge kept), as MIB prunes a
    circuit before evaluating it: repeatedly drop every node (head, MLP) that has no kept incoming edge or no
    kept outgoing edge, and every edge from or into a dropped node, until nothing changes. ``input``
    counts as having incoming edges, ``logits`` as present. A head has incoming edges when any of its
    q/k/v inputs has one (grouped-query attention: its group's key/value inputs count for every head of
    the group, and a key/value input stays while any head of the group does).

    Under corrupted-run ablation pruning never changes what a circuit computes: a node whose every input
    is ablated computes its corrupted-run output, so its kept outgoing edges carry nothing, and a node with
    no kept outgoing edge reaches nothing. With mean or zero ablation it can, which is why MIB prunes.

    >>> from edgepatch.models import random_model
    >>> g = build_graph(random_model("tiny"))
    >>> c = g.mask_from_edges(["input->a0.h0<q>", "a0.h0->logits", "a0.h1->logits"])
    >>> g.edges_from_mask(prune_circuit(g, c))  # a0.h1 reads nothing kept: its edge goes
    ['input->a0.h0<q>', 'a0.h0->logits']
    """
    if graph.level != "edge":
        raise EdgepatchError(
            f"prune_circuit needs an edge-level graph; got {graph!r} (level={graph.level!r}), whose weights "
            f"have no destinations to prune. Prune on graph.edge_graph."
        )
    if not isinstance(circuit, Tensor):
        raise EdgepatchError(
            f"circuit must be a tensor [..., n_src, n_dest] (e.g. scores.circuit(k) or graph.mask_from_edges(names)); "
            f"got {type(circuit).__name__}."
        )
    graph.check_shape(circuit, "circuit")
    if circuit.dtype != torch.bool:
        if not bool(((circuit == 0) | (circuit == 1)).all()):
            raise EdgepatchError(
                "circuit must be a 0/1 or bool mask (1 = edge kept); got weights other than 0 and 1. Pruning "
                "asks which edges are kept: pass e.g. weights > 0."
            )
        circuit = circuit != 0
    owned = _owner_matrix(graph).to(circuit.device)
    kept = circuit & graph.valid.to(circuit.device)
    inp, logits = graph.src_index("input"), graph.dest_index("logits")
    while True:
        fed = (owned & kept.any(-2).unsqueeze(-2)).any(-1)  # [..., n_src]: some input of the node is kept
        fed[..., inp] = True
        node = fed & kept.any(-1)
        read = (owned & node.unsqueeze(-1)).any(-2)  # [..., n_dest]: the destination's node is present
        read[..., logits] = True
        new = kept & node.unsqueeze(-1) & read.unsqueeze(-2)
        if torch.equal(new, kept):
            return kept
        kept = new
