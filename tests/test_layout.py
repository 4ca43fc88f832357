"""The layout is the architecture: which package may import which, read from the source with ``ast``.

Every import counts, at module level or inside a function, because a lazy import is still a
dependency the day that function runs. Only ``if TYPE_CHECKING:`` blocks are left out of the
cycle check (they never run).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("lance_io", "serve_apps", "ray_jobs", "llamafactory_ext", "bench", "tests")


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and whether it only runs under TYPE_CHECKING."""

    module: str
    where: str
    type_checking: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    _module_name(path): path for package in OURS for path in sorted((REPO / package).rglob("*.py"))
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(source: str, module: str, *, is_package: bool = False, filename: str = "?") -> list[Import]:
    """Return every import of ``source`` (absolute names; ``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(source, filename)
    package = module.split(".") if is_package else module.split(".")[:-1]
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            guarded |= {id(inner) for child in node.body for inner in ast.walk(child)}
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [Import(name, f"{filename}:{node.lineno}", id(node) in guarded) for name in names]
    return found


def imports_of(module: str) -> list[Import]:
    """Return every import of one of our modules."""
    path = MODULES[module]
    return imports_in(
        path.read_text(), module, is_package=path.name == "__init__.py", filename=str(path.relative_to(REPO))
    )


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _offenders(package: str, forbidden: set[str], allowed: set[str] = frozenset()) -> list[str]:
    """Imports in ``package`` of a forbidden top-level package, except modules under ``allowed``."""
    out = []
    for module in MODULES:
        if _top(module) != package:
            continue
        for imp in imports_of(module):
            if _top(imp.module) in forbidden and not any(
                imp.module == a or imp.module.startswith(a + ".") for a in allowed
            ):
                out.append(f"{imp.where} imports {imp.module}")
    return sorted(set(out))


def _resolve(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (``a.b.func`` -> ``a.b``), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Return module -> modules of ours it imports at run time (TYPE_CHECKING blocks left out)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = {_resolve(imp.module) for imp in imports_of(module) if not imp.type_checking}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_lazy_relative_and_type_checking_imports_and_finds_cycles():
    """The rules below are only as good as this reader: show it finds what it must."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n"
        "    import lance\n"
        "def f():\n"
        "    import pyarrow.compute\n"
    )
    found = {i.module: i.type_checking for i in imports_in(source, "pkg.sub.mod")}
    assert found["pkg.sub.sibling"] is False and found["pkg.other.thing"] is False
    assert found["pyarrow.compute"] is False and found["lance"] is True
    assert _resolve("ray_jobs.ingest.job.ingest") == "ray_jobs.ingest.job"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert _offenders("serve_apps", {"lance_io"}) != []  # it does import lance_io.tasks, lazily too


def test_lance_io_imports_no_other_package_of_ours():
    assert _offenders("lance_io", set(OURS) - {"lance_io"}) == []


def test_serve_apps_imports_no_lance_or_pyarrow_and_only_tasks_reasons_views_and_image_size_of_lance_io():
    forbidden = {"lance", "lance_ray", "pyarrow", "ray_jobs", "llamafactory_ext", "bench", "tests", "lance_io"}
    allowed = {"lance_io.tasks", "lance_io.reasons", "lance_io.augment", "lance_io.image_size"}
    assert _offenders("serve_apps", forbidden, allowed=allowed) == []


def test_importing_the_serve_app_and_every_backend_loads_neither_lance_nor_pyarrow():
    """What the ast cannot see (a dependency's own imports): the modules a labeler replica loads."""
    backends = sorted(m for m in MODULES if m.startswith("serve_apps.backends."))
    code = (
        "import importlib, json, sys\n"
        f"for name in {['serve_apps.app', 'serve_apps.client', *backends]!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('lance', 'lance_ray', 'pyarrow'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_llamafactory_ext_imports_neither_ray_jobs_nor_serve_apps():
    assert _offenders("llamafactory_ext", {"ray_jobs", "serve_apps", "bench", "tests"}) == []


def test_bench_imports_nothing_from_tests():
    assert _offenders("bench", {"tests"}) == []


def test_no_import_cycles_between_our_modules():
    assert cycles(import_graph()) == []
