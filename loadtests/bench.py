"""HTTP benchmark of a running cappy-serve: the fixed /select workload, closed loop at a given
concurrency, ONE JSON line of figures on stdout.

    python -m loadtests.bench --url http://127.0.0.1:8000 --concurrency 8 --limit 400
    python -m loadtests.bench --self-contained --export /tmp/ex/minilm --concurrency 8 \\
        --limit 400 --serve-arg max_wait_ms=0 --check-argmax ref.jsonl
    python -m loadtests.bench reference --checkpoint CKPT_DIR --out ref.jsonl --limit 400

Each workload line `{"id", "instruction", "candidates"}` is sent as POST /select
`{"instruction", "candidates"}`. `--concurrency` workers share one httpx.AsyncClient (keep-alive,
pool sized to the concurrency); each sends its next request as soon as its previous one is
answered. The run is bounded: the workload once, or `--limit` requests (the workload cycled if
it is shorter), or, with `--duration`, the workload cycled until the time is up or `--limit`
requests were sent, whichever comes first.
`--warmup N` requests go first and are not counted.

The figures: requests, pairs, seconds, requests/s, pairs/s, client-side latency percentiles,
errors by status, and from the server's /metrics (scraped before and after the timed phase,
differenced) the mean batch size, batch tokens and padding fraction, queue and inference time,
rejections by reason. `--check-argmax FILE` compares the returned best index with a reference
(`reference` writes one: fp32 PyTorch from the checkpoint, or ONNX Runtime fp32 from the export).

`--self-contained --export DIR` starts `cappy serve` on a free 127.0.0.1 port with any
`--serve-arg KEY=VALUE` settings (passed as CAPPY_KEY=VALUE), waits for /ready, runs, and stops it
with SIGTERM. Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_REQUESTS = Path(__file__).resolve().parents[1].parent / "shared/data/bench_requests.jsonl"
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
# With --duration and no --limit, the workload is cycled at most this many times.
MAX_CYCLES = 1000


# --- workload -----------------------------------------------------------------------------------


def load_workload(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Reads the JSONL workload (`{"id", "instruction", "candidates"}` per line)."""
    requests: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item.get("candidates"), list) or "instruction" not in item:
                raise ValueError(f"{path}:{number}: needs 'instruction' and a 'candidates' list")
            item.setdefault("id", number - 1)
            requests.append(item)
            if limit is not None and len(requests) >= limit:
                break
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def select_body(item: dict[str, Any]) -> dict[str, Any]:
    """The POST /select body for one workload line."""
    return {"instruction": item["instruction"], "candidates": item["candidates"]}


def rerank_body(item: dict[str, Any], top_n: int | None = 3) -> dict[str, Any]:
    """The POST /v1/rerank body for one workload line (the locustfile's mix)."""
    body: dict[str, Any] = {"query": item["instruction"], "documents": item["candidates"]}
    if top_n is not None:
        body["top_n"] = min(top_n, len(item["candidates"]))
    return body


def score_body(item: dict[str, Any]) -> dict[str, Any]:
    """The POST /score body for one workload line: one pair per candidate."""
    return {
        "pairs": [{"instruction": item["instruction"], "response": c} for c in item["candidates"]]
    }


