"""The package's shape, as docs/design.md states it: arrows one way, Ray in one package, argv
and printing in the command line only, no module past ~400 lines. Read from the source (AST)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scorecam_stream"
MAX_LINES = 450  # "no module over ~400 lines", with a little slack before this fails


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_command_line(name: str) -> bool:
    """The command line: cli.py and the modules split from it (cli_*.py, or a cli package)."""
    last = name.split(".")[1] if "." in name else ""
    return last == "cli" or last.startswith("cli_")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Return the package's modules that ``name`` imports (types-only imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exports its submodules: an edge into a package is an edge into
    # what its __init__ imports, so a cycle through a re-export is still found.
    cycles = []
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for other in sorted(graph[name]):
            if state[other] == 1:
                cycles.append([*path[path.index(other) :], other])
            elif state[other] == 0:
                visit(other)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name)
    assert cycles == []


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_distributed_package_imports_ray():
    outside = [
        name
        for name, path in _modules().items()
        if "ray" in _top_level_imports(path) and not name.startswith("scorecam_stream.distributed")
    ]
    assert outside == []


def _calls(path: Path) -> list[str]:
    """Return the dotted names the module reads or calls: ``print``, ``sys.argv``..."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names.append(node.func.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names.append(f"{node.value.id}.{node.attr}")
    return names


def test_only_the_command_line_reads_argv_and_prints():
    offenders = [
        f"{name}: {call}"
        for name, path in _modules().items()
        if not _is_command_line(name)
        for call in _calls(path)
        if call in ("print", "sys.argv", "input")
    ]
    assert offenders == []


def test_no_module_is_past_the_size_where_it_should_be_split():
    long = {
        name: lines
        for name, path in _modules().items()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
