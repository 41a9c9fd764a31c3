"""The service's defaults, each stated once. `Settings` (service/settings.py) takes its fields'
defaults from here, and so do the configuration dataclasses of the engine and the proxy (for the
code and tests that build them without Settings), the benchmarks and `adapt`; the settings'
descriptions say what each one means."""

# --- scoring ------------------------------------------------------------------------------------
# Per device: (padded tokens per batch, pairs per batch). The CPU's: a batch of 8,192 padded
# tokens keeps both cores busy with little padding; a GPU gains from fuller batches.
DEVICE_BATCH_LIMITS: dict[str, tuple[int, int]] = {"cpu": (8192, 64), "cuda": (32768, 256)}
MAX_RESCORED = 16
# Per device: how long the oldest queued pair waits for company while the model idles (ms). A CPU
# gains little from the wait (a row of 160 tokens costs 7% more alone than in a batch of 9, and a
# lone request is cut across the idle streams at once): on 2 cores, 2 ms delayed every request
# at concurrency 1 and formed no larger batches under load, where the model is never idle
# (loadtests/README.md). A GPU runs a fuller batch for nearly the cost of a small one.
DEVICE_MAX_WAIT_MS: dict[str, float] = {"cpu": 0.0, "cuda": 2.0}
MAX_QUEUE_TOKENS = 400_000
# 10 s: a 2-core CPU at concurrency 32 on the benchmark's mix (up to 64 candidates a request)
# keeps its queue 4-8 s deep without being overloaded.
MAX_QUEUE_WAIT_S = 10.0
REQUEST_TIMEOUT_S = 60.0
# Share of MAX_QUEUE_WAIT_S kept for the retries that refusals promised, while any promise is
# open (service/engine/tickets.py): newcomers are admitted up to the rest.
RETRY_HEADROOM_SHARE = 0.2
PAD_TO_MULTIPLE = 8

# --- upstream and proxy -------------------------------------------------------------------------
UPSTREAM_API_KEY_HEADER = "authorization"
UPSTREAM_TIMEOUT_S = 60.0
UPSTREAM_MAX_IN_FLIGHT = 64
UPSTREAM_MAX_ATTEMPTS = 3
PROXY_MAX_SAMPLES = 64
PROXY_MIN_CANDIDATES = 1
PROXY_TIMEOUT_S = 120.0
PROXY_INSTRUCTION_MAX_CHARS = 2000
PROXY_STREAM_KEEPALIVE_S = 10.0
