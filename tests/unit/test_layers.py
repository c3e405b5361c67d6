"""The import layers of docs/architecture.md, enforced: every import of a shardwise module, at module level or inside
a function (so that no function-local import can hide a circle), goes to the importer's own layer or one below,
and no set of modules imports itself round. The check reads the source with `ast`; it imports nothing."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from helpers import REPO

# lowest first: a module may import from its own layer and the layers below it
LAYERS = ("models", "optim", "parallel", "trainer", "launch")
# the config schema sits in trainer/ but imports no subsystem: only the leaf every layer shares and the recipe files
CONFIG_SCHEMA, CONFIG_MAY_IMPORT = "trainer.config", {"models.args", "trainer.recipes"}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported shardwise module: line}} over the layers' source files, every import counted."""
    files = {_module_name(root, p): p for layer in LAYERS for p in sorted((root / layer).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for target in targets:
                if target.split(".")[0] not in LAYERS:
                    continue
                while target and target not in files:  # `from pkg import name` names a module or an attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
                    break
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_problems(root: Path) -> list[str]:
    graph = import_graph(root)
    problems = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            mine, theirs = LAYERS.index(module.split(".")[0]), LAYERS.index(target.split(".")[0])
            if theirs > mine:
                problems.append(
                    f"upward import: {module} (line {line}) imports {target} ({LAYERS[mine]} is below {LAYERS[theirs]})"
                )
            if module == CONFIG_SCHEMA and target not in CONFIG_MAY_IMPORT:
                problems.append(f"the config schema imports a subsystem: {module} (line {line}) imports {target}")
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def test_no_import_circle_and_no_upward_import():
    assert import_problems(REPO) == []


def test_the_check_fails_on_a_circle_and_an_upward_import(tmp_path):
    """A copy of the tree broken on purpose: the model imports the config schema (upward, and a circle with it, as
    before the layers existed), and the memory terms import the plan that imports them (a circle in one layer)."""
    for layer in LAYERS:
        shutil.copytree(REPO / layer, tmp_path / layer, ignore=shutil.ignore_patterns("__pycache__"))
    llama = tmp_path / "models" / "llama.py"
    # function-local, as the old circle was hidden: counted all the same
    llama.write_text(
        llama.read_text() + "\n\ndef _schema():\n    from trainer.config import Config\n\n    return Config\n"
    )
    terms = tmp_path / "parallel" / "memory_terms.py"
    terms.write_text(terms.read_text().replace("import math\n", "import math\n\nimport parallel.plan\n", 1))
    problems = import_problems(tmp_path)
    assert any(p.startswith("upward import: models.llama") and "trainer.config" in p for p in problems), problems
    assert any(p.startswith("import circle:") and "models.llama" in p and "trainer.config" in p for p in problems), (
        problems
    )
    assert "import circle: parallel.memory_terms -> parallel.plan" in problems, problems
