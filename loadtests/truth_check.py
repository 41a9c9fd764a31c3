"""Does an adapted scorer tell a right answer from a wrong one? Train on ground-truth and
mismatch pairs only (no LLM needed) with the held-out stop, once per setting, and report how
often each held-out example's ground truth scores above its mismatch: overall and per task.

    python -m loadtests.truth_check --data ../shared/data/bigbench_dev.jsonl --base MINILM_DIR \\
        --work ../truth-check --setting paper= --setting head="--lr 5e-5 --head-lr 1e-3" \\
        --setting mean="--lr 5e-5 --head-lr 1e-3 --pooling mean" -- --steps 300 --bf16

What it runs, each printed before it runs and resumable (a finished setting is kept; an
interrupted one continues with --resume):
1. `cappy adapt data --train DATA --split train --samples-per-example 0` (every train example's
   ground truths and mismatch);
2. per setting, `cappy adapt train --data ... --base BASE` with the common training flags (after
   `--`) and the setting's own; the held-out examples (10% of each task's, `--eval-fraction`)
   are the check's dev examples;
3. the kept checkpoint's export scores the held-out pairs again (adapt.scoring, fp32), for the
   per-task table.

Writes WORK/report.json and WORK/report.md; the target the issue sets is >= 90%.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET = 0.9


def _run(command: list[str], log: Path) -> None:
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    with log.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: exit {done.returncode}; see {log}")


def _cappy(*args: str) -> list[str]:
    return [sys.executable, "-m", "cappy", *args]


def _per_task(export: Path, data: Path, seed: int, fraction: float) -> dict[str, Any]:
    """Ground truth above mismatch per task, on the held-out examples, from the export."""
    from adapt.data import read_pairs
    from adapt.heldout import metrics, split_by_example
    from adapt.scoring import ExportScorer

    held = split_by_example(read_pairs(data), fraction, seed).held_out
    scores = ExportScorer(export).score([(p.instruction, p.response) for p in held])
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(held):
        by_task[pair.task].append(index)
    tasks = {}
    for task, rows in sorted(by_task.items()):
        found = metrics([held[i] for i in rows], [float(scores[i]) for i in rows])
        if "gt_accuracy" in found:
            tasks[task] = round(found["gt_accuracy"], 4)
    overall = metrics(held, [float(s) for s in scores]).get("gt_accuracy")
    return {"overall": overall, "tasks": tasks, "examples": len({p.id for p in held})}


def check(
    data: Path,
    base: str,
    work: Path,
    settings: dict[str, list[str]],
    common: Sequence[str],
    *,
    seed: int = 0,
    eval_fraction: float = 0.1,
) -> dict[str, Any]:
    """Runs every setting (see the module docstring) and returns the report."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    pairs = work / "data"
    if not (pairs / "pairs.jsonl").is_file():
        _run(
            _cappy(
                "adapt", "data", "--train", str(data), "--split", "train",
                "--samples-per-example", "0", "--seed", str(seed), "--out", str(pairs), "--quiet",
            ),
            log,
        )  # fmt: skip
    results: dict[str, Any] = {}
    for name, flags in settings.items():
        out = work / name
        started = time.monotonic()
        if not (out / "cappy_export.json").is_file():
            resume = ["--resume"] if (work / f"{name}.checkpoint.trainer").exists() else []
            command = _cappy(
                "adapt", "train", "--data", str(pairs), "--base", base, "--out", str(out),
                "--seed", str(seed), "--eval-fraction", str(eval_fraction), "--quiet",
                *common, *flags, *resume,
            )  # fmt: skip
            _run(command, log)
        record = json.loads((work / f"{name}.checkpoint" / "cappy_adapt.json").read_text())
        held = record["held_out"]
        results[name] = {
            "flags": [*common, *flags],
            "best": held["best"],
            "evaluations": held["evaluations"],
            "steps": record["steps"],
            "stopped_early": held["stopped_early"],
            "train_seconds": record["train_seconds"],
            "wall_seconds_this_run": round(time.monotonic() - started, 1),
            "held_out": _per_task(out, pairs, seed, eval_fraction),
        }
    report = {"data": str(data), "base": base, "target": TARGET, "settings": results}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        "# Ground truth above its mismatch (held-out examples)",
        "",
        f"- data: `{report['data']}`, base: `{report['base']}`; target >= {report['target']:.0%}",
        "",
        "| setting | flags | steps | best step | ground truth above mismatch | MSE | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, found in settings.items():
        best = found["best"] or {}
        accuracy = found["held_out"]["overall"]
        lines.append(
            f"| {name} | `{' '.join(found['flags'])}` | {found['steps']} | "
            f"{best.get('step', '')} | {accuracy:.1%} | {best.get('mse', float('nan')):.4f} | "
            f"{found['train_seconds']:.0f} |"
        )
    tasks = sorted({t for found in settings.values() for t in found["held_out"]["tasks"]})
    lines += ["", "## Per task", "", "| task | " + " | ".join(settings) + " |"]
    lines.append("|---|" + "---:|" * len(settings))
    for task in tasks:
        cells = [settings[name]["held_out"]["tasks"].get(task) for name in settings]
        lines.append(
            f"| {task} | " + " | ".join("" if c is None else f"{c:.0%}" for c in cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _setting(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FLAGS")
    return name.strip(), shlex.split(flags)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        common = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.truth_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="JSONL with a train split")
    parser.add_argument("--base", required=True, help="the base to adapt (cappy adapt train)")
    parser.add_argument("--work", type=Path, required=True, help="work and report folder")
    parser.add_argument(
        "--setting",
        type=_setting,
        action="append",
        required=True,
        metavar="NAME=FLAGS",
        help="a training setting: its name and its own `cappy adapt train` flags (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    report = check(
        args.data,
        args.base,
        args.work,
        dict(args.setting),
        common,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
    )
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
