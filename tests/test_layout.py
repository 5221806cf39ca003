"""The layers import downward only: schemas, then the shared plumbing (chatbatch/), then
producer, gateway and worker, then the CLI on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: Package -> the top-level packages of this project it may import.
ALLOWED = {
    "schemas": {"schemas"},
    "chatbatch": {"schemas", "chatbatch"},
    "producer": {"schemas", "chatbatch", "producer"},
    "gateway": {"schemas", "chatbatch", "producer", "gateway"},
    "worker": {"schemas", "chatbatch", "worker"},
    "cli": {"schemas", "chatbatch", "producer", "gateway", "worker", "cli"},
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}
