"""The phases of a gpu_bench run, each a function `(bench, budget_s, record)` that GpuBench.phase
runs under its budget: setup (checkpoint, export, fp32 reference), serve (`cappy serve` driven by
loadtests.closed_loop), engine (loadtests.engine_bench), peers (transformers,
sentence-transformers) and cuda_tests (`pytest -m gpu`)."""
