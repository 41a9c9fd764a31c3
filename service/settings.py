"""The service's one typed settings object: environment variables with the prefix `CAPPY_`
(e.g. `CAPPY_MAX_BATCH_TOKENS=8192`), overridden by `cappy serve` flags and by tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import NoneType
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import defaults
from service.engine.types import Device, Engine, Precision

_CPU_LIMITS, _CUDA_LIMITS = (
    defaults.DEVICE_BATCH_LIMITS["cpu"],
    defaults.DEVICE_BATCH_LIMITS["cuda"],
)
# What an operator writes to unset a setting (any case); see Settings._empty_or_unset.
_UNSET_WORDS = frozenset({"null", "none"})


class Settings(BaseSettings):
    """Every knob of the service; the README's settings table lists the same names."""

    model_config = SettingsConfigDict(env_prefix="CAPPY_", extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------------------
    model: str = Field(
        "btan2/cappy-large",
        description="Export directory, local Hugging Face checkpoint or hub id. A checkpoint or "
        "hub id is exported once into `cache_dir` and reused.",
    )
    cache_dir: Path = Field(
        Path("~/.cache/cappy-serve/exports").expanduser(),
        description="Where exports of checkpoints and hub ids are kept between starts.",
    )
    model_name: str | None = Field(
        None,
        description="Name the API reports for the scorer (default: the served export's name, "
        "which follows a reload).",
    )
    device: Device = Field("auto", description="auto: CUDA when ONNX Runtime sees a GPU, else CPU.")
    engine: Engine = Field(
        "auto",
        description="auto: ONNX Runtime CUDA on GPU; on CPU the fastest faithful engine "
        "(OpenVINO bf16 where the CPU has native bf16, else ONNX Runtime fp32).",
    )
    precision: Precision = Field(
        "auto",
        description="auto: fp16 on GPU, bf16 or fp32 on CPU (see engine). int8: on CPU, "
        "when the export has a calibrated OpenVINO int8 model (cappy export --int8-calibration), "
        "int8 screening with the near-ties re-scored in bf16 then fp32 for ranking (/score in "
        "bf16); else model.int8.onnx on ONNX Runtime.",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="CPU inference threads (default: usable cores)."
    )
    streams: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Batches run at once. CPU (OpenVINO): inference streams, the threads split "
        "between them; 1: every thread on each batch (lowest latency at low load); unset: "
        "OpenVINO's throughput hint picks (2 on a 2-core machine). CUDA: ONNX Runtime sessions, "
        "each with its own CUDA stream, so that one batch's copies and preparation overlap "
        "another's kernels; unset: 2.",
    )
    allow_ungated: bool = Field(
        False,
        description="Serve graphs that did not pass a parity gate at export time: a variant "
        "whose parity could not be measured, or an export made with `cappy export --parity "
        "record` (benchmark stand-ins). Off: such an export or variant is refused; /info's "
        "`parity_gated` says which was served.",
    )
    max_rescored: int = Field(
        defaults.MAX_RESCORED,
        ge=1,
        le=1024,
        description="Most near-tied leaders of one ranking request that a more precise stage "
        "re-scores, all of them or none, so that a ranking compares one precision (candidates "
        "with identical tokens count once): bounds the work one request can buy.",
    )
    tensorrt: bool = Field(
        False,
        description="CUDA only: put ONNX Runtime's TensorRT execution provider (fp16) before "
        "CUDA; refused at start when its libraries are missing. Engines are built per shape "
        "and kept in `cache_dir`/tensorrt.",
    )

    # --- batcher ---------------------------------------------------------------------------------
    max_batch_tokens: int | None = Field(
        None,
        ge=64,
        le=1_048_576,
        description="Padded tokens per batch (rows x longest row). unset: "
        f"{_CPU_LIMITS[0]} on CPU, {_CUDA_LIMITS[0]} on CUDA.",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"Pairs per batch. unset: {_CPU_LIMITS[1]} on CPU, {_CUDA_LIMITS[1]} on CUDA.",
    )
    max_wait_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="How long a batch may wait to fill while the model idles. unset: "
        f"{defaults.DEVICE_MAX_WAIT_MS['cpu']:g} on CPU (a lone request is cut across the idle "
        f"streams at once), {defaults.DEVICE_MAX_WAIT_MS['cuda']:g} on GPU.",
    )
    max_queue_tokens: int = Field(
        defaults.MAX_QUEUE_TOKENS,
        ge=512,
        description="Tokens the queue may hold (a memory cap); beyond it requests get 429 with "
        "Retry-After.",
    )
    max_queue_wait_s: float | None = Field(
        defaults.MAX_QUEUE_WAIT_S,
        gt=0,
        le=3600,
        description="Longest expected queue wait (queued tokens at the model's recent pace, "
        "scaled by how much longer the oldest pairs have in fact waited) at which a request is "
        "still admitted; beyond it, or when the queue would make a request "
        "miss its deadline, 429 at once with a Retry-After of when it will have room, a promise "
        "the queue keeps: while refused requests hold one, newcomers are admitted up to "
        f"{1 - defaults.RETRY_HEADROOM_SHARE:.0%} of this limit. Admission looks at the queue, "
        "not at the request's size. unset: the token cap alone.",
    )
    padding_tolerance: float | None = Field(
        None,
        ge=0,
        description="Padding tokens a pair may add to a batch per token of its own. unset: "
        "0.1 on CPU (padding is wasted compute there), unlimited on GPU.",
    )
    split_across_streams: bool | None = Field(
        None,
        description="While the work at hand (queued, plus what running batches have left) is "
        "less than a batch for each stream, share it out: a batch holds at most its share, so "
        "that a lone request runs on every core and the streams finish together. unset: on for "
        "CPU, off for CUDA.",
    )
    pad_to_multiple: int = Field(
        defaults.PAD_TO_MULTIPLE,
        ge=1,
        le=512,
        description="Batch widths are padded up to a multiple of this (1: to the longest pair): "
        "fewer distinct shapes, measured faster on OpenVINO CPU; GPUs favour multiples of 8.",
    )
    cross_request_batching: bool = Field(
        True,
        description="Batch pairs of different requests together. false: each batch holds one "
        "request's pairs (the per-request baseline of the benchmarks).",
    )
    request_timeout_s: float = Field(
        defaults.REQUEST_TIMEOUT_S,
        gt=0,
        le=3600,
        description="Deadline of a scoring request, queueing included.",
    )

    # --- request limits --------------------------------------------------------------------------
    max_items_per_request: int = Field(
        1024,
        ge=1,
        le=100_000,
        description="Most pairs in one /score request, candidates in /select, documents in "
        "/v1/rerank.",
    )
    max_text_chars: int = Field(
        50_000, ge=1, description="Longest instruction, response, query or document (characters)."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body (bytes); beyond it 413."
    )

    # --- HTTP ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="Bind port.")
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when set every route but /health, /ready and "
        "/metrics wants `Authorization: Bearer <key>`.",
    )
    graceful_shutdown_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long in-flight requests may take to finish; what still "
        "runs then is answered 503.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    # --- best-of-N proxy (/v1/chat/completions, /v1/completions, /v1/models) --------------------
    upstream_base_url: str | None = Field(
        None,
        description="OpenAI-compatible upstream API root incl. version, e.g. "
        "https://api.openai.com/v1. Unset: the proxy routes answer 404.",
    )
    upstream_api_key: SecretStr | None = Field(None, description="Key sent to the upstream.")
    upstream_forward_client_key: bool = Field(
        False,
        description="Send the caller's own bearer token upstream instead of upstream_api_key "
        "(only when CAPPY_API_KEYS is unset: the bearer then is the upstream key).",
    )
    upstream_api_key_header: str = Field(
        defaults.UPSTREAM_API_KEY_HEADER,
        description="Header for the upstream key (Azure: api-key).",
    )
    upstream_timeout_s: float = Field(
        defaults.UPSTREAM_TIMEOUT_S, gt=0, description="One upstream call, retries included."
    )
    upstream_max_in_flight: int = Field(
        defaults.UPSTREAM_MAX_IN_FLIGHT,
        ge=1,
        le=4096,
        description="Global cap on upstream calls in flight.",
    )
    upstream_max_attempts: int = Field(
        defaults.UPSTREAM_MAX_ATTEMPTS, ge=1, le=10, description="Attempts per upstream call."
    )
    upstream_n_support: Literal["auto", "yes", "no"] = Field(
        "auto", description="Does the upstream honour n > 1 (auto: detect, top up if short)."
    )
    upstream_top_k_support: Literal["auto", "yes", "no"] = Field(
        "auto", description="Does the upstream accept top_k (auto: detect, else substitute)."
    )
    proxy_recipe: str | None = Field(
        None,
        description="JSON list of decodings, e.g. "
        '[{"name": "temp_0.9", "count": 4, "temperature": 0.9}]; unset: the paper\'s 17.',
    )
    proxy_max_samples: int = Field(
        defaults.PROXY_MAX_SAMPLES, ge=1, le=256, description="Most samples one request may ask."
    )
    proxy_min_candidates: int = Field(
        defaults.PROXY_MIN_CANDIDATES,
        ge=1,
        description="Fewest samples that must arrive to answer (else 502/504).",
    )
    proxy_timeout_s: float = Field(
        defaults.PROXY_TIMEOUT_S, gt=0, description="Deadline for gathering one request's samples."
    )
    proxy_instruction_max_chars: int = Field(
        defaults.PROXY_INSTRUCTION_MAX_CHARS,
        ge=1,
        description="Most characters of the instruction a chat conversation is rendered into for "
        "Cappy: over it, the turns before the last user turn are dropped, oldest first (then "
        "the system message); the last user turn and what follows it are always kept.",
    )
    proxy_stream_keepalive_s: float = Field(
        defaults.PROXY_STREAM_KEEPALIVE_S,
        gt=0,
        description="SSE keep-alive comment interval while samples are gathered; a stream's status "
        "line waits this long for the outcome.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_or_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty value (`CAPPY_X=`, what compose and Kubernetes pass for `X: ""`) means the
        setting's default; `null` or `none` (any case) means unset, for a setting that has an
        unset mode (its type allows None), and is refused with a reason for one that has not."""
        if not isinstance(value, str) or info.field_name is None:
            return value
        field = cls.model_fields[info.field_name]
        text = value.strip()
        if not text:
            return field.default
        if text.lower() in _UNSET_WORDS:
            if NoneType in get_args(field.annotation):
                return None
            raise PydanticCustomError(
                "no_unset_mode",
                "'{value}' means unset, and this setting cannot be unset; leave it empty for "
                "its default, {default}",
                {"value": value, "default": str(field.default)},
            )
        return value

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_batch_tokens is not None and self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError("max_queue_tokens must be at least max_batch_tokens")
        return self

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
