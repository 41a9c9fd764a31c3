"""Serving a test's stdlib HTTP server on a background thread for as long as the test needs it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import TCPServer


@contextmanager
def serving(server: TCPServer) -> Iterator[str]:
    """Serves `server` (bound to 127.0.0.1) on a daemon thread; yields its root URL,
    `http://127.0.0.1:PORT`; shuts it down and closes its socket on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
