"""The shape of the code: no import cycle (at module level or inside functions), modules under ~450
lines, and a README whose layout table names every module of the package."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastweedout")
MAX_LINES = 450


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """Every fastweedout module a module imports, wherever the import statement stands."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycles_module_level_or_lazy():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of the code's layers
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_are_small():
    big = {m: n for m, p in modules().items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_readme_layout_table_names_every_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## What the code is", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Za-z_/.]+?)(?:\.py)?/?`", table))
    missing = []
    for path in modules().values():
        rel = os.path.relpath(path, ROOT)
        leaf = os.path.basename(path)[:-3]
        folder = os.path.relpath(os.path.dirname(path), ROOT)
        if leaf == "__init__" or folder in named or f"{folder}/" in table:
            continue
        if not ({rel[:-3], leaf} & named):
            missing.append(rel)
    assert not missing, f"the README's layout table does not name {missing}"
    for name in named:  # and names nothing that is not there
        if "/" in name or name.startswith("fastweedout"):
            assert os.path.exists(os.path.join(ROOT, name)) or os.path.exists(os.path.join(ROOT, name + ".py")), name
