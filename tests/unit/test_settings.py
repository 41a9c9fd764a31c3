"""Settings: bounds are validated, environment variables apply, every knob is documented."""

from __future__ import annotations

from pathlib import Path
from types import NoneType, SimpleNamespace
from typing import get_args

import pytest
from pydantic import ValidationError

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPPY_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("CAPPY_API_KEYS", " k-secret-1 , k-secret-2 ,")
    settings = Settings()
    assert settings.max_batch_tokens == 4096
    assert settings.api_key_list() == ["k-secret-1", "k-secret-2"]
    assert "k-secret" not in repr(settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_batch_tokens": 0},
        {"max_batch_size": 0},
        {"port": 70000},
        {"device": "tpu"},
        {"max_queue_tokens": 1000, "max_batch_tokens": 4096},
        {"upstream_n_support": "maybe"},
    ],
)
def test_bounds(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        f"CAPPY_{name.upper()}"
        for name in Settings.model_fields
        if f"`CAPPY_{name.upper()}`" not in text
    ]
    assert missing == []


def test_batcher_defaults_are_the_services() -> None:
    """A batcher built without a config behaves as the served one."""
    from service.engine.batching_config import BatcherConfig

    settings, config = Settings(), BatcherConfig()
    assert config.max_batch_tokens == settings.max_batch_tokens
    assert config.max_batch_size == settings.max_batch_size
    assert config.max_wait_ms == settings.max_wait_ms
    assert config.max_queue_tokens == settings.max_queue_tokens
    assert config.max_queue_wait_s == settings.max_queue_wait_s
    assert config.default_timeout_s == settings.request_timeout_s
    assert config.padding_tolerance == settings.padding_tolerance
    assert config.pad_to_multiple == settings.pad_to_multiple
    assert config.cross_request == settings.cross_request_batching


async def test_the_chat_instruction_budget_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """CAPPY_PROXY_INSTRUCTION_MAX_CHARS reaches the proxy: a conversation over it is rendered
    without its oldest turns, one under the default keeps them."""
    from service.app import proxy_state
    from service.schemas.openai import ChatCompletionRequest

    turns = [{"role": "user", "content": f"question {i}: " + "words " * 40} for i in range(4)]
    request = ChatCompletionRequest(model="m", messages=turns)  # ~1,000 characters rendered
    runtime = SimpleNamespace(rank=None)
    base_url = "http://upstream.test/v1"

    default = proxy_state(Settings(upstream_base_url=base_url), runtime)
    monkeypatch.setenv("CAPPY_PROXY_INSTRUCTION_MAX_CHARS", "300")
    budgeted = proxy_state(Settings(upstream_base_url=base_url), runtime)
    assert default is not None and budgeted is not None
    try:
        assert default.best_of_n.config.instruction_max_chars == 2000
        assert budgeted.best_of_n.config.instruction_max_chars == 300
        kept = default.best_of_n.prepare(request).instruction
        cut = budgeted.best_of_n.prepare(request).instruction
        assert "question 0" in kept and "omitted" not in kept
        assert "[... 3 earlier messages omitted]" in cut and "question 3" in cut
        assert "question 0" not in cut
    finally:
        await default.client.aclose()
        await budgeted.client.aclose()


def _clear_cappy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"CAPPY_{name.upper()}", raising=False)


def _allows_none(name: str) -> bool:
    return NoneType in get_args(Settings.model_fields[name].annotation)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_an_empty_variable_means_the_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`VAR: ""` in compose or Kubernetes reaches the service as `CAPPY_VAR=`: the default
    (None for a setting whose default is unset), never an error."""
    _clear_cappy_environment(monkeypatch)
    monkeypatch.setenv(f"CAPPY_{name.upper()}", "")
    default = Settings.model_fields[name].default
    assert getattr(Settings(), name) == default
    monkeypatch.setenv(f"CAPPY_{name.upper()}", "  ")
    assert getattr(Settings(), name) == default


@pytest.mark.parametrize("word", ["null", "None", "NULL", " none "])
@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_null_unsets_what_can_be_unset(
    name: str, word: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_cappy_environment(monkeypatch)
    monkeypatch.setenv(f"CAPPY_{name.upper()}", word)
    if _allows_none(name):
        assert getattr(Settings(), name) is None
        return
    with pytest.raises(ValidationError) as raised:
        Settings()
    error = raised.value.errors()[0]
    assert error["loc"] == (name,)
    assert "cannot be unset" in error["msg"]
    assert str(Settings.model_fields[name].default) in error["msg"]  # says what empty gives


def test_the_queue_wait_can_be_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented "unset: the token cap alone" mode; empty keeps the 10 s default."""
    _clear_cappy_environment(monkeypatch)
    monkeypatch.setenv("CAPPY_MAX_QUEUE_WAIT_S", "null")
    assert Settings().max_queue_wait_s is None
    monkeypatch.setenv("CAPPY_MAX_QUEUE_WAIT_S", "")
    assert Settings().max_queue_wait_s == 10.0
    monkeypatch.setenv("CAPPY_MAX_QUEUE_WAIT_S", "2.5")
    assert Settings().max_queue_wait_s == 2.5
