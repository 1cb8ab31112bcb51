#!/usr/bin/env bash
# Run edgepatch's test suite (sets itself up first). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     # the fast suite only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
