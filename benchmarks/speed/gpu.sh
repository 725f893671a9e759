#!/usr/bin/env bash
# The performance suite on a CUDA machine, within 8 minutes, in three stages:
#
#   1. tests    pytest -m gpu: the CUDA behaviour tests (tests/test_cuda.py)
#   2. eager    the whole suite in bf16 autocast without compile: peak, training step vs HF
#               (three families + GPT-2 small at seq 1,024), decoding, scaling, real data
#   3. compiled the training step again with torch.compile on both sides, GPT-2 small first
#
# MFU is against the GPU's spec-sheet bf16 peak (in brackets: the best GEMM measured in the run).
# Each stage gets what is left of the time budget (stage 3 all of the rest); a stage cut short
# keeps the rows it finished. Installs nothing: it needs an environment where
# `import trainformer, torch, transformers, matplotlib` works (`pip install -e .`, or PYTHONPATH).
#
#   bash benchmarks/speed/gpu.sh [OUT_DIR]            # default bench_out_gpu/
#   BENCH_TIMEOUT=480 BENCH_TESTS=0 BENCH_EAGER_S=200 PYTHON=python3 bash benchmarks/speed/gpu.sh
# Real-data throughput needs the Tatoeba pairs under $TRAINFORMER_DATA (else it is skipped).
set -euo pipefail

cd "$(dirname "$0")/../.."
OUT="${1:-bench_out_gpu}"
TIMEOUT="${BENCH_TIMEOUT:-480}"        # seconds for all three stages
TESTS="${BENCH_TESTS:-1}"              # 0: skip stage 1
TESTS_S="${BENCH_TESTS_S:-100}"        # at most this long for stage 1
EAGER_S="${BENCH_EAGER_S:-200}"        # at most this long for stage 2
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
START=$(date +%s)

die() { echo "gpu.sh: $*" >&2; exit 1; }
left() { echo $((TIMEOUT - ($(date +%s) - START))); }
limit() { local l; l=$(left); (( l < $1 )) && echo "$l" || echo "$1"; }  # min(left, $1)

command -v timeout >/dev/null || die "'timeout' (coreutils) not found"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || die "nvidia-smi failed: is the driver loaded?"
"$PY" - <<'PY' || die "the Python environment is not ready (see the message above)"
import importlib.util
import sys

import torch

missing = [m for m in ("trainformer", "transformers", "matplotlib", "seqeval") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (install them first; this script installs nothing)")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CPU-only build or driver mismatch)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
mkdir -p "$OUT"
failed=()

# run NAME SECONDS CMD...: one stage under `timeout`, its output in OUT/NAME.log
run() {
  local name=$1 secs=$2 rc; shift 2
  (( secs > 10 )) || { echo "gpu.sh: no time left for $name"; failed+=("$name (no time)"); return; }
  echo "===== gpu.sh: $name (at most ${secs}s) ====="
  set +e
  timeout --signal=INT --kill-after=20 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  case $rc in
    0) ;;
    124|130|137) failed+=("$name (cut at ${secs}s)") ;;
    *) failed+=("$name (rc $rc)") ;;
  esac
}

if [[ $TESTS != 0 ]]; then
  run tests "$(limit "$TESTS_S")" "$PY" -m pytest -m gpu tests/test_cuda.py -p no:cacheprovider
fi
run eager "$(limit "$EAGER_S")" "$PY" -m trainformer bench --device cuda --precision bf16 \
  --only peak,train,decode,scaling,realdata --out "$OUT/eager"
run compiled "$(left)" "$PY" -m trainformer bench --device cuda --precision bf16 --compile \
  --only peak,train --train-models gpt2-small,decoder,encoder,encoder_decoder --out "$OUT/compiled"

for stage in eager compiled; do
  [[ -f "$OUT/$stage/bench.md" ]] && { echo; echo "===== $OUT/$stage/bench.md ====="; cat "$OUT/$stage/bench.md"; }
done
echo
echo "gpu.sh: $(( $(date +%s) - START ))s in all"
(( ${#failed[@]} == 0 )) || die "not complete: ${failed[*]}; see the logs in $OUT"
