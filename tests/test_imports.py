"""The package's import graph, read from the source (every import, also inside functions):
no cycles, components never import entry points, and no import deferred to dodge a cycle."""

import ast
from pathlib import Path

import dfqkit

ROOT = Path(dfqkit.__file__).parent
COMPONENTS = ("models", "generators", "mixers", "losses", "quant", "ptq", "data")
#: what a component may import besides other components
COMPONENT_MAY_IMPORT = {
    "dfqkit.errors",
    "dfqkit.optional",
    "dfqkit.registry",
    "dfqkit.step",
    "dfqkit.taps",
}
#: imports inside functions, each with its reason (none may dodge a cycle)
DEFERRED_ALLOWED = {
    ("dfqkit", "dfqkit.api"): "dfqkit.quantize is loaded on first use: `import dfqkit` is cheap",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ["dfqkit", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """``(imported dfqkit module, deferred)`` for each runtime import of module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    def walk(node: ast.AST, deferred: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue  # annotations only, never executed
            inner = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in child.names]  # fmt: skip
            else:
                yield from walk(child, inner)
                continue
            for target in targets:
                if target.startswith("dfqkit"):
                    found = resolve(target)
                    if found and found != name:
                        yield found, inner

    yield from walk(ast.parse(path.read_text()), False)


def _graph():
    mods = _modules()
    edges = {m: set() for m in mods}
    deferred = set()
    for name, path in mods.items():
        for target, late in _imports(name, path, mods):
            edges[name].add(target)
            if late:
                deferred.add((name, target))
    return edges, deferred


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_inside_functions():
    edges, deferred = _graph()
    assert ("dfqkit", "dfqkit.api") in deferred  # the one import inside a function
    assert "dfqkit.build" in edges["dfqkit.config"] and "dfqkit.run" in edges["dfqkit.build"]


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_components_never_import_entry_points():
    edges, _ = _graph()
    bad = []
    for module, targets in edges.items():
        if module.split(".")[1:2] and module.split(".")[1] in COMPONENTS:
            for t in targets:
                component = t.split(".")[1:2] and t.split(".")[1] in COMPONENTS
                if not component and t not in COMPONENT_MAY_IMPORT:
                    bad.append(f"{module} -> {t}")
    assert bad == []


def test_no_import_is_deferred_to_dodge_a_cycle():
    _, deferred = _graph()
    assert deferred == set(DEFERRED_ALLOWED)


def test_no_module_registers_differently_when_run_as_main():
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            left = getattr(node, "left", None)
            if (
                isinstance(node, ast.Compare)
                and isinstance(left, ast.Name)
                and left.id == "__name__"
            ):
                block = next(n for n in ast.walk(tree) if isinstance(n, ast.If) and n.test is node)
                assert ast.unparse(node) == "__name__ == '__main__'", path
                assert not any(
                    isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(block)
                ), f"{path}: imports under __main__"
