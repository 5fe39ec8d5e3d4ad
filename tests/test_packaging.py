"""Packaging: the console scripts, the dependency list, and the op library's record of
the TensorFlow it was built against."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_keywords():
    """The literal keyword arguments of setup.py's setup() call."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            out = {}
            for kw in node.keywords:
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    pass  # not a literal (cmdclass, long_description, ...)
            return out
    raise AssertionError("no setup() call in setup.py")


def _console_scripts():
    scripts = {}
    for spec in _setup_keywords()["entry_points"]["console_scripts"]:
        name, target = (s.strip() for s in spec.split("="))
        scripts[name] = target
    return scripts


# (arguments, exit status, text the output must contain) for each script: a real (quick)
# analysis, and a bad flag for the driver, which reports it in one line; either way the
# function ran with no arguments and read sys.argv (the old `run` entry points raised
# TypeError before reading anything).
SCRIPT_RUNS = {
    "tfaccum-analyze": (["--model=digits_cnn", "--batch_size=8", "--sparsity=none",
                         "--chunk_size=0"], 0, "Precision plan for digits_cnn"),
    "tfaccum-train": (["--no_such_flag"], 2, "error: Unknown command line flag 'no_such_flag'"),
}


def _check_run(name, command, cwd=None):
    args, status, expected = SCRIPT_RUNS[name]
    result = subprocess.run(command + args, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode == status, f"{name}: status {result.returncode}\n{output[-3000:]}"
    assert expected in output, f"{name}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


def test_console_scripts_name_functions_that_take_no_arguments():
    import importlib
    import inspect

    scripts = _console_scripts()
    assert set(scripts) == set(SCRIPT_RUNS)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        function = getattr(importlib.import_module(module), attr)
        inspect.signature(function).bind()  # raises TypeError if an argument is required


@pytest.mark.parametrize("name", sorted(SCRIPT_RUNS))
def test_console_script_entry_points_of_this_checkout_run(name):
    """What pip's generated wrapper runs (`sys.exit(function())`), with this checkout's
    tfaccum: it does not need an install."""
    module, _, attr = _console_scripts()[name].partition(":")
    wrapper = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.argv[0] = {name!r}; "
               f"from {module} import {attr}; sys.exit({attr}())")
    _check_run(name, [sys.executable, "-c", wrapper])


# The package that runs with `python -m` the command line of each script.
PACKAGE_MAINS = {"tfaccum-analyze": "tfaccum.analysis", "tfaccum-train": "tfaccum.training"}


@pytest.mark.parametrize("name", sorted(SCRIPT_RUNS))
def test_python_m_runs_the_package_command_lines(name):
    """`python -m tfaccum.analysis` / `python -m tfaccum.training` (the packages'
    __main__.py) do what the scripts do; the old `python -m tfaccum.analyze` /
    `tfaccum.train` are tested in test_analysis.py and test_train.py."""
    _check_run(name, [sys.executable, "-m", PACKAGE_MAINS[name]], cwd=ROOT)  # this checkout


@pytest.mark.parametrize("name", sorted(SCRIPT_RUNS))
def test_installed_console_scripts_run(name, tmp_path):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH: install tfaccum (pip install --no-build-isolation "
                    "-e .) to test the installed scripts")
    # The script's interpreter, asked from a neutral directory, says which tfaccum the
    # script imports: another checkout's editable install tests that checkout, not this one.
    interpreter = open(path).readline()[2:].strip().split()[0]
    where = subprocess.run(
        [interpreter, "-c", "import os, tfaccum; "
         "print(os.path.dirname(os.path.dirname(os.path.abspath(tfaccum.__file__))))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    installed = where.stdout.strip().splitlines()[-1] if where.stdout.strip() else None
    if installed is None or os.path.realpath(installed) != os.path.realpath(ROOT):
        pytest.skip(f"{path} runs the tfaccum in {installed}, not this checkout ({ROOT})")
    from importlib import metadata

    installed_scripts = {ep.name: ep.value for ep in metadata.distribution("tfaccum")
                         .entry_points if ep.group == "console_scripts"}
    assert installed_scripts[name] == _console_scripts()[name], \
        "the installed entry points are stale: reinstall (pip install --no-build-isolation -e .)"
    _check_run(name, [path])


# Top-level module -> distribution, for modules whose names differ.
DISTRIBUTIONS = {"absl": "absl-py", "sklearn": "scikit-learn",
                 "tensorflow_datasets": "tensorflow-datasets"}


def _third_party_imports():
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "tfaccum")):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("tfaccum", "__future__"):
                        found.add(top)
    return found


def _requirement_name(spec):
    for sep in "<>=!~[; ":
        spec = spec.split(sep)[0]
    return spec.lower()


def test_dependencies_are_what_tfaccum_imports():
    keywords = _setup_keywords()
    required = {_requirement_name(r) for r in keywords["install_requires"]}
    extras = {_requirement_name(r) for reqs in keywords["extras_require"].values() for r in reqs}
    imported = {DISTRIBUTIONS.get(m, m) for m in _third_party_imports()}
    # TensorFlow comes from the [cpu] or [gpu] extra (tensorflow-cpu or tensorflow), or is
    # installed first, as the op library must be built against it.
    assert "tensorflow" in imported and {"tensorflow", "tensorflow-cpu"} <= extras
    undeclared = imported - required - extras - {"tensorflow"}
    assert not undeclared, f"imported but not declared in setup.py: {sorted(undeclared)}"
    unused = required - imported
    assert not unused, f"declared in install_requires but never imported: {sorted(unused)}"


def test_the_build_records_the_tensorflow_version_next_to_the_library():
    import tensorflow as tf

    import tfaccum

    path = tfaccum.ops._library_path()
    assert open(path + ".tf_version").read() == tf.__version__ + "\n"
    assert tfaccum.ops.check_library_version(path) == tf.__version__


def test_the_loader_refuses_a_library_built_for_another_tensorflow(tmp_path, monkeypatch):
    import tensorflow as tf

    import tfaccum

    library = tmp_path / "_tfaccum_ops.so"
    shutil.copyfile(tfaccum.ops._library_path(), library)
    monkeypatch.setattr(tfaccum.ops, "_library", None)
    monkeypatch.setattr(tfaccum.ops, "_library_path", lambda: str(library))

    def must_not_load(path):
        raise AssertionError(f"loaded {path} despite the version mismatch")

    monkeypatch.setattr(tf, "load_op_library", must_not_load)
    (tmp_path / "_tfaccum_ops.so.tf_version").write_text("2.0.0\n")
    with pytest.raises(ImportError, match=r"built against TensorFlow 2\.0\.0, but TensorFlow "
                                          + tf.__version__.replace(".", r"\.") +
                                          r" is installed: rebuild with `make`"):
        tfaccum.ops.load_library()
    # A library from before the record existed is refused the same way.
    (tmp_path / "_tfaccum_ops.so.tf_version").unlink()
    with pytest.raises(ImportError, match=r"no record of the TensorFlow it was built against "
                                          r".*rebuild with `make`"):
        tfaccum.ops.load_library()
    # With the right record, the loader goes on to load this copy.
    (tmp_path / "_tfaccum_ops.so.tf_version").write_text(tf.__version__ + "\n")
    with pytest.raises(AssertionError, match="loaded .*_tfaccum_ops.so"):
        tfaccum.ops.load_library()
