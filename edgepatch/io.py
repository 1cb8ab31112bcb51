"""Saving and loading scores, circuits and sweep results; MIB / EAP-IG graph export and import (JSON and tensors).

Context
-------
Everything edgepatch saves is a safetensors file (the tensors; never pickle, so loading runs no code) plus
a JSON sidecar with the same stem (``scores.safetensors`` + ``scores.json``) that says what the tensors are:
the kind of object, the method and metric, and the graph's spec (the :class:`~edgepatch.graph.ModelSpec`
fields, ``split_qkv`` and ``level``). The same JSON is also stored in the safetensors header, so the
tensor file alone is enough to load. ``load_*(path)`` rebuilds the graph from the spec with
:func:`edgepatch.graph.graph_from_spec`, without the model; pass ``graph=`` to reuse (and check) yours.

MIB / EAP-IG graph JSON
-----------------------
The circuit-localization track of MIB (Mueller et al. 2025) and EAP-IG (Hanna et al. 2024;
``eap.graph.Graph.to_json`` / ``from_json``) exchange graphs as::

    {"cfg": {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "m11": {...}, "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": false}, ..., "m11->logits": {...}}}

:func:`to_mib_json` writes that format (plus an ``"edgepatch"`` key with the graph spec and the method,
which EAP-IG ignores); :func:`from_mib_json` reads it into :class:`~edgepatch.scores.EdgeScores`, with
``circuit_mask`` set from the edges' ``in_graph`` (None when no edge is in the graph). Node ``in_graph`` is
written as "touches an in-graph edge" (``logits``: always true, as in EAP-IG).

Name mapping. EAP-IG names every attention destination per query head and per input:
``a{L}.h{H}<q>``, ``<k>``, ``<v>``. edgepatch destinations that stand for several of those are written once
per MIB edge with the same score and ``in_graph``, and read back as the mean of those edges' scores, in the
graph if any of them is:

- grouped-query attention: key/value destinations are per key/value head, ``a{L}.kv{G}<k>`` / ``<v>``; MIB
  names them per query head, ``a{L}.h{H}<k>`` for every head ``H`` of group ``G``
  (``G = H // (n_heads // n_kv_heads)``);
- joint graphs (``split_qkv=False``): ``src->a{L}.h{H}`` is written as its ``<q>``, ``<k>`` and ``<v>``
  edges (with grouped-query attention ``a{L}.h{H}`` is the query input and ``a{L}.kv{G}`` the key/value
  input, written as the ``<k>`` and ``<v>`` edges of the group's heads);
- node-level graphs: each source's score is written as the node's ``"score"`` and on all its outgoing edges
  (a node weight applies to every outgoing edge); reading uses the node scores when present.

EAP-IG's tensor format (``Graph.to_pt`` / ``from_pt``) holds the same graph as dense ``[n_forward,
n_backward]`` score and ``in_graph`` tensors: :func:`to_mib_pt` writes it and :func:`from_mib_pt` reads it,
checking the file's pickle before loading it (see there).

EAP-IG graphs always contain MLP nodes; graphs of attention-only models are written without them, and their
MLP edges are ignored on import.

Example
-------
>>> import torch, tempfile, os
>>> from edgepatch.models import random_model
>>> from edgepatch.graph import build_graph
>>> from edgepatch.scores import EdgeScores
>>> g = build_graph(random_model("tiny"))
>>> s = EdgeScores(torch.randn(g.n_src, g.n_dest), g, method="random")
>>> path = os.path.join(tempfile.mkdtemp(), "scores.safetensors")
>>> save_scores(s, path)
>>> load_scores(path).scores.nan_to_num().equal(s.scores.nan_to_num())
True
>>> d = to_mib_json(s)
>>> sorted(d), d["edges"]["input->a0.h0<q>"]["in_graph"]
(['cfg', 'edgepatch', 'edges', 'nodes'], False)
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import os
import pickle  # (its UnpicklingError only: nothing here unpickles with it)
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from edgepatch.errors import EdgepatchError, shape_str, short_repr, suggest
from edgepatch.graph import Graph, ModelSpec, graph_from_spec
from edgepatch.progress import atomic_save, atomic_write, atomic_write_text
from edgepatch.scores import EdgeScores, require_edge_scores

__all__ = [
    "save_scores", "load_scores", "save_circuit", "load_circuit", "save_sweep", "load_sweep",
    "to_mib_json", "to_mib_pt", "from_mib_json", "from_mib_pt", "graph_to_dict", "graph_from_dict", "mib_edge_names",
]

_VERSION = 1


# ------------------------------------------------------------------------------------------------------
# Graph specs
# ------------------------------------------------------------------------------------------------------
def graph_to_dict(graph: Graph) -> dict[str, Any]:
    """The JSON description of a graph: enough to rebuild it with :func:`graph_from_dict`."""
    return {
        "spec": dataclasses.asdict(graph.spec), "split_qkv": graph.split_qkv, "level": graph.level,
        "n_src": graph.n_src, "n_dest": graph.n_dest, "n_edges": graph.n_edges,
    }


def graph_from_dict(d: Mapping[str, Any]) -> Graph:
    """Rebuild a graph from :func:`graph_to_dict`'s output (no model needed)."""
    try:
        fields = {f.name for f in dataclasses.fields(ModelSpec)}
        spec = ModelSpec(**{k: v for k, v in d["spec"].items() if k in fields})
        graph = graph_from_spec(spec, split_qkv=bool(d["split_qkv"]), level=d["level"])
    except (KeyError, TypeError) as err:
        raise EdgepatchError(f"Cannot rebuild the graph from {dict(d)!r}: missing or bad field {err}.") from None
    if "n_edges" in d and graph.n_edges != d["n_edges"]:
        raise EdgepatchError(
            f"The saved graph had {d['n_edges']} edges but rebuilding it from its spec gives {graph!r}; the file was "
            f"written by an incompatible edgepatch version."
        )
    return graph


