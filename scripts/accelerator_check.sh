#!/usr/bin/env bash
# The accelerator check: one prepared script for a machine with one GPU or a TPU host, under 8 minutes.
#
#   bash scripts/accelerator_check.sh [OUT_DIR]            # on the accelerator (OUT_DIR defaults to $OUT or ./accelerator_check)
#   JAXINF_CHECK_SMALL=1 bash scripts/accelerator_check.sh  # CPU, tiny shapes: what the heavy test runs so it cannot rot
#
# It writes, each also printed:
#   devices.txt            jax's devices and versions
#   engine_float32.md      scripts/bench_engine.py in float32: each stage's step against a plain forward+backward,
#   engine_bfloat16.md     and in bf16, with the model-FLOPs utilisation of each step (scores included)
#   vs_kronfluence.json    scripts/bench_vs_kronfluence.py --size small: both libraries per stage, same shapes
#   parity.txt             the float32 parity test against kronfluence (tests/test_kronfluence_precision.py)
#   compile_ahead.md       scripts/bench_compile_ahead.py: a cold jaxinf run with each pass's other programs compiled
#                          in the background (the accelerators' default) against one without, once each
# Peaks for the MFU column: JAXINF_PEAK_TFLOPS_F32 and JAXINF_PEAK_TFLOPS_BF16 (defaults: an H200's dense peaks).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-accelerator_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
small="${JAXINF_CHECK_SMALL:-0}"
f32="${JAXINF_PEAK_TFLOPS_F32:-67}"
bf16="${JAXINF_PEAK_TFLOPS_BF16:-989}"
if [ "$small" = 1 ]; then
  engine=(--d-model 32 --layers 2 --heads 2 --vocab 64 --seq 16 --batch 2 --queries 4 --rank 4 --repeats 1)
  kron=(--size tiny --documents 16)
  ahead=(--size tiny --documents 16)
else
  engine=(--d-model 1024 --layers 8 --heads 8 --vocab 32768 --seq 1024 --batch 8 --queries 32 --rank 32)
  kron=(--size small)
  ahead=(--size small --documents 256)
fi
python -c "import jax, jaxlib; print(jax.devices()); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" \
  | tee "$out/devices.txt"
python scripts/bench_engine.py "${engine[@]}" --dtype float32 --peak-tflops "$f32" | tee "$out/engine_float32.md"
python scripts/bench_engine.py "${engine[@]}" --dtype bfloat16 --peak-tflops "$bf16" | tee "$out/engine_bfloat16.md"
python scripts/bench_vs_kronfluence.py "${kron[@]}" --torch-device auto --json "$out/vs_kronfluence.json"
python -m pytest tests/test_kronfluence_precision.py -q -p no:cacheprovider 2>&1 | tee "$out/parity.txt"
python scripts/bench_compile_ahead.py "${ahead[@]}" --repeat 1 --root "$out/compile_ahead" --json "$out/compile_ahead.json" \
  | tee "$out/compile_ahead.md"
rm -rf "$out/compile_ahead"
