"""Collecting samples through the proxy's client: parsing the answers, and resuming after a crash
without asking the upstream twice for any answer it gave."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from adapt import planning, sampling
from adapt.cache import SampleCache
from adapt.errors import AdaptError
from tests.unit.adapt.fakes import (
    BASE,
    EXAMPLES,
    MODEL,
    Crash,
    FakeUpstream,
    answer_text,
    sampling_config,
)


def test_answers_are_parsed_with_their_logprobs() -> None:
    fake = FakeUpstream()
    sample = planning.plan(EXAMPLES[:1], sampling_config())[0]
    for endpoint, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
        body = planning.build_body(sample, sampling_config(logprobs=True, endpoint=endpoint))
        _, payload = fake.respond(path, body)
        record = sampling.parse_answer(sample, payload, endpoint)  # type: ignore[arg-type]
        assert record.text == answer_text(sample.seed)
        assert record.key == ("e0", sample.decoding.name, sample.seed)
        assert record.logprobs is not None
        # The completions answer's first value is null, as some servers send: left out.
        expected = len(record.text.split()) - (endpoint == "completions")
        assert len(record.logprobs) == expected


async def _collect(
    fake: FakeUpstream, cache_path: Path, config: planning.SamplingConfig, **kwargs: object
) -> sampling.CollectStats:
    planned = planning.plan(EXAMPLES, config)
    async with sampling.make_client(BASE, transport=fake.transport()) as client:
        with SampleCache(cache_path, config.header()) as cache:
            return await sampling.collect(
                planned,
                client,
                cache,
                config,
                progress=False,
                **kwargs,  # type: ignore[arg-type]
            )


def _crashed(answers: int, cache: Path, config: planning.SamplingConfig) -> FakeUpstream:
    """The upstream of a collection that crashed after `answers` answers."""
    crashing = FakeUpstream(crash_after=answers)
    with pytest.raises(Crash):
        asyncio.run(_collect(crashing, cache, config))
    return crashing


def test_resume_after_a_crash_asks_nothing_twice(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = sampling_config()
    crashing = _crashed(7, cache, config)
    assert crashing.answered == 7
    resumed = FakeUpstream()
    stats = asyncio.run(_collect(resumed, cache, config))
    assert (stats.planned, stats.cached, stats.fetched) == (20, 7, 13)
    # Across both runs every planned call was answered exactly once.
    both = crashing.calls + resumed.calls
    assert len(both) == 20 and set(both.values()) == {1}
    # A third run has nothing left to ask.
    idle = FakeUpstream()
    assert asyncio.run(_collect(idle, cache, config)).fetched == 0
    assert idle.bodies == []


def test_resume_after_a_torn_write_asks_only_the_torn_sample_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = sampling_config()
    first = _crashed(6, cache, config)
    lines = cache.read_bytes().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    cache.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])  # the last answer, half written
    second = FakeUpstream()
    stats = asyncio.run(_collect(second, cache, config))
    assert (stats.cached, stats.fetched) == (5, 15)
    repeated = [key for key, n in (first.calls + second.calls).items() if n > 1]
    assert repeated == [(f"Question {torn['example_id'][1:]}?", torn["seed"])]


def test_failed_calls_are_not_cached_and_asked_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = sampling_config()
    planned = planning.plan(EXAMPLES, config)
    bad = {planned[3].seed, planned[11].seed}
    failing = FakeUpstream(fail=lambda body: 400 if body["seed"] in bad else None)
    stats = asyncio.run(_collect(failing, cache, config))
    assert stats.fetched == 18 and sorted(k[2] for k, _ in stats.failed) == sorted(bad)
    retry = FakeUpstream()
    assert asyncio.run(_collect(retry, cache, config)).fetched == 2
    assert {b["seed"] for b in retry.bodies} == bad


def test_too_many_failures_stop_the_run(tmp_path: Path) -> None:
    down = FakeUpstream(fail=lambda _body: 400)
    with pytest.raises(AdaptError, match="4 upstream calls failed"):
        asyncio.run(_collect(down, tmp_path / "cache.jsonl", sampling_config(), max_failures=3))
    assert len(down.bodies) == 4


def test_concurrent_collection_caches_every_answer_once(tmp_path: Path) -> None:
    fake = FakeUpstream()
    cache = tmp_path / "cache.jsonl"
    stats = asyncio.run(_collect(fake, cache, sampling_config(), concurrency=4))
    assert stats.fetched == 20 and set(fake.calls.values()) == {1}
    assert len(cache.read_text().splitlines()) == 21


def test_the_model_defaults_to_the_first_listed() -> None:
    async def resolve() -> tuple[str, str]:
        async with sampling.make_client(BASE, transport=FakeUpstream().transport()) as client:
            return (
                await sampling.resolve_model(client, None),
                await sampling.resolve_model(client, "mine"),
            )

    assert asyncio.run(resolve()) == (MODEL, "mine")


# --- what is sent: the proxy's parameters, llama.cpp's sampler extras where accepted ------------
SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
OFF = {"min_p": 0.0, "repeat_penalty": 1.0}  # with top_k 0: llama.cpp's samplers switched off
EXTRAS_SENT = {
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **OFF},
    "temperature_0.9": {"temperature": 0.9, "top_p": 1.0, "top_k": 0, **OFF},
    "top_k_40": {"temperature": 1.0, "top_p": 1.0, "top_k": 40, **OFF},
    "top_p_0.95": {"temperature": 1.0, "top_p": 0.95, "top_k": 0, **OFF},
    "greedy": {"temperature": 0.0, "top_k": 0, **OFF},
}
PLAIN_SENT = {
    "sampling": {"temperature": 1.0, "top_p": 1.0},
    "temperature_0.9": {"temperature": 0.9, "top_p": 1.0},
    "top_k_40": {"temperature": 1.0, "top_p": 1.0},
    "top_p_0.95": {"temperature": 1.0, "top_p": 0.95},
    "greedy": {"temperature": 0.0},
}


def _gather(
    fake: FakeUpstream, cache: Path, samples: int = 4, **options: object
) -> tuple[planning.SamplingConfig, sampling.CollectStats]:
    opts = sampling.SamplingOptions(upstream=BASE, max_tokens=8, progress=False, **options)  # type: ignore[arg-type]
    gathering = sampling.gather(
        opts, EXAMPLES, cache, fake.transport(), logprobs=False, samples_per_example=samples
    )
    config, _, stats = asyncio.run(gathering)
    return config, stats


def _sent(fake: FakeUpstream) -> dict[tuple[str, int], dict[str, object]]:
    """Each call's sampling parameters, by (prompt, seed)."""
    return {
        (str(b["messages"][0]["content"]), int(b["seed"])): {
            k: b[k] for k in SAMPLER_FIELDS if k in b
        }
        for b in fake.bodies
    }


