"""The locks of the test environments (requirements/): they pin what pyproject.toml and
requirements/clients.in ask for, at versions their ranges allow, so that a dependency added
without `make lock` is caught here rather than on a fresh machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

REQUIREMENTS = ROOT / "requirements"


def _pins(lock: Path) -> dict[str, str]:
    """name -> pinned version, from a lock's `name==version` lines."""
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def _wanted(texts: list[str]) -> list[Requirement]:
    return [Requirement(text) for text in texts if text.strip() and not text.lstrip().startswith("#")]


def test_the_test_lock_pins_every_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(REQUIREMENTS / "test.txt")
    for requirement in _wanted([*project["dependencies"], *project["optional-dependencies"]["dev"]]):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            # Installed first, with pip, from TORCH_SPEC (scripts/bootstrap.sh): never in the lock.
            assert name not in pins
            continue
        assert name in pins, f"{requirement.name} is not in requirements/test.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/test.txt pins {requirement.name}=={pins[name]}, outside {requirement}: run `make lock`"
        )


def test_the_clients_lock_pins_every_client() -> None:
    pins = _pins(REQUIREMENTS / "clients.txt")
    for requirement in _wanted((REQUIREMENTS / "clients.in").read_text().splitlines()):
        name = canonicalize_name(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), f"{requirement}: run `make lock`"

