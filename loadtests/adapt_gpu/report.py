"""The report: adapt_gpu.json (rewritten atomically after every phase, so a run cut short still
says what it did) and adapt_gpu.md (the phases, the sampling throughput, training, and the
headline of `cappy eval`'s report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapt.selection import METHOD_NAMES, METHODS, OVERALL, SUBSET_METHODS, SUBSET_SIZES

HEADLINE_COMPARISONS = ("cappy - self_scoring", "cappy - greedy")


def write(out: Path, report: dict[str, Any]) -> None:
    path = out / "adapt_gpu.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    (out / "adapt_gpu.md").write_text(markdown(report), encoding="utf-8")


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


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


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
            f"({metric} {_cell(best.get(metric), '{:.4g}')}), "
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
        f"- GPU: {device}; CPU {env.get('cpu')} x{env.get('cores')}; python {env.get('python')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
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
            "| "
            + " | ".join(
                [
                    p["name"],
                    str(p["status"]),
                    _cell(p.get("seconds")),
                    _cell(p.get("budget_s")),
                    _cell(up.get("samples_per_s")),
                    _cell(up.get("mean_rows_per_generate")),
                    _cell((p.get("gpu") or {}).get("util_mean")),
                    _phase_note(p),
                ]
            )
            + " |"
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