def _header(cache: Path) -> dict[str, object]:
    return json.loads(cache.read_text().splitlines()[0])["config"]


def test_an_upstream_taking_the_extras_gets_them_on_every_call(tmp_path: Path) -> None:
    fake = FakeUpstream()
    cache = tmp_path / "cache.jsonl"
    config, stats = _gather(fake, cache, samples=17)
    assert config.send_top_k and config.send_extras
    # Nothing asked twice, detection included: 5 examples x 17 samples.
    assert len(fake.bodies) == 5 * 17 and set(fake.calls.values()) == {1}
    assert (stats.fetched, stats.cached, stats.failed) == (85, 0, [])
    planned = {
        (s.example.instruction, s.seed): s.decoding.name for s in planning.plan(EXAMPLES, config)
    }
    for key, params in _sent(fake).items():
        assert params == EXTRAS_SENT[planned[key]]
    header = _header(cache)
    assert header["send_extras"] is True and header["sent"] == EXTRAS_SENT


def test_an_upstream_refusing_the_extras_is_detected_from_the_first_calls(tmp_path: Path) -> None:
    # OpenAI-like: any sampler field it does not know is a 400 (here one naming nothing).
    refusing = FakeUpstream(
        fail=lambda body: 400 if {"top_k", "min_p", "repeat_penalty"} & body.keys() else None
    )
    cache = tmp_path / "cache.jsonl"
    config, stats = _gather(refusing, cache)
    assert not config.send_top_k and not config.send_extras
    # Two calls were refused (the first with the extras, the first top-k 40 with top_k); each
    # was asked again, and its answer kept.
    assert len(refusing.bodies) == 20 + 2 and refusing.answered == 20
    assert (stats.fetched, stats.cached, stats.failed) == (20, 0, [])
    header = _header(cache)
    assert header["send_top_k"] is False and header["sent"] == PLAIN_SENT
    assert all(not {"top_k", "min_p", "repeat_penalty"} & b.keys() for b in refusing.bodies[3:])
    # Resuming asks nothing, and the cache's settings stand.
    idle = FakeUpstream()
    again, stats = _gather(idle, cache)
    assert idle.bodies == [] and stats.cached == 20 and again == config