def schedule(
    workload: Sequence[dict[str, Any]], limit: int | None, cycle: bool
) -> Iterator[dict[str, Any]]:
    """The requests to send, in order: the workload once, or cycled (bounded) when `cycle`."""
    sent = 0
    for _ in range(MAX_CYCLES if cycle else 1):
        for item in workload:
            if limit is not None and sent >= limit:
                return
            yield item
            sent += 1


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: `buckets` are (upper bound, cumulative count) sorted by
    bound, the last one +Inf. Linear interpolation inside the bucket; a quantile that falls in the
    +Inf bucket answers the largest finite bound. None when the histogram is empty."""
    if not 0 <= q <= 1:
        raise ValueError("q must be within [0, 1]")
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            in_bucket = count - previous_count
            if in_bucket <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / in_bucket
        previous_bound, previous_count = bound, count
    return previous_bound


# --- Prometheus text ----------------------------------------------------------------------------

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> dict[Sample, float]:
    """Prometheus text exposition -> {(sample name, labels): value}. Comments, blank lines and
    timestamps are ignored."""
    samples: dict[Sample, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        labels: frozenset[tuple[str, str]] = frozenset()
        if "{" in line:
            name, rest = line.split("{", 1)
            label_text, _, value_text = _split_labels(rest)
            labels = frozenset(_parse_labels(label_text).items())
        else:
            name, _, value_text = line.partition(" ")
        value_text = value_text.strip().split(" ")[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        samples[(name.strip(), labels)] = value
    return samples


def _split_labels(rest: str) -> tuple[str, str, str]:
    """Splits `a="x",b="y"} 1.0` at the closing brace, honouring quoted strings."""
    quoted = escaped = False
    for i, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return rest[:i], "}", rest[i + 1 :]
    raise ValueError(f"unterminated label set: {rest!r}")


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in ", ":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        if text[i] != '"':
            raise ValueError(f"label value not quoted: {text!r}")
        i += 1
        value: list[str] = []
        while text[i] != '"':
            if text[i] == "\\":
                i += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[i], text[i]))
            else:
                value.append(text[i])
            i += 1
        labels[key] = "".join(value)
        i += 1
    return labels


def _total(samples: dict[Sample, float], name: str, **match: str) -> float:
    """Sum of the samples called `name` whose labels include `match`."""
    wanted = set(match.items())
    return sum(v for (n, labels), v in samples.items() if n == name and wanted <= labels)


def _buckets(samples: dict[Sample, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) of histogram `name` (summed over its other labels), by bound."""
    by_bound: dict[float, float] = {}
    for (n, labels), value in samples.items():
        if n != f"{name}_bucket":
            continue
        le = dict(labels).get("le")
        if le is None:
            continue
        bound = float(le)
        by_bound[bound] = by_bound.get(bound, 0.0) + value
    return sorted(by_bound.items())


