#!/usr/bin/env bash
# The GPU check of issue 16, one prepared call (< 8 minutes on an H200; each step has its own timeout):
# the GPU kernels' tests compiled on CUDA, every test marked gpu, then benchmarks/gpu_speed.py.
# Installs nothing: the machine's torch and Triton are used (its versions are logged). Results and logs go to
# $OUT (the device tool's folder; benchmarks/results when unset). Exit status: non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_flex_block.py 2>&1 \
    | tee "$OUT/gpu_kernel_tests.log"
kernels=${PIPESTATUS[0]}
timeout 80 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_marked_tests.log"
marked=${PIPESTATUS[0]}
timeout 240 "$PY" benchmarks/gpu_speed.py --out "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log"
bench=${PIPESTATUS[0]}
echo "kernel tests rc=$kernels, gpu-marked tests rc=$marked, benchmark rc=$bench" | tee -a "$OUT/device.txt"
[ "$kernels" = 0 ] && [ "$marked" = 0 ] && [ "$bench" = 0 ]
