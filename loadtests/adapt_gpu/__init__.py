"""ONE command for the paper-scale adaptation on a GPU machine where only python3 with torch and
transformers exists (plus the carried wheels): `python -m loadtests.adapt_gpu`.

It starts the upstream LLM on the GPU (SmolLM2-135M-Instruct from its GGUF, served by
loadtests.transformers_upstream, several processes sharing the device), then runs, as
subprocesses of the same python:
- `cappy adapt data` on the train split, every example x 17 samples, 64 new tokens, in
  parallel shards of whole tasks, merged into one pairs file;
- `cappy adapt train` on it: the paper's budget (400 steps, effective batch 256, lr 2e-5: the
  command's defaults) in bf16, with the held-out stop, exported;
- meanwhile, `cappy eval`'s sampling of the test split (17 samples with log-probabilities), in
  shards merged into one sample cache;
- `cappy eval` on that cache with the new export as the scorer: Cappy against self-scoring,
  greedy, nucleus, random and the oracle.
One JSON + Markdown summary (adapt_gpu.json, adapt_gpu.md: per phase its time, status, sampling
throughput and GPU utilisation; the eval's headline table) and an archive of every phase's log.
Each phase has a time cap and `--deadline` bounds the whole; a failed phase is recorded, and the
phases that do not need its output still run.

`--dry-run` runs the same path on the CPU with a tiny random LLM, two tasks of tiny data and a
few training steps. See loadtests/README.md (adapt_gpu/) for the device call sequence.
"""
