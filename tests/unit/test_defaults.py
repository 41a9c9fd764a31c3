"""Each default has one home: the configuration the engine and the proxy build without Settings
(dataclass defaults, function defaults) is what Settings gives, and what the app maps from
Settings is that same configuration."""

from __future__ import annotations

import inspect
from pathlib import Path

from service import defaults
from service.app import runtime_config
from service.engine.batching_config import DEVICE_BATCH_LIMITS, BatcherConfig
from service.engine.runtime import RuntimeConfig
from service.settings import Settings
from service.upstream import recipe, sse
from service.upstream.best_of_n import ProxyConfig
from service.upstream.client import UpstreamConfig


def _default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default  # type: ignore[arg-type]


def test_the_engine_built_without_settings_is_the_served_one() -> None:
    settings = Settings(model=".")
    served = runtime_config(settings)
    assert served == RuntimeConfig(export_dir=Path("."), trt_cache=served.trt_cache)
    assert BatcherConfig() == served.batcher
    assert DEVICE_BATCH_LIMITS is defaults.DEVICE_BATCH_LIMITS


def test_the_proxy_built_without_settings_is_the_served_one() -> None:
    settings = Settings()
    upstream = UpstreamConfig(base_url="http://upstream.test/v1")
    assert (upstream.timeout_s, upstream.max_in_flight, upstream.max_attempts) == (
        settings.upstream_timeout_s,
        settings.upstream_max_in_flight,
        settings.upstream_max_attempts,
    )
    assert upstream.api_key_header == settings.upstream_api_key_header
    proxy = ProxyConfig()
    assert (proxy.timeout_s, proxy.instruction_max_chars) == (
        settings.proxy_timeout_s,
        settings.proxy_instruction_max_chars,
    )
    assert (proxy.n_support, proxy.top_k_support) == (
        settings.upstream_n_support,
        settings.upstream_top_k_support,
    )
    assert _default(recipe.resolve_options, "max_samples") == settings.proxy_max_samples
    assert _default(recipe.Recipe.from_spec, "max_samples") == settings.proxy_max_samples
    assert _default(recipe.resolve_options, "default_min_candidates") == (
        settings.proxy_min_candidates
    )
    assert _default(sse.sse_stream, "keepalive_s") == settings.proxy_stream_keepalive_s
