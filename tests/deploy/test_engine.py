"""Where Docker cannot run, the deploy tests skip with one line that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import engine


def test_no_docker_and_not_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.shutil, "which", lambda _name: None)
    monkeypatch.setattr(engine, "_is_root", lambda: False)
    with pytest.raises(engine.DockerUnavailable) as why:
        engine.prepare()
    assert str(why.value) == "docker.io is not installed and this is not root (apt-get)"


def test_no_daemon_and_not_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(engine, "_daemon_answers", lambda _cli: False)
    monkeypatch.setattr(engine, "_is_root", lambda: False)
    with pytest.raises(engine.DockerUnavailable) as why:
        engine.prepare()
    assert "\n" not in str(why.value)
    assert str(why.value) == "no Docker daemon answers and this is not root (dockerd)"


def test_a_client_without_a_daemon_or_dockerd_gets_docker_io(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine with a static docker client and nothing else (as CI's had): the suite installs
    docker.io for dockerd instead of skipping."""
    installed: list[tuple[str, ...]] = []

    def apt_install(*packages: str) -> None:
        installed.append(packages)
        raise engine.DockerUnavailable("stop here")

    monkeypatch.setattr(
        engine.shutil, "which", lambda name: "/usr/local/bin/docker" if name == "docker" else None
    )
    monkeypatch.setattr(engine, "_daemon_answers", lambda _cli: False)
    monkeypatch.setattr(engine, "_apt_install", apt_install)
    with pytest.raises(engine.DockerUnavailable):
        engine.prepare()
    assert installed == [("docker.io",)]


def test_compose_arguments_name_project_files_and_profiles(tmp_path: Path) -> None:
    args = engine.compose_args("p", [tmp_path / "a.yml", tmp_path / "b.yml"], ["cpu", "llm"])
    assert args[:3] == ["compose", "--project-name", "p"]
    assert args.count("--file") == 2 and args.count("--profile") == 2
