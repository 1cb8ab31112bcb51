#!/usr/bin/env bash
# Run edgepatch's test suite (sets itself up first). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     # the fast suite only
#
# The suite runs in .venv (TransformerLens 3.9: both model classes), then, because users bring either
# class from any release line, again in .venv-tl2 (TransformerLens 2.x: HookedTransformer only) and
# .venv-tl4 (4.x: TransformerBridge only), where the tests of the missing class are skipped. Those two
# runs leave out the slow tests and the modules that do not depend on the TransformerLens version.
# EDGEPATCH_TL_MATRIX=0 runs the first only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "${EDGEPATCH_TL_MATRIX:-1}" != "0" ]; then
    # TransformerLens 2.x pins numpy < 2; the newest pyarrow (which datasets needs) requires numpy 2
    # without declaring it, so the 2.x environment takes the releases of that time.
    for spec in "2|transformer-lens>=2.16,<3 datasets<4 pyarrow<18" "4|transformer-lens>=4,<5"; do
        major="${spec%%|*}"
        echo "== TransformerLens ${major}.x (.venv-tl${major})"
        EDGEPATCH_VENV=".venv-tl${major}" EDGEPATCH_TL="${spec#*|}" bash scripts/setup.sh
        ".venv-tl${major}/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider \
            --ignore=tests/test_io.py --ignore=tests/test_data.py --ignore=tests/test_plots.py \
            --ignore=tests/test_readme.py --ignore=tests/test_notebook.py "$@" || {
            rc=$?; [ "$rc" -eq 5 ] || status=$rc  # (5: the arguments select no test run there)
        }
    done
fi
exit "$status"
