"""The floor of the random-weights ratio (issue #2): what the kernels that exact edge patching must run cost,
with no engine overhead at all, against a plain forward of the same model on the same batch.

With every weight strictly between 0 and 1, each of a layer's q/k/v inputs (and its MLP input) is its own
combination of every earlier source, so a patched forward must at least, per layer:

- record the sources' differences from their ablated values (one pass over the layer's new sources);
- mix: one multiply-add per edge x d_model x token (a batched product per token, as the engine does);
- normalize every mixed input (the layer's input normalization, with its affine map);
- project every head from its own input (the model's q/k/v projection, per head);
- compute the per-head outputs (they replace the model's output projection) and sum them;
- complete the MLP input with the layer's own heads.

It replaces the model's own q/k/v and output projections, timed here as the model runs them (one matrix
product each). Prints one JSON line: the plain forward, the kernels, the replaced products (median seconds
of interleaved rounds) and ``floor_ratio = (plain + kernels - replaced) / plain`` per round (median): the
lowest patched / plain ratio this design can reach on this machine. ``bench_patch.py``'s random-weights
ratio minus this floor is the engine's own overhead (Python, decisions, small operators). The kernels
use the CPU engine's layout (token-major differences); on a GPU the engine mixes source-major instead.
SmolLM2-135M (``--model smollm2-135m --model-class bridge``), 8 x 16 tokens: floor 1.49 (one run).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

from common import emit, interleaved, parse_args, setup
from edgepatch.graph import dest_groups


def main() -> None:
    args = parse_args()
    dev = args.device
    model, graph, gen, data = setup(args)
    spec = graph.engine_graph.spec
    dtype = getattr(torch, args.dtype)
    T, m, dh = args.batch * args.seq, spec.d_model, spec.d_head
    n_src = graph.engine_graph.n_src
    layers: dict[int, dict[str, int]] = {}
    for name, idx, n in dest_groups(graph):
        parts = name.split(".")
        layer, what = int(parts[1]), parts[-1]
        info = layers.setdefault(layer, {"heads": 0, "n": n, "mlp_n": n})
        if what in ("hook_q_input", "hook_k_input", "hook_v_input"):
            info["heads"] += len(idx)
            info["n"] = n
        elif what == "hook_mlp_in":
            info["mlp_n"] = n
    kw = {"device": dev, "dtype": dtype}
    buf = torch.randn(T, n_src, m, **kw)  # token-major differences, as the engine keeps them
    abl = torch.randn(n_src, T, m, **kw)
    gain, bias = torch.rand(m, **kw), torch.rand(m, **kw)
    H = spec.n_heads
    z = torch.randn(H, T, dh, **kw)
    W_O = torch.randn(H, dh, m, **kw)
    x = torch.randn(T, m, **kw)
    W_qkv = torch.randn(m, (H + 2 * spec.n_kv_heads) * dh, **kw)
    b_qkv = torch.randn((H + 2 * spec.n_kv_heads) * dh, **kw)
    W_out, b_out = torch.randn(H * dh, m, **kw), torch.randn(m, **kw)
    plan = []
    most = max(info["heads"] for info in layers.values()) + 1
    mixed = torch.empty(T, most, m, **kw)  # (preallocated outputs, as the engine keeps its scratch buffers)
    outs = torch.empty(H, T, m, **kw)
    for layer in sorted(layers):
        info = layers[layer]
        n, R = info["n"], info["heads"]
        rows = R + 1  # the layer's q/k/v inputs and the part of its MLP input from the sources before it
        coef = torch.rand(n + 1, rows, **kw)  # (+ the base residual, one more source with coefficient 1)
        kinds = [H, spec.n_kv_heads, spec.n_kv_heads] if R else []
        W_k = [torch.randn(h, m, dh, **kw) for h in kinds]
        rest = torch.rand(1, info["mlp_n"] - n, **kw)  # the MLP input's weights of the layer's own heads
        plan.append((n, R, coef, kinds, W_k, rest))
    to_logits = torch.rand(1, n_src, **kw).expand(T, -1, -1)
    has_mlp = not spec.attn_only

    def kernels() -> None:
        start = 1
        torch.sub(x, abl[0], out=buf[:, 0])  # the input's difference
        for n, R, coef, kinds, W_k, rest in plan:
            y = torch.bmm(coef.T.expand(T, -1, -1), buf[:, : n + 1], out=mixed[:, : R + 1])  # [T, R + 1, m]
            part = y[:, R].clone()
            if R:
                y = F.layer_norm(y, (m,), gain, bias)
                lo = 0
                for h, Wk in zip(kinds, W_k):
                    torch.bmm(y[:, lo : lo + h].transpose(0, 1), Wk)
                    lo += h
                torch.bmm(z, W_O, out=outs)  # [H, T, m]
                outs.sum(0)
                torch.sub(outs.transpose(0, 1), abl[start : start + H].transpose(0, 1), out=buf[:, start : start + H])
                start += H
            if rest.shape[1]:
                part.sub_(torch.matmul(rest, buf[:, n : n + rest.shape[1]]).squeeze(1))
            if has_mlp:
                torch.sub(x, abl[start], out=buf[:, start])  # the MLP's difference
                start += 1
        torch.bmm(to_logits, buf)  # the logits' input

    def replaced() -> None:
        for _ in plan:
            torch.addmm(b_qkv, x, W_qkv)
            torch.addmm(b_out, x, W_out)

    with torch.no_grad():
        fns = {"plain": lambda: model(data.clean), "kernels": kernels, "replaced": replaced}
        med, _ = interleaved(fns, args.repeats, dev)
        # the floor per round, from the same round's three timings
        rounds = []
        for _ in range(args.repeats):
            _, r = interleaved(fns, 1, dev, warmup=0)
            rounds.append(1 + r["kernels"] - r["replaced"])
    emit(
        "patch_floor",
        args,
        plain_s=med["plain"],
        kernels_s=med["kernels"],
        replaced_s=med["replaced"],
        floor_ratio=statistics.median(rounds),
        target_ratio=1.3,
    )


if __name__ == "__main__":
    main()
