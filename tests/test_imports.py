"""The import graph of ernievil2, read from the source (ast): the library never imports the
commands (engine, training, cli, launcher, evaluation), not even inside a function, and no two
modules import each other at module level."""
import ast

import pytest

from conftest import ROOT

PACKAGE = ROOT / "packages" / "ernievil2"
COMMANDS = ("ernievil2.engine", "ernievil2.train", "ernievil2.cli", "ernievil2.launch",
            "ernievil2.evaluate", "ernievil2.__main__", "ernievil2.zeroshot_cli",
            "ernievil2.search_cli", "ernievil2.serve")


def module_name(path):
    parts = ["ernievil2", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_command(name):
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def _resolve(importer, node):
    """The ernievil2 modules an import statement loads (absolute or relative)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module
    # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def imports(name, module_level_only):
    """(target, line) of every ernievil2 import in module `name`."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), str(MODULES[name]))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not (module_level_only and in_function):
                found.extend((t, child.lineno) for t in _resolve(name, child)
                             if t == "ernievil2" or t.startswith("ernievil2."))
            visit(child, nested)
    visit(tree, False)
    return found


def test_the_graph_reader_sees_relative_absolute_and_late_imports():
    launch = {t for t, _ in imports("ernievil2.launch", module_level_only=False)}
    assert {"ernievil2.cli", "ernievil2.resources"} <= launch  # both inside functions
    assert "ernievil2.cli" not in {t for t, _ in imports("ernievil2.launch", module_level_only=True)}
    assert "ernievil2.distributed" in {t for t, _ in imports("ernievil2.losses", True)}  # absolute


LIBRARY = [m for m in MODULES if not is_command(m)]


@pytest.mark.parametrize("name", LIBRARY)
def test_the_library_never_imports_a_command(name):
    bad = [f"{t} (line {line})" for t, line in imports(name, module_level_only=False) if is_command(t)]
    assert not bad, f"{MODULES[name]} imports {', '.join(bad)}"


def test_no_import_cycle_at_module_level():
    graph = {m: sorted({t for t, _ in imports(m, module_level_only=True) if t in MODULES and t != m})
             for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m)
