#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine with torch, triton and onnxruntime installed:
#   bash benchmarks/gpu_all.sh [RESULTS_DIR]     (default: gpu-results/)
# installs qcompile (no dependencies), runs the Triton kernel tests on CUDA (compiled, not interpreted), then the
# kernel table (benchmarks/gpu_kernels.py) and the decode benchmark (benchmarks/e2e_gpu.py). Each stage has a time
# limit (seconds, overridable: TESTS_S, KERNELS_S, E2E_S, MORE_S) so one slow stage cannot take the others' results;
# every stage writes its own log in RESULTS_DIR.
set -u
RESULTS=$(realpath -m "${1:-gpu-results}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
started=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - started)) s)"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$RESULTS/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/device.txt"

stage "install"
(cd "$REPO" && $PY -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3)

cd /tmp  # import the installed package, not the source tree
stage "tests: Triton kernels compiled on CUDA"
workers=$($PY -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider $workers "$REPO/tests/codegen/test_triton_kernels.py" \
    2>&1 | tee "$RESULTS/tests.txt" | tail -25

stage "kernels: W4A16 and W8A16"
timeout "${KERNELS_S:-200}" $PY "$REPO/benchmarks/gpu_kernels.py" --schemes int4-g128 int8 2>&1 \
    | tee "$RESULTS/kernels-w4-w8.txt"

stage "decode"
timeout "${E2E_S:-120}" $PY "$REPO/benchmarks/e2e_gpu.py" 2>&1 | tee "$RESULTS/e2e.txt"

stage "kernels: W8A8 and FP8"
timeout "${MORE_S:-150}" $PY "$REPO/benchmarks/gpu_kernels.py" --schemes w8a8 fp8-w8a8 fp8 2>&1 \
    | tee "$RESULTS/kernels-w8a8-fp8.txt"
stage "done"
