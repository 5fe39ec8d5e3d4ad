"""The layering of docs/architecture.md, enforced: no module imports one above it, and no
imports go round in a cycle.

Python: every module of the ``tfaccum`` package belongs to a level of ``LEVELS``; each
``import`` and ``from ... import`` statement in it (at the top or inside a function: a
deferred import is a dependency all the same) may name a module of its own level or of a
level below, and the imports between modules form no cycle. The import of a package that
Python runs before a submodule (``tfaccum/__init__.py`` before ``tfaccum.config``) is not
an edge: only what a module names counts.

C++: each folder of ``custom_ops`` may include only its own headers and those of the
folders ``INCLUDES`` lists for it, and only ``tf/`` may include TensorFlow.

The checkers are tested on synthetic graphs and on a copy of the package with an import
that breaks the rule, so that a passing test means something.
"""

import ast
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A name ending in ".*" stands for every module below that package; an
# exact name wins over a pattern.
LEVELS = [
    ("foundations", ["tfaccum.config", "tfaccum.presets", "tfaccum.reference", "tfaccum.models"]),
    ("ops", ["tfaccum.ops", "tfaccum.engine"]),
    ("scope", ["tfaccum.scope"]),
    ("layers", ["tfaccum.layers"]),
    ("inventory", ["tfaccum.inventory"]),
    ("rewrite", ["tfaccum.model_rewrite", "tfaccum.model_summary", "tfaccum.rewriting"]),
    ("api", ["tfaccum"]),
    ("analysis", ["tfaccum.analysis", "tfaccum.analysis.*"]),
    ("driver", ["tfaccum.training", "tfaccum.training.*"]),
    ("cli", ["tfaccum.analysis.cli", "tfaccum.analysis.__main__", "tfaccum.training.cli",
             "tfaccum.training.__main__", "tfaccum.analyze", "tfaccum.train"]),
]

# custom_ops folder -> the other folders it may include from.
INCLUDES = {"core": set(), "cpu": {"core"}, "cuda": {"core"}, "tf": {"core", "cpu", "cuda"}}
FRAMEWORK_HEADERS = ("tensorflow/", "xla/", "absl/", "Eigen/", "unsupported/Eigen")


