"""The `make_proxy` fixture: a BestOfN over a scripted upstream, its clients closed after."""

from __future__ import annotations

import random

import httpx
import pytest

from service.upstream.best_of_n import BestOfN, ProxyConfig
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.fanout import Support
from tests.support.upstream import BASE, SECRET, FakeUpstream, Scorer


@pytest.fixture
async def make_proxy():
    clients: list[UpstreamClient] = []

    def factory(
        upstream: FakeUpstream,
        scorer: Scorer | None = None,
        *,
        n_support: Support = "auto",
        top_k_support: Support = "auto",
        max_attempts: int = 1,
        call_timeout_s: float = 5.0,
        proxy_timeout_s: float = 5.0,
    ) -> BestOfN:
        client = UpstreamClient(
            UpstreamConfig(
                base_url=BASE,
                api_key=SECRET,
                max_attempts=max_attempts,
                timeout_s=call_timeout_s,
                backoff_base_s=0.001,
            ),
            transport=httpx.MockTransport(upstream.handler),
        )
        clients.append(client)
        config = ProxyConfig(
            n_support=n_support,
            top_k_support=top_k_support,
            timeout_s=proxy_timeout_s,
        )
        return BestOfN(client, scorer or Scorer(), config, rng=random.Random(7))

    yield factory
    for client in clients:
        await client.aclose()
