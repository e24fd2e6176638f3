#!/usr/bin/env bash
# One command for a CUDA machine (issue 11, item 5): the torch engine against transformers
# `generate`, the step-cost curve, and the decoders' wall time, on random-init models built from
# config (speed does not depend on weight values): the embedded architecture (SmolLM2-135M) and
# a 1.7B-class Llama (SmolLM2-1.7B's shape). Needs PyTorch and transformers (pydantic for the
# decoders); no vLLM, no network, no weights. Writes every table to one folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default ./gpu_check_out; under 8 min on one H200
#   benchmarks/gpu_check.sh OUT_DIR --tiny     # seconds on a CPU: a 2-layer toy (tests)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-gpu_check_out}"
mode="${2:-}"
mkdir -p "$out"
export PYTHONPATH="$here/../server:$here/../clients${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=0
run() {  # run NAME CMD...: output to OUT/gpu_check.log and the terminal; a failure is kept, not fatal
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$out/gpu_check.log"
  "$@" 2>&1 | tee -a "$out/gpu_check.log" || { status=1; echo "!! $name failed" | tee -a "$out/gpu_check.log"; }
}
{ date -u; "$py" -c 'import torch, transformers, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; } > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
if [ "$mode" = "--tiny" ]; then
  run engine_tiny "$py" "$here/bench_engine.py" --tiny --tokens 8 --curve 1 2 --curve-tokens 4 --repeats 1 --profile --out "$out"
  run decoders_tiny "$py" "$here/bench_decoder_timing.py" --tiny --tokens 8 --out "$out"
else
  for cfg in smollm2-135m smollm2-1.7b; do
    run "engine_$cfg" "$py" "$here/bench_engine.py" --config "$here/configs/$cfg.json" --tokens 128 --repeats 3 --curve-tokens 32 --out "$out"
    run "decoders_$cfg" "$py" "$here/bench_decoder_timing.py" --config "$here/configs/$cfg.json" --tokens 128 --out "$out"
  done
fi
cat "$out"/engine_*.md "$out"/decoders_*.md > "$out/tables.md" 2>/dev/null
date -u >> "$out/environment.txt"
exit $status
