"""Small and benchmark-shaped models with random weights, for tests, benchmarks and examples.

Context
-------
Model weights cannot always be downloaded (CI, air-gapped clusters), but the engine's correctness and
speed do not depend on trained weights: every invariant in DESIGN.md §3 is an exact identity that holds
for any weights. So the test suite and the benchmarks build models from a config with random weights,
in either TransformerLens model class:

- ``"hooked"``: ``transformer_lens.HookedTransformer`` (TL 2.x / 3.x), built from a
  ``HookedTransformerConfig``.
- ``"bridge"``: ``transformer_lens.model_bridge.TransformerBridge`` (TL 3.x / 4.x), wrapping a randomly
  initialised HuggingFace model (GPT-2, GPT-NeoX or Llama architecture).
- ``"auto"`` (the default): ``"hooked"`` where the installed TransformerLens has it (2.x, 3.x), else
  ``"bridge"`` (4.x). :func:`model_classes` says which the installed version has.

Presets (``random_model(preset)``):

=================  ==============================================================================
``gpt2-small``     GPT-2 small's exact shape (12 layers, 12 heads, d_model 768): the benchmark shape
``tiny``           GPT-2-like, 2 layers, 4 heads, d_model 32
``tiny-3l``        GPT-2-like, 3 layers, 3 heads, d_model 24
``tiny-parallel``  GPT-NeoX-like parallel attention + MLP, rotary, 2 layers
``tiny-gqa``       Llama-like grouped-query attention (6 query heads, 2 key/value heads), RMSNorm
``tiny-attn-only`` attention-only, 2 layers (hooked only)
=================  ==============================================================================

Models with GPT-2's vocabulary (``gpt2-small``, or ``d_vocab=50257``) carry GPT-2's tokenizer (shipped
offline), so the string tasks (``tasks.ioi``, ...) run on them; the others have no tokenizer (``tasks.induction``
takes a vocabulary size), in both model classes.

Example
-------
>>> model = random_model("tiny", model_class="hooked", seed=0)
>>> model.cfg.n_layers
2
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

ModelClass = Literal["auto", "hooked", "bridge"]

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(arch="gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024),
    "tiny": dict(arch="gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=101, n_ctx=64),
    "tiny-3l": dict(arch="gpt2", n_layers=3, d_model=24, n_heads=3, d_mlp=48, d_vocab=101, n_ctx=64),
    "tiny-parallel": dict(arch="neox", n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=101, n_ctx=64),
    "tiny-gqa": dict(arch="llama", n_layers=2, d_model=36, n_heads=6, n_kv_heads=2, d_mlp=64, d_vocab=101, n_ctx=64),
    "tiny-attn-only": dict(arch="gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=None, d_vocab=101, n_ctx=64, attn_only=True),
}


def random_model(
    preset: str = "tiny",
    model_class: ModelClass = "auto",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """Build a TransformerLens model with random weights from a named preset (see module docstring).

    ``overrides`` replace preset fields (``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``,
    ``d_mlp``, ``d_vocab``, ``n_ctx``). The model is in eval mode.

    >>> m = random_model("tiny-gqa", model_class="bridge", seed=1)
    >>> type(m).__name__
    'TransformerBridge'
    """
    if preset not in PRESETS:
        import difflib

        close = difflib.get_close_matches(preset, PRESETS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)}.{hint}")
    spec = {**PRESETS[preset], **overrides}
    spec.setdefault("attn_only", False)
    spec.setdefault("n_kv_heads", None)
    spec["preset"] = preset
    if model_class not in ("auto", "hooked", "bridge"):
        raise ValueError(f"model_class must be 'auto', 'hooked' or 'bridge', got {model_class!r}.")
    have = model_classes()
    if model_class == "auto":
        if not have:
            raise ImportError(f"{_tl_version()} has neither HookedTransformer nor TransformerBridge; install "
                              f"transformer-lens>=2 (3.9 has both).")
        model_class = "hooked" if "hooked" in have or spec["attn_only"] else "bridge"
    if spec["attn_only"] and model_class == "hooked" and "hooked" not in have:
        raise ImportError(f"the attention-only preset {preset!r} needs HookedTransformer, which {_tl_version()} "
                          f"does not have (TransformerLens 4 removed it); install transformer-lens 3.9.")
    if model_class not in have:
        other = "bridge" if model_class == "hooked" else "hooked"
        what = ("HookedTransformer (TransformerLens 4 removed it)" if model_class == "hooked"
                else "TransformerBridge (transformer_lens.model_bridge, TransformerLens >= 3)")
        hint = f"use model_class={other!r} (or 'auto')" if other in have else "install transformer-lens 3.9, which has both"
        raise ImportError(f"random_model(model_class={model_class!r}) needs {what}, which {_tl_version()} does not "
                          f"have; {hint}.")
    model = _hooked(spec, seed) if model_class == "hooked" else _bridge(spec, seed)
    param = next(model.parameters())
    if param.device != torch.device(device):
        model.to(device)
    if param.dtype != dtype:
        model.to(dtype)
    return model.eval()


def model_classes() -> tuple[str, ...]:
    """The TransformerLens model classes the installed version has: ``("hooked", "bridge")`` for 3.x,
    ``("hooked",)`` for 2.x, ``("bridge",)`` for 4.x.

    >>> set(model_classes()) <= {"hooked", "bridge"}
    True
    """
    have = []
    try:
        from transformer_lens import HookedTransformer  # noqa: F401

        have.append("hooked")
    except ImportError:
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

        have.append("bridge")
    except ImportError:
        pass
    return tuple(have)


def _tl_version() -> str:
    from importlib import metadata

    try:
        return f"TransformerLens {metadata.version('transformer-lens')}"
    except metadata.PackageNotFoundError:
        return "the installed TransformerLens"


def _hooked(spec: dict[str, Any], seed: int) -> torch.nn.Module:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    arch = spec["arch"]
    kwargs: dict[str, Any] = dict(
        n_layers=spec["n_layers"],
        d_model=spec["d_model"],
        n_heads=spec["n_heads"],
        d_head=spec["d_model"] // spec["n_heads"],
        d_mlp=spec["d_mlp"],
        d_vocab=spec["d_vocab"],
        n_ctx=spec["n_ctx"],
        attn_only=spec["attn_only"],
        seed=seed,
        init_weights=True,
        model_name=f"random-{spec['preset']}",
    )
    if arch == "gpt2":
        kwargs.update(act_fn="gelu_new", normalization_type="LN")
    elif arch == "neox":
        kwargs.update(act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True,
                      positional_embedding_type="rotary", rotary_dim=spec["d_model"] // spec["n_heads"])
    elif arch == "llama":
        kwargs.update(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                      gated_mlp=True, n_key_value_heads=spec["n_kv_heads"],
                      rotary_dim=spec["d_model"] // spec["n_heads"])
    if spec["attn_only"]:
        kwargs.pop("d_mlp")
    cfg = HookedTransformerConfig(**kwargs)
    tokenizer = None
    if spec["d_vocab"] == 50257:  # GPT-2's vocabulary: its tokenizer (offline), as the bridge gets
        from edgepatch.tokenizers import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    # TL's default init is small; make the random weights big enough that every component matters.
    _spread_weights(model, seed)
    return model


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _bridge(spec: dict[str, Any], seed: int) -> torch.nn.Module:
    from transformer_lens.model_bridge import TransformerBridge
    import transformers

    torch.manual_seed(seed)
    arch = spec["arch"]
    if spec["attn_only"]:
        raise ValueError("attention-only models are only available as model_class='hooked'.")
    common = dict(vocab_size=spec["d_vocab"])
    if arch == "gpt2":
        hf_cfg = transformers.GPT2Config(n_layer=spec["n_layers"], n_embd=spec["d_model"], n_head=spec["n_heads"],
                                         n_inner=spec["d_mlp"], n_positions=spec["n_ctx"],
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **common)
        hf_model = transformers.GPT2LMHeadModel(hf_cfg)
        name = "gpt2"
    elif arch == "neox":
        hf_cfg = transformers.GPTNeoXConfig(hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
                                            num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
                                            max_position_embeddings=spec["n_ctx"], use_parallel_residual=True,
                                            **common)
        hf_model = transformers.GPTNeoXForCausalLM(hf_cfg)
        name = "EleutherAI/pythia-14m"
    elif arch == "llama":
        hf_cfg = transformers.LlamaConfig(hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
                                          num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
                                          num_key_value_heads=spec["n_kv_heads"] or spec["n_heads"],
                                          head_dim=spec["d_model"] // spec["n_heads"],
                                          max_position_embeddings=spec["n_ctx"], **common)
        hf_model = transformers.LlamaForCausalLM(hf_cfg)
        name = "meta-llama/Llama-3.2-1B"
    else:  # pragma: no cover - presets are fixed
        raise ValueError(arch)
    hf_model.eval()
    from edgepatch.tokenizers import gpt2_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=gpt2_tokenizer())
    bridge.cfg.model_name = f"random-{spec['preset']}"
    if len(bridge.tokenizer) > spec["d_vocab"]:
        # booting needs a tokenizer, but GPT-2's would produce ids beyond this vocabulary: none, as for the
        # HookedTransformer (tasks then need a vocabulary size, not a tokenizer)
        bridge.tokenizer = None
    return bridge