def _resolve_graph(saved: Mapping[str, Any] | None, graph: Graph | None, path: Any) -> Graph:
    if saved is None:
        if graph is None:
            raise EdgepatchError(f"{str(path)!r} stores no graph spec; pass graph=ep.build_graph(model).")
        return graph
    if graph is None:
        return graph_from_dict(saved)
    if not isinstance(graph, Graph):
        raise EdgepatchError(f"graph must be an edgepatch Graph; got {type(graph).__name__}.")
    other = graph_from_dict(saved)
    if other.src_names != graph.src_names or other.dest_names != graph.dest_names:
        raise EdgepatchError(
            f"{str(path)!r} was saved for {other!r} (split_qkv={other.split_qkv}, level={other.level!r}) but the "
            f"given graph is {graph!r} (split_qkv={graph.split_qkv}, level={graph.level!r}). Load it without graph= "
            f"to get its own graph, or build the graph of the model it was made with."
        )
    return graph


# ------------------------------------------------------------------------------------------------------
# safetensors + JSON sidecar
# ------------------------------------------------------------------------------------------------------
def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: tensors become lists, unknown objects their repr (documented loss)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _write(path: str | os.PathLike, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    tpath, jpath = _paths(path)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "edgepatch", "kind": kind, "version": _VERSION, **meta}
    atomic_save(tensors, tpath, {"edgepatch": json.dumps(header)})
    atomic_write_text(jpath, json.dumps(header, indent=1))
    return tpath


