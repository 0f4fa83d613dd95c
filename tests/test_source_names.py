"""Every name the project's Python reads is bound somewhere it can be found.

A name read but bound nowhere raises NameError only when its line runs, and some lines run only
on a GPU (`bench/autotune.py` read an `M` that a refactor had removed, 2026-11-27: the CPU never
ran that line). `symtable` gives each scope's names as the compiler resolves them: a name that
resolves to the module's globals must be bound at module level or be a builtin.
"""

import builtins
import symtable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("sba_kernels", "sba_model", "bench", "tests") for p in (ROOT / folder).rglob("*.py"))
MODULE_NAMES = {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__", "__builtins__",
                "__path__", "__annotations__"}


def unbound_globals(source: str, filename: str) -> list[tuple[str, str]]:
    """``(scope, name)`` for each global name read in ``source`` that nothing binds."""
    module = symtable.symtable(source, filename, "exec")
    bound = {s.get_name() for s in module.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    known = bound | set(dir(builtins)) | MODULE_NAMES
    found = []

    def visit(table):
        for symbol in table.get_symbols():
            resolves_to_module = table is module or symbol.is_global()
            if resolves_to_module and symbol.is_referenced() and symbol.get_name() not in known:
                found.append((table.get_name(), symbol.get_name()))
        for child in table.get_children():
            visit(child)

    visit(module)
    return found


def test_the_check_finds_a_name_nothing_binds():
    source = "import os\n\ndef f(n):\n    rows = [n * k for k in range(M)]\n    return os.sep, rows, len(rows)\n"
    assert unbound_globals(source, "x.py") == [("f", "M")]
    assert unbound_globals(source.replace("def f", "M = 3\n\ndef f"), "x.py") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_name_is_read_that_nothing_binds(path):
    assert unbound_globals(path.read_text(), str(path)) == []
