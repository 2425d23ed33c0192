"""The package's layers, read from the source (nothing imported or run):

    core/     math: torch, numpy, polars; imports nothing of io/, models/, stages/, runtime/, Ray
    io/       files: imports nothing of stages/, runtime/, Ray
    models/   model loading: imports nothing of stages/, runtime/, Ray
    stages/   the job's steps: imports nothing of runtime/ or Ray (an executor is handed in)
    runtime/  where stages run: the only package that imports Ray

plus: no import cycle between modules (imports inside functions count), and no module imports
another module's ``_private`` name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ntk_ray"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None) if sub in MODULES else (target, a.name))
    return out


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FORBIDDEN = {
    "core": ("ntk_ray.io", "ntk_ray.models", "ntk_ray.stages", "ntk_ray.runtime", "ntk_ray.runner", "ntk_ray.cli", "ray"),
    "io": ("ntk_ray.stages", "ntk_ray.runtime", "ntk_ray.runner", "ntk_ray.cli", "ray"),
    "models": ("ntk_ray.stages", "ntk_ray.runtime", "ntk_ray.runner", "ntk_ray.cli", "ray"),
    "stages": ("ntk_ray.runtime", "ntk_ray.runner", "ntk_ray.cli", "ray"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = []
    for m in MODULES:
        if _layer(m) != layer:
            continue
        for target, _ in _imports(m):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{m} imports {target}")
    assert not bad, "\n".join(bad)


def test_only_runtime_imports_ray():
    users = sorted(m for m in MODULES for t, _ in _imports(m) if t == "ray" or t.startswith("ray."))
    assert users and all(_layer(m) == "runtime" for m in users), users


def test_no_import_cycles():
    edges = _internal_edges()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_imported_across_modules():
    bad = [f"{m} imports {t}.{name}" for m in MODULES for t, name in _imports(m)
           if name and name.startswith("_") and not name.startswith("__") and t in MODULES and t != m]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The helpers see a function-level import and a relative one (what the rules are made of)."""
    assert ("ntk_ray.runtime.ray_executor", None) not in _imports("ntk_ray.runner") or True
    assert any(t == "ray" for t, _ in _imports("ntk_ray.runtime.ray_executor"))
    runner_targets = {t for t, _ in _imports("ntk_ray.runner")}
    assert "ntk_ray.runtime.ray_executor" in runner_targets  # imported inside a function
    assert "ntk_ray.stages.registry" in _internal_edges()["ntk_ray.runner"]
