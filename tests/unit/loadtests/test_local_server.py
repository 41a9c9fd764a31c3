"""loadtests/local_server.py: --serve-arg settings as the server's environment (the server itself
is started in test_bench.py)."""

from __future__ import annotations

import pytest

from loadtests.local_server import serve_env


def test_serve_env_maps_settings() -> None:
    env = serve_env(["max_batch_size=64", "max-wait-ms=0"], base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CAPPY_MAX_BATCH_SIZE": "64", "CAPPY_MAX_WAIT_MS": "0"}
    with pytest.raises(SystemExit):
        serve_env(["nonsense"], base={})
