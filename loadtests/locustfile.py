"""Locust load test for cappy-serve: a mix of /select (most), /v1/rerank and /score built from the
bench workload, closed loop (no think time).

    pip install locust
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 2m

Environment: CAPPY_BENCH_REQUESTS (workload JSONL, default ../shared/data/bench_requests.jsonl),
CAPPY_BENCH_API_KEY (sent as a bearer token), CAPPY_BENCH_SEED (request order, default 0).
Only loopback hosts are accepted, and a headless run without --run-time stops after 60 s.
`loadtests/bench.py` is the tool for reproducible figures; this file is for interactive load
(the web UI) and for shapes of traffic that bench.py does not produce.
"""

from __future__ import annotations

import os
import random
from typing import Any

from locust import FastHttpUser, constant, events, task

from loadtests.closed_loop import check_loopback
from loadtests.workload import (
    DEFAULT_REQUESTS,
    load_workload,
    rerank_body,
    score_body,
    select_body,
)

DEFAULT_RUN_TIME_S = 60
WORKLOAD = load_workload(os.environ.get("CAPPY_BENCH_REQUESTS", str(DEFAULT_REQUESTS)))
_API_KEY = os.environ.get("CAPPY_BENCH_API_KEY")
_SEED = int(os.environ.get("CAPPY_BENCH_SEED", "0"))
_users = 0


@events.init.add_listener
def _bounded_and_local(environment: Any, **_: Any) -> None:
    """Loopback targets only; a headless run gets a run time if none was given."""
    if environment.host:
        check_loopback(environment.host)
    options = environment.parsed_options
    if options is not None and getattr(options, "headless", False) and not options.run_time:
        options.run_time = DEFAULT_RUN_TIME_S


class CappyUser(FastHttpUser):
    """One closed-loop client: sends its next request as soon as the last one is answered."""

    wait_time = constant(0)

    def on_start(self) -> None:
        global _users
        _users += 1
        self.rng = random.Random(_SEED * 100_003 + _users)
        if _API_KEY:
            self.client.headers = {"Authorization": f"Bearer {_API_KEY}"}
        check_loopback(self.host or "")

    def _item(self) -> dict[str, Any]:
        return self.rng.choice(WORKLOAD)

    def _post(self, path: str, body: dict[str, Any], pairs: int) -> None:
        # Requests are named by route and candidate count: 1, 4, 17 and 64 in the bench workload.
        with self.client.post(
            path, json=body, name=f"{path} [{pairs}]", catch_response=True
        ) as response:
            if response.status_code == 429:
                response.failure("429 overloaded")
            elif response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(8)
    def select(self) -> None:
        item = self._item()
        self._post("/select", select_body(item), len(item["candidates"]))

    @task(1)
    def rerank(self) -> None:
        item = self._item()
        self._post("/v1/rerank", rerank_body(item), len(item["candidates"]))

    @task(1)
    def score(self) -> None:
        item = self._item()
        self._post("/score", score_body(item), len(item["candidates"]))
