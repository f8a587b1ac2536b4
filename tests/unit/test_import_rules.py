"""The import rules of docs/ARCHITECTURE.md, held against the real imports, and no import circles.

The rules are read from the page itself (the table between its import-rules
markers), so the map and the code cannot drift apart: a new import that breaks
a rule fails here, naming the module, the import and the rule.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# Where first-party modules live, and what is generated (not held to the rules).
SOURCES = {ROOT / "sidecar": "", ROOT / "clients" / "python": "", ROOT: "bench"}
GENERATED = ("taskguard.store.etcdpb", "taskguard_client.v1")
FIRST_PARTY = ("taskguard", "taskguard_client", "bench")

Graph = Mapping[str, set[str]]


def _modules() -> Iterator[tuple[str, Path]]:
    for base, only in SOURCES.items():
        folder = base / only if only else base
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[0] not in FIRST_PARTY:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not name.startswith(GENERATED):
                yield name, path


def _is_module(name: str, known: set[str]) -> bool:
    return name in known or name.startswith(GENERATED)


def import_graph() -> dict[str, set[str]]:
    """Each module's imports, function-level ones included; ``from x import y`` is x.y when y is a module."""
    modules = dict(_modules())
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    imports.add(full if _is_module(full, known) else base)
        graph[name] = {target for target in imports if target != name}
    return graph


def rules() -> dict[str, list[str]]:
    text = ARCHITECTURE.read_text()
    table = text.split("<!-- import-rules: begin -->", 1)[1].split("<!-- import-rules: end -->", 1)[0]
    found: dict[str, list[str]] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        found[cells[0].strip("`")] = re.findall(r"`([^`]+)`", cells[1])
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbids(entry: str, target: str) -> bool:
    if entry.endswith(".*"):
        return target.startswith(entry[:-1])
    return _under(target, entry)


def violations(graph: Graph, table: Mapping[str, list[str]]) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        for scope, forbidden in table.items():
            if not _under(module, scope):
                continue
            for target in sorted(imports):
                for entry in forbidden:
                    # A folder's own modules may use each other unless a rule names one of them.
                    if _forbids(entry, target) and not (_under(target, scope) and entry == scope):
                        found.append(f"{module} imports {target}: the rule for {scope} forbids {entry}")
    return found


def circles(graph: Graph) -> list[list[str]]:
    """Every set of first-party modules that import each other round (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_rules_table_is_there_and_names_modules_that_exist() -> None:
    table = rules()
    graph = import_graph()
    assert {"taskguard.guard", "taskguard.store", "taskguard.runtime", "taskguard.front"} <= set(table)
    for scope in table:
        assert any(_under(module, scope) for module in graph), f"the rule for {scope} names no module"


def test_every_module_keeps_the_import_rules_of_the_architecture_page() -> None:
    broken = violations(import_graph(), rules())
    assert not broken, "\n".join(broken)


def test_no_two_modules_import_each_other_round() -> None:
    assert circles(import_graph()) == []


def test_the_checks_catch_what_they_are_for() -> None:
    graph = {
        "taskguard.guard.core": {"taskguard.guard.model", "asyncio"},
        "taskguard.guard.model": set(),
        "taskguard.front.api": {"taskguard.store.sqlite", "taskguard.store"},
        "bench.a": {"bench.b"},
        "bench.b": {"bench.c"},
        "bench.c": {"bench.a"},
    }
    table = {"taskguard.guard": ["taskguard.guard", "asyncio"], "taskguard.front": ["taskguard.store.*"]}
    assert violations(graph, table) == [
        "taskguard.front.api imports taskguard.store.sqlite: the rule for taskguard.front forbids taskguard.store.*",
        "taskguard.guard.core imports asyncio: the rule for taskguard.guard forbids asyncio",
    ]
    assert circles(graph) == [["bench.a", "bench.b", "bench.c"]]
