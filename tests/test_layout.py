"""The package's layers, read from its source: the rules (``import raftorch``: the top-level
modules and ``raftorch.models``), the training tool (``raftorch.training``) and the science
(``raftorch.experiments``, ``raftorch.analysis``, ``raftorch.theory``); ``raftorch.cli`` is the
entry point above them all. Dependencies point one way (science -> tool -> rules), no module
imports itself through others, and no module reaches into another's private names. Every
import counts, those inside functions too (a lazy import is still a dependency); only imports
under ``if TYPE_CHECKING:`` are annotations and skipped."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "raftorch"

RULES, TOOL, SCIENCE, ENTRY = "rules", "tool", "science", "entry"
ALLOWED = {RULES: {RULES}, TOOL: {RULES, TOOL}, SCIENCE: {RULES, TOOL, SCIENCE}, ENTRY: {RULES, TOOL, SCIENCE, ENTRY}}


def module_files() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = module_files()


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("raftorch.cli", "raftorch.__main__"):
        return ENTRY
    if len(parts) > 1 and parts[1] == "training":
        return TOOL
    if len(parts) > 1 and parts[1] in ("experiments", "analysis", "theory"):
        return SCIENCE
    return RULES


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported raftorch module, names taken from it, line) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "raftorch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "raftorch":
                continue
            for alias in node.names:  # `from raftorch import layers` imports the module raftorch.layers
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((target, [alias.name], node.lineno))
    return [(t, names, line) for t, names, line in found if t in MODULES]


GRAPH = {m: imports(m) for m in MODULES}


def test_the_layers_are_what_the_package_holds():
    assert {layer(m) for m in MODULES} == {RULES, TOOL, SCIENCE, ENTRY}
    assert layer("raftorch.convert") == RULES and layer("raftorch.models.vgg") == RULES
    assert layer("raftorch.training.loop") == TOOL and layer("raftorch.experiments.suite") == SCIENCE


def test_dependencies_point_from_the_science_to_the_tool_to_the_rules():
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)}), line {line}"
             for m, edges in GRAPH.items() for t, _, line in edges
             if layer(t) not in ALLOWED[layer(m)]]
    assert not wrong, "\n".join(wrong)


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    succ = {m: sorted({t for t, _, _ in edges if t != m}) for m, edges in GRAPH.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in succ:
        if m not in index:
            visit(m)
    return out


def _is_package_init(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_module_imports_itself_through_others():
    # a package's __init__ gathers its modules' public names, and those modules may import
    # the package's other modules through it; the package itself is not part of a circle
    cycles = [c for c in _cycles() if len([m for m in c if not _is_package_init(m)]) > 1]
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m} imports {name} from {t}, line {line}"
               for m, edges in GRAPH.items() for t, names, line in edges for name in names
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_private_attribute_of_another_raftorch_module_is_used():
    found = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}  # local name -> raftorch module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES:
                        bound[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raftorch"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != m):
                found.append(f"{m} uses {node.value.id}.{node.attr}, line {node.lineno}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", ["convert", "Linear", "Conv2d", "MultiheadAttention", "DirectFeedback",
                                  "feed_targets", "loss_scale"])
def test_the_rules_are_what_import_raftorch_gives(name):
    import raftorch

    assert hasattr(raftorch, name)


def test_the_checks_find_a_wrong_direction_and_a_circle(monkeypatch):
    """The checks above can fail: an edge from the rules to the tool, and a circle."""
    fake = dict(GRAPH)
    fake["raftorch.layers"] = GRAPH["raftorch.layers"] + [("raftorch.training.loop", [], 1), ("raftorch.rules", [], 1)]
    fake["raftorch.rules"] = GRAPH["raftorch.rules"] + [("raftorch.layers", [], 1)]
    monkeypatch.setitem(globals(), "GRAPH", fake)
    with pytest.raises(AssertionError, match="raftorch.layers \\(rules\\) imports raftorch.training.loop"):
        test_dependencies_point_from_the_science_to_the_tool_to_the_rules()
    with pytest.raises(AssertionError, match="raftorch.layers"):
        test_no_module_imports_itself_through_others()
