"""The house rules, checked on the source: one-way layering, no import cycles, no hidden imports of the
project's own modules inside functions, and no function longer than a screen."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mumic_core", "pipelines", "jobs")
LAYER = {"mumic_core": 0, "pipelines": 1, "jobs": 2}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = modules()


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The project modules an import statement loads (a package's submodule when `from pkg import sub`)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, node, is_package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
        return []
    return sorted({n for n in names if n.split(".")[0] in PACKAGES})


def _has_reason(lines: list[str], index: int) -> bool:
    """A comment on the import's line, or on the line above its block of imports (blank lines allowed)."""
    if "#" in lines[index]:
        return True
    i = index - 1
    while i >= 0 and (not lines[i].strip() or lines[i].strip().startswith(("import ", "from "))):
        if "#" in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str, bool]]]:
    """Module-level import graph, and every import inside a function: (module, line, target, has reason)."""
    graph: dict[str, set[str]] = defaultdict(set)
    inner = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        is_package = path.name == "__init__.py"
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            for target in _targets(module, node, is_package):
                if id(node) in top:
                    graph[module].add(target)
                else:
                    inner.append((module, node.lineno, target, _has_reason(lines, node.lineno - 1)))
    return graph, inner


GRAPH, INNER = imports()


def test_layers_only_depend_downwards_jobs_pipelines_mumic_core():
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]
    ]
    assert not wrong, wrong


def test_mumic_core_knows_nothing_of_ray_or_mlflow():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("mumic_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow", "deltalake")]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_among_the_projects_modules():
    # a package imports its own modules from __init__: that edge is the package's, not a cycle
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")} for m, ts in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_imports_of_project_modules_inside_functions_say_why():
    hidden = [f"{m}:{line} imports {t}" for m, line, t, reason in INNER if not reason]
    assert not hidden, hidden


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_a_screen(package):
    long = []
    for module, path in MODULES.items():
        if module.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, long
