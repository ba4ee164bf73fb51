"""The shape of the code: no import cycle (at module level or inside functions), modules under ~450
lines, a README whose layout table names every module of the package, and no private name used
outside the module (a private module: the package) that holds it."""

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


def test_readme_layout_table_matches_the_tree():
    """Every module is named in the row of its folder (top-level modules in a row of their own), and
    every module a row names exists in that folder."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## What the code is", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 3 and cells[1].strip().startswith("`fastweedout"):
            rows[cells[1].strip()] = "|".join(cells[1:])
    folder_rows = {re.match(r"`(fastweedout/[a-z_/]+/)`", k).group(1): v for k, v in rows.items()
                   if re.match(r"`fastweedout/[a-z_/]+/`$", k)}
    top_cells = " ".join(k for k in rows if k not in {f"`{f}`" for f in folder_rows})
    missing, extra = [], []
    for path in modules().values():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        folder, leaf = rel.rsplit("/", 1)
        if leaf == "__init__.py":
            continue
        if folder == "fastweedout":
            if f"`{leaf}`" not in top_cells and f"`{rel}`" not in top_cells:
                missing.append(rel)
        elif f"`{leaf}`" not in folder_rows.get(folder + "/", ""):
            missing.append(rel)
    for folder, text in folder_rows.items():
        extra += [f"{folder}{leaf}" for leaf in re.findall(r"`([a-z_]+\.py)`", text)
                  if not os.path.exists(os.path.join(ROOT, folder, leaf))]
    assert not missing, f"the README's layout table does not name {missing} in its folder's row"
    assert not extra, f"the README's layout table names modules that are not there: {extra}"
    folders = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, "/") + "/" for p in modules().values()}
    assert set(folder_rows) == folders - {"fastweedout/"}, "a folder without its row, or a row without its folder"




def private_uses(name: str, path: str, known: set[str]) -> list[str]:
    """``from M import _x`` and ``M._x`` in module ``name`` where M is another fastweedout module and
    ``_x`` is not a private module of the package ``name`` lives in."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read())
    bound: dict[str, str] = {}  # local name -> the fastweedout module it is
    out = []

    def foreign(owner: str, attr: str) -> bool:
        if not attr.startswith("_") or attr.startswith("__") or owner == name:
            return False
        sub = f"{owner}.{attr}"
        return not (sub in known and (package == owner or package.startswith(owner + ".")))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module in known:
            for a in node.names:
                if foreign(node.module, a.name):
                    out.append(f"{name}:{node.lineno}: from {node.module} import {a.name}")
                if f"{node.module}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in known:
                    bound[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                and foreign(bound[node.value.id], node.attr):
            out.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    return out


def test_no_private_names_used_across_modules():
    mods = modules()
    found = [u for m, p in sorted(mods.items()) for u in private_uses(m, p, set(mods))]
    assert not found, "private names used outside their module (make them public): " + "; ".join(found)


# A number with a unit of time, a speed-up or a rate: a measurement, which belongs in bench/results
MEASUREMENT = re.compile(r"\d(\.\d+)?\s?(ms|µs|us|s|sec|seconds|min|minutes|h|hours)\b"
                         r"|\d\.\d+\s?x\b|\d\s?×|\bx\s?\d+(\.\d+)?\s+(faster|slower)|\b(faster|slower) by \d"
                         r"|\d\s?([GTMk]?FLOP|[GTMk]i?B|images|img|it)/s\b"
                         r"|\d\s?% of (the )?(copy|peak|bandwidth)", re.I)


def docs_and_comments(path: str):
    """(line, text) of every docstring and comment of a module."""
    import io
    import tokenize

    src = open(path, encoding="utf-8").read()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_no_measurements_in_docstrings_or_comments():
    """Timings and speed-ups go stale: the code says why (and points to bench/results), not how fast."""
    found = [f"{m}:{line}: {hit.group(0)!r}" for m, p in sorted(modules().items())
             for line, text in docs_and_comments(p) for hit in MEASUREMENT.finditer(text)]
    assert not found, "measurements in docstrings or comments (point to bench/results instead): " + "; ".join(found)
