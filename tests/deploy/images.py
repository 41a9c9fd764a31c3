"""The project's images, built from its own Dockerfile (and deploy/llm/Dockerfile) on the bases
standins.py chose, while package_index.py offers the host's local packages to pip inside.

`python -m tests.deploy.images` builds them all by hand, as the tests do, and prints their sizes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.deploy import package_index
from tests.deploy.engine import Docker
from tests.deploy.standins import BaseImages

ROOT = Path(__file__).resolve().parents[2]
LLM_DOCKERFILE = ROOT / "deploy" / "llm" / "Dockerfile"
# Names of their own: these are the product's images, but built on stand-in bases.
TAGS = {
    "cpu": "cappy-serve-test:cpu",
    "cpu-serve": "cappy-serve-test:cpu-serve",
    "gpu": "cappy-serve-test:gpu",
    "llm": "cappy-serve-test:llm",
}
# What each image is built with: (Dockerfile, target, EXTRAS).
RECIPES = {
    "cpu": (ROOT / "Dockerfile", None, "cpu"),
    "cpu-serve": (ROOT / "Dockerfile", "serve", "cpu"),
    "gpu": (ROOT / "Dockerfile", None, "gpu"),
    "llm": (LLM_DOCKERFILE, None, None),
}
LLAMA_WHEEL = "llama_cpp_python-0.3.36-*.whl"


# The classic builder prints the id of the image each step made (or found in its cache).
_STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$", re.MULTILINE)
# Where a session records the step images of its builds, for the next session to remove those
# it does not reuse.
STEPS_RECORD = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "cappy-serve-test"
    / "image-steps.json"
)


@dataclass(frozen=True)
class Built:
    """An image built: its tag, build time and size, and the ids of the images its steps made
    or reused (every stage's, the ones no tag names among them)."""

    tag: str
    seconds: float
    size_bytes: int
    steps: tuple[str, ...] = ()


def _host_index_url(python: str) -> str:
    done = subprocess.run(
        [python, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "https://pypi.org/simple"


@contextlib.contextmanager
def host_packages(python: str = sys.executable) -> Iterator[None]:
    """The host's local packages on the loopback index while images build, with the
    llama-cpp-python wheel pip built here (an image then need not compile llama.cpp)."""
    roots, links = package_index.host_pip_sources(python)
    wheels = [w for folder in links for w in folder.glob("*.whl")]
    wheels += package_index.built_wheels(LLAMA_WHEEL)[:1]
    with package_index.serving(package_index.PackageIndex(roots, wheels)):
        yield


def build(docker: Docker, name: str, bases: BaseImages, python: str = sys.executable) -> Built:
    """Builds image `name` (a key of RECIPES) and returns its tag, build time and size."""
    dockerfile, target, extras = RECIPES[name]
    args = ["build", "--network", "host", "--file", str(dockerfile), "--tag", TAGS[name]]
    args += ["--build-arg", f"PYTHON_IMAGE={bases.python}"]
    if extras is not None:
        args += ["--build-arg", f"EXTRAS={extras}"]
    if target is not None:
        args += ["--target", target]
    if bases.standin and dockerfile == ROOT / "Dockerfile":
        # The PyTorch CPU index is not reachable from a machine without registries; the CPU
        # wheel comes from the host's local packages, its dependencies from the host's index.
        args += ["--build-arg", f"TORCH_INDEX_URL={_host_index_url(python)}"]
    context = ROOT if dockerfile == ROOT / "Dockerfile" else dockerfile.parent
    before = image_id(docker, TAGS[name])
    started = time.monotonic()
    output = docker.run(*args, str(context), timeout=1800).stdout
    seconds = time.monotonic() - started
    size = int(docker.run("image", "inspect", "--format", "{{.Size}}", TAGS[name]).stdout)
    remove_replaced(docker, before, image_id(docker, TAGS[name]))
    return Built(TAGS[name], seconds, size, tuple(_STEP_IMAGE.findall(output)))


def image_id(docker: Docker, tag: str) -> str | None:
    """The id of the image `tag` names, None when there is none."""
    done = docker.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def remove_stale_steps(
    docker: Docker, built: dict[str, Built], record: Path = STEPS_RECORD
) -> None:
    """Removes the step images that the previous builds of the images built now (by name) made
    and these builds did not reuse, and records these builds' steps for the next session.

    The classic builder keeps every step's image as its cache, and a stage that copies the
    source (the builder stages, and the `serve` stage of an image built to `export`, whose
    venv layer alone is GBs) makes new ones each time the tree changes; their old ones then
    serve nothing and piled up until the disk was full. Only the images the record names are
    touched, never one a tag names, never one another image is built on (docker refuses that
    without --force), and one at a time without its parents (`--no-prune`): the images built
    now, the cache they came from, and the steps of images not built now stay.
    """
    try:
        previous: dict[str, list[str]] = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    current = {step for image in built.values() for step in image.steps}
    for name in built:
        for step in reversed(previous.get(name, [])):  # the last steps first: children first
            if step in current:
                continue
            done = docker.run(
                "image", "inspect", "--format", "{{len .RepoTags}}", step, check=False
            )
            if done.returncode == 0 and done.stdout.strip() == "0":
                docker.run("image", "rm", "--no-prune", step, check=False)
    previous.update({name: list(image.steps) for name, image in built.items()})
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(previous), encoding="utf-8")


def remove_replaced(docker: Docker, before: str | None, after: str | None) -> None:
    """Removes the image a build moved this suite's tag away from: an image of an older tree
    that nothing names any more, whose layers (the GPU image's venv alone is GBs) would otherwise
    pile up run after run until the disk is full. Images of anyone else are never touched; one
    that a container still uses stays."""
    if before is not None and before != after:
        docker.run("image", "rm", before, check=False)


if __name__ == "__main__":
    from tests.deploy.engine import prepare
    from tests.deploy.standins import base_images

    engine = prepare(sys.executable)
    chosen = base_images(engine)
    with host_packages():
        for image in sys.argv[1:] or list(RECIPES):
            built = build(engine, image, chosen)
            print(f"{built.tag}: {built.size_bytes / 1e6:.0f} MB, built in {built.seconds:.0f} s")
