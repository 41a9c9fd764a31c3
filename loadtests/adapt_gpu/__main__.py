"""`python -m loadtests.adapt_gpu`: see loadtests.adapt_gpu.cli."""

from loadtests.adapt_gpu.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
