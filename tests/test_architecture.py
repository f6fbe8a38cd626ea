"""The structure the docs promise: no import circles among the project's modules (function-local imports
included), and an engine (`arcface/`) that imports nothing from `plugins/`.

Imports are read from the source with `ast`, not by running it, so an import inside a function counts as much as
one at the top of a file. `import a.b` and `from a import b` (b a module) point at module a.b; `from a import
name` points at a (its __init__.py when a is a package). Entering a package's __init__ on the way to one of its
submodules is not counted: it is how Python works, not a dependency the code chose.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arcface", "plugins", "tools")


def module_files():
    """{dotted module name: file} of every .py file under the checked roots."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_modules(name, path, known):
    """The project modules that module `name` (file `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in known else source)
    edges = set()
    for target in found:
        while target and target not in known:  # `import a.b.c` of a non-module: its nearest module
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def import_graph():
    files = module_files()
    return {name: imported_modules(name, path, files) for name, path in files.items()}


def circles(graph):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle_and_a_local_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from .sibling import x\n    import pkg.other\n")
    known = {"pkg.m": path, "pkg.sibling": path, "pkg.other": path}
    assert imported_modules("pkg.m", path, known) == {"pkg.sibling", "pkg.other"}


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_engine_imports_nothing_from_plugins():
    graph = import_graph()
    offenders = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.split(".")[0] == "arcface"
                       for t in targets if t.split(".")[0] == "plugins")
    assert not offenders, offenders


def test_no_sys_path_edits_in_the_package_and_tools():
    offenders = [str(p.relative_to(ROOT)) for p in module_files().values() if "sys.path" in p.read_text()]
    assert not offenders, offenders


def test_the_public_api_resolves():
    import arcface
    missing = [name for name in arcface.__all__ if getattr(arcface, name, None) is None]
    assert not missing and "load_config" in arcface.__all__ and "register_plugin" in arcface.__all__
