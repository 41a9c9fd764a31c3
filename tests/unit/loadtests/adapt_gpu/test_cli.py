"""`python -m loadtests.adapt_gpu` flags: the GPU run's defaults and the dry run's."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.adapt_gpu.cli import DRY, FULL, build_parser, resolve


def _args(*argv: str):
    return resolve(build_parser().parse_args(list(argv)))


def test_the_gpu_run_defaults_find_their_inputs() -> None:
    args = _args()
    for key, value in FULL.items():
        assert getattr(args, key) == value
    assert args.samples_per_example == 17 and args.deadline == 600
    assert Path(args.data).name == "bigbench_dev.jsonl"
    assert args.gguf is None or args.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert args.out == str(Path("exports/adapt-gpu") / "report")


def test_the_dry_run_defaults_and_flags_over_them(tmp_path: Path) -> None:
    args = _args("--dry-run", "--work", str(tmp_path), "--shards", "3")
    assert args.device == "cpu" and args.shards == 3 and args.upstreams == DRY["upstreams"]
    assert args.cache_dir == str(tmp_path / "cache") and args.data is None


def test_unknown_phases_are_refused() -> None:
    with pytest.raises(SystemExit, match="--skip"):
        _args("--skip", "nothing")
