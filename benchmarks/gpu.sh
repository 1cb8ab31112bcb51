#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md ("GPU"): every benchmark on CUDA, both model classes, GPT-2-small
# shape at 8 x 16 and 32 x 128 tokens, and the real SmolLM2-135M. Needs a CUDA build of torch (scripts/setup.sh
# installs the CPU one): PYTHON=/path/to/python bash benchmarks/gpu.sh > gpu.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for cls in hooked bridge; do
  for shape in "8 16" "32 128"; do
    set -- $shape
    $PY benchmarks/bench_patch.py --device cuda --model-class $cls --batch $1 --seq $2
    $PY benchmarks/bench_sweep.py --device cuda --model-class $cls --batch $1 --seq $2 --repeats 3
    $PY benchmarks/bench_attribution.py --device cuda --model-class $cls --batch $1 --seq $2 --repeats 3
  done
  $PY benchmarks/bench_patch.py --device cuda --model smollm2-135m --model-class $cls
  $PY benchmarks/bench_attribution.py --device cuda --model smollm2-135m --model-class $cls --repeats 3
  $PY benchmarks/bench_sweep.py --device cuda --model smollm2-135m --model-class $cls --repeats 3
done
