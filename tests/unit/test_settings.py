"""Settings: bounds are validated, environment variables apply, every knob is documented."""

from __future__ import annotations

from pathlib import Path

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
    from service.engine.batcher import BatcherConfig

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
