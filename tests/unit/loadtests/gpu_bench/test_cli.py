"""loadtests/gpu_bench/cli.py: the GPU run's and the dry run's defaults."""

from __future__ import annotations

from pathlib import Path

from loadtests.gpu_bench.cli import build_parser, resolve
from loadtests.gpu_bench.phases.serve import int_list


def test_dry_run_defaults_fill_unset_flags_only(tmp_path: Path) -> None:
    args = resolve(
        build_parser().parse_args(
            ["--dry-run", "--work", str(tmp_path), "--per-request-limit", "3"]
        )
    )
    assert args.device == "cpu" and args.model_size == "tiny"
    assert args.per_request_limit == 3 and "pytest" in args.skip
    assert Path(args.requests).is_file() and args.out == str(tmp_path / "report")
    full = resolve(build_parser().parse_args(["--work", str(tmp_path)]))
    assert full.device == "cuda" and full.model_size == "large"
    assert int_list(full.concurrency) == [1, 8, 32, 64, 128]
    assert len(int_list(full.limits)) == 5
