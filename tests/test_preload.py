"""agent/preload.py: the background imports a CLI command runs while the modem answers."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from agent import ops, preload

AGENT = Path(__file__).resolve().parent.parent / "agent"


def _module_graph() -> dict[str, set[str]]:
    """Module → the agent modules it imports at module level (what runs at import time)."""
    mods = {}
    for p in AGENT.rglob("*.py"):
        parts = p.relative_to(AGENT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps.add(target)
                deps |= {f"{target}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_level_import_cycle():
    """Two threads importing the two ends of a module-level cycle can deadlock (Python then
    raises _DeadlockError in one of them): the preload relies on there being none. (A package
    importing its own submodule in __init__ is not a cycle here: a submodule's parent package
    is fully imported before the preload starts.)"""
    assert _cycles(_module_graph()) == []


@pytest.mark.parametrize("op", sorted(ops._OPS))
def test_every_preloaded_module_exists(op):
    for step in ops.preload_modules(op):
        module, _, func = step.partition(":")
        m = importlib.import_module(module)
        if func:
            assert callable(getattr(m, func))


def test_what_a_download_imports_while_the_package_loads_exists():
    from agent.ops import download
    for name in download.AFTER_INSTALL:
        importlib.import_module(name)


def test_nothing_left_to_import_starts_no_thread():
    assert preload.start(["json", "agent.preload"]) is None


def test_preload_imports_in_the_background_and_puts_the_switch_interval_back():
    code = (
        "import sys; from agent import preload, codec\n"
        "before = sys.getswitchinterval()\n"
        "p = preload.start(['agent.es10', 'agent.no_such_module', 'json', 'agent.codec:warm'])\n"
        "assert p.wait(60)\n"
        "assert 'agent.es10' in sys.modules and 'json' in sys.modules\n"
        "assert codec._types is not None, 'the base tables were not loaded'\n"
        "assert [n for n, _ in p.failed] == ['agent.no_such_module'], p.failed\n"
        "assert sys.getswitchinterval() == before, sys.getswitchinterval()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_a_failing_step_is_recorded_not_raised():
    def boom():
        raise ZeroDivisionError("x")
    p = preload.start([boom, "json"])
    assert p.wait(10)
    assert p.failed == [("test_a_failing_step_is_recorded_not_raised.<locals>.boom", "ZeroDivisionError: x")]
