"""The architecture's two promises, read from the source: no import cycles (imports inside functions count), and ray
imported only inside distml/distributed/, which imports no workflow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distml"
DISTRIBUTED = "distml.distributed"
WORKFLOWS = {
    f"distml.{name}" for name in ("kfold", "holdout", "finetune", "sweep", "tune", "pipeline", "compare", "predict")
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute names of every import in `source` (`from x import y` gives x and x.y: y may be a module)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported not in (name, "distml"):
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        state[node] = "done"
        stack.pop()

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_the_checker_sees_imports_inside_functions_relative_ones_and_the_cycles_they_make():
    source = "import os\n\ndef f():\n    from . import kfold\n    from .distributed.cluster import connect\n"
    assert imports_in(source, "distml.cli", is_package=False) == {
        "os",
        "distml",
        "distml.kfold",
        "distml.distributed.cluster",
        "distml.distributed.cluster.connect",
    }
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(graph()) == []


def test_only_the_distributed_package_imports_ray():
    outside = sorted(
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if not module_name(path).startswith(DISTRIBUTED)
        and any(name == "ray" or name.startswith("ray.") for name in imports(path))
    )
    assert outside == []


def test_the_distributed_package_imports_no_workflow_and_no_cli():
    edges = graph()
    reached = {
        (module, target)
        for module, targets in edges.items()
        if module.startswith(DISTRIBUTED)
        for target in targets
        if target in WORKFLOWS or target == "distml.cli"
    }
    assert reached == set()
