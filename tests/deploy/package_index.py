"""The host's local Python packages, served on a fixed loopback port for pip inside image builds.

pip on this host reads local package indexes and wheel folders (`extra-index-url = file://...`,
`find-links = /dir`: the torch CPU wheel, mirrored CUDA wheels) that a container cannot see. A
build with `--network host` can reach 127.0.0.1, so this server offers the same packages there:

- `/simple/<project>/`: the host's `file://` extra indexes merged (PEP 503 pages, links rewritten
  to `/file/<n>/<path>`);
- `/links/`: one page linking every wheel of the host's find-links folders, plus wheels a test
  adds (llama-cpp-python as pip built it here, so that an image does not compile it again).

The stand-in base image's pip configuration names this address (see standins.py), so the port is
fixed. It is test tooling for machines without registry access; users build against PyPI.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from tests.support import servers

PORT = 38611
ADDRESS = f"http://127.0.0.1:{PORT}"
SIMPLE_URL = f"{ADDRESS}/simple/"
LINKS_URL = f"{ADDRESS}/links/"

_HREF = re.compile(r'href="([^"]+)"')


def host_pip_sources(python: str = sys.executable) -> tuple[list[Path], list[Path]]:
    """The host pip's local index roots (the folder above each `file://.../simple`) and local
    find-links folders, from `pip config list` and the PIP_* environment."""
    done = subprocess.run(
        [python, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    values: dict[str, list[str]] = {"extra-index-url": [], "index-url": [], "find-links": []}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in values:
            values[name] += value.strip().strip("'\"").split()
    for name in values:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            values[name] += env.split()
    roots: list[Path] = []
    for url in values["extra-index-url"] + values["index-url"]:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            simple = Path(unquote(parsed.path))
            if simple.is_dir() and simple.parent not in roots:
                roots.append(simple.parent)
    links = []
    for item in values["find-links"]:
        path = Path(unquote(urlparse(item).path)) if item.startswith("file:") else Path(item)
        if path.is_dir() and path not in links:
            links.append(path)
    return roots, links


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


class PackageIndex:
    """What the server offers: index roots (each with `simple/` and the files it links) and
    wheel files for `/links/`."""

    def __init__(self, roots: Sequence[Path], wheels: Sequence[Path]):
        self.roots = [root.resolve() for root in roots]
        self.wheels = {wheel.name: wheel.resolve() for wheel in wheels}

    def project_page(self, project: str) -> str | None:
        links: list[str] = []
        for number, root in enumerate(self.roots):
            page = root / "simple" / _normalize(project) / "index.html"
            if not page.is_file():
                continue
            for href in _HREF.findall(page.read_text(encoding="utf-8", errors="replace")):
                target, _, fragment = html.unescape(href).partition("#")
                resolved = (page.parent / unquote(target)).resolve()
                if resolved.is_file() and resolved.is_relative_to(root):
                    url = f"/file/{number}/{resolved.relative_to(root)}"
                    links.append(_anchor(url + (f"#{fragment}" if fragment else ""), resolved.name))
        return _page(links) if links else None

    def links_page(self) -> str:
        return _page(_anchor(f"/wheel/{name}", name) for name in sorted(self.wheels))

    def file(self, number: int, relative: str) -> Path | None:
        if not 0 <= number < len(self.roots):
            return None
        root = self.roots[number]
        path = (root / relative).resolve()
        return path if path.is_file() and path.is_relative_to(root) else None


def _anchor(url: str, text: str) -> str:
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a><br>'


def _page(anchors: Iterator[str] | list[str]) -> str:
    return "<!DOCTYPE html><html><body>\n" + "\n".join(anchors) + "\n</body></html>\n"


def _handler(index: PackageIndex) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            parts = unquote(urlparse(self.path).path).strip("/").split("/")
            if parts[0] == "simple" and len(parts) == 2:
                self._text(index.project_page(parts[1]))
            elif parts == ["links"]:
                self._text(index.links_page())
            elif parts[0] == "wheel" and len(parts) == 2:
                self._file(index.wheels.get(parts[1]))
            elif parts[0] == "file" and len(parts) > 2 and parts[1].isdigit():
                self._file(index.file(int(parts[1]), "/".join(parts[2:])))
            else:
                self.send_error(404)

        def _text(self, body: str | None) -> None:
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _file(self, path: Path | None) -> None:
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            if self.command != "HEAD":
                with path.open("rb") as source:
                    self.copyfile(source, self.wfile)

    return Handler


@contextmanager
def serving(index: PackageIndex, port: int = PORT) -> Iterator[str]:
    """Serves `index` on 127.0.0.1:`port` (0: a free one) while the block runs; yields the
    address.

    Raises:
        OSError: the port is taken (another run's index, or another program).
    """
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(index))
    server.daemon_threads = True
    with servers.serving(server) as url:
        yield url


def built_wheels(pattern: str) -> list[Path]:
    """Wheels pip built on this host and kept in its cache (newest first), e.g.
    `llama_cpp_python-0.3.36-*.whl`."""
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip")) / "wheels"
    found = list(cache.rglob(pattern)) if cache.is_dir() else []
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)
