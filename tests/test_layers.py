"""The layering of ARCHITECTURE.md, enforced: no upward import between layers, no import cycle.

Every `import trainformer...` statement in src/trainformer counts, the ones
inside functions too (a late import is still a dependency). A failure names
the file, line and the two layers, so a new upward import is caught in the
same commit that adds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A unit (a top-level module or package of trainformer) imports only units of
# lower layers; units in the same layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("paths", "textio"),
    ("presets",),
    ("config",),
    ("rundir",),
    ("nn",),
    ("models",),
    ("data",),
    ("modeldir",),
    ("generation",),
    ("training",),
    ("inference",),
    ("tasks",),
    ("compression", "interop", "bench"),
    ("fit", "serve"),
    ("cli", "configdoc"),
    ("__main__",),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

# The upward imports that exist today, each with its reason; ARCHITECTURE.md lists them too.
# A line here may be removed (the test then holds the code to the stricter rule), never added lightly.
KNOWN = {
    # a transformers directory given where a model dir is expected is converted on the fly
    ("modeldir", "interop"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported trainformer module, line) for every import statement in the file.

    ``from trainformer.pkg import mod`` counts as importing ``trainformer.pkg.mod`` when that is a module.
    """
    out = []
    this = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("trainformer")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = this.split(".")[: len(this.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("trainformer"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out += [(t, node.lineno) for t in subs or [target]]
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    paths = sorted((SRC / "trainformer").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in graph()} - {"trainformer"}
    assert units <= set(RANK), f"put these in LAYERS (and ARCHITECTURE.md): {sorted(units - set(RANK))}"


def test_no_upward_or_sideways_import_between_layers():
    bad = []
    for module, imports in graph().items():
        src = unit_of(module)
        for target, line in imports:
            dst = unit_of(target)
            if dst in (src, "trainformer") or (src, dst) in KNOWN:
                continue
            if RANK[dst] >= RANK[src]:
                bad.append(f"{module.replace('.', '/')}.py:{line} imports {target} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_known_exceptions_still_exist():
    """A fixed exception leaves KNOWN, so it cannot come back unnoticed."""
    seen = {(unit_of(m), unit_of(t)) for m, imports in graph().items() for t, _ in imports}
    assert KNOWN <= seen, f"no longer imported, remove from KNOWN: {sorted(KNOWN - seen)}"


def test_no_import_cycle_between_modules():
    modules = graph()
    edges = {m: {t for t, _ in imports if t in modules and t != m} for m, imports in modules.items()}
    # a package's __init__ importing its own submodules is how packages export; not a cycle
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    known = {(a, b) for a, b in KNOWN}
    cycles = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if (unit_of(node), unit_of(nxt)) in known:
                    continue
                if nxt == start:
                    cycles.append(" -> ".join(path + [nxt]))
                elif nxt not in path and len(path) < 8:
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


@pytest.mark.parametrize("source, bad_import", [
    ("from trainformer.cli import main\n", "cli"),
    ("def f():\n    from trainformer.inference.loading import load_translator\n", "inference"),
])
def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch, source, bad_import):
    """A deliberately bad import in a low layer (models/) fails the check, lazy or not."""
    fake = tmp_path / "src" / "trainformer"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "src")
    with pytest.raises(AssertionError, match=f"models may not import {bad_import}"):
        test_no_upward_or_sideways_import_between_layers()


def test_the_contract_catches_a_cycle_inside_a_layer(tmp_path, monkeypatch):
    fake = tmp_path / "src" / "trainformer" / "tasks"
    fake.mkdir(parents=True)
    (fake / "a.py").write_text("from trainformer.tasks.b import g\n")
    (fake / "b.py").write_text("def g():\n    from trainformer.tasks.a import f\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "src")
    with pytest.raises(AssertionError, match="trainformer.tasks.a -> trainformer.tasks.b -> trainformer.tasks.a"):
        test_no_import_cycle_between_modules()
