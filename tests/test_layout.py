"""The package layout is the architecture (docs/architecture.md): no import cycles, no layer reaching up.

Imports are read with ``ast`` from every module under ``src/``, function-level ones included (they run too),
``if TYPE_CHECKING:`` blocks excluded (they never run). ``from pkg import name`` where ``pkg.name`` is a module
is an import of that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# package -> the jfe packages it may import (besides itself and the shared modules below)
SHARED = {"jfe.errors", "jfe.paths", "jfe.hardware"}
ALLOWED = {
    "jfe.data": set(),
    "jfe.models": {"jfe.data"},
    "jfe.index": {"jfe.data"},
    "jfe.indexing": {"jfe.index", "jfe.models", "jfe.data"},
    "jfe.eval": {"jfe.index", "jfe.models", "jfe.data"},
    "jfe.serve": {"jfe.indexing", "jfe.index", "jfe.models", "jfe.data"},
    "jfe.train": {"jfe.eval", "jfe.index", "jfe.models", "jfe.data"},
    "jfe.lance_embeddings": {"jfe.models", "jfe.data"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif base in modules:
                        graph[name].add(base)
    for name in graph:
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _package(module: str) -> str | None:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                None)


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_layer_imports_from_a_layer_above() -> None:
    """Each layer imports only the layers below it; the CLI shells (``*.commands``), the short API and the
    study sit on top and may import anything."""
    bad = []
    for module, targets in import_graph().items():
        package = _package(module)
        if package is None or module.endswith(".commands"):
            continue
        for target in targets:
            other = _package(target)
            if other is None:
                if target.startswith("jfe.") and target not in SHARED and target != "jfe.cli_options":
                    bad.append(f"{module} -> {target}")
            elif other != package and other not in ALLOWED[package]:
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_the_library_never_imports_the_study() -> None:
    """``jfe_study`` (demo, reproduce, curves, bootstrap, seeds report) sits apart, as open_clip_train does:
    it reaches the ``jfe`` command through an entry point, never through an import from ``jfe``."""
    graph = import_graph()
    assert any(m.startswith("jfe_study") for m in graph)  # the study is there to be kept apart
    bad = [f"{m} -> {t}" for m, ts in graph.items() if m == "jfe" or m.startswith("jfe.")
           for t in ts if t.startswith("jfe_study")]
    assert bad == []
    # nor by name at run time (importlib): the entry point is the only way in
    assert not [p for p in (SRC / "jfe").rglob("*.py") if "import_module(\"jfe_study" in p.read_text()]


def test_the_study_commands_reach_jfe_through_the_entry_point() -> None:
    from typer.main import get_command

    from jfe.cli import app

    names = set(get_command(app).commands)  # type: ignore[attr-defined]
    assert {"demo", "reproduce", "seeds-report", "report", "eval"} <= names


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants of the code (f-string parts included), docstrings left out: what a program spells."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def modules_spelling(fragment: str, roots: tuple[Path, ...] = (SRC / "jfe", SRC / "jfe_study")) -> list[str]:
    return sorted(str(path.relative_to(SRC)) for root in roots for path in root.rglob("*.py")
                  if any(fragment in n.value for n in _code_strings(ast.parse(path.read_text(encoding="utf-8")))))


def test_metric_names_are_spelled_in_one_place() -> None:
    """Recall@k's name comes from jfe.eval.metrics.recall_key / PRIMARY_METRIC everywhere else, so a new
    metric (or a renamed one) touches one module, not eight."""
    assert modules_spelling("R@") == ["jfe/eval/metrics.py"]
    # the finder sees f-string parts and skips docstrings
    tree = ast.parse('"""R@5 in a docstring"""\nx = f"val R@{k}"\n')
    assert [n.value for n in _code_strings(tree)] == ["val R@"]