def _read(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    tpath, jpath = _paths(path)
    if not tpath.exists():
        raise EdgepatchError(f"No such file: {str(tpath)!r} (edgepatch saves tensors as .safetensors + a .json sidecar).")
    with safe_open(str(tpath), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header_meta = (f.metadata() or {}).get("edgepatch")
    if jpath.exists():
        meta = json.loads(jpath.read_text())
    elif header_meta is not None:
        meta = json.loads(header_meta)
    else:
        raise EdgepatchError(f"{str(tpath)!r} has no edgepatch metadata (no {jpath.name} sidecar); it was not saved by edgepatch.")
    if meta.get("format") != "edgepatch" or meta.get("kind") != kind:
        loader = {"scores": "load_scores", "circuit": "load_circuit", "sweep": "load_sweep"}.get(meta.get("kind"), "")
        raise EdgepatchError(
            f"{str(tpath)!r} holds {meta.get('kind')!r} data, not {kind!r}"
            + (f"; read it with edgepatch.io.{loader}." if loader else ".")
        )
    return tensors, meta


# ------------------------------------------------------------------------------------------------------
# Scores, circuits, sweeps
# ------------------------------------------------------------------------------------------------------
def save_scores(scores: EdgeScores, path: str | os.PathLike) -> None:
    """Save :class:`EdgeScores` to ``path`` (``.safetensors``; a ``.json`` sidecar beside it).

    ``info`` is stored as JSON: tensors become lists and other objects their ``repr``.

    >>> import torch, tempfile, os
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> p = os.path.join(tempfile.mkdtemp(), "eap")
    >>> save_scores(EdgeScores(torch.ones(g.n_src, g.n_dest), g, method="eap"), p)
    >>> sorted(os.listdir(os.path.dirname(p)))
    ['eap.json', 'eap.safetensors']
    """
    if not isinstance(scores, EdgeScores):
        raise EdgepatchError(f"save_scores needs EdgeScores; got {type(scores).__name__}. Save masks with save_circuit.")
    tensors = {"scores": scores.scores}
    if scores.circuit_mask is not None:
        tensors["circuit_mask"] = scores.circuit_mask.bool().to(torch.uint8)
    meta = {"method": scores.method, "metric": scores.metric, "info": _jsonable(scores.info),
            "graph": graph_to_dict(scores.graph)}
    if scores.slots is not None:  # per-position scores
        meta["slots"] = list(scores.slots)
    _write(path, "scores", tensors, meta)


def load_scores(path: str | os.PathLike, graph: Graph | None = None) -> EdgeScores:
    """Load :class:`EdgeScores` saved by :func:`save_scores` (the graph is rebuilt unless given)."""
    tensors, meta = _read(path, "scores")
    g = _resolve_graph(meta.get("graph"), graph, path)
    mask = tensors.get("circuit_mask")
    slots = meta.get("slots")
    return EdgeScores(tensors["scores"], g, method=meta.get("method", "unknown"), metric=meta.get("metric", ""),
                      info=dict(meta.get("info") or {}), circuit_mask=None if mask is None else mask.bool(),
                      slots=None if slots is None else tuple(slots))


def save_circuit(mask: Tensor, path: str | os.PathLike, graph: Graph, name: str = "") -> None:
    """Save a bool circuit mask ``[n_src, n_dest]`` of ``graph``.

    >>> import tempfile, os
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> p = os.path.join(tempfile.mkdtemp(), "c.safetensors")
    >>> save_circuit(g.mask_from_edges(["a0.h1->m1"]), p, g)
    >>> mask, g2 = load_circuit(p)
    >>> g2.edges_from_mask(mask)
    ['a0.h1->m1']
    """
    if not isinstance(graph, Graph):
        raise EdgepatchError(f"save_circuit(mask, path, graph): graph must be an edgepatch Graph; got {type(graph).__name__}.")
    if not isinstance(mask, Tensor):
        mask = graph.mask_from_edges(list(mask))
    graph.check_shape(mask, "mask")
    if mask.ndim != 2:
        raise EdgepatchError(f"mask must be [n_src, n_dest]; got {shape_str(mask.shape)}.")
    m = mask.detach().cpu().bool() & graph.valid
    _write(path, "circuit", {"mask": m.to(torch.uint8)}, {"name": name, "n_edges_kept": int(m.sum()),
                                                           "graph": graph_to_dict(graph)})


def load_circuit(path: str | os.PathLike, graph: Graph | None = None) -> tuple[Tensor, Graph]:
    """Load a circuit saved by :func:`save_circuit`: ``(bool mask [n_src, n_dest], graph)``."""
    tensors, meta = _read(path, "circuit")
    g = _resolve_graph(meta.get("graph"), graph, path)
    return tensors["mask"].bool(), g


def save_sweep(result: Any, path: str | os.PathLike) -> None:
    """Save a :class:`~edgepatch.sweep.SweepResult` (per-prompt values included).

    >>> import torch, tempfile, os
    >>> from edgepatch.sweep import SweepResult
    >>> r = SweepResult([1], [1], torch.ones(1, 2), torch.ones(2), torch.zeros(2), torch.zeros(0, 1), n_edges=5)
    >>> p = os.path.join(tempfile.mkdtemp(), "sweep.safetensors")
    >>> save_sweep(r, p); load_sweep(p).values.tolist()
    [[1.0, 1.0]]
    """
    from edgepatch.sweep import SweepResult

    if not isinstance(result, SweepResult):
        raise EdgepatchError(f"save_sweep needs a SweepResult; got {type(result).__name__}.")
    tensors = {
        "values": result.values.double(), "clean": result.clean.double(), "ablated": result.ablated.double(),
        "random_values": result.random_values.double(),
    }
    meta = {
        "counts": list(result.counts), "effective_counts": list(result.effective_counts), "n_edges": result.n_edges,
        **{k: _jsonable(v) for k, v in result.metadata().items()},
        "graph": None if result.graph is None else graph_to_dict(result.graph),
    }
    _write(path, "sweep", tensors, meta)


def load_sweep(path: str | os.PathLike, graph: Graph | None = None) -> Any:
    """Load a :class:`~edgepatch.sweep.SweepResult` saved by :func:`save_sweep` (or by ``sweep(out=...)``:
    ``load_sweep(out / "result.safetensors")``)."""
    from edgepatch.sweep import SweepResult

    tensors, meta = _read(path, "sweep")
    g = None
    if meta.get("graph") is not None or graph is not None:
        g = _resolve_graph(meta.get("graph"), graph, path)
    keys = ("method", "metric", "direction", "ablation", "by", "ties", "higher_is_better", "counts_spec")
    return SweepResult(
        counts=list(meta["counts"]), effective_counts=list(meta["effective_counts"]), values=tensors["values"],
        clean=tensors["clean"], ablated=tensors["ablated"], random_values=tensors["random_values"],
        n_edges=int(meta["n_edges"]), graph=g, info=dict(meta.get("info") or {}),
        **{k: meta[k] for k in keys if k in meta},
    )


# ------------------------------------------------------------------------------------------------------
# MIB / EAP-IG JSON
# ------------------------------------------------------------------------------------------------------
_ATTN_DEST = re.compile(r"a(\d+)\.(h|kv)(\d+)(?:<([qkv])>)?")


def mib_edge_names(graph: Graph) -> list[list[str]]:
    """For every edge of ``graph`` (in ``graph.edge_names`` order; sources at node level), the MIB / EAP-IG
    edge names it stands for (see the module docstring's name mapping).

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny-gqa"))  # 6 query heads, 2 key/value heads
    >>> mib_edge_names(g)[g.edge_names.index("input->a0.kv1<k>")]
    ['input->a0.h3<k>', 'input->a0.h4<k>', 'input->a0.h5<k>']
    """
    spec = graph.spec
    group = spec.n_heads // spec.n_kv_heads
    eg = graph.engine_graph
    dest_map: list[list[str]] = []
    for dest in eg.dest_names:
        m = _ATTN_DEST.fullmatch(dest)
        if m is None:
            dest_map.append([dest])
            continue
        layer, kind, idx, qkv = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "kv":
            heads = range(idx * group, (idx + 1) * group)
            letters = [qkv] if qkv else ["k", "v"]
            dest_map.append([f"a{layer}.h{h}<{x}>" for x in letters for h in heads])
        elif qkv:
            dest_map.append([dest])
        else:
            dest_map.append([f"{dest}<{x}>" for x in ("q" if spec.gqa else "qkv")])
    s_idx, d_idx = eg.edge_index.T.tolist()
    per_edge = [[f"{eg.src_names[s]}->{n}" for n in dest_map[d]] for s, d in zip(s_idx, d_idx)]
    if graph.level == "edge":
        return per_edge
    out: list[list[str]] = [[] for _ in range(graph.n_src)]
    for s, names in zip(s_idx, per_edge):
        out[s].extend(names)
    return out


def _mib_nodes(graph: Graph) -> list[str]:
    spec = graph.spec
    nodes = ["input"]
    for layer in range(spec.n_layers):
        nodes += [f"a{layer}.h{h}" for h in range(spec.n_heads)]
        if not spec.attn_only:
            nodes.append(f"m{layer}")
    return nodes + ["logits"]


def _mib_cfg(graph: Graph) -> dict[str, Any]:
    spec = graph.spec
    cfg: dict[str, Any] = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "parallel_attn_mlp": spec.parallel,
                           "d_model": spec.d_model}
    if spec.gqa:
        cfg["n_key_value_heads"] = spec.n_kv_heads
    return cfg


def _mib_graph(scores_or_mask: EdgeScores | Tensor, graph: Graph | None, fn: str) -> dict[str, Any]:
    """The MIB view of scores or a circuit mask (shared by :func:`to_mib_json` and :func:`to_mib_pt`): the
    graph, the method and metric, every MIB edge's ``(score, in_graph)`` and the nodes in the graph."""
    if isinstance(scores_or_mask, EdgeScores):
        require_edge_scores(scores_or_mask, f"{fn} (MIB's graph format has no positions)")
        graph = scores_or_mask.graph
        scores = scores_or_mask.scores
        mask = scores_or_mask.circuit_mask
        method = scores_or_mask.method
    elif isinstance(scores_or_mask, Tensor):
        if graph is None:
            raise EdgepatchError(f"{fn}(mask) needs the graph: {fn}(mask, graph=graph).")
        graph.check_shape(scores_or_mask, "mask")
        mask = scores_or_mask.detach().cpu().bool()
        scores = mask.float()
        method = "circuit"
    else:
        raise EdgepatchError(f"{fn} needs EdgeScores or a bool mask tensor; got {type(scores_or_mask).__name__}.")
    if mask is not None:
        mask = mask.detach().cpu().bool() & graph.valid
    flat = graph.to_edges(scores.float().cpu()).tolist()
    kept = graph.to_edges(mask).tolist() if mask is not None else [False] * graph.n_edges

    edges: dict[str, tuple[float, bool]] = {}
    # (node level: every outgoing edge carries the source's values)
    for mib, s, k in zip(mib_edge_names(graph), flat, kept):
        for n in mib:
            edges[n] = (float(s), bool(k))
    touched = {"logits"}
    for n, (_, k) in edges.items():
        if k:
            src, dest = n.split("->")
            touched.add(src)
            touched.add(dest.split("<")[0])
    node_scores = dict(zip(graph.src_names, map(float, flat))) if graph.level == "node" else None
    return {"graph": graph, "method": method, "metric": getattr(scores_or_mask, "metric", ""), "edges": edges,
            "touched": touched, "node_scores": node_scores}


def _write_new(path: str | os.PathLike, write: Any) -> None:
    """``write`` to ``path`` atomically, creating its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, write)


def to_mib_json(
    scores_or_mask: EdgeScores | Tensor, path: str | os.PathLike | None = None, graph: Graph | None = None
) -> dict[str, Any]:
    """Export scores (``EdgeScores``; ``in_graph`` from its ``circuit_mask``, else all false) or a circuit (a
    bool ``[n_src, n_dest]`` mask with ``graph=``; scores 1.0 on its edges) as MIB / EAP-IG graph JSON.
    Writes it to ``path`` when given; returns the dict either way. For large graphs :func:`to_mib_pt`
    writes MIB's smaller tensor format.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> d = to_mib_json(g.mask_from_edges(["a0.h1->m1"]), graph=g)
    >>> d["edges"]["a0.h1->m1"], d["nodes"]["a0.h1"]
    ({'score': 1.0, 'in_graph': True}, {'in_graph': True})
    """
    m = _mib_graph(scores_or_mask, graph, "to_mib_json")
    graph = m["graph"]
    edges = {n: {"score": s, "in_graph": k} for n, (s, k) in m["edges"].items()}
    nodes: dict[str, dict[str, Any]] = {n: {"in_graph": n in m["touched"]} for n in _mib_nodes(graph)}
    if m["node_scores"] is not None:
        for src, s in m["node_scores"].items():
            nodes[src]["score"] = s
    d = {
        "cfg": _mib_cfg(graph), "nodes": nodes, "edges": edges,
        "edgepatch": {"graph": graph_to_dict(graph), "method": m["method"], "metric": m["metric"]},
    }
    if path is not None:
        _write_new(path, lambda tmp: tmp.write_text(json.dumps(d)))
    return d


def _mib_layout(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """EAP-IG's dense layout (``Graph.get_dst_nodes`` and the forward order): the source rows and
    destination columns of its ``[n_forward, n_backward]`` tensors. MLP rows and columns are there even
    in attention-only models, as EAP-IG always builds them."""
    src = ["input"]
    dst: list[str] = []
    for layer in range(spec.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(spec.n_heads)]
        src += heads + [f"m{layer}"]
        dst += [f"{h}<{x}>" for x in "qkv" for h in heads] + [f"m{layer}"]
    return src, dst + ["logits"]


def to_mib_pt(
    scores_or_mask: EdgeScores | Tensor, path: str | os.PathLike, graph: Graph | None = None
) -> dict[str, Any]:
    """Export scores or a circuit as MIB / EAP-IG's tensor format (``eap.graph.Graph.to_pt`` / ``from_pt``),
    more compact than the JSON for large graphs: a ``torch.save`` file of a dict with ``cfg``,
    ``src_nodes`` (EAP-IG's forward order), ``dst_nodes`` (per layer: every head's ``<q>``, then ``<k>``, then
    ``<v>``, then the MLP; ``logits`` last), ``edges_scores`` and ``edges_in_graph`` (``[n_forward,
    n_backward]``, 0 / false where EAP-IG has no edge), ``nodes_in_graph`` (``[n_forward]``) and, for
    node-level graphs, ``nodes_scores``; plus an ``"edgepatch"`` entry with the graph spec and the method,
    which EAP-IG ignores. Names map as in :func:`to_mib_json`. Returns the dict; :func:`from_mib_pt` reads
    it back.

    >>> import os, tempfile
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))  # 2 layers, 4 heads
    >>> d = to_mib_pt(g.mask_from_edges(["a0.h1->m1"]), os.path.join(tempfile.mkdtemp(), "c.pt"), graph=g)
    >>> d["edges_scores"].shape, d["dst_nodes"][:2], d["edges_in_graph"].sum().item()
    (torch.Size([11, 27]), ['a0.h0<q>', 'a0.h1<q>'], 1)
    """
    m = _mib_graph(scores_or_mask, graph, "to_mib_pt")
    graph = m["graph"]
    src, dst = _mib_layout(graph.spec)
    row = {n: i for i, n in enumerate(src)}
    col = {n: i for i, n in enumerate(dst)}
    scores = torch.zeros(len(src), len(dst))
    in_graph = torch.zeros(len(src), len(dst), dtype=torch.bool)
    for name, (s, k) in m["edges"].items():
        a, b = name.split("->")
        scores[row[a], col[b]] = s
        in_graph[row[a], col[b]] = k
    d: dict[str, Any] = {
        "cfg": _mib_cfg(graph), "src_nodes": src, "dst_nodes": dst, "edges_scores": scores,
        "edges_in_graph": in_graph, "nodes_in_graph": torch.tensor([n in m["touched"] for n in src]),
        "edgepatch": {"graph": graph_to_dict(graph), "method": m["method"], "metric": m["metric"]},
    }
    if m["node_scores"] is not None:
        d["nodes_scores"] = torch.tensor([m["node_scores"].get(n, math.nan) for n in src])
    _write_new(path, lambda tmp: torch.save(d, tmp))
    return d


def from_mib_json(path_or_dict: str | os.PathLike | Mapping[str, Any], graph: Graph, strict: bool = True) -> EdgeScores:
    """Import MIB / EAP-IG graph JSON as :class:`EdgeScores` of ``graph`` (``circuit_mask`` from the edges'
    ``in_graph``; None when no edge is in the graph). Scores of several MIB edges that map to one edgepatch
    edge are averaged (grouped-query key/value heads, joint graphs). ``strict``: raise on graph edges the
    JSON lacks (else their score is NaN) and on JSON edges the graph lacks (else they are ignored). For
    EAP-IG's tensor files (``Graph.to_pt``) use :func:`from_mib_pt`.

    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> s = from_mib_json(to_mib_json(g.mask_from_edges(["a0.h1->m1"]), graph=g), g)
    >>> g.edges_from_mask(s.circuit_mask)
    ['a0.h1->m1']
    """
    _check_graph_arg(graph, "from_mib_json")
    if isinstance(path_or_dict, Mapping):
        d = path_or_dict
        where = "the given dict"
    else:
        where, raw = _read_bytes(path_or_dict)
        if raw[:2] == b"PK" or raw[:1] == b"\x80":  # a zip archive (torch.save) or a bare pickle
            raise EdgepatchError(
                f"{where} is a tensor file (EAP-IG's Graph.to_pt / torch.save), not graph JSON: import it with "
                f"ep.io.from_mib_pt(path, graph)."
            )
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EdgepatchError(f"{where} is not valid JSON ({err}).") from None
        except RecursionError:
            raise EdgepatchError(f"{where} is JSON nested too deeply to be a graph file.") from None
    if not isinstance(d, Mapping) or not isinstance(d.get("edges"), Mapping):
        raise EdgepatchError(
            f"{where} is not MIB / EAP-IG graph JSON: expected a dict with 'cfg', 'nodes' and 'edges' "
            f"(edges: {{'src->dest': {{'score': float, 'in_graph': bool}}}})."
        )
    nodes = d.get("nodes") if isinstance(d.get("nodes"), Mapping) else {}
    for n, v in nodes.items():
        if isinstance(v, Mapping) and v.get("neurons") is not None and not isinstance(v["neurons"], (list, tuple)):
            raise EdgepatchError(f"{where}: node {n!r} has neurons {short_repr(v['neurons'])}; expected a list of booleans.")
    partial = [n for n, v in nodes.items() if isinstance(v, Mapping) and v.get("neurons") is not None
               and not all(bool(x) for x in v["neurons"])]
    meta = d.get("edgepatch") if isinstance(d.get("edgepatch"), Mapping) else {}
    return _import_mib(d.get("cfg"), nodes, d["edges"], partial, meta, where, graph, strict, "mib-json")


def from_mib_pt(path: str | os.PathLike, graph: Graph, strict: bool = True) -> EdgeScores:
    """Import MIB / EAP-IG's tensor format (``eap.graph.Graph.to_pt``, and :func:`to_mib_pt`) as
    :class:`EdgeScores` of ``graph``, with the same name mapping and ``strict`` rules as :func:`from_mib_json`.
    Reads both EAP-IG layouts: the current one (``edges_scores``, ``nodes_in_graph``, ``src_nodes`` a list)
    and the earlier one (``edges``, ``src_nodes`` a dict of node -> in graph); rows and columns are matched
    by the file's ``src_nodes`` / ``dst_nodes`` names, so their order does not matter.

    These files are ``torch.save`` archives, whose index is a pickle. edgepatch never unpickles it freely:
    before anything is loaded, every object the pickle refers to is checked against what a graph file needs
    (tensors, their storages, dicts), and the archive against the members ``torch.save`` writes; only then
    is it read with ``torch.load(weights_only=True)``, PyTorch's restricted loader. A file that refers to
    anything else (code, classes, TorchScript) is refused, so loading one never runs code from it.

    >>> import os, tempfile
    >>> from edgepatch.models import random_model
    >>> from edgepatch.graph import build_graph
    >>> g = build_graph(random_model("tiny"))
    >>> path = os.path.join(tempfile.mkdtemp(), "c.pt")
    >>> _ = to_mib_pt(g.mask_from_edges(["a0.h1->m1"]), path, graph=g)
    >>> g.edges_from_mask(from_mib_pt(path, g).circuit_mask)
    ['a0.h1->m1']
    """
    _check_graph_arg(graph, "from_mib_pt")
    where, raw = _read_bytes(path)
    d = _load_graph_pt(raw, where)
    scores_key = "edges_scores" if "edges_scores" in d else "edges"
    missing = [k for k in ("src_nodes", "dst_nodes", scores_key, "edges_in_graph") if k not in d]
    if missing:
        raise EdgepatchError(
            f"{where} is not an EAP-IG graph file: it lacks {missing} (it has {sorted(map(str, d))}). Expected "
            f"Graph.to_pt's dict: cfg, src_nodes, dst_nodes, edges_scores, edges_in_graph, nodes_in_graph."
        )
    positional = [k for k in d if str(k).startswith("positional")]
    if positional:
        raise EdgepatchError(
            f"{where} holds a per-position circuit ({positional[0]!r}); edgepatch imports MIB graphs without "
            f"positions only. Per-position scores come from edgepatch itself (ep.attribute(..., positions=...))."
        )
    src, dst = list(d["src_nodes"]), list(d["dst_nodes"])
    scores, in_graph = d[scores_key], d["edges_in_graph"]
    for key, t in ((scores_key, scores), ("edges_in_graph", in_graph)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (len(src), len(dst)):
            got = f"shape {shape_str(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise EdgepatchError(
                f"{where}: {key!r} should be a [len(src_nodes), len(dst_nodes)] = [{len(src)}, {len(dst)}] tensor; "
                f"got {got}."
            )
    row = {str(n): i for i, n in enumerate(src)}
    col = {str(n): i for i, n in enumerate(dst)}
    scores_l, kept_l = scores.float().tolist(), in_graph.bool().tolist()
    edges: dict[str, dict[str, Any]] = {}
    for group in mib_edge_names(graph):
        for name in group:
            a, b = name.split("->")
            if a in row and b in col:
                edges[name] = {"score": scores_l[row[a]][col[b]], "in_graph": kept_l[row[a]][col[b]]}
    for r, c in in_graph.bool().nonzero().tolist():  # circuit edges the graph lacks: `strict` decides
        edges.setdefault(f"{src[r]}->{dst[c]}", {"score": scores_l[r][c], "in_graph": True})
    if isinstance(d["src_nodes"], Mapping):  # EAP-IG's earlier layout: {node: in_graph}
        flags = [bool(v) for v in d["src_nodes"].values()]
    else:
        flags = [bool(v) for v in d["nodes_in_graph"].tolist()] if isinstance(d.get("nodes_in_graph"), Tensor) else []
    nodes: dict[str, dict[str, Any]] = {str(n): {"in_graph": f} for n, f in zip(src, flags)}
    node_scores = d.get("nodes_scores")
    if isinstance(node_scores, Tensor) and node_scores.numel() == len(src):
        for n, v in zip(src, node_scores.float().tolist()):
            nodes.setdefault(str(n), {})["score"] = None if math.isnan(v) else v
    neurons = d.get("neurons_in_graph")
    partial = []
    if isinstance(neurons, Tensor) and neurons.dim() == 2 and neurons.shape[0] == len(src):
        partial = [str(src[i]) for i in (~neurons.bool().all(dim=1)).nonzero().flatten().tolist()]
    meta = d.get("edgepatch") if isinstance(d.get("edgepatch"), Mapping) else {}
    return _import_mib(d.get("cfg"), nodes, edges, partial, meta, where, graph, strict, "mib-pt")


def _check_graph_arg(graph: Any, fn: str) -> None:
    if not isinstance(graph, Graph):
        raise EdgepatchError(f"{fn}(path, graph): graph must be an edgepatch Graph; got {type(graph).__name__}.")


def _read_bytes(path: str | os.PathLike) -> tuple[str, bytes]:
    where = repr(str(path))
    try:
        return where, Path(path).read_bytes()
    except FileNotFoundError:
        raise EdgepatchError(f"No such file: {where}.") from None
    except IsADirectoryError:
        raise EdgepatchError(f"{where} is a folder; give the path of a graph file in it.") from None


# What a graph file's pickle may refer to: tensors rebuilt from their storages, ordered dicts (a tensor's
# empty backward hooks). Anything else (a function, a class, a module) is refused before loading.
_PT_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")} | {
    ("torch", f"{t}Storage") for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                        "Byte", "Bool")
}
_PT_REFUSED_OPS = {"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}
_PT_MEMBERS = re.compile(r"[^/]+/(data\.pkl|data/\d+|version|\.format_version|\.storage_alignment|byteorder|"
                         r"\.data/serialization_id|\.data/version)")


def _load_graph_pt(raw: bytes, where: str) -> Mapping[str, Any]:
    """The dict of a ``torch.save`` graph file, loaded only after its archive members and every global its
    pickle names are known to be plain data (see :func:`from_mib_pt`)."""
    convert = ("Convert it where it was made, e.g. in EAP-IG `Graph.from_pt(path).to_json('graph.json')`, and use "
               "from_mib_json.")
    if raw[:2] != b"PK":
        kind = "a bare pickle (torch.save's pre-1.6 format)" if raw[:1] == b"\x80" else "not a torch.save archive"
        raise EdgepatchError(f"{where} is {kind}; from_mib_pt reads the zip archives torch.save writes. {convert}")
    try:
        with zipfile.ZipFile(_io.BytesIO(raw)) as z:
            names = z.namelist()
            odd = [n for n in names if not _PT_MEMBERS.fullmatch(n)]
            pkl = [n for n in names if n.endswith("/data.pkl")]
            if odd or len(pkl) != 1:
                raise EdgepatchError(
                    f"{where} is not a plain tensor file: " + (f"it contains {odd[0]!r} (TorchScript or other code?), "
                    if odd else f"it has {len(pkl)} data.pkl members, ") + f"which a graph file does not. {convert}"
                )
            index = z.read(pkl[0])
    except zipfile.BadZipFile as err:
        raise EdgepatchError(f"{where} is not a readable torch.save archive ({err}).") from None
    try:
        for op, arg, _ in pickletools.genops(index):  # parses the opcodes; runs and imports nothing
            if op.name in _PT_REFUSED_OPS or (op.name == "GLOBAL" and tuple(str(arg).split(" ", 1)) not in _PT_GLOBALS):
                what = f"the global {str(arg).replace(' ', '.')!r}" if op.name == "GLOBAL" else f"the opcode {op.name}"
                raise EdgepatchError(
                    f"{where} refers to {what}, which a graph file of tensors, lists and dicts does not; edgepatch "
                    f"does not load it (loading could run code from the file). {convert}"
                )
    except EdgepatchError:
        raise
    except (ValueError, EOFError) as err:
        raise EdgepatchError(f"{where}: its data.pkl is not a valid pickle ({err}).") from None
    try:
        d = torch.load(_io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's restricted loader refused something
        raise EdgepatchError(
            f"{where} holds something other than tensors, lists and dicts ({_weights_only_reason(err)}); edgepatch "
            f"does not load it otherwise, as that could run code from the file. {convert}"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch's message, with the file named
        raise EdgepatchError(f"{where} could not be read as a tensor file ({type(err).__name__}: {err}).") from None
    if not isinstance(d, Mapping):
        raise EdgepatchError(f"{where} holds a {type(d).__name__}, not EAP-IG's graph dict (Graph.to_pt).")
    return d


def _weights_only_reason(err: Exception) -> str:
    """The reason in the message of ``torch.load(weights_only=True)``'s refusal, without the advice around it
    (which suggests ``weights_only=False``: not for a file from someone else)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    return lines[0] if lines else type(err).__name__


