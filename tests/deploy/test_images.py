"""The suite's image builds clean up after themselves: a build that moves one of the suite's tags
removes the image the tag named before, and a session removes the step images of the previous
builds of the same images that its own builds did not reuse; nothing else."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.images import Built, image_id, remove_replaced, remove_stale_steps


@dataclass
class FakeDocker:
    """Answers `image inspect` from `ids` (tag -> id) and `tags` (id -> how many tags name it),
    and records every other command."""

    ids: dict[str, str] = field(default_factory=dict)
    tags: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def run(self, *args: str, **_: object) -> subprocess.CompletedProcess[str]:
        if args[:2] == ("image", "inspect"):
            ref = args[-1]
            answer = self.ids.get(ref) if args[3] == "{{.Id}}" else self.tags.get(ref)
            found = answer is not None
            return subprocess.CompletedProcess(
                args, 0 if found else 1, str(answer) if found else "", ""
            )
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


def test_the_previous_builds_steps_not_reused_go_last_first(tmp_path: Path) -> None:
    """The cpu image was built before as base > deps > src1 > app1 (and tag1, still tagged);
    now as base > deps > src2 > app2: app1 then src1 go, one at a time, and nothing else: not
    the reused steps, not a tagged image, not the steps of the gpu image, not built now."""
    record = tmp_path / "steps.json"
    previous = {"cpu": ["base", "deps", "src1", "tag1", "app1"], "gpu": ["base", "gdeps"]}
    record.write_text(json.dumps(previous), encoding="utf-8")
    docker = FakeDocker(tags={"base": 1, "deps": 0, "src1": 0, "tag1": 1, "app1": 0, "gdeps": 0})
    built = {"cpu": Built("cappy-serve-test:cpu", 1.0, 1, ("base", "deps", "src2", "app2"))}
    remove_stale_steps(docker, built, record)  # type: ignore[arg-type]
    assert docker.calls == [
        ("image", "rm", "--no-prune", "app1"),
        ("image", "rm", "--no-prune", "src1"),
    ]
    assert json.loads(record.read_text(encoding="utf-8")) == {
        "cpu": ["base", "deps", "src2", "app2"],
        "gpu": ["base", "gdeps"],
    }


def test_without_a_record_nothing_is_removed_and_one_is_started(tmp_path: Path) -> None:
    record = tmp_path / "cache" / "steps.json"
    docker = FakeDocker(tags={"a": 0})
    remove_stale_steps(docker, {"llm": Built("t", 1.0, 1, ("a",))}, record)  # type: ignore[arg-type]
    assert docker.calls == []
    assert json.loads(record.read_text(encoding="utf-8")) == {"llm": ["a"]}
