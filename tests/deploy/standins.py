"""The third-party images the deployment names, or stand-ins built from Debian packages where no
registry is reachable.

Each upstream image (`python:3.11-slim`, `prom/prometheus`, `haproxy`) is used when it is present
or can be pulled. Otherwise a stand-in with a name of its own (never an upstream name) is built:

- python: `debootstrap --variant=minbase bookworm` with python3, venv, pip and ca-certificates,
  `python` linked to python3, imported with `docker import`. It carries the host's CA bundle and
  a pip configuration that reaches the host's package index (through the host network) and the
  host's local packages (package_index.py), so that pip inside a build installs what pip on the
  host would.
- prometheus, haproxy: that base plus Debian's package, laid out as the upstream image is
  (standins/*.Dockerfile).

Stand-ins are kept between runs (their names are fixed); `docker image rm` rebuilds them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.deploy import package_index
from tests.deploy.engine import Docker, DockerUnavailable, _apt_install

HERE = Path(__file__).resolve().parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

PYTHON_UPSTREAM = "python:3.11-slim"
PYTHON_STANDIN = "cappy-standin/python:3.11-bookworm"
STANDIN_BUILDS = {
    # name: (upstream image, stand-in tag, Dockerfile)
    "prometheus": ("prom/prometheus:v2.53.4", "cappy-standin/prometheus:debian", "prometheus"),
    "haproxy": ("haproxy:2.8", "cappy-standin/haproxy:debian", "haproxy"),
}

PIP_CONF = f"""[global]
cert = /etc/ssl/certs/ca-certificates.crt
extra-index-url = {package_index.SIMPLE_URL}
find-links = {package_index.LINKS_URL}
trusted-host = 127.0.0.1
"""


@dataclass(frozen=True)
class BaseImages:
    """The image behind each name the deployment uses, upstream or stand-in."""

    python: str
    prometheus: str
    haproxy: str

    @property
    def standin(self) -> bool:
        """Whether the python base is a stand-in (its pip needs the host's packages)."""
        return self.python == PYTHON_STANDIN


def _usable(docker: Docker, image: str) -> bool:
    if docker.has_image(image):
        return True
    return docker.run("pull", image, check=False, timeout=120).returncode == 0


def _build_python_standin(docker: Docker) -> None:
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    with tempfile.TemporaryDirectory(prefix="cappy-standin-") as tmp:
        root = Path(tmp) / "rootfs"
        done = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                SUITE,
                str(root),
                DEBIAN_MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DockerUnavailable(f"debootstrap of the stand-in python base failed: {tail}")
        # The host's CA bundle (its package index may sit behind a TLS proxy), kept where
        # update-ca-certificates in a derived image keeps it too.
        extra = root / "usr/local/share/ca-certificates/host-bundle.crt"
        extra.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HOST_CA_BUNDLE, extra)
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "etc/pip.conf").write_text(PIP_CONF, encoding="utf-8")
        (root / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        for cache in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                docker.cli,
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "-",
                PYTHON_STANDIN,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        tar.wait()
        if imported.returncode != 0:
            raise DockerUnavailable(f"docker import of the stand-in failed: {imported.stderr}")


def _build_standin(docker: Docker, tag: str, dockerfile: str, base: str) -> None:
    docker.run(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        "--file",
        str(HERE / "standins" / f"{dockerfile}.Dockerfile"),
        "--tag",
        tag,
        str(HERE / "standins"),
        timeout=900,
    )


def base_images(docker: Docker) -> BaseImages:
    """The python, prometheus and haproxy images to use, stand-ins built where needed."""
    python = PYTHON_UPSTREAM
    if not _usable(docker, PYTHON_UPSTREAM):
        python = PYTHON_STANDIN
        if not docker.has_image(PYTHON_STANDIN):
            _build_python_standin(docker)
    chosen = {}
    for name, (upstream, standin, dockerfile) in STANDIN_BUILDS.items():
        if _usable(docker, upstream):
            chosen[name] = upstream
            continue
        if not docker.has_image(standin):
            debian = python if python == PYTHON_STANDIN else _debian_base(docker)
            _build_standin(docker, standin, dockerfile, debian)
        chosen[name] = standin
    return BaseImages(python=python, **chosen)


def _debian_base(docker: Docker) -> str:
    """A Debian base for the stand-ins when python came from a registry but these did not."""
    if _usable(docker, "debian:bookworm-slim"):
        return "debian:bookworm-slim"
    if not docker.has_image(PYTHON_STANDIN):
        _build_python_standin(docker)
    return PYTHON_STANDIN


if __name__ == "__main__":
    import sys

    from tests.deploy.engine import prepare

    print(base_images(prepare(sys.executable)))
