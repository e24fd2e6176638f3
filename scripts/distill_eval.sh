#!/usr/bin/env bash
# The evaluation of docs/experiments.md ("A student worth serving"): one vLLM server with the
# student adapter loaded beside the base model, then `powerserve eval` runs.
#   scripts/distill_eval.sh ADAPTER OUT_DIR [N_POWER [N_CHEAP]]
# 1. cheap decoders (standard, temperature alpha 4, distilled) on the first N_CHEAP (default 100)
#    problems of arithmetic and of math500;
# 2. the power decoders (power_smc 8 particles, power_mcmc block 16 x 2 steps, alpha 4) on the
#    first N_POWER problems of each set (default 100: the full grid).
# Same seeds everywhere (task i is asked with seed i), so the runs pair problem by problem.
# max_tokens: 96 on arithmetic (the teacher's budget), 128 on math500 (env ARITH_TOKENS, MATH_TOKENS).
# ENGINE=torch serves on the torch engine instead (the adapter attached through peft on a torch
# engine of its own): on a small CPU it runs the power decoders several times faster than vLLM,
# which scores every sampled token in a second pass.
set -euo pipefail
adapter=${1:?adapter directory}
out=${2:?output directory}
npow=${3:-100}
ncheap=${4:-100}
port=${PORT:-8461}
mkdir -p "$out"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
nice -n 19 powerserve serve --engine "${ENGINE:-vllm}" --port "$port" --distilled "student=$adapter" \
    --max-running-weight 1000 --max-queued-weight 100000 --request-timeout-s 7200 \
    >"$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$server" || { echo "server died: see $out/server.log" >&2; exit 1; }
    sleep 5
done
url=http://127.0.0.1:$port
cheap=(--decoders standard --decoders temperature:alpha=4 --decoders distilled)
power=(--decoders "power_smc:alpha=4,particles=8" --decoders "power_mcmc:alpha=4,block_size=16,mcmc_steps=2")
for set in "arithmetic ${ARITH_TOKENS:-96}" "math500 ${MATH_TOKENS:-128}"; do
    read -r name tokens <<<"$set"
    nice -n 19 powerserve eval --server "$url" --tasks "$name:$ncheap" --max-tokens "$tokens" --concurrency 8 \
        "${cheap[@]}" --out "$out/$name-cheap" --no-progress
done
for set in "arithmetic ${ARITH_TOKENS:-96}" "math500 ${MATH_TOKENS:-128}"; do
    read -r name tokens <<<"$set"
    nice -n 19 powerserve eval --server "$url" --tasks "$name:$npow" --max-tokens "$tokens" --concurrency 8 \
        "${power[@]}" --out "$out/$name-power" --no-progress
done
