"""The report: gpu_bench.json (rewritten atomically after every phase), gpu_bench.md (one table
row per phase) and the one-line summary of a phase in the progress log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtests.device_run import cell, machine_lines, save_report, table_row


def write(out: Path, report: dict[str, Any]) -> None:
    """`report` as out/gpu_bench.json (replaced whole, never half-written) and out/gpu_bench.md."""
    save_report(out, "gpu_bench", report, markdown(report))


def summary_line(record: dict[str, Any]) -> str:
    if record.get("pairs_per_s") is None:
        return record.get("error") or ""
    gpu = (record.get("gpu") or {}).get("util_mean")
    agreement = (record.get("argmax") or {}).get("agreement")
    latency = record.get("latency_ms") or {}
    return (
        f"{record['pairs']} pairs in {record['seconds']:.1f} s = {record['pairs_per_s']} pairs/s"
        f"; p50/p99 {cell(latency.get('p50'))}/{cell(latency.get('p99'))} ms"
        f"; GPU {cell(gpu, '{}%') or 'n/a'}; FLOP-limit {cell(record.get('flop_fraction'))}"
        f"; argmax {cell(agreement) or 'n/a'}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one table row per phase."""
    env = report["environment"]
    gpu = env.get("gpu") or {}
    model = report.get("model") or {}
    ref = report.get("reference") or {}
    config = report["config"]
    device = (
        f"{gpu['name']}, driver {gpu['driver']}, {gpu['memory_mib']:.0f} MiB"
        if gpu
        else "none seen (no nvidia-smi)"
    )
    lines = [
        "# gpu_bench" + (" (dry run)" if report["dry_run"] else ""),
        "",
        f"- started {report['started_at']}, wall {report.get('wall_s')} s",
        *machine_lines(env, device),
        f"- model: {model.get('family')} {model.get('size')} ({model.get('layers')} layers, "
        f"hidden {model.get('hidden')}, {model.get('encoder_parameters')} encoder parameters), "
        f"tokenizer {model.get('tokenizer')}, initializer_range {model.get('initializer_range')}",
        f"- workload: {report['workload']['requests']} requests, {report['workload']['pairs']} "
        f"pairs; device {config['device']}; peak {config['peak_tflops']} TFLOP/s",
        f"- argmax reference: {ref.get('scorer')}, {ref.get('subset')}; {ref.get('decisive')} "
        f"decisive sets, {ref.get('near_ties')} near ties excluded ({ref.get('near_tie')})",
        "",
        "| phase | status | requests | pairs | s | pairs/s | p50 ms | p99 ms | GPU util % "
        "| FLOP-limit fraction | argmax vs fp32 (sets) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        latency = p.get("latency_ms") or {}
        argmax = p.get("argmax") or {}
        agreement = argmax.get("agreement")
        note = p.get("error") or p.get("summary") or ""
        if p.get("errors"):
            note = f"errors {p['errors']} {note}"
        lines.append(
            table_row(
                [
                    p["name"],
                    str(p["status"]),
                    cell(p.get("requests")),
                    cell(p.get("pairs")),
                    cell(p.get("seconds", p.get("seconds_total"))),
                    cell(p.get("pairs_per_s")),
                    cell(latency.get("p50")),
                    cell(latency.get("p99")),
                    cell((p.get("gpu") or {}).get("util_mean")),
                    cell(p.get("flop_fraction")),
                    f"{agreement} ({argmax.get('compared')})" if agreement is not None else "",
                    note.replace("|", "/").replace("\n", " ")[:200],
                ]
            )
        )
    return "\n".join(lines) + "\n"
