"""Dockerfile and compose.yaml, checked as far as a machine without a container engine can:
everything they copy, mount or run exists in the repository, and the image's config loads."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml

from ratebox import config

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_every_path_the_image_copies_exists_and_its_command_is_a_launcher() -> None:
    steps = dockerfile()
    copies = [args.split() for op, args in steps if op == "COPY"]
    assert copies
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    (cmd,) = [args for op, args in steps if op == "CMD"]
    argv = yaml.safe_load(cmd)  # exec form: a JSON list
    assert os.access(ROOT / argv[0], os.X_OK), argv[0]
    config_in_image = argv[argv.index("-c") + 1]
    (copied,) = [src for *srcs, dst in copies for src in srcs if dst == config_in_image]
    settings = config.load(str(ROOT / copied), {})
    assert settings.postgres.migrate_on_start is False
    assert any(op == "USER" and args != "root" for op, args in steps)


def test_compose_mounts_builds_and_runs_what_the_repository_has() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "ratebox"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: {source}"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}"
        for word in shlex.split(" ".join(service.get("entrypoint", []))):
            for launcher in re.findall(r"bin/ratebox-[a-z]+", word):
                assert os.access(ROOT / launcher, os.X_OK), launcher
    assert "9187" in services["ratebox"]["ports"][0]
