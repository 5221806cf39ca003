"""The house style's checks: ruff and mypy clean over the whole tree (configured in
pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy", "."]], ids=["ruff", "mypy"])
def test_clean(tool: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"`{' '.join(tool)}` found problems:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
