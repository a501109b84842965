#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine with torch, triton and onnxruntime installed:
#   bash benchmarks/gpu_all.sh [RESULTS_DIR]     (default: gpu-results/)
# installs qcompile (no dependencies), runs the Triton kernel tests on CUDA (compiled, not interpreted), then the
# kernel table (benchmarks/gpu_kernels.py) and the decode benchmark (benchmarks/e2e_gpu.py). Each stage has a time
# limit in seconds so one slow stage cannot take the others' results, and writes its own log in RESULTS_DIR.
# Environment: STAGES (default "tests forms kernels e2e more"; also "launch" and "inline"), TESTS_S, FORMS_S,
# KERNELS_S, E2E_S, MORE_S, LAUNCH_S, INLINE_S (limits), KERNEL_ARGS / MORE_ARGS / E2E_ARGS / INLINE_ARGS (extra
# arguments), TESTS (pytest selection).
set -u
RESULTS=$(realpath -m "${1:-gpu-results}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests forms kernels e2e more}
started=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - started)) s)"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$RESULTS/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/device.txt"

stage "install"
(cd "$REPO" && $PY -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3)
cd /tmp  # import the installed package, not the source tree

if wants tests; then
    stage "tests: make test-gpu's selection, Triton kernels compiled on CUDA (default configs)"
    workers=$($PY -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
    tests=${TESTS:-$REPO/tests}
    QCOMPILE_TRITON_TUNE=0 timeout "${TESTS_S:-240}" $PY -m pytest -q -p no:cacheprovider -rs $workers \
        -m "gpu or triton" $tests 2>&1 | tee "$RESULTS/tests.txt" | tail -40
fi
if wants forms; then
    stage "forms: int4 byte and word forms at fixed configs"
    timeout "${FORMS_S:-180}" $PY "$REPO/benchmarks/gpu_forms.py" 2>&1 | tee "$RESULTS/forms.txt"
fi
if wants kernels; then
    stage "kernels: W4A16 and W8A16"
    timeout "${KERNELS_S:-240}" $PY "$REPO/benchmarks/gpu_kernels.py" --schemes int4-g128 int8 ${KERNEL_ARGS:-} 2>&1 \
        | tee "$RESULTS/kernels-w4-w8.txt"
fi
if wants launch; then
    stage "launch: Python work per eager call"
    timeout "${LAUNCH_S:-60}" $PY "$REPO/benchmarks/triton_launch.py" --device cuda 2>&1 | tee "$RESULTS/launch.txt"
fi
if wants e2e; then
    stage "decode"
    timeout "${E2E_S:-150}" $PY "$REPO/benchmarks/e2e_gpu.py" ${E2E_ARGS:-} 2>&1 | tee "$RESULTS/e2e.txt"
fi
if wants inline; then
    stage "decode, compiled blocks without CUDA graphs: the op vs inlined kernels"
    for inline in "" "--inline"; do
        TORCHINDUCTOR_AUTOGRAD_CACHE=0 timeout "${INLINE_S:-150}" $PY "$REPO/benchmarks/e2e_gpu.py" --compile \
            --no-graphs $inline \
            ${INLINE_ARGS:---layers 4 --steps 50} 2>&1 | tee -a "$RESULTS/inline.txt"
    done
fi
if wants more; then
    stage "kernels: W8A8 and FP8"
    timeout "${MORE_S:-200}" $PY "$REPO/benchmarks/gpu_kernels.py" --schemes w8a8 fp8-w8a8 fp8 ${MORE_ARGS:-} 2>&1 \
        | tee "$RESULTS/kernels-w8a8-fp8.txt"
fi
stage "done"
