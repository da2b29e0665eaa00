"""The package layering of docs/architecture.md, checked on the source with ``ast``.

Every import counts, including function-level and ``TYPE_CHECKING`` ones: a cycle hidden
behind a lazy import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("agent", "server", "harness", "bench", "tests")
MAX_MODULE_LINES = 400

# Which top-level package (or server subpackage) may import which. Anything not listed is
# refused. "agent" is the wire contract and the device runtime: it stands alone.
ALLOWED: dict[str, set[str]] = {
    "agent": {"agent"},
    "server": {"agent", "server"},
    "harness": {"agent", "server", "harness"},
    "bench": {"agent", "server", "harness", "bench", "tests"},
    "tests": {"agent", "server", "harness", "bench", "tests"},
}
# Inside server: the arrows only point down (cli -> service/station -> broker -> pki/store).
SERVER_ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "pki": {"errors", "pki"},
    "store": {"errors", "pki", "store"},  # pki: certificate fingerprints and serials
    "broker": {"errors", "pki", "store", "broker"},
    "service": {"errors", "config", "pki", "store", "broker", "service"},
    "station": {"errors", "config", "pki", "store", "station"},
    "cli": {"errors", "config", "pki", "store", "broker", "service", "station", "cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in TOP_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The project modules ``name`` imports (a ``from pkg import mod`` names the module)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in MODULES else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH[node]:
            # A package's __init__ importing its own submodules is not a cycle a reader sees.
            if state.get(nxt) == 1 and not nxt.startswith(node + "."):
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in GRAPH:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    GRAPH["agent.errors"].append("agent.protocol")
    GRAPH["agent.protocol"].append("agent.errors")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["agent.errors"].remove("agent.protocol")
        GRAPH["agent.protocol"].remove("agent.errors")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layering(name: str) -> None:
    top = name.split(".")[0]
    for target in GRAPH[name]:
        assert target.split(".")[0] in ALLOWED[top], f"{name} imports {target}"
        if top == "server" and target.startswith("server.") and name.count(".") >= 1:
            mine, theirs = name.split(".")[1], target.split(".")[1]
            assert theirs in SERVER_ALLOWED[mine], f"{name} imports {target}"


# Test modules are exempt: each holds the cases of one concept, and splitting them by length
# would scatter a concept's cases over files. Everything that ships, benchmarks and the
# harness stays under the limit.
@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith("tests")))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[name]} has {lines} lines; split it by concept"


def test_agent_cli_imports_nothing_of_server() -> None:
    """What a board runs: the agent's entry points load no server or harness module."""
    probe = (
        "import sys, agent.cli, agent.runner, agent.factory.console; "
        "bad = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('server', 'harness', 'pymongo'));"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"the agent loaded {done.stdout.strip()}"
