#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on one GPU (sized for an H100, at most ~10 minutes),
# offline: nothing is installed or downloaded. Results go to benchmarks/results/gpu_*:
#
#   gpu_env.txt               nvidia-smi, Python, torch/CUDA, onnxruntime (+ providers), timm, TensorRT
#   gpu_pytest.txt            python -m pytest -q -m "gpu or tensorrt": every real-TensorRT test
#                             (build/run/refit through Polygraphy, engine + refit from Python,
#                             two named inputs, INT8 Q/DQ and calibration, explicit device)
#   gpu_vit_base_b32.{json,png,txt}   the Fig. 3 cost benchmark (ViT-B/16, batch 32, CUDA)
#   gpu_engine_tiny_{fp32,fp16}.json   TensorRT builds of a fused tiny ViT (when TensorRT imports)
#   gpu_bundle.json           a 10-task ViT-S/16 bundle engine vs the fused model's, fp32/fp16,
#                             and a task added by refit (when TensorRT imports)
#   gpu_summary.txt           one line per step: status, exit code, seconds
#   gpu_*.log                 each step's stderr (progress, warnings, TensorRT's log)
#
# Each step runs under `timeout`; a failed step does not stop the others; the script exits
# non-zero at the end if any step failed (a skipped step is not a failure). The package runs
# from this checkout (PYTHONPATH), so `pip install` is not needed. Limits can be changed with
# TOTAL_S (whole run, default 570 s) and the per-step *_S variables below; RESULTS_DIR moves
# the output folder.
#   bash benchmarks/run_gpu.sh && cp benchmarks/results/gpu_* "$WHERE_RESULTS_SHOULD_GO"
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
RES="${RESULTS_DIR:-$ROOT/benchmarks/results}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RES"

TOTAL_S="${TOTAL_S:-570}"
ENV_S="${ENV_S:-40}"
PYTEST_S="${PYTEST_S:-170}"
BENCH_S="${BENCH_S:-240}"
ENGINE_S="${ENGINE_S:-40}"
BUNDLE_S="${BUNDLE_S:-200}"

START=$SECONDS
FAILED=0
SUMMARY="$RES/gpu_summary.txt"
: > "$SUMMARY"

note() { echo "[run_gpu] $*" >&2; }

# step NAME LIMIT_S LOGFILE CMD...: run CMD with a time limit (never past TOTAL_S), tee to LOGFILE
step() {
    local name="$1" limit="$2" log="$3"; shift 3
    local left=$(( TOTAL_S - (SECONDS - START) - 5 ))
    if (( left < limit )); then limit=$left; fi
    if (( limit <= 0 )); then
        note "$name: FAILED (no time left of TOTAL_S=$TOTAL_S)"
        printf '%-22s FAIL  rc=-   0 s  (no time left)\n' "$name" >> "$SUMMARY"
        FAILED=1
        return 1
    fi
    note "$name (limit ${limit} s): $*"
    local t0=$SECONDS rc errlog="${log%.*}.log"
    # stdout to the terminal and LOGFILE, stderr to LOGFILE's .log (its tail shown on failure)
    timeout --kill-after=5 "$limit" "$@" 2> "$errlog" | tee "$log"
    rc=${PIPESTATUS[0]}
    local took=$(( SECONDS - t0 ))
    if (( rc == 0 )); then
        printf '%-22s PASS  rc=0   %d s\n' "$name" "$took" >> "$SUMMARY"
    else
        if [[ $rc == 124 || $rc == 137 ]]; then note "$name: timed out after ${limit} s"; fi
        tail -n 15 "$errlog" >&2
        printf '%-22s FAIL  rc=%d  %d s\n' "$name" "$rc" "$took" >> "$SUMMARY"
        FAILED=1
    fi
    return $rc
}

skip() {
    note "$1: skipped ($2)"
    printf '%-22s SKIP  (%s)\n' "$1" "$2" >> "$SUMMARY"
}

