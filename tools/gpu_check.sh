#!/usr/bin/env bash
# GPU check of the runtime: CUDA parity tests and a short CUDA benchmark, in under 5 minutes.
#
#   tools/gpu_check.sh [ONNXRUNTIME_GPU_WHEEL]
#
# - With a wheel path, installs it with `pip install --no-deps --target` into its own folder ($ORT_GPU_SITE,
#   default /tmp/ort-gpu-site) that goes first on PYTHONPATH, so it shadows the CPU `onnxruntime` without touching
#   the environment (the two packages provide the same module and must never be installed side by side).
#   Without one, the onnxruntime already importable must have CUDAExecutionProvider.
# - onnxruntime-gpu 1.31.x is built for CUDA 13 (libcublas.so.13 ...); `onnxruntime.preload_dlls()` loads the
#   CUDA libraries of the nvidia-* pip packages (those torch brings). The check fails unless a session REALLY gets
#   CUDAExecutionProvider (onnxruntime falls back to CPU silently otherwise).
# - Then: pytest -k cuda on tests/test_runtime.py (export fixtures included), and tools/bench_runtime.py on CUDA
#   (tiny GPT-2, fp32 and fp16). Each step has its own timeout; the exit code is non-zero if any step failed.
# Needs: the project's Python with torch/transformers/peft/onnx (the tests export models). PYTHON overrides `python`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
SITE=${ORT_GPU_SITE:-/tmp/ort-gpu-site}
START=$(date +%s)
FAILED=()

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, record failure, keep going
    local name=$1 limit=$2
    shift 2
    echo "=== [$(( $(date +%s) - START ))s] $name"
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "!!! $name FAILED (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))"
        FAILED+=("$name")
    fi
    return $rc
}

if [ $# -ge 1 ]; then
    [ -f "$1" ] || { echo "error: wheel not found: $1" >&2; exit 2; }
    echo "=== installing $(basename "$1") into $SITE (--no-deps --target)"
    "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$1" || exit 2
fi
if [ -d "$SITE/onnxruntime" ]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 1. The provider is really there: preload the CUDA libraries, build a session, check what it got.
step "cuda provider" 60 "$PY" - <<'EOF' || { echo "no working CUDA provider: nothing else to check"; exit 1; }
import sys
import onnxruntime as ort

print("onnxruntime", ort.__version__, "from", ort.__file__)
print("available:", ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("CUDAExecutionProvider is not in this onnxruntime build; pass an onnxruntime-gpu wheel")
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
from ptuning_onnx.runtime import session as s
import pathlib
import onnx
from onnx import helper, TensorProto
# A one-node graph is enough to prove the provider loads its libraries (cuBLAS/cuDNN) and takes the node.
graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])])
path = pathlib.Path("/tmp/gpu_check_matmul.onnx")
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
sessions, device, _ = s.build_sessions({"m": path}, "cuda")
print("session providers:", sessions["m"].get_providers(), "->", device)
EOF

# 2. CUDA tests: greedy == CPU on padded batches, KV cache stays on the device, 8 threads == serial, fp16 export.
#    PTUNING_REQUIRE_CUDA=1 turns their skip-when-absent into a failure.
PTUNING_REQUIRE_CUDA=1 step "pytest -k cuda" 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_runtime.py -k cuda -rs

# 2b. ptuning-export's parity on CUDA (issue 3's --device cuda), fp32 and fp16, on the tiny Llama (GQA + rotary).
step "export parity on cuda" 120 "$PY" - <<'EOF'
import sys, tempfile, pathlib
sys.path.insert(0, "tests")
from conftest import MODELS, make_peft_adapter
from ptuning_onnx.export import export
work = pathlib.Path(tempfile.mkdtemp())
make_peft_adapter(work / "ad", MODELS / "llama", "CAUSAL_LM", "AutoModelForCausalLM")
for dtype in ("fp32", "fp16"):
    result = export(MODELS / "llama", work / "ad", work / dtype, dtype=dtype, device="cuda", progress=False)
    print(dtype, "cuda parity", result.report["max_abs_diff"], "negative control",
          result.report["negative_control"]["failed_as_expected"])
EOF

# 3. Short benchmark on the GPU (runtime on CUDA vs PEFT on torch CUDA when torch sees the GPU).
step "bench fp32" 90 "$PY" tools/bench_runtime.py --provider cuda --repeats 5
step "bench fp16" 90 "$PY" tools/bench_runtime.py --provider cuda --dtype fp16 --repeats 5 --skip-peft

echo "=== done in $(( $(date +%s) - START ))s"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all GPU checks passed"