def _import_mib(cfg: Any, nodes: Mapping[str, Any], edges: Mapping[str, Any], partial: list[str],
                meta: Mapping[str, Any], where: str, graph: Graph, strict: bool, default_method: str) -> EdgeScores:
    """The import shared by :func:`from_mib_json` and :func:`from_mib_pt`, from MIB edge names to their
    ``{"score", "in_graph"}`` and node names to their ``{"in_graph", "score"}``."""
    cfg = cfg if isinstance(cfg, Mapping) else {}
    spec = graph.spec
    for key, mine in (("n_layers", spec.n_layers), ("n_heads", spec.n_heads)):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
            raise EdgepatchError(f"{where}: cfg {key} is {short_repr(cfg[key])}; expected a number.")
        if key in cfg and int(cfg[key]) != mine:
            raise EdgepatchError(
                f"{where} describes a model with {key}={cfg[key]} but {graph!r} has {key}={mine}; import it into the "
                f"graph of the model it was made for."
            )
    names = mib_edge_names(graph)
    known = {n for group in names for n in group}
    unknown = [n for n in edges if n not in known and not (spec.attn_only and _touches_mlp(n))]
    if unknown and strict:
        raise EdgepatchError(
            f"{where} has {len(unknown)} edge(s) that {graph!r} lacks, e.g. {unknown[0]!r}."
            f"{suggest(unknown[0], known)} Use the graph of the model the file was made for (split_qkv does not "
            f"matter), or pass strict=False to ignore them."
        )

    def score_of(name: str, e: Any) -> float:
        s = e.get("score") if isinstance(e, Mapping) else None
        if s is None:
            return math.nan
        if isinstance(s, Tensor) and s.numel() == 1:
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise EdgepatchError(f"{where}: edge {name!r} has score {short_repr(s)}; expected a number (or null).")
        return float(s)

    def kept_of(name: str, e: Any) -> bool:
        v = e.get("in_graph", False) if isinstance(e, Mapping) else False
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, (bool, int)) or v not in (0, 1):  # (a string "false" would be true)
            raise EdgepatchError(f"{where}: edge {name!r} has in_graph {short_repr(v)}; expected true or false.")
        return bool(v)

    if partial:
        warnings.warn(
            f"{where} is a neuron-level circuit ({len(partial)} node(s) keep only some of their neurons, e.g. "
            f"{partial[0]!r}); edgepatch patches whole edges, so the imported circuit keeps those nodes' edges whole.",
            stacklevel=3,
        )
    node_scores = None
    if graph.level == "node":
        if all(isinstance(nodes.get(s), Mapping) and nodes[s].get("score") is not None for s in graph.src_names):
            node_scores = [score_of(s, nodes[s]) for s in graph.src_names]
    flat, kept, missing = [], [], []
    for i, group in enumerate(names):
        found = [(n, edges[n]) for n in group if n in edges]
        if not found:
            missing.append(graph.edge_names[i])
            flat.append(math.nan)
            kept.append(False)
            continue
        vals = [score_of(n, e) for n, e in found]
        flat.append(sum(vals) / len(vals))
        kept.append(any([kept_of(n, e) for n, e in found]))
    if node_scores is not None:
        flat = node_scores
    if missing and strict:
        raise EdgepatchError(
            f"{where} lacks {len(missing)} of the {graph.n_edges} edges of {graph!r}, e.g. {missing[0]!r}. Use the "
            f"graph of the model the file was made for, or pass strict=False to give those edges NaN scores."
        )
    dense = graph.from_edges(torch.tensor(flat, dtype=torch.float32), fill=math.nan)
    mask = graph.from_edges(torch.tensor(kept, dtype=torch.bool), fill=False).bool()
    return EdgeScores(dense, graph, method=str(meta.get("method", default_method)), metric=str(meta.get("metric", "")),
                      info={"source": where}, circuit_mask=mask if bool(mask.any()) else None)


def _touches_mlp(name: str) -> bool:
    src, _, dest = name.partition("->")
    return bool(re.fullmatch(r"m\d+", src) or re.fullmatch(r"m\d+", dest))
