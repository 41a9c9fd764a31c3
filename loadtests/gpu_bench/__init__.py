"""One command that benchmarks cappy-serve's GPU path on a bare GPU machine (and its CPU dry run).

    python3 -m loadtests.gpu_bench --requests exports/gpu-input/bench_requests.jsonl \\
        --work /root/gpu-bench --out "$OUT"       # GPU: Cappy-large shape, fp16, CUDA
    python -m loadtests.gpu_bench --dry-run --work /tmp/gb --out /tmp/gb/report   # CPU, tiny

It owns the whole run, one phase after another, each under its own time budget (a failure or an
overrun is recorded in the JSON and the next phase still runs; phases that would start after
--deadline are recorded as skipped):

  checkpoint     a seeded random Cappy-large-shaped scorer (RoBERTa-large with a RoBERTa BPE
                 tokenizer, or BERT-large with a WordPiece one), kept in --work
  export         `cappy export --parity record` (fp32 + fp16), kept in --work
  reference      PyTorch fp32 scores of the first --reference-limit requests: the argmax truth
  serve-start    `cappy serve --device cuda` on a free loopback port, until /ready
  serve-cN       loadtests.closed_loop at concurrency N (one phase per --concurrency)
  engine         loadtests/engine_bench.py on the same export (ONNX Runtime fp16 on CUDA)
  peer-*         transformers fp16 length-sorted batches; sentence-transformers CrossEncoder
                 .predict in bulk and one request at a time; CPU work confined to --peer-threads
  pytest         the CUDA tests, `pytest -m gpu tests/unit/engine` (not in the dry run)

Per phase: pairs/s, p50/p99 latency, mean GPU utilisation over the timed window (nvidia-smi
every 200 ms; null without nvidia-smi), the fraction of the FLOP limit (real tokens x FLOPs per
token / seconds / --peak-tflops) and argmax agreement with fp32 on the requests whose fp32
top-two margin is not a near tie. Output: --out/gpu_bench.json (rewritten after every phase) and
--out/gpu_bench.md. Progress goes to stderr, one timestamped line per phase event.

Torch work runs in worker subprocesses (`python -m loadtests.gpu_bench worker KIND ...`), so
that each can be killed at its budget and frees the GPU when it ends. Needs only what the GPU
machine's python3 has (torch, transformers, tokenizers, sentence-transformers, httpx, numpy)
plus the service's wheels on PYTHONPATH; tqdm is only used by `cappy export`, whose
transformers dependency brings it.
"""