# (a) what this machine is
env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "--- nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed (rc=$?)"
    echo "--- python packages"
    "$PY" - <<'EOF'
import importlib, importlib.metadata, platform, sys, warnings
warnings.simplefilter("ignore")
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version(), "| GPUs", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.1f} GiB")
import onnxruntime as ort
print("onnxruntime", ort.__version__, "| device", ort.get_device(), "| providers",
      ort.get_available_providers())
for name in ("timm", "onnx", "onnxsim", "click", "safetensors", "pytest", "matplotlib",
             "polygraphy", "tensorrt"):
    try:
        m = importlib.import_module(name)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(m, "__version__", "?")
        print(name, version)
    except Exception as e:
        print(name, "NOT AVAILABLE:", str(e).splitlines()[0] if str(e) else type(e).__name__)
EOF
}
export -f env_report
export PY ROOT
step env "$ENV_S" "$RES/gpu_env.txt" bash -c env_report

# (b) the GPU and TensorRT tests (TensorRT tests skip themselves where it is missing)
step pytest "$PYTEST_S" "$RES/gpu_pytest.txt" \
    "$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider

# (c) Fig. 3 setting: every method's cost on ViT-B/16, batch 32, CUDA
step bench "$BENCH_S" "$RES/gpu_vit_base_b32.txt" \
    "$PY" -m ssf_deploy bench --model vit_base_patch16_224 --batch-size 32 --device cuda \
    --method all --out "$RES/gpu_vit_base_b32.json" --plot "$RES/gpu_vit_base_b32.png"

# (d) TensorRT fp32 and fp16 engines of a fused tiny ViT, checked against onnxruntime
tiny_onnx() {
    "$PY" - "$1" <<'EOF'
import sys
import torch
from ssf_deploy import apply_method, create_base_model, fuse
from ssf_deploy.export import export_onnx
torch.manual_seed(0)
model = apply_method(create_base_model("test_vit", 10, img_size=32, patch_size=8), "ssf",
                     init_std=0.2).eval()
x = torch.randn(2, 3, 32, 32)
info = export_onnx(fuse(model, x), sys.argv[1], example=x[:1], dynamic_batch=True,
                   metadata={"arch": "test_vit", "num_classes": 10, "fused_from": "ssf"})
print("fused tiny ViT ->", sys.argv[1], info["nodes"], "nodes")
EOF
}
if trt_err="$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2>&1)"; then
    note "TensorRT $trt_err"
    export -f tiny_onnx
    if step tiny-onnx "$ENGINE_S" "$WORK/tiny_onnx.txt" bash -c 'tiny_onnx "$1"' _ "$WORK/tiny.onnx"
    then
        for prec in fp32 fp16; do
            flag=(); if [[ $prec == fp16 ]]; then flag=(--fp16); fi
            step "engine-$prec" "$ENGINE_S" "$RES/gpu_engine_tiny_$prec.json" \
                "$PY" -m ssf_deploy engine "$WORK/tiny.onnx" --out "$WORK/tiny_$prec.plan" \
                ${flag[@]+"${flag[@]}"} --opt-batch 8 --max-batch 32 --iters 50 --json
        done
    fi
else
    skip "engine-fp32/fp16" "TensorRT not importable: $(echo "$trt_err" | tail -n 1)"
fi

# (e) a task bundle as one TensorRT engine (ViT-S/16, 10 synthetic tasks, batch 16): its
#     latency next to the fused model's engine at fp32 and fp16, and a task added by refit
if [[ -n "${trt_err:-}" ]] && "$PY" -c 'import tensorrt' 2>/dev/null; then
    step bundle-engine "$BUNDLE_S" "$RES/gpu_bundle.txt" \
        "$PY" benchmarks/bundle/run.py --gpu --archs vit_small_patch16_224 --tasks 10 \
        --batch 16 --out "$RES" --work "$WORK"
else
    skip "bundle-engine" "TensorRT not importable"
fi

note "summary ($(( SECONDS - START )) s):"
cat "$SUMMARY" >&2
exit $FAILED
