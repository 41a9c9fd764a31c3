"""`python -m loadtests.gpu_bench [worker KIND]`: see loadtests.gpu_bench.cli."""

from loadtests.gpu_bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
