"""The layout's rules, checked on the source: ``lmstrain.lms`` is a library that uses nothing of
the app, and no lmstrain module imports itself back through others."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmstrain"


def module_name(path, root=PACKAGE.parent):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name, root):
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path, root=PACKAGE.parent):
    """Every lmstrain module ``path`` imports, at any depth (function-level imports too).

    ``from package import submodule`` depends on the submodule only (the package is already
    being imported when its own modules run); ``from package import name`` on the package.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names
                          if is_module(f"{base}.{a.name}", root)]
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return {n for n in found if n == "lmstrain" or n.startswith("lmstrain.")}


def module_graph():
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_the_library_imports_nothing_of_the_app():
    outside = {module: sorted(name for name in names if not name.startswith("lmstrain.lms"))
               for module, names in module_graph().items() if module.startswith("lmstrain.lms")}
    assert {m: names for m, names in outside.items() if names} == {}


def test_the_module_graph_has_no_cycle():
    graph = module_graph()
    # A module's package __init__ runs first; count it as a dependency, so that a cycle
    # through a package's exports is found too.
    edges = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(
                    path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "lmstrain" / "lms").mkdir(parents=True)
    (tmp_path / "lmstrain" / "training").mkdir()
    for module in ("lms/__init__", "lms/x", "lms/y", "training/__init__", "training/fit"):
        (tmp_path / "lmstrain" / f"{module}.py").touch()
    source = tmp_path / "lmstrain" / "lms" / "x.py"
    source.write_text("def f():\n    from lmstrain.training.fit import fit\n"
                      "    from . import y\n")
    assert imports(source, tmp_path) == {"lmstrain.training.fit", "lmstrain.lms.y"}


def test_importing_the_library_loads_no_other_lmstrain_module():
    code = ("import sys, lmstrain.lms, lmstrain.lms.sim, lmstrain.lms.profile\n"
            "from lmstrain.lms import LMS, SwapSettings, split_cpu\n"
            "print(sorted(m for m in sys.modules if m.startswith('lmstrain') and "
            "m != 'lmstrain' and not m.startswith('lmstrain.lms')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
                          check=True)
    assert done.stdout.strip() == "[]"
