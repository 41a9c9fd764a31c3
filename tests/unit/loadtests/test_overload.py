"""The overload scenario end to end, bounded: a real `cappy serve` on the MiniLM export, its
capacity measured, then flooded at 10x and brought back to normal load. What it must show: only
200s and 429s (each 429 with Retry-After), no request size starved, and that the server is
back after the flood: it answers the normal load again, about as fast as before the flood.

Every check is a count or a ratio of this run's own measurements: a loaded host stretches
every phase alike (the README's figures: 13.5 s to recover on a host at load 6-7), so no
wall-clock bound holds there, and none is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def workload(path: Path) -> Path:
    words = "the model answers a question about rivers mountains history code music".split()
    lines = []
    for i in range(60):
        size = 1 if i % 2 else 16
        candidates = [" ".join(words[(i + j) % len(words) :] + words[:j]) for j in range(size)]
        lines.append(
            json.dumps({"id": str(i), "instruction": f"question {i}?", "candidates": candidates})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_overload_is_refused_honestly_and_recovers(minilm_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    command = [
        sys.executable,
        "-m",
        "loadtests.overload",
        "--self-contained",
        "--export",
        str(minilm_export),
        "--requests",
        str(workload(tmp_path / "requests.jsonl")),
        "--serve-arg",
        "max_queue_wait_s=1.0",
        "--baseline-seconds",
        "2",
        "--capacity-seconds",
        "6",
        "--capacity-concurrency",
        "8",
        "--overload-seconds",
        "10",
        "--recovery-seconds",
        "10",
        "--recovery-load",
        "0.3",
        "--out",
        str(out),
    ]
    # ~1 min on a quiet machine; the bound is only for a run that hangs.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    flood, recovery = result["overload"], result["recovery"]
    assert set(flood["statuses"]) <= {"200", "429"}, flood["statuses"]
    assert flood["statuses"].get("429", 0) > 0  # it was overloaded
    assert flood["refused_without_retry_after"] == 0
    assert set(recovery["statuses"]) <= {"200", "429"}, recovery["statuses"]
    # Back after the flood, at 0.3x the capacity measured before it: admission reopened (an
    # honest server refuses half that load only if the host slowed over 6x meanwhile), and the
    # flood's queue is gone: the median answer is within the tool's own bar, 4x the unloaded
    # p95 of this run. (`recovery_s` is a max over single requests, which one late outlier on
    # a busy host sets: reported, not asserted.)
    context = {k: recovery[k] for k in ("statuses", "latency_ms", "recovery_s")}
    answered = recovery["statuses"].get("200", 0)
    assert recovery["sent"] > 0 and answered >= 0.5 * recovery["sent"], context
    median_s = recovery["latency_ms"]["p50"] / 1000
    assert median_s <= recovery["recovered_latency_threshold_s"], context
    shares = flood["ok_share_by_candidates"]
    assert shares["16"] > 0.3 * shares["1"]  # a 16-pair request is not starved by 1-pair ones
    # The server's own queue time of the flood's admitted pairs, against its 1 s limit, and the
    # probe's Retry-After values set against when its retries were admitted: reported.
    assert flood["server_queue_time"]["pairs"] > 0
    assert flood["server_queue_time"]["limit_s"] == 1.0
    probe = flood["retry_probe"]
    assert probe["sent"] >= 5 and probe["refused"] == len(probe["retry_after_vs_admitted_s"])
    rss = [row["rss_mb"] for row in flood["timeline"] if row["rss_mb"]]
    assert rss and min(rss) > 50  # the server's memory, sampled through the flood


def test_the_probe_sends_every_smallest_request_in_turn() -> None:
    from loadtests.overload import smallest

    items = [{"id": str(i), "candidates": ["x"] * (1 + i % 3)} for i in range(7)]
    # Distinct requests, as a real client's are: the server keys a refusal's promise on content.
    assert [item["id"] for item in smallest(items)] == ["0", "3", "6"]
