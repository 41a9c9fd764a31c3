"""The report: adapt_gpu.json (rewritten atomically after every phase, so a run cut short still
says what it did) and adapt_gpu.md (the phases, the sampling throughput, training, and the
headline of `cappy eval`'s report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapt.selection import METHOD_NAMES, METHODS, OVERALL, SUBSET_METHODS, SUBSET_SIZES
from loadtests.device_run import cell, machine_lines, save_report, table_row

HEADLINE_COMPARISONS = ("cappy - self_scoring", "cappy - greedy")


def write(out: Path, report: dict[str, Any]) -> None:
    """`report` as out/adapt_gpu.json (replaced whole, never half-written) and out/adapt_gpu.md."""
    save_report(out, "adapt_gpu", report, markdown(report))


def headline(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of `cappy eval`'s report.json: each method overall, Cappy and the
    self-scorings by number of samples, and the bootstrap intervals of Cappy's differences."""
    intervals = (evaluation.get("bootstrap") or {}).get("comparisons") or {}
    return {
        "examples": evaluation.get("examples"),
        "tasks": len(evaluation.get("tasks") or []),
        "incomplete_examples": len(evaluation.get("incomplete_examples") or []),
        "samples": evaluation.get("samples"),
        "scorer": evaluation.get("scorer"),
        "overall": {m: (evaluation["methods"].get(m) or {}).get(OVERALL) for m in METHODS},
        "by_samples": {
            m: {
                str(k): (evaluation["by_samples"][m].get(str(k)) or {}).get(OVERALL)
                for k in SUBSET_SIZES
            }
            for m in SUBSET_METHODS
            if m in (evaluation.get("by_samples") or {})
        },
        "bootstrap": {name: intervals.get(name) for name in HEADLINE_COMPARISONS},
    }


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _phase_note(p: dict[str, Any]) -> str:
    parts = [p.get("summary") if isinstance(p.get("summary"), str) else None]
    if p.get("pairs") is not None:
        parts.append(f"{p['pairs']} pairs {p.get('pairs_by_source')}")
    if p.get("samples_cached") is not None:
        parts.append(f"{p['samples_cached']} of {p.get('samples_planned')} samples cached")
    if p.get("ready_s") is not None:
        parts.append(f"ready in {p['ready_s']} s")
    if p.get("ran_beside"):
        parts.append(f"beside {p['ran_beside']}")
    held = p.get("held_out")
    if held:
        best = held.get("best") or {}
        metric = held.get("metric")
        parts.append(
            f"{p.get('steps')} steps, {held.get('examples')} held-out examples, "
            f"{held.get('evaluations')} evaluations, best at step {best.get('step')} "
            f"({metric} {cell(best.get(metric), '{:.4g}')}), "
            f"stopped early {held.get('stopped_early')}"
        )
    if isinstance(p.get("summary"), dict):
        summary = p["summary"]
        if "first_loss" in summary:
            parts.append(f"loss {summary.get('first_loss')} -> {summary.get('last_loss')}")
    parts += [p.get("note"), p.get("error")]
    text = "; ".join(str(x) for x in parts if x)
    return text.replace("|", "/").replace("\n", " ")[:400]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env.get("gpu") or {}
    inputs = report.get("inputs") or {}
    device = f"{gpu['name']}, {gpu['memory_mib']:.0f} MiB" if gpu else "none seen (no nvidia-smi)"
    upstream = report.get("upstream") or {}
    lines = [
        "# adapt_gpu" + (" (dry run)" if report["dry_run"] else ""),
        "",
        f"- started {report['started_at']}, wall {report.get('wall_s')} s "
        f"(deadline {report['config'].get('deadline')} s)",
        *machine_lines(env, device),
        f"- data: {inputs.get('data')}: {inputs.get('train_examples')} train examples "
        f"({inputs.get('train_tasks')} tasks) x {report['config'].get('samples_per_example')} "
        f"samples, {inputs.get('test_examples')} test examples ({inputs.get('test_tasks')} tasks) "
        "x 17",
        f"- LLM: {' '.join(inputs.get('llm') or [])}, {upstream.get('processes')} upstream "
        f"process(es); scorer base {inputs.get('base')}",
        f"- train flags: {' '.join(inputs.get('train_flags') or [])}"
        + (
            f" (lacking: {', '.join(inputs['held_out_flags_missing'])})"
            if inputs.get("held_out_flags_missing")
            else ""
        ),
        "",
        "| phase | status | s | budget s | samples/s | rows per generate | GPU util % | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in report["phases"]:
        up = p.get("upstream") or {}
        lines.append(
            table_row(
                [
                    p["name"],
                    str(p["status"]),
                    cell(p.get("seconds")),
                    cell(p.get("budget_s")),
                    cell(up.get("samples_per_s")),
                    cell(up.get("mean_rows_per_generate")),
                    cell((p.get("gpu") or {}).get("util_mean")),
                    _phase_note(p),
                ]
            )
        )
    evaluation = report.get("eval")
    if evaluation:
        lines += [
            "",
            f"## Selection quality: Rouge-L x 100 on {evaluation['examples']} test examples "
            f"({evaluation['tasks']} tasks, mean over tasks)",
            "",
            "| " + " | ".join(METHOD_NAMES[m] for m in METHODS) + " |",
            "|" + "---:|" * len(METHODS),
            "| " + " | ".join(_points(evaluation["overall"].get(m)) for m in METHODS) + " |",
            "",
            "| method | " + " | ".join(str(k) for k in SUBSET_SIZES) + " samples |",
            "|---|" + "---:|" * len(SUBSET_SIZES),
        ]
        for m, by_k in evaluation["by_samples"].items():
            cells = [_points(by_k.get(str(k))) for k in SUBSET_SIZES]
            lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, interval in evaluation["bootstrap"].items():
            if interval:
                low = interval.get("low")
                high = interval.get("high")
                lines.append(
                    f"- {name}: {_points(interval.get('difference'))} "
                    f"(95% bootstrap {_points(low)} to {_points(high)})"
                )
        lines.append(f"- full report: {evaluation.get('report')}")
    return "\n".join(lines) + "\n"
