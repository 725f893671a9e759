#!/usr/bin/env bash
# The performance suite on a CUDA machine: bf16, torch.compile, full sizes (GPT-2 small at
# sequence 1,024 included, MFU against the GPU's spec bf16 peak), within 8 minutes.
# Installs nothing: it needs an environment where `import trainformer, torch, transformers,
# matplotlib` already works (e.g. `pip install -e .` done beforehand).
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default bench_out_gpu/
#   BENCH_TIMEOUT=480 BENCH_ONLY=peak,train bash benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-bench_out_gpu}"
TIMEOUT="${BENCH_TIMEOUT:-480}"          # seconds; 8 minutes
ONLY="${BENCH_ONLY:-peak,train,decode,scaling,realdata}"  # ddp is CPU-only (gloo)
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python

die() { echo "gpu.sh: $*" >&2; exit 1; }

command -v timeout >/dev/null || die "'timeout' (coreutils) not found"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || die "nvidia-smi failed: is the driver loaded?"
"$PY" - <<'PY' || die "the Python environment is not ready (see the message above)"
import sys
import torch
missing = [m for m in ("trainformer", "transformers", "matplotlib") if __import__("importlib").util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (install them first; this script installs nothing)")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CPU-only build or driver mismatch)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY

mkdir -p "$OUT"
echo "gpu.sh: running sections $ONLY (limit ${TIMEOUT}s) -> $OUT"
set +e
timeout --signal=INT --kill-after=30 "$TIMEOUT" "$PY" -m trainformer bench \
  --device cuda --precision bf16 --compile --only "$ONLY" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -eq 124 || $rc -eq 130 || $rc -eq 137 ]]; then
  die "timed out after ${TIMEOUT}s (rc $rc); partial log in $OUT/bench.log. Try BENCH_ONLY=peak,train"
fi
[[ -f "$OUT/bench.md" ]] || die "no report written (rc $rc); see $OUT/bench.log"
echo
echo "===== $OUT/bench.md ====="
cat "$OUT/bench.md"
[[ $rc -eq 0 ]] || die "some sections failed (rc $rc); their errors are in the report above"