def test_answers_asked_otherwise_than_the_settled_config_are_asked_again(tmp_path: Path) -> None:
    # The first call succeeds with the extras, the first top-k call only without them: that
    # first answer was drawn otherwise than every other "sampling" sample and is not kept.
    fake = FakeUpstream(
        fail=lambda body: 400 if body.get("top_k") == 40 and "min_p" in body else None
    )
    cache = tmp_path / "cache.jsonl"
    config, stats = _gather(fake, cache)
    assert config.send_top_k and not config.send_extras
    first = planning.plan(EXAMPLES, config)[0]
    assert fake.calls[(first.example.instruction, first.seed)] == 2
    assert (stats.fetched, stats.failed) == (20, [])
    assert _header(cache)["sent"]["top_k_40"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 40}


def test_no_top_k_sends_neither_and_asks_nothing_first(tmp_path: Path) -> None:
    fake = FakeUpstream()
    config, _ = _gather(fake, tmp_path / "cache.jsonl", send_top_k=False)
    assert not config.send_top_k and not config.send_extras
    assert len(fake.bodies) == 20
    assert all(not {"top_k", "min_p", "repeat_penalty"} & b.keys() for b in fake.bodies)


def test_a_cache_from_before_the_extras_resumes_without_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache.jsonl"
    old = sampling_config(send_extras=False)
    old_header = {k: v for k, v in old.header().items() if k not in ("send_extras", "sent")}
    first = FakeUpstream(crash_after=7)
    with pytest.raises(Crash):
        asyncio.run(_collect(first, cache, old))
    cache.write_text(
        json.dumps(
            {"type": "header", "format": "cappy-samples", "version": 1, "config": old_header}
        )
        + "\n"
        + "".join(cache.read_text().splitlines(keepends=True)[1:])
    )
    fake = FakeUpstream()
    with caplog.at_level(logging.WARNING):
        config, stats = _gather(fake, cache)
    assert "made before llama.cpp's sampler extras" in caplog.text
    assert config.send_top_k and not config.send_extras
    assert (stats.cached, stats.fetched) == (7, 13)
    assert all("min_p" not in b and b.get("top_k") in (None, 40) for b in fake.bodies)
    assert _header(cache) == old_header  # the file keeps its header
    # A run that insists on neither top_k nor the extras is refused: the cache sent top_k.
    with pytest.raises(AdaptError, match="send_top_k: cache has true, asked false"):
        _gather(FakeUpstream(), cache, send_top_k=False)


def test_detection_calls_count_as_failures(tmp_path: Path) -> None:
    down = FakeUpstream(fail=lambda _body: 400)
    with pytest.raises(AdaptError, match="3 upstream calls failed"):
        _gather(down, tmp_path / "cache.jsonl", max_failures=2)
    # Each sample asked with the extras, then without them; the top-k one then without top_k.
    assert [b["seed"] for b in down.bodies].count(down.bodies[-1]["seed"]) == 3
    assert len(down.bodies) == 2 + 2 + 3
    assert not (tmp_path / "cache.jsonl").exists()


@pytest.mark.parametrize("command", ["adapt data", "eval"])
def test_ctrl_c_stops_at_once_with_a_call_in_flight(command: str, tmp_path: Path) -> None:
    """Ctrl-C while the upstream holds a call: the command exits 130 without waiting for the
    answer (the upstream never gives it), and the cache holds every answer given before."""
    import signal
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from adapt.cache import read_cache
    from tests.support.servers import serving

    answered = 0
    held = threading.Event()
    release = threading.Event()

    class Upstream(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._json({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            nonlocal answered
            self.rfile.read(int(self.headers["content-length"]))
            if answered >= 2:  # the third call is held until the test ends
                held.set()
                release.wait(60)
                return
            answered += 1
            message = {"role": "assistant", "content": f"answer {answered}"}
            self._json({
                "id": "x", "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            })  # fmt: skip

    data = tmp_path / "examples.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"e{i}", "task": "t", "instruction": f"q{i}", "targets": ["a"]})
            + "\n"
            for i in range(3)
        )
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    with serving(server) as url:
        out = tmp_path / "out"
        if command == "adapt data":
            args = ["adapt", "data", "--train", str(data), "--out", str(out)]
        else:
            args = ["eval", "--data", str(data), "--out", str(out)]
        # A shell without job control that starts the suite in the background hands its
        # children SIGINT ignored, and Python then sets no KeyboardInterrupt handler: the child
        # gets Ctrl-C's handler back first, as a terminal would give it.
        launcher = (
            "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('cappy', run_name='__main__', alter_sys=True)"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, *args, "--upstream", f"{url}/v1", "--quiet"],
            cwd=Path(__file__).resolve().parents[3],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert held.wait(120), "the third call never reached the upstream"
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
            still_held = not release.is_set()
        finally:
            release.set()
            if process.poll() is None:
                process.kill()
    assert still_held and process.returncode == 130, err[-2000:]
    assert "re-run the same command to resume" in err
    _, records = read_cache(out / "samples.jsonl")
    assert len(records) == 2
