"""`python -m loadtests.transformers_upstream`: see loadtests.transformers_upstream.cli."""

from loadtests.transformers_upstream.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
