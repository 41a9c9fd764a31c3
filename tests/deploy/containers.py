"""One container of a test: started with `docker run`, reached on a loopback port, always
removed afterwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import httpx

from tests.deploy.engine import Docker


@dataclass
class Container:
    docker: Docker
    name: str
    url: str | None  # None without a published port (e.g. --network none)

    def logs(self) -> str:
        done = self.docker.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict:
        return self.docker.inspect(self.name)["State"]

    def exec(self, *command: str, timeout: float = 60) -> tuple[int, str]:
        done = self.docker.run("exec", self.name, *command, check=False, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until /ready answered 200 (from the container's start); fails the test with
        the container's log after `timeout_s`."""
        assert self.url is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            if not self.state()["Running"]:
                break
            time.sleep(0.25)
        raise AssertionError(f"{self.name} not ready within {timeout_s:.0f} s:\n{self.logs()}")

    def wait_for_log(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            logs = self.logs()
            if needle in logs:
                return logs
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} not in {self.name}'s log within {timeout_s:.0f} s")


@contextlib.contextmanager
def running(
    docker: Docker,
    image: str,
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[str] = (),
    options: Sequence[str] = ("--read-only", "--tmpfs", "/tmp"),
    publish: bool = True,
) -> Iterator[Container]:
    """`docker run -d` of `image` as `name` (replacing a leftover of that name), its port 8000
    published on a free loopback port; removed with its anonymous volumes on exit."""
    docker.run("rm", "--force", "--volumes", name, check=False)
    args = ["run", "--detach", "--name", name, *options]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for mount in mounts:
        args += ["--volume", mount]
    if publish:
        args += ["--publish", "127.0.0.1::8000"]
    docker.run(*args, image, timeout=120)
    try:
        url = None
        if publish:
            address = docker.run("port", name, "8000/tcp").stdout.splitlines()[0].strip()
            url = f"http://{address}"
        yield Container(docker, name, url)
    finally:
        docker.run("rm", "--force", "--volumes", name, check=False, timeout=120)
