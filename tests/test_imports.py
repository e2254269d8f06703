"""No import cycles among the packages that promise none (DESIGN: arrows point down).

`import_graph()` parses every module under lcm/ and kernels/ with `ast` (nothing is imported)
and collects an edge for every `import` and `from ... import` statement, at module level and
inside functions and classes alike, with relative imports resolved against the importing
module. The rules:

- `import a.b` is an edge to `a.b` only, not to `a` (Python runs `a/__init__.py` first, but
  a package's `__init__` re-exporting its submodules would otherwise put every submodule in a
  cycle with it);
- `from a.b import c` is an edge to the module `a.b.c` when there is one, else to `a.b`;
- only modules under lcm/ and kernels/ are nodes; imports of anything else are dropped.

A package `__init__` importing its own submodules is an ordinary edge: it closes a cycle only
when a submodule imports the package back (`from lcm.attention import ...` inside
lcm/attention/), which is a real cycle.

`test_no_import_cycles` fails if a module of `PACKAGES_WITHOUT_CYCLES` lies on a cycle of that
graph (the cycle may pass through other modules), naming one such cycle. Extending the promise
to a package is one more entry in that tuple.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("lcm", "kernels")
PACKAGES_WITHOUT_CYCLES = ("lcm", "kernels")


def module_names(root=ROOT, sources=SOURCES):
    """{dotted module name: path} of every .py file under the source folders."""
    names = {}
    for source in sources:
        for path in sorted((root / source).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _imported(node, module, is_package, modules):
    """The modules of `modules` that one import statement of `module` names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:  # relative: from the package of `module`, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    named = {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in named if name in modules} or {target}


def import_graph(root=ROOT, sources=SOURCES):
    """{module: set of modules it imports}, over the modules of lcm/ and kernels/."""
    modules = module_names(root, sources)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):  # every statement, in functions too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, is_package, modules)
        graph[module] = {m for m in edges if m in modules and m != module}
    return graph


def _in(module, packages):
    return any(module == p or module.startswith(p + ".") for p in packages)


def find_cycle(graph, packages=PACKAGES_WITHOUT_CYCLES):
    """One cycle (a list of modules, first == last) through a module of `packages`, or None."""
    for start in sorted(m for m in graph if _in(m, packages)):
        # Depth-first search for a path from start back to start.
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "lcm.attention.attend" in graph and "kernels.ring.tpu" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_rules():
    """Relative imports resolve; `from pkg import submodule` is an edge to the submodule; a
    cycle is found and named."""
    modules = {"a": None, "a.b": None, "a.b.c": None, "a.d": None}
    rel = ast.parse("from .c import x\nfrom . import c\nfrom .. import d").body
    assert [_imported(n, "a.b", True, modules) for n in rel] == [{"a.b.c"}, {"a.b.c"}, {"a.d"}]
    assert _imported(ast.parse("import a.b").body[0], "a.d", False, modules) == {"a.b"}
    graph = {"a": {"a.b"}, "a.b": {"a.b.c"}, "a.b.c": {"a"}, "a.d": set()}
    assert find_cycle(graph, ("a.b",)) == ["a.b", "a.b.c", "a", "a.b"]
    assert find_cycle(graph, ("a.d",)) is None


def private_imports(root=ROOT, sources=SOURCES):
    """`module: from X import _name` for every private name a module of lcm/ or kernels/
    imports from another of their modules (dunder names such as __all__ are public)."""
    modules = module_names(root, sources)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            targets = _imported(node, module, is_package, modules)
            if not any(t in modules or t.startswith(("lcm.", "kernels.")) for t in targets):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}: from {'.' * node.level}{node.module or ''} "
                                 f"import {alias.name}")
    return found


def test_no_private_names_imported_across_modules():
    """Each package exposes what others use under a public name, in one place."""
    assert private_imports() == []
