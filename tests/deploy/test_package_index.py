"""The loopback package index that offers the host's local packages to pip inside image builds:
its pages are what pip reads, its links lead to the files, and nothing outside its roots is
served."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from tests.deploy.package_index import PackageIndex, serving


def _local_index(root: Path, name: str, data: bytes) -> None:
    """A PEP 503 index as the host keeps one: simple/<project>/index.html with links relative
    to it, files beside."""
    (root / "files").mkdir(parents=True)
    (root / "files" / name).write_bytes(data)
    page = root / "simple" / "demo-pkg"
    page.mkdir(parents=True)
    digest = hashlib.sha256(data).hexdigest()
    (page / "index.html").write_text(
        f'<a href="../../files/{name}#sha256={digest}">{name}</a>', encoding="utf-8"
    )


def test_pages_merge_the_host_indexes_and_serve_their_files(tmp_path: Path) -> None:
    _local_index(tmp_path / "a", "demo_pkg-1.0-py3-none-any.whl", b"one")
    _local_index(tmp_path / "b", "demo_pkg-2.0-py3-none-any.whl", b"two")
    wheel = tmp_path / "built" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"built here")
    (tmp_path / "secret.txt").write_text("not for pip")
    index = PackageIndex([tmp_path / "a", tmp_path / "b"], [wheel])
    with serving(index, port=0) as url, httpx.Client(base_url=url) as client:
        # PEP 503 names are normalised: Demo_Pkg and demo-pkg are one project.
        page = client.get("/simple/Demo_Pkg/")
        assert page.status_code == 200
        links = [line.split('"')[1] for line in page.text.splitlines() if "href" in line]
        assert len(links) == 2 and all("#sha256=" in link for link in links)
        bodies = {client.get(link.split("#")[0]).content for link in links}
        assert bodies == {b"one", b"two"}
        assert "llama_cpp_python-0.3.36" in client.get("/links/").text
        assert client.get(f"/wheel/{wheel.name}").content == b"built here"
        assert client.get("/simple/unknown-project/").status_code == 404
        assert client.get("/file/0/../../secret.txt").status_code == 404
        assert client.get("/file/7/files/x.whl").status_code == 404
