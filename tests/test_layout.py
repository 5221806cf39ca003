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


#: Worker stage -> the worker stages it may import: decode knows tokens and tensors only, the
#: engine schedules and batches them, models load and run a model on the engine's terms, and the
#: service (Celery, Redis, the process) sits on top (docs/engine.md#stages).
WORKER_ALLOWED = {
    "decode": {"decode"},
    "engine": {"engine", "decode"},
    "models": {"models", "engine", "decode"},
    "service": {"service", "models", "engine", "decode"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """The project's own modules, by dotted name."""
    return {_module_name(path): path for package in ALLOWED for path in sorted((ROOT / package).rglob("*.py"))}


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules one module imports, by every import statement it holds (at module
    level, inside functions, under `if TYPE_CHECKING:`), relative ones resolved; `from a import
    b` names the module a.b where there is one, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            named += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found: set[str] = set()
    for target in named:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_itself_through_others() -> None:
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_worker_is_laid_out_by_stage() -> None:
    loose = [path.name for path in (ROOT / "worker").glob("*.py") if path.name != "__init__.py"]
    assert loose == [], "every worker module belongs to a stage: worker/<stage>/"
    assert {path.name for path in (ROOT / "worker").iterdir() if path.is_dir() and (path / "__init__.py").exists()} == set(WORKER_ALLOWED)


@pytest.mark.parametrize("stage", sorted(WORKER_ALLOWED))
def test_a_worker_stage_imports_only_the_stages_it_may(stage: str) -> None:
    modules = _modules()
    wrong = {}
    for path in sorted((ROOT / "worker" / stage).rglob("*.py")):
        name = _module_name(path)
        stages = {target.split(".")[1] for target in _imported(name, path, modules) if target.startswith("worker.") and target.count(".") >= 1}
        if stages - WORKER_ALLOWED[stage]:
            wrong[str(path.relative_to(ROOT))] = sorted(stages - WORKER_ALLOWED[stage])
    assert wrong == {}
