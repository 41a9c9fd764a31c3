"""The torch side of gpu_bench, run as `python -m loadtests.gpu_bench worker KIND` (one process
per phase, killed at its budget, printing one JSON line of figures): the stand-in checkpoint's
build, and the PyTorch scorers (fp32 reference, transformers and CrossEncoder peers)."""
