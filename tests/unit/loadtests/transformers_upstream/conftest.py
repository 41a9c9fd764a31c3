"""A tiny random causal LM (loadtests.transformers_upstream.standin), built once, and the upstream
server serving it in a thread on a free loopback port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests.transformers_upstream.batcher import Batcher
from loadtests.transformers_upstream.engine import Engine
from loadtests.transformers_upstream.server import Api, UpstreamServer


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loadtests.transformers_upstream.standin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def engine(tiny_llm: Path) -> Engine:
    return Engine.load(model_dir=tiny_llm, device="cpu")


@dataclass
class Served:
    server: UpstreamServer
    api: Api
    batcher: Batcher

    @property
    def url(self) -> str:
        return self.server.url


def serve(engine: Engine, *, start_batcher: bool = True, max_wait_s: float = 0.005) -> Served:
    batcher = Batcher(
        engine.generate_fitting, max_rows=16, max_batch_tokens=1 << 15, max_wait_s=max_wait_s
    )
    api = Api(engine, batcher, "tiny")
    server = UpstreamServer(("127.0.0.1", 0), api)
    if start_batcher:
        batcher.start()
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return Served(server, api, batcher)


def close(served: Served) -> None:
    served.server.shutdown()
    served.batcher.stop()
    served.server.server_close()


@pytest.fixture
def upstream(engine: Engine) -> Iterator[Served]:
    served = serve(engine)
    yield served
    close(served)
