"""The package's import graph has no cycle, and no module imports another module's private names.

Every import statement counts, including the ones inside functions (a lazy import still ties two modules
together).  kernels/ is read as vitnp.kernels, as it is installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vitnp": ROOT / "vitnp", "vitnp.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "vitnp" and parts[:1] == ["kernels"]:
                continue  # a stray vitnp/kernels folder is not the installed kernels package
            modules[".".join([package, *parts])] = path
    return modules


def is_package(name: str, modules: dict) -> bool:
    return modules[name].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom, modules: dict) -> str | None:
    """The absolute module an ImportFrom reads from (None: outside vitnp)."""
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == "vitnp" else None
    base = module.split(".")
    if not is_package(module, modules):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, modules: dict):
    """(imported module, private names taken from it, line) for every vitnp import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> vitnp module, for attribute access on imported modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vitnp" and alias.name in modules:
                    found.append((alias.name, [], node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node, modules)
            if source is None:
                continue
            private = []
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in modules:  # `from . import gemm`: the submodule itself
                    found.append((target, [], node.lineno))
                    aliases[alias.asname or alias.name] = target
                else:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(alias.name)
                    found.append((source, [], node.lineno))
            if private:
                found.append((source, private, node.lineno))
    for node in ast.walk(tree):  # module._private
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((aliases[node.value.id], [node.attr], node.lineno))
    return found


def graph():
    modules = module_files()
    edges, private = {}, []
    for module, path in modules.items():
        edges[module] = set()
        for target, names, line in imports(module, path, modules):
            if target not in modules:
                raise AssertionError(f"{path}:{line} imports {target}, which does not exist")
            if target != module:
                edges[module].add(target)
            if names and target != module:
                private.append(f"{path.relative_to(ROOT)}:{line} uses {target}'s private {', '.join(names)}")
    return edges, private


def find_cycle(edges: dict) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert not private, "\n".join(private)


@pytest.mark.parametrize("source, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a2"}, "a2": set(), "b": {"b"}}, False),  # self-edges are dropped by graph()
])
def test_the_cycle_finder_finds_cycles(source, cyclic):
    edges = {k: {v for v in vs if v != k} for k, vs in source.items()}
    assert (find_cycle(edges) is not None) == cyclic


def test_the_import_reader_sees_private_names_and_lazy_imports(tmp_path):
    folder = tmp_path / "vitnp"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("def f():\n    from .b import _hidden\n    from . import b\n    return b._other\n")
    (folder / "b.py").write_text("_hidden = _other = 1\n")
    modules = {"vitnp": folder / "__init__.py", "vitnp.a": folder / "a.py", "vitnp.b": folder / "b.py"}
    found = imports("vitnp.a", modules["vitnp.a"], modules)
    assert {t for t, _, _ in found} == {"vitnp.b"}
    assert sorted(n for _, names, _ in found for n in names) == ["_hidden", "_other"]
