"""The house rules of the source tree, read from the files themselves: data flows one way
(no import cycle), the collector takes from ``trainer_client`` only its torch-free
contract, the client nothing from the collector, and no module grows past a size one
reads in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("collector", "trainer_client")
MAX_LINES = 450  # "~400": a module past this wants splitting by what its parts do
# What the collector (no torch on a login node) may import of the client's package.
CLIENT_FOR_COLLECTOR = ("trainer_client", "trainer_client.wire", "trainer_client.curve")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str], top_level_only: bool) -> set[str]:
    """The project modules ``name`` imports (at module level only, if asked: imports
    inside functions run later and cannot make a cycle at import time)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also those under ``if TYPE_CHECKING:`` are skipped: not run
        nodes = [n for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)]
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods), top_level_only=True) for m, p in mods.items()}
    # A package's __init__ importing its own children is how packages work, not a cycle.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):]
                                                                    + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_two_halves_import_only_the_contract():
    mods = _modules()
    for name, path in mods.items():
        deps = _imports(name, path, set(mods), top_level_only=False)
        if name.startswith("collector"):
            client = {d for d in deps if d.startswith("trainer_client")}
            assert client <= set(CLIENT_FOR_COLLECTOR) | {
                d for d in client if d.startswith("trainer_client.wire.")}, (name, client)
        else:
            assert not {d for d in deps if d.startswith("collector")}, name


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
