#!/usr/bin/env bash
# Issue 18's measurements in one device run, most valuable first, each step bounded so that the
# session's short GPU time still yields the first table when a later step runs long.
#
#   bash bench/gpu_session.sh [SECONDS]      # on the GPU machine: SECONDS for all steps (540)
#   bash bench/gpu_session.sh --tiny [S]     # here, on the CPU: the same steps on the tiny models
#
# On the GPU machine (torch and transformers, no diffusers): `make gpu-wheels` here first, then the
# device tool's run with carry [".whl"] and `bash bench/gpu_session.sh 540` (timeout_s 580). Each
# step's log and figures (its last JSON line) go to $OUT; `python3 bench/gpu_report.py $OUT` turns
# them into the README's rows.
set -uo pipefail
cd "$(dirname "$0")/.."

tiny=()
if [[ "${1:-}" == "--tiny" ]]; then
  tiny=(--tiny)
  shift
fi
budget=${1:-540}
started=$SECONDS
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/sdfleet-gpu-session-XXXX")
mkdir -p "$OUT"

# The carried wheels (diffusers and what it needs beyond the machine's packages), where present.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" .whl/*.whl || exit 1
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +"date %Y-%m-%d %H:%M UTC"
  git log -1 --format="commit %H" 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, transformers, diffusers
print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
} | tee "$OUT/machine.txt"

# step NAME SECONDS ARGS...: bench/gpu.py ARGS under at most SECONDS, and never past the budget;
# its output in $OUT/NAME.log, its figures in $OUT/NAME.json (none where it ran out of time).
step() {
  local name=$1 cap=$2
  shift 2
  set -- "${tiny[@]}" "$@"
  local left=$((budget - (SECONDS - started)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    echo "skipped $name: ${left}s of the budget left" | tee "$OUT/$name.log"
    return
  fi
  # The command as a user would type it: the session's temporary folder shown as WORK.
  echo "== $name (at most ${limit}s): bench/gpu.py ${*//$work/WORK}" | tee "$OUT/$name.log"
  timeout --kill-after=15 "$limit" "$PYTHON" bench/gpu.py "$@" 2>&1 \
    | tee -a "$OUT/$name.log"
  echo "== $name exit ${PIPESTATUS[0]} after $((SECONDS - started))s of the session" \
    | tee -a "$OUT/$name.log"
  grep '^{' "$OUT/$name.log" | tail -n 1 >"$OUT/$name.json" || rm -f "$OUT/$name.json"
}

# The tiny run checks this script on the CPU in seconds: fewer steps, smaller batches.
if [[ ${#tiny[@]} -gt 0 ]]; then
  short=2 long=3 sd2_batches=(1 2 auto) sdxl_batches=(2)
else
  short=25 long=50 sd2_batches=(1 16 auto) sdxl_batches=(1 8)
fi
# 1. SD2-base, 25 steps, compile auto: the engine against plain diffusers at batch 1, 16 and the
#    engine's own choice, and a second engine in a fresh process loading the compile cache.
#    The model is built once into WORK/sd2, its compile cache kept beside it for step 2.
step sd2-25-steps 420 --steps "$short" --batches "${sd2_batches[@]}" --model "$work/sd2"
# 2. The same at 50 steps (the issue's MFU basis, 83 TFLOP per image), on the cached graphs.
step sd2-50-steps 180 --steps "$long" --batches "${sd2_batches[@]}" --model "$work/sd2" \
  --no-second-engine
# 3. SDXL-base at 1024², 25 steps, where time is left.
step sdxl-25-steps 300 --family sdxl --steps "$short" --batches "${sdxl_batches[@]}" \
  --model "$work/sdxl" --no-second-engine

rm -rf "$work"
echo "session used $((SECONDS - started))s of ${budget}s; figures in $OUT"