def _by_label(samples: dict[Sample, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def metrics_diff(before: dict[Sample, float], after: dict[Sample, float]) -> dict[str, Any]:
    """Server-side figures for the interval between two /metrics scrapes (counters and histograms
    differenced; a restarted server shows up as negative counts and yields an error entry)."""
    diff = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in set(before) | set(after)}

    def mean(name: str) -> float | None:
        count = _total(diff, f"{name}_count")
        return _total(diff, f"{name}_sum") / count if count > 0 else None

    def quantile_ms(name: str, q: float) -> float | None:
        value = histogram_quantile(q, _buckets(diff, name))
        return None if value is None else value * 1000

    batches = _total(diff, "cappy_batch_size_count")
    if batches < 0:
        return {"error": "the server's counters went down between scrapes (restarted?)"}
    queue_mean = mean("cappy_queue_time_seconds")
    inference_mean = mean("cappy_inference_time_seconds")
    rejected = {
        k: int(v)
        for k, v in _by_label(diff, "cappy_requests_rejected_total", "reason").items()
        if v
    }
    dropped = {
        k: int(v) for k, v in _by_label(diff, "cappy_pairs_dropped_total", "reason").items() if v
    }
    cpu_s = _total(diff, "process_cpu_seconds_total")
    pairs = _total(diff, "cappy_pairs_scored_total")
    return {
        "batches": int(batches),
        "mean_batch_size": _round(mean("cappy_batch_size"), 2),
        "mean_batch_tokens": _round(mean("cappy_batch_tokens"), 1),
        "mean_padding_fraction": _round(mean("cappy_batch_padding_fraction"), 4),
        "pairs_scored": int(_total(diff, "cappy_pairs_scored_total")),
        "tokens_scored": int(_total(diff, "cappy_tokens_scored_total")),
        "pairs_truncated": int(_total(diff, "cappy_pairs_truncated_total")),
        "queue_time_mean_ms": _round(None if queue_mean is None else queue_mean * 1000, 2),
        "queue_time_p50_ms_est": _round(quantile_ms("cappy_queue_time_seconds", 0.5), 2),
        "queue_time_p95_ms_est": _round(quantile_ms("cappy_queue_time_seconds", 0.95), 2),
        "inference_time_mean_ms": _round(
            None if inference_mean is None else inference_mean * 1000, 2
        ),
        "inference_busy_s": _round(_total(diff, "cappy_inference_time_seconds_sum"), 3),
        "tokenize_time_mean_ms": _round(
            None if (m := mean("cappy_tokenize_time_seconds")) is None else m * 1000, 2
        ),
        "rejected": rejected,
        "pairs_dropped": dropped,
        # CPU the server process used (all threads), and pairs per CPU-second: less moved by
        # other tenants of a shared host than wall-clock rates.
        "cpu_s": _round(cpu_s, 2) if cpu_s else None,
        "pairs_per_cpu_s": _round(pairs / cpu_s, 1) if cpu_s else None,
        # Near-tied leaders re-scored for ranking, by the precision that re-scored them (pairs
        # re-scored in bf16 by the batcher are in pairs_scored and the batch figures too).
        "pairs_rescored": {
            k: int(v)
            for k, v in _by_label(diff, "cappy_pairs_rescored_total", "precision").items()
            if v
        },
    }


# --- the load loop ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: its workload id, status (0 for a transport error), latency and answer."""

    id: Any
    pairs: int
    status: int
    latency_s: float
    index: int | None = None
    error: str | None = None


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0


def check_loopback(url: str) -> None:
    """Refuses any target that is not on this machine's loopback range."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"error: {url}: only loopback targets (127.0.0.0/8, ::1, localhost)")


async def _send(client: httpx.AsyncClient, item: dict[str, Any]) -> Outcome:
    pairs = len(item["candidates"])
    started = time.perf_counter()
    try:
        response = await client.post("/select", json=select_body(item))
    except httpx.HTTPError as exc:
        return Outcome(
            item["id"], pairs, 0, time.perf_counter() - started, error=type(exc).__name__
        )
    latency = time.perf_counter() - started
    index = None
    if response.status_code == 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            index = int(response.json()["index"])
    return Outcome(item["id"], pairs, response.status_code, latency, index=index)


async def drive(
    client: httpx.AsyncClient,
    items: Iterable[dict[str, Any]],
    concurrency: int,
    duration_s: float | None = None,
) -> RunResult:
    """Closed loop: `concurrency` workers send the next item as soon as their last one is
    answered, until the items run out or `duration_s` has passed (requests in flight then are
    finished and counted)."""
    iterator = iter(items)
    result = RunResult()
    started = time.perf_counter()
    stop_at = None if duration_s is None else started + duration_s

    async def worker() -> None:
        while stop_at is None or time.perf_counter() < stop_at:
            item = next(iterator, None)
            if item is None:
                return
            result.outcomes.append(await _send(client, item))

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    result.seconds = time.perf_counter() - started
    return result


def summarize(result: RunResult, reference: dict[str, int] | None = None) -> dict[str, Any]:
    """Client-side figures of a run."""
    ok = [o for o in result.outcomes if o.status == 200]
    latencies_ms = [o.latency_s * 1000 for o in ok]
    errors = Counter(
        str(o.status if o.status else o.error) for o in result.outcomes if o.status != 200
    )
    pairs = sum(o.pairs for o in ok)
    seconds = result.seconds
    figures: dict[str, Any] = {
        "requests": len(ok),
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else None,
        "pairs_per_s": round(pairs / seconds, 1) if seconds > 0 else None,
        "latency_ms": {
            "p50": _round(percentile(latencies_ms, 50), 1),
            "p95": _round(percentile(latencies_ms, 95), 1),
            "p99": _round(percentile(latencies_ms, 99), 1),
            "max": _round(max(latencies_ms) if latencies_ms else None, 1),
            "mean": _round(sum(latencies_ms) / len(latencies_ms) if latencies_ms else None, 1),
        },
        "errors": dict(sorted(errors.items())),
    }
    if reference is not None:
        figures["argmax"] = argmax_agreement(ok, reference)
    return figures


def argmax_agreement(outcomes: Iterable[Outcome], reference: dict[str, int]) -> dict[str, Any]:
    """Share of answered requests whose returned best index equals the reference's; requests
    with one candidate agree trivially and are counted apart."""
    compared = agree = trivial = missing = 0
    disagreed: list[Any] = []
    for outcome in outcomes:
        expected = reference.get(str(outcome.id))
        if expected is None or outcome.index is None:
            missing += 1
            continue
        if outcome.pairs == 1:
            trivial += 1
            continue
        compared += 1
        if outcome.index == expected:
            agree += 1
        elif str(outcome.id) not in {str(d) for d in disagreed}:
            disagreed.append(outcome.id)
    return {
        "agreement": round(agree / compared, 5) if compared else None,
        "compared": compared,
        "single_candidate": trivial,
        "not_in_reference": missing,
        "disagreeing_ids": disagreed[:20],
    }


def load_reference(path: str | Path) -> dict[str, int]:
    """{id: index} from a JSONL of {"id", "index", ...}."""
    reference: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                reference[str(row["id"])] = int(row["index"])
    return reference


async def scrape(client: httpx.AsyncClient) -> dict[Sample, float] | None:
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


async def server_info(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The served engine and batcher limits, from /info (None when it is not readable)."""
    try:
        response = await client.get("/info")
        if response.status_code != 200:
            return None
        info = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return {
        "model": info.get("model"),
        "runtime": info.get("runtime"),
        "limits": info.get("limits"),
    }


async def benchmark(
    url: str,
    workload: Sequence[dict[str, Any]],
    *,
    concurrency: int,
    limit: int | None = None,
    duration_s: float | None = None,
    warmup: int = 0,
    api_key: str | None = None,
    reference: dict[str, int] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Warms up, scrapes /metrics, runs the timed phase, scrapes again; returns the figures."""
    check_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(
        max_connections=concurrency + 2,
        max_keepalive_connections=concurrency + 2,
        keepalive_expiry=60.0,
    )
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        if warmup > 0:
            # From the end of the workload, so that the timed phase does not start with the same
            # requests (nothing is cached server-side, but the client should not assume it).
            await drive(client, schedule(workload[::-1], warmup, cycle=True), concurrency)
        info = await server_info(client)
        load_before = os.getloadavg()[0]
        before = await scrape(client)
        client_cpu = time.process_time()
        run = await drive(
            client,
            schedule(workload, limit, cycle=duration_s is not None or limit is not None),
            concurrency,
            duration_s,
        )
        client_cpu = time.process_time() - client_cpu
        after = await scrape(client)
        load_after = os.getloadavg()[0]
    figures: dict[str, Any] = {"concurrency": concurrency, **summarize(run, reference)}
    figures["server"] = (
        metrics_diff(before, after)
        if before is not None and after is not None
        else {"error": "/metrics not readable"}
    )
    if info is not None:
        figures["server_info"] = info
    # This process's own CPU during the timed phase: on a small machine the load generator
    # competes with the server for the same cores.
    figures["client_cpu_s"] = round(client_cpu, 2)
    figures["warmup"] = warmup
    figures["loadavg_1m"] = {"before": round(load_before, 2), "after": round(load_after, 2)}
    return figures


# --- self-contained mode ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(serve_args: Sequence[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `cappy serve`: `KEY=VALUE` -> `CAPPY_KEY=VALUE` (any Settings field)."""
    env = dict(os.environ if base is None else base)
    for arg in serve_args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --serve-arg {arg!r}: expected KEY=VALUE")
        env["CAPPY_" + key.strip().upper().replace("-", "_")] = value
    return env


@contextlib.contextmanager
def running_server(
    export: str | Path,
    serve_args: Sequence[str],
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
    api_key: str | None = None,
    server: Sequence[str] | None = None,
) -> Iterator[str]:
    """Starts `cappy serve` on a free loopback port, yields its URL once /ready answers 200, and
    stops it with SIGTERM (SIGKILL if it has not exited after STOP_TIMEOUT_S).

    `server` replaces the `python -m cappy.cli serve` prefix of the command (tests use a fake).
    """
    port = free_port()
    env = serve_env(serve_args)
    env.setdefault("CAPPY_LOG_LEVEL", "warning")
    prefix = list(server) if server else [sys.executable, "-m", "cappy.cli", "serve"]
    command = [*prefix, "--model", str(export), "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="cappy-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log.name, ready_timeout_s, api_key)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully: -SIGTERM
        # after our SIGTERM is a clean exit too.
        if process.returncode in (0, -signal.SIGTERM):
            Path(log.name).unlink(missing_ok=True)
        else:
            print(f"cappy serve exited with {process.returncode}; log: {log.name}", file=sys.stderr)


def _wait_ready(
    url: str, process: subprocess.Popen[Any], log: str, timeout_s: float, api_key: str | None
) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=5.0, headers=headers) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = Path(log).read_text(encoding="utf-8", errors="replace")[-3000:]
                raise SystemExit(f"error: cappy serve exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                response = client.get("/ready")
                if response.status_code == 200:
                    return
                if response.status_code == 503 and client.get("/health").status_code == 503:
                    tail = Path(log).read_text(encoding="utf-8", errors="replace")[-3000:]
                    raise SystemExit(f"error: the model failed to load:\n{tail}")
            time.sleep(0.25)
    raise SystemExit(f"error: cappy serve not ready after {timeout_s:.0f} s (log: {log})")


# --- the fp32 reference -------------------------------------------------------------------------


def _reference_checkpoint(export: Path | None) -> Path | None:
    """The export's source checkpoint when it is a local directory (from its manifest)."""
    if export is None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
        source = Path(str(manifest["source"]["model"]))
        if (source / "config.json").is_file():
            return source
    return None


def batches_by_length(
    lengths: Sequence[int], max_tokens: float = math.inf, max_rows: float = math.inf
) -> list[list[int]]:
    """Index lists sorted by length, cut so that rows x longest row stays within `max_tokens`
    and rows within `max_rows` (a single longer row goes alone): the in-process batching of
    every benchmark here."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest row is the longest
        if current and ((len(current) + 1) * lengths[i] > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class _TorchReference:
    """fp32 PyTorch scorer from a Hugging Face checkpoint (the export's ground truth)."""

    def __init__(self, checkpoint: Path, max_length: int, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, torch_dtype=torch.float32
        ).eval()
        self.max_length = max_length
        self.name = f"torch fp32 ({checkpoint})"

    def _encode(self, instruction: str, candidates: Sequence[str], **options: Any) -> Any:
        return self.tokenizer(
            [instruction] * len(candidates),
            list(candidates),
            truncation="longest_first",
            max_length=self.max_length,
            **options,
        )

    def lengths(self, instruction: str, candidates: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._encode(instruction, candidates)["input_ids"]]

    def score(self, instruction: str, candidates: Sequence[str]) -> list[float]:
        batch = self._encode(instruction, candidates, padding=True, return_tensors="pt")
        with self.torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(v) for v in logits[:, 0].tolist()]


class _OnnxReference:
    """ONNX Runtime fp32 (CPU provider) on the export's model.onnx."""

    def __init__(self, export: Path, threads: int | None) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
        self.np = np
        self.inputs = list(manifest["inputs"])
        self.pad = int(manifest.get("pad_token_id") or 0)
        self.tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(manifest["max_length"]), strategy="longest_first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_file = manifest["models"]["fp32"]["file"]
        self.session = ort.InferenceSession(
            str(export / model_file), options, providers=["CPUExecutionProvider"]
        )
        self.output = str(manifest.get("output") or "logits")
        self.name = f"onnxruntime fp32 ({export / model_file})"

    def _encode(self, instruction: str, candidates: Sequence[str]) -> list[Any]:
        return self.tokenizer.encode_batch([(instruction, c) for c in candidates])

    def lengths(self, instruction: str, candidates: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(instruction, candidates)]

    def score(self, instruction: str, candidates: Sequence[str]) -> list[float]:
        np = self.np
        encoded = self._encode(instruction, candidates)
        width = max(len(e.ids) for e in encoded)
        feeds = {
            "input_ids": np.full((len(encoded), width), self.pad, dtype=np.int64),
            "attention_mask": np.zeros((len(encoded), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encoded), width), dtype=np.int64),
        }
        for row, e in enumerate(encoded):
            n = len(e.ids)
            feeds["input_ids"][row, :n] = e.ids
            feeds["attention_mask"][row, :n] = 1
            feeds["token_type_ids"][row, :n] = e.type_ids
        feeds = {name: feeds[name] for name in self.inputs}
        (logits,) = self.session.run([self.output], feeds)
        return [float(v) for v in logits[:, 0].tolist()]


def write_reference(argv: Sequence[str]) -> int:
    """`reference`: the fp32 argmax (and scores) of every workload request, as JSONL."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench reference",
        description="Compute fp32 reference scores and argmax per workload request (JSONL "
        "{id, index, scores}) for --check-argmax. PyTorch fp32 from the checkpoint when one is "
        "given or the export's manifest names a local one, else ONNX Runtime fp32 from the "
        "export's model.onnx.",
    )
    parser.add_argument("--requests", default=str(DEFAULT_REQUESTS), help="workload JSONL")
    parser.add_argument("--out", required=True, help="JSONL to write")
    parser.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory")
    parser.add_argument("--export", default=None, help="export directory")
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncation length (default: the export's, else 512)",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    export = Path(args.export) if args.export else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else _reference_checkpoint(export)
    max_length = args.max_length
    if max_length is None and export is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
            max_length = int(manifest["max_length"])
    max_length = max_length or 512
    backend = args.backend
    if backend == "auto":
        backend = "torch" if checkpoint is not None else "onnx"
    scorer: _TorchReference | _OnnxReference
    if backend == "torch":
        if checkpoint is None:
            raise SystemExit(
                "error: --backend torch needs --checkpoint (or an export whose "
                "manifest names a local checkpoint)"
            )
        scorer = _TorchReference(checkpoint, max_length, args.threads)
    else:
        if export is None:
            raise SystemExit("error: --backend onnx needs --export")
        scorer = _OnnxReference(export, args.threads)

    workload = load_workload(args.requests, args.limit)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    total_pairs = sum(len(r["candidates"]) for r in workload)
    with (
        open(partial, "w", encoding="utf-8") as handle,
        tqdm(
            total=total_pairs, unit="pair", desc=f"reference ({backend} fp32)", file=sys.stderr
        ) as progress,
    ):
        for item in workload:
            candidates = item["candidates"]
            lengths = scorer.lengths(item["instruction"], candidates)
            scores = [0.0] * len(candidates)
            for batch in batches_by_length(lengths, args.max_batch_tokens):
                values = scorer.score(item["instruction"], [candidates[i] for i in batch])
                for i, value in zip(batch, values, strict=True):
                    scores[i] = value
                progress.update(len(batch))
            best = min(range(len(scores)), key=lambda i: (-scores[i], i))
            ordered = sorted(scores, reverse=True)
            margin = ordered[0] - ordered[1] if len(ordered) > 1 else None
            handle.write(
                json.dumps({"id": item["id"], "index": best, "scores": scores, "margin": margin})
                + "\n"
            )
    partial.replace(out)
    print(
        json.dumps(
            {
                "reference": str(out),
                "backend": scorer.name,
                "requests": len(workload),
                "pairs": total_pairs,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="a running server (loopback only)")
    target.add_argument(
        "--self-contained",
        action="store_true",
        help="start `cappy serve --model EXPORT` on a free port for the run",
    )
    parser.add_argument("--export", default=None, help="export directory (--self-contained)")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server setting for --self-contained, e.g. max_batch_size=64 "
        "(sent as CAPPY_MAX_BATCH_SIZE); repeatable",
    )
    parser.add_argument("--requests", default=str(DEFAULT_REQUESTS), help="workload JSONL")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="timed requests (default: the workload once; with --duration, no limit but the time)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds of timed load")
    parser.add_argument("--warmup", type=int, default=0, help="untimed requests sent first")
    parser.add_argument(
        "--check-argmax",
        default=None,
        metavar="FILE",
        help="reference JSONL of {id, index} (see the reference subcommand)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CAPPY_BENCH_API_KEY"),
        help="sent as Authorization: Bearer (env CAPPY_BENCH_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    parser.add_argument("--label", default=None, help="free text copied into the JSON line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reference":
        return write_reference(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("error: --concurrency must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise SystemExit("error: --duration must be positive")
    workload = load_workload(args.requests)
    reference = load_reference(args.check_argmax) if args.check_argmax else None

    def run(url: str) -> dict[str, Any]:
        return asyncio.run(
            benchmark(
                url,
                workload,
                concurrency=args.concurrency,
                limit=args.limit,
                duration_s=args.duration,
                warmup=args.warmup,
                api_key=args.api_key,
                reference=reference,
                timeout_s=args.timeout,
            )
        )

    if args.self_contained:
        if not args.export:
            raise SystemExit("error: --self-contained needs --export DIR")
        with running_server(
            args.export, args.serve_arg, ready_timeout_s=args.ready_timeout, api_key=args.api_key
        ) as url:
            figures = run(url)
        figures["serve_args"] = list(args.serve_arg)
    else:
        figures = run(args.url or "http://127.0.0.1:8000")
    if args.label:
        figures = {"label": args.label, **figures}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
