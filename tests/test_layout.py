"""The house rules that keep the layout readable, checked over every module of the package:

- the product (umo/ outside umo/toy/) never imports the toy world's wing (umo/toy/), at any level;
- the modules' imports, function-level ones included, form no circle;
- an import inside a function says why on its line or the line above (an optional heavy dependency);
- no file of the repository points outside it (a sibling folder's documents) or at issue numbers.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "umo"
WING = "umo.toy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of one of our modules in a tree, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in {_known(n) for n in names} - {None}:
            found.append((node.lineno, target))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {t for _, t in imported_modules(tree)} - {name} for name, tree in TREES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def test_the_graph_checks_see_what_they_must():
    """The checks below read real imports: the wing imports the product, and a planted circle is found."""
    graph = import_graph()
    assert "umo.config" in graph["umo.toy.config"] and "umo.toy.world.build" in graph["umo.toy.cli"]
    assert "umo.models.flux2" in graph["umo.models"]  # a function-level import counts
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_product_never_imports_the_toy_wing():
    product = [name for name in TREES if not (name == WING or name.startswith(WING + "."))]
    assert len(product) > 30 and len(TREES) - len(product) > 15
    leaks = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
             for name in product for line, target in imported_modules(TREES[name])
             if target == WING or target.startswith(WING + ".")]
    assert not leaks, "\n".join(leaks)


def test_no_import_circles():
    assert not circles(import_graph())


def _function_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_imports_inside_functions_say_why():
    unexplained = []
    for name, tree in TREES.items():
        lines = MODULES[name].read_text().splitlines()
        explained: set[int] = set()
        for node in sorted(_function_imports(tree), key=lambda n: n.lineno):
            line = node.lineno - 1
            above = line - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            own = lines[line:node.end_lineno]  # the statement's lines: a comment may sit in its parentheses
            if any("#" in text for text in own) or lines[above].strip().startswith("#") or above + 1 in explained:
                explained.add(node.lineno)
            else:
                unexplained.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: {lines[line].strip()}")
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)


OUTSIDE = re.compile(r"\.\./shared|\bshared/notes\b|\b(PAPER|DESIGN|STYLE)\.md\b|\bissues? #?\d+|\(#\d+\)", re.IGNORECASE)


def test_no_file_points_outside_the_repository_or_at_issue_numbers():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    text = [p for p in tracked if Path(p).suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg"}
            or Path(p).name in {"Makefile", "run"}]
    assert "README.md" in text and "umo/config.py" in text
    hits = []
    for rel in text:
        if rel == "tests/test_layout.py":
            continue
        for number, line in enumerate((ROOT / rel).read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
