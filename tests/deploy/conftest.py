"""The deploy tests run the deployment for real: the project's images, containers, compose with
Prometheus and haproxy. Every test here is marked `docker`.

The session prepares Docker itself where this machine allows it (engine.py: docker.io, dockerd,
the compose plugin), builds stand-ins for registry images that cannot be pulled (standins.py),
offers the host's local packages to pip inside builds (package_index.py), and builds each image
once, when a test first needs it (images.py). Where Docker cannot run, every test here skips with
the one-line reason. The figures of the run (image sizes and build times, ready times, failover
counts) are printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy import images as image_builds
from tests.deploy.engine import Docker, DockerUnavailable, prepare
from tests.deploy.standins import BaseImages, base_images

HERE = Path(__file__).resolve().parent
# Figures of this run, printed at the end (pytest_terminal_summary).
FIGURES: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.docker)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("deployment figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def docker() -> Docker:
    try:
        return prepare(sys.executable)
    except DockerUnavailable as exc:
        pytest.skip(f"Docker cannot run here: {exc}")


@pytest.fixture(scope="session")
def bases(docker: Docker) -> BaseImages:
    try:
        return base_images(docker)
    except DockerUnavailable as exc:
        pytest.skip(f"the base images can neither be pulled nor built here: {exc}")


@pytest.fixture(scope="session")
def image(docker: Docker, bases: BaseImages) -> Iterator[Callable[[str], str]]:
    """`image(name)`: the tag of the project's image `name` (cpu, cpu-serve, gpu, llm), built on
    first use."""
    built: dict[str, image_builds.Built] = {}
    with contextlib.ExitStack() as stack:
        serving = False

        def get(name: str) -> str:
            nonlocal serving
            if name not in built:
                if not serving:
                    stack.enter_context(image_builds.host_packages())
                    serving = True
                built[name] = image_builds.build(docker, name, bases)
                FIGURES.append(
                    f"image {built[name].tag}: {built[name].size_bytes / 1e6:.0f} MB "
                    f"(built in {built[name].seconds:.0f} s)"
                )
            return built[name].tag

        # At the end, the previous session's step images that these builds did not reuse go.
        stack.callback(lambda: image_builds.remove_stale_steps(docker, built))
        yield get


def _readable_copy(source: Path, root: Path) -> Path:
    """`root` holding `minilm/`, a copy of `source`, readable by the containers' uid 10001
    (pytest's own temporary folders are private to root)."""
    shutil.copytree(source, root / "minilm")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="session")
def deploy_exports(minilm_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `minilm/`, the MiniLM export, readable by the containers."""
    return _readable_copy(minilm_export, tmp_path_factory.mktemp("deploy-exports"))


@pytest.fixture(scope="session")
def deploy_checkpoints(minilm_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `minilm/`, the MiniLM checkpoint the export is made of, readable by the
    containers."""
    return _readable_copy(minilm_checkpoint, tmp_path_factory.mktemp("deploy-checkpoints"))
