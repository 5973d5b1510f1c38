"""The package's shape: no import cycles between its modules, and no method named outside its own
module and the registry (the registries are the one place a method or metric is listed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_graph() -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p for p in (SRC / "editscale").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_methods_are_named_only_in_their_modules_and_the_registry():
    own = {"alphaedit": "alphaedit.py", "encore": "encore.py", "ft-c": "ftc.py", "r-rome": "rome.py", "prune": "prune.py",
           "nas": "nas.py", "ultraedit": "ultraedit.py"}
    for path in (SRC / "editscale").rglob("*"):
        if path.suffix not in (".py", ".yaml") or path.name == "methods.py":
            continue
        # a method built on another imports its class (nas.py: from .alphaedit import AlphaEdit)
        text = "\n".join(line for line in path.read_text().splitlines() if not re.match(r"from \.\w+ import ", line))
        for name, module in own.items():
            if path.name != module:
                assert not re.search(re.escape(name), text), f"{name!r} named in {path.relative_to(SRC)}"


# The layers, lowest first: a module may import its own layer and the ones below, never one above
# (imports inside functions count). The registry and plugin loading sit at the bottom, so that a
# stage never reaches up to load plugins or to find another stage's registry.
LAYERS = ["io", "robust", "registry", "plugins", "config", "layout", "models", "data", "stats", "edit", "evaluate", "report",
          "audit", "results", "workflow", "planning", "memory", "calibration", "doctor", "merge", "forkserver", "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package itself
    assert parts[1] in LAYERS, f"{module}: put {parts[1]!r} in tests/test_layout.py's LAYERS"
    return LAYERS.index(parts[1])


def test_no_module_imports_a_higher_layer():
    graph = _import_graph()
    upward = sorted(f"{m} -> {t}" for m in graph for t in graph[m] if _layer(t) > _layer(m))
    assert not upward, upward


def test_the_upward_import_check_sees_imports_inside_functions():
    """The graph the layer test reads has function-level imports (a lazy import is still a dependency)."""
    graph = _import_graph()
    assert "editscale.edit.chain" in graph["editscale.evaluate.job"]  # imported inside Checkpoint.model only
    assert _layer("editscale.edit.chain") < _layer("editscale.evaluate.job")


def test_stage_packages_do_not_import_the_orchestration_modules():
    """The stages (models, data, stats, edit, evaluate, report, audit) are the library; the workflow
    plan, the cost estimates and doctor sit above them and import them, never the reverse."""
    graph = _import_graph()
    top = {"editscale.workflow", "editscale.planning", "editscale.doctor"}
    stages = ("models", "data", "stats", "edit", "evaluate", "report", "audit")
    upward = {m: sorted(graph[m] & top) for m in graph if m.split(".")[1:2] and m.split(".")[1] in stages and graph[m] & top}
    assert not upward, upward
