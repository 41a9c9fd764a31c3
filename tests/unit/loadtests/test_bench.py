"""loadtests/bench.py and the closed loop end to end against a small fake server (in-process, and
as a subprocess for --self-contained), the locustfile against it too. One slow test drives a real
`cappy serve` on the tiny export."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loadtests import bench
from loadtests.closed_loop import benchmark
from loadtests.local_server import running_server
from loadtests.workload import load_workload
from tests.support.servers import serving
from tests.unit.loadtests.workloads import write_workload

# A stand-in for cappy-serve: /health, /ready, /info, /metrics and /select. The best candidate
# is the longest (ties to the lower index); a candidate containing "FAIL" answers 500. Runs
# in-process (make_server) and as a script (python fake_server.py --model X --host H --port P).
FAKE_SERVER = r"""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"batches": 0, "pairs": 0, "pad_sum": 0.0, "queue": [], "rejected": 0}
QUEUE_BOUNDS = (0.001, 0.01, 0.1, 1.0)


def metrics_text():
    with LOCK:
        lines = ["# HELP cappy_batch_size Pairs per model batch.",
                 "# TYPE cappy_batch_size histogram",
                 'cappy_batch_size_bucket{le="+Inf"} %d' % STATE["batches"],
                 "cappy_batch_size_count %d" % STATE["batches"],
                 "cappy_batch_size_sum %d" % STATE["pairs"],
                 "cappy_batch_tokens_count %d" % STATE["batches"],
                 "cappy_batch_tokens_sum %d" % (STATE["pairs"] * 10),
                 "cappy_batch_padding_fraction_count %d" % STATE["batches"],
                 "cappy_batch_padding_fraction_sum %f" % STATE["pad_sum"],
                 "cappy_pairs_scored_total %d" % STATE["pairs"]]
        for bound in QUEUE_BOUNDS:
            n = sum(1 for q in STATE["queue"] if q <= bound)
            lines.append('cappy_queue_time_seconds_bucket{le="%s"} %d' % (bound, n))
        lines.append('cappy_queue_time_seconds_bucket{le="+Inf"} %d' % len(STATE["queue"]))
        lines.append("cappy_queue_time_seconds_count %d" % len(STATE["queue"]))
        lines.append("cappy_queue_time_seconds_sum %f" % sum(STATE["queue"]))
        lines.append('cappy_requests_rejected_total{reason="overloaded"} %d' % STATE["rejected"])
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path in ("/health", "/ready"):
            self.answer(200, {"status": "ok"})
        elif self.path == "/info":
            self.answer(200, {"model": "fake", "runtime": {"engine": "fake"},
                              "limits": {"max_wait_ms": os.environ.get("CAPPY_MAX_WAIT_MS")}})
        elif self.path == "/metrics":
            self.answer(200, metrics_text().encode(), "text/plain; version=0.0.4")
        else:
            self.answer(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/score":
            self.answer(200, {"data": [{"index": i, "score": 0.5}
                                       for i in range(len(body["pairs"]))]})
            return
        if self.path == "/v1/rerank":
            self.answer(200, {"results": [{"index": 0, "relevance_score": 0.5}]})
            return
        if self.path != "/select":
            self.answer(404, {"error": "not found"})
            return
        candidates = body["candidates"]
        if any("FAIL" in c for c in candidates):
            with LOCK:
                STATE["rejected"] += 1
            self.answer(500, {"error": {"message": "boom"}})
            return
        best = max(range(len(candidates)), key=lambda i: (len(candidates[i]), -i))
        with LOCK:
            STATE["batches"] += 1
            STATE["pairs"] += len(candidates)
            STATE["pad_sum"] += 0.25
            STATE["queue"].extend([0.005] * len(candidates))
        self.answer(200, {"index": best, "candidate": candidates[best]})


def make_server(host="127.0.0.1", port=0):
    return ThreadingHTTPServer((host, port), Handler)


if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    server = make_server(args["--host"], int(args["--port"]))
    def stop(*_):
        threading.Thread(target=server.shutdown).start()
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    server.server_close()
"""


# --- end to end against the fake server ---------------------------------------------------------


@pytest.fixture
def fake_server_module(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER, encoding="utf-8")
    namespace: dict[str, Any] = {"__name__": "fake_server"}
    exec(compile(FAKE_SERVER, str(script), "exec"), namespace)
    return namespace, script


@pytest.fixture
def fake_url(fake_server_module: tuple[dict[str, Any], Path]) -> Iterator[str]:
    namespace, _ = fake_server_module
    with serving(namespace["make_server"]()) as url:
        yield url


def _workload(tmp_path: Path) -> tuple[Path, Path]:
    items: list[dict[str, Any]] = [
        {"id": i, "instruction": f"q{i}", "candidates": ["x" * ((i + k) % 5 + 1) for k in range(n)]}
        for i, n in enumerate([1, 4, 17, 4, 1, 17, 4, 4, 64, 1])
    ]
    items.append({"id": 99, "instruction": "q", "candidates": ["FAIL", "ok"]})
    workload = write_workload(tmp_path / "w.jsonl", items)
    reference = tmp_path / "ref.jsonl"
    rows = []
    for item in items:
        c: list[str] = item["candidates"]
        best = max(range(len(c)), key=lambda i: (len(c[i]), -i))
        if item["id"] == 3:
            best = (best + 1) % len(c)  # one deliberate disagreement
        rows.append({"id": item["id"], "index": best})
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return workload, reference


def test_bench_end_to_end_prints_one_json_line(
    fake_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload, reference = _workload(tmp_path)
    code = bench.main(
        [
            "--url",
            fake_url,
            "--requests",
            str(workload),
            "--concurrency",
            "3",
            "--warmup",
            "2",
            "--check-argmax",
            str(reference),
            "--label",
            "fake",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["label"] == "fake"
    assert figures["concurrency"] == 3
    assert figures["requests"] == 10  # the 11th answers 500
    assert figures["pairs"] == 1 + 4 + 17 + 4 + 1 + 17 + 4 + 4 + 64 + 1
    assert figures["errors"] == {"500": 1}
    latency = figures["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert figures["requests_per_s"] > 0 and figures["pairs_per_s"] > 0
    # The fake records one batch per answered request: warm-up requests are not in the diff.
    server = figures["server"]
    assert server["batches"] == 10
    assert server["mean_batch_size"] == pytest.approx(117 / 10)
    assert server["mean_padding_fraction"] == 0.25
    assert server["queue_time_mean_ms"] == pytest.approx(5.0)
    assert 1.0 <= server["queue_time_p50_ms_est"] <= 10.0
    assert server["rejected"] == {"overloaded": 1}
    argmax = figures["argmax"]
    assert argmax["compared"] == 7 and argmax["single_candidate"] == 3
    assert argmax["agreement"] == pytest.approx(6 / 7, abs=1e-5)
    assert argmax["disagreeing_ids"] == [3]
    assert figures["server_info"]["runtime"] == {"engine": "fake"}
    # The process's own CPU over the timed phase (here it also runs the fake server's thread).
    cores = os.cpu_count() or 1
    assert 0 <= figures["client_cpu_s"] <= cores * figures["seconds"] + 0.05


def test_bench_limit_and_duration_are_bounds(fake_url: str, tmp_path: Path) -> None:
    workload = load_workload(_workload(tmp_path)[0])
    limited = asyncio.run(benchmark(fake_url, workload, concurrency=2, limit=25))
    assert limited["requests"] + sum(limited["errors"].values()) == 25
    timed = asyncio.run(benchmark(fake_url, workload, concurrency=2, duration_s=0.3))
    assert timed["seconds"] < 5
    assert timed["requests"] > 0


def test_bench_refuses_a_non_loopback_target(tmp_path: Path) -> None:
    workload, _ = _workload(tmp_path)
    with pytest.raises(SystemExit, match="loopback"):
        bench.main(["--url", "http://192.168.1.10:8000", "--requests", str(workload)])


def test_self_contained_starts_and_sigterms_the_server(
    fake_server_module: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    _, script = fake_server_module
    workload = load_workload(_workload(tmp_path)[0], limit=5)
    with running_server(
        tmp_path, ["max_wait_ms=0"], ready_timeout_s=30, server=[sys.executable, str(script)]
    ) as url:
        assert url.startswith("http://127.0.0.1:")
        figures = asyncio.run(benchmark(url, workload, concurrency=2))
    assert figures["requests"] == 5
    assert figures["server_info"]["limits"] == {"max_wait_ms": "0"}
    # The server is gone: its port refuses connections.
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_self_contained_reports_a_server_that_dies(tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text("import sys; print('no model here'); sys.exit(3)\n", encoding="utf-8")
    with (
        pytest.raises(SystemExit, match="no model here"),
        running_server(tmp_path, [], ready_timeout_s=30, server=[sys.executable, str(script)]),
    ):
        pass


# --- a real cappy serve on the tiny export ------------------------------------------------------


@pytest.mark.slow
def test_against_a_real_server_and_reference(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [
        {
            "id": i,
            "instruction": f"Question {i}: what is {i} plus {i}?",
            "candidates": [f"answer {i + k} " * (k + 1) for k in range(n)],
        }
        for i, n in enumerate([1, 4, 17, 4, 9, 2])
    ]
    workload = write_workload(tmp_path / "w.jsonl", items)
    # The reference from the export's own source checkpoint (torch) and from its model.onnx.
    torch_ref, onnx_ref = tmp_path / "torch.jsonl", tmp_path / "onnx.jsonl"
    assert (
        bench.main(
            [
                "reference",
                "--export",
                str(tiny_export),
                "--requests",
                str(workload),
                "--out",
                str(torch_ref),
            ]
        )
        == 0
    )
    assert (
        bench.main(
            [
                "reference",
                "--export",
                str(tiny_export),
                "--backend",
                "onnx",
                "--requests",
                str(workload),
                "--out",
                str(onnx_ref),
            ]
        )
        == 0
    )
    capsys.readouterr()
    torch_rows = [json.loads(line) for line in torch_ref.read_text().splitlines()]
    onnx_rows = [json.loads(line) for line in onnx_ref.read_text().splitlines()]
    assert [r["id"] for r in torch_rows] == list(range(6))
    for t, o in zip(torch_rows, onnx_rows, strict=True):
        assert np.allclose(t["scores"], o["scores"], atol=1e-4)

    assert (
        bench.main(
            [
                "--self-contained",
                "--export",
                str(tiny_export),
                "--requests",
                str(workload),
                "--concurrency",
                "4",
                "--warmup",
                "2",
                "--check-argmax",
                str(torch_ref),
                "--serve-arg",
                "engine=onnxruntime",
                "--serve-arg",
                "precision=fp32",
                "--serve-arg",
                "max_wait_ms=1",
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out.strip())
    assert figures["requests"] == 6 and figures["errors"] == {}
    assert figures["pairs"] == 37
    assert figures["server"]["pairs_scored"] == 37
    assert figures["server"]["mean_batch_size"] > 0
    assert figures["server_info"]["runtime"]["engine"]
    assert figures["argmax"]["compared"] == 5
    # ONNX Runtime fp32 against PyTorch fp32: the tiny model's wide random weights keep
    # candidates far apart (its scores differ by far more than float noise), so every set agrees.
    assert figures["argmax"]["agreement"] == 1.0
    assert figures["serve_args"] == ["engine=onnxruntime", "precision=fp32", "max_wait_ms=1"]


def test_locustfile_runs_headless(fake_url: str, tmp_path: Path) -> None:
    """A short headless Locust run of the locustfile against the fake server (skipped without
    locust, which is not a project dependency: it monkey-patches the standard library, so it
    runs in its own process)."""
    beside = Path(sys.executable).with_name("locust")
    locust = str(beside) if beside.is_file() else shutil.which("locust")
    if locust is None:
        pytest.skip("locust is not installed (pip install locust)")
    workload, _ = _workload(tmp_path)
    root = Path(bench.__file__).parents[1]
    # Run from the repository root with it on the path, as loadtests/README.md says.
    env = {**os.environ, "CAPPY_BENCH_REQUESTS": str(workload), "PYTHONPATH": str(root)}
    # The workload's FAIL request answers 500: drop it so that the run has no failures.
    lines = workload.read_text(encoding="utf-8").splitlines()
    workload.write_text("\n".join(line for line in lines if "FAIL" not in line) + "\n")
    done = subprocess.run(
        [
            locust,
            "-f",
            str(root / "loadtests/locustfile.py"),
            "--host",
            fake_url,
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "3s",
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "/select [" in output


def test_module_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(bench.__file__).parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--self-contained" in done.stdout
