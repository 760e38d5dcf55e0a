#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with an NVIDIA GPU and a CUDA build
# of torch: build lo_ops with its CUDA kernels, run the whole test suite (the CUDA tests
# included), compute-sanitizer (memcheck, racecheck, initcheck, synccheck) on the ops, and the GPU
# benchmarks.
# Outputs land in perf/results/ (and are copied to $OUT when it is set).
#
#   LO_OPS_SHARED=/path/to/shared perf/gpu_check.sh      # default: ../shared next to the repo
#
# On a device machine that receives only the repository, copy the shared material into the
# ignored folder .shared first (cp -r ../shared .shared), carry it, and run
#   LO_OPS_SHARED=.shared perf/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LO_OPS_SHARED=${LO_OPS_SHARED:-$(cd .. && pwd)/shared}
export LO_OPS_SHARED=$(cd "$LO_OPS_SHARED" 2>/dev/null && pwd || echo "$LO_OPS_SHARED")
PY=${PYTHON:-python3}
RESULTS=perf/results
mkdir -p "$RESULTS"
status=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi || { echo "no nvidia-smi: is there a GPU?"; exit 2; }
$PY - <<'PYEOF' || exit 2
import importlib, sys
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print("device", torch.cuda.get_device_name())
missing = [m for m in ("safetensors", "huggingface_hub", "msgpack", "pytest", "ninja")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing} (install them, or carry wheels)")
PYEOF
[ -d "$LO_OPS_SHARED/vectors" ] || { echo "no shared material at $LO_OPS_SHARED"; exit 2; }

step "build with the CUDA kernels"
LO_OPS_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
$PY -c "import lo_ops, lo_ops.testing; assert all(lo_ops.has_kernel(op, 'cuda') for op in lo_ops.testing.OPS)" || exit 1

step "tests"
$PY -m pytest -q -ra tests 2>&1 | tee "$RESULTS/gpu_tests.txt" || status=1

step "compute-sanitizer"
for tool in memcheck racecheck initcheck synccheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 $PY perf/sanitize_ops.py \
    > "$RESULTS/compute_sanitizer_$tool.txt" 2>&1 || status=1
  tail -n 5 "$RESULTS/compute_sanitizer_$tool.txt"
done

step "benchmarks"
for set in vit_base_16 gpt2_355m many_small; do
  $PY perf/bench_step.py --device cuda --set "$set" || status=1
done

step "profiles (time per phase, share of the step inside lo_ops events)"
for opt in small_fc_lopt velo celo celo_adam; do
  $PY perf/profile_step.py --device cuda --set vit_base_16 --optimizer "$opt" || status=1
done

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/gpu_tests.txt "$RESULTS"/compute_sanitizer_*.txt "$RESULTS"/bench_step_*_cuda_*.json \
     "$RESULTS"/profile_*_cuda.* "$OUT"/ 2>/dev/null
fi
exit $status
