"""The suite's image builds clean up after themselves: a build that moves one of the suite's tags
removes the image the tag named before (an older tree's, GBs of layers), and nothing else."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from tests.deploy.images import image_id, remove_replaced


@dataclass
class FakeDocker:
    """Answers `image inspect` from `ids` (tag -> id) and records every other command."""

    ids: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def run(self, *args: str, **_: object) -> subprocess.CompletedProcess[str]:
        if args[:2] == ("image", "inspect"):
            known = self.ids.get(args[-1])
            return subprocess.CompletedProcess(args, 0 if known else 1, known or "", "")
        self.calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")


def test_the_image_a_tag_named_before_a_rebuild_is_removed() -> None:
    docker = FakeDocker({"cappy-serve-test:cpu": "sha256:old"})
    before = image_id(docker, "cappy-serve-test:cpu")  # type: ignore[arg-type]
    docker.ids["cappy-serve-test:cpu"] = "sha256:new"
    remove_replaced(docker, before, image_id(docker, "cappy-serve-test:cpu"))  # type: ignore[arg-type]
    assert docker.calls == [("image", "rm", "sha256:old")]


def test_an_unchanged_or_first_build_removes_nothing() -> None:
    docker = FakeDocker({"cappy-serve-test:cpu": "sha256:same"})
    remove_replaced(docker, "sha256:same", "sha256:same")  # type: ignore[arg-type]
    assert image_id(docker, "cappy-serve-test:gpu") is None  # type: ignore[arg-type]
    remove_replaced(docker, None, "sha256:same")  # type: ignore[arg-type]
    assert docker.calls == []