# ---------------------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------------------
def package_modules(root, package="tfaccum"):
    """{module name: path} of every module of the package under ``root``."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(module, modules):
    return modules[module].endswith("__init__.py")


def imported_modules(module, path, modules, package="tfaccum"):
    """The modules of the package that ``module``'s import statements name."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level` packages up
                base = module.split(".") if _is_package(module, modules) else \
                    module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import name` imports the submodule pkg.name when there is one.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                       else source for alias in node.names]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                while target not in modules:  # `import tfaccum.x.y` of an attribute
                    target = target.rpartition(".")[0]
                if target != module:
                    found.add(target)
    return found


def import_graph(root, package="tfaccum"):
    modules = package_modules(root, package)
    return {m: imported_modules(m, path, modules, package) for m, path in modules.items()}


def level_of(module, levels=LEVELS):
    """The index of ``module``'s level, or None."""
    exact = [i for i, (_, names) in enumerate(levels) if module in names]
    if exact:
        return exact[0]
    best = None
    for i, (_, names) in enumerate(levels):
        for name in names:
            if name.endswith(".*") and module.startswith(name[:-1]):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    return None if best is None else best[0]


def upward_imports(graph, levels=LEVELS):
    """``(module, imported)`` for each import of a module on a higher level."""
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if level_of(t, levels) > level_of(m, levels))


def find_cycle(graph):
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_level():
    missing = sorted(m for m in package_modules(ROOT) if level_of(m) is None)
    assert not missing, f"place these modules in LEVELS and docs/architecture.md: {missing}"


def test_no_module_imports_one_above_it():
    graph = import_graph(ROOT)
    names = [name for name, _ in LEVELS]
    bad = [f"{m} ({names[level_of(m)]}) imports {t} ({names[level_of(t)]})"
           for m, t in upward_imports(graph)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, " -> ".join(cycle)


def test_the_layers_module_imports_only_ops_config_and_scope():
    # The cycle this layering removed: layers imported the half-initialised package and
    # the rewrite module, which imported layers.
    assert import_graph(ROOT)["tfaccum.layers"] <= {"tfaccum.ops", "tfaccum.config",
                                                    "tfaccum.scope"}


# The public names of the package before it was restructured (issue 15), all still there.
PUBLIC_BEFORE = [
    "AccumConfig", "AccumPolicy", "BFLOAT16", "BINARY16", "BINARY32", "FLOAT32", "FP8_E4M3",
    "FP8_E5M2", "FULL_PRECISION", "FloatFormat", "PRESETS", "accum_conv2d", "accum_matmul",
    "accumulation_scope", "as_format", "as_policy", "config", "layers", "ops", "quantize",
    "rewrite", "rewriting", "set_step_counter", "summary", "reference", "analysis", "models",
    "__version__"]


def test_the_public_names_remain():
    import tfaccum

    missing = [name for name in PUBLIC_BEFORE if not hasattr(tfaccum, name)]
    assert not missing, missing
    assert tfaccum.rewriting.rewrite is tfaccum.rewrite
    assert tfaccum.rewriting.summary is tfaccum.summary
    assert tfaccum.rewriting.accumulation_scope is tfaccum.accumulation_scope


# The checkers themselves.
def test_checkers_on_a_synthetic_graph():
    levels = [("low", ["p.a", "p.b"]), ("high", ["p.c", "p.d", "p.sub.*"]),
              ("top", ["p.sub.x"])]
    assert [level_of(m, levels) for m in ("p.a", "p.c", "p.sub.y", "p.sub.x", "p.z")] == \
        [0, 1, 1, 2, None]
    fine = {"p.a": set(), "p.b": {"p.a"}, "p.c": {"p.a", "p.b"}, "p.d": set(),
            "p.sub.y": {"p.c"}, "p.sub.x": {"p.sub.y", "p.a"}}
    assert upward_imports(fine, levels) == [] and find_cycle(fine) is None
    upward = dict(fine, **{"p.b": {"p.a", "p.d"}})  # up a level, no cycle
    assert upward_imports(upward, levels) == [("p.b", "p.d")]
    assert find_cycle(upward) is None
    cycle = dict(fine, **{"p.a": {"p.b"}})  # same level, but a cycle
    assert upward_imports(cycle, levels) == []
    assert find_cycle(cycle) in (["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"])


def test_import_resolution(tmp_path):
    files = {
        "q/__init__.py": "from q import x\n",
        "q/x.py": "from .y import f\nimport q.sub.z\n",
        "q/y.py": "def f(): from q import x as _\n",
        "q/sub/__init__.py": "from . import z\nfrom .. import y\n",
        "q/sub/z.py": "from q.x import something\nimport os\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_graph(str(tmp_path), "q") == {
        "q": {"q.x"}, "q.x": {"q.y", "q.sub.z"}, "q.y": {"q.x"},
        "q.sub": {"q.sub.z", "q.y"}, "q.sub.z": {"q.x"}}


@pytest.mark.parametrize("inject", [
    ("tfaccum/layers.py", "from tfaccum.model_rewrite import rewrite"),  # the old cycle
    ("tfaccum/ops.py", "import tfaccum"),
    ("tfaccum/analysis/vrr.py", "from tfaccum.training import settings"),
])
def test_an_injected_import_is_caught(tmp_path, inject):
    path, line = inject
    shutil.copytree(os.path.join(ROOT, "tfaccum"), tmp_path / "tfaccum",
                    ignore=shutil.ignore_patterns("*.so", "*.tf_version", "__pycache__"))
    target = tmp_path / path
    target.write_text(target.read_text() + "\n\ndef _injected():\n    " + line + "\n")
    module = path[:-3].replace("/", ".")
    assert [m for m, _ in upward_imports(import_graph(str(tmp_path)))] == [module]
    assert upward_imports(import_graph(ROOT)) == []


def test_the_old_layers_rewriting_cycle_is_found(tmp_path):
    shutil.copytree(os.path.join(ROOT, "tfaccum"), tmp_path / "tfaccum",
                    ignore=shutil.ignore_patterns("*.so", "*.tf_version", "__pycache__"))
    layers = tmp_path / "tfaccum" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom tfaccum.model_rewrite import rewrite\n")
    cycle = find_cycle(import_graph(str(tmp_path)))
    assert cycle is not None and "tfaccum.layers" in cycle and "tfaccum.model_rewrite" in cycle


# ---------------------------------------------------------------------------------------
# C++
# ---------------------------------------------------------------------------------------
def include_violations(ops_dir, includes=INCLUDES):
    """``(file, include, why)`` for each #include that crosses the folders' rule."""
    bad = []
    for folder in includes:
        for here, _, files in os.walk(os.path.join(ops_dir, folder)):
            for name in files:
                if not name.endswith((".h", ".cc", ".cu", ".cuh")):
                    continue
                path = os.path.join(here, name)
                text = open(path).read()
                for include in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M):
                    target = os.path.normpath(os.path.join(here, include))
                    where = os.path.relpath(target, ops_dir).split(os.sep)[0]
                    if os.path.exists(target):
                        if where != folder and where not in includes[folder]:
                            bad.append((os.path.relpath(path, ops_dir), include,
                                        f"{folder}/ may not include {where}/"))
                    elif include.startswith(FRAMEWORK_HEADERS) and folder != "tf":
                        bad.append((os.path.relpath(path, ops_dir), include,
                                    f"{folder}/ may not include TensorFlow"))
                    elif not include.startswith(FRAMEWORK_HEADERS):
                        bad.append((os.path.relpath(path, ops_dir), include, "not found"))
    return bad


def test_cpp_folders_include_only_what_they_may():
    assert include_violations(os.path.join(ROOT, "custom_ops")) == []


def test_the_include_checker_catches_a_crossing(tmp_path):
    ops = tmp_path / "custom_ops"
    shutil.copytree(os.path.join(ROOT, "custom_ops"), ops,
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    rounding = ops / "core" / "rounding.h"
    rounding.write_text(rounding.read_text() + '\n#include "../cpu/gemm_engine.h"\n'
                        '#include "tensorflow/core/framework/tensor.h"\n')
    assert include_violations(str(ops)) == [
        ("core/rounding.h", "../cpu/gemm_engine.h", "core/ may not include cpu/"),
        ("core/rounding.h", "tensorflow/core/framework/tensor.h",
         "core/ may not include TensorFlow")]
