"""The examples in tfaccum's docstrings run as written.

Every module of the package whose source holds a ``>>>`` example is run through
``doctest`` (the examples import what they use; nothing is provided for them), so an
example that names something undefined, or whose shown result drifts, fails here.
"""

import doctest
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tfaccum")


def _modules_with_examples():
    names = []
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py") or name == "__main__.py":
                continue
            path = os.path.join(folder, name)
            if ">>>" not in open(path).read():
                continue
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_api_modules_have_examples():
    assert {"tfaccum", "tfaccum.ops", "tfaccum.analysis", "tfaccum.scope",
            "tfaccum.model_rewrite", "tfaccum.model_summary", "tfaccum.inventory"} <= \
        set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    importlib.import_module(name)
    module = sys.modules[name]  # analysis.vrr is also a function of tfaccum.analysis
    # An empty namespace, not the module's: an example must import what it uses, as a
    # reader who copies it into a fresh interpreter would.
    result = doctest.testmod(module, globs={}, verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no example found"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples " \
        "failed (printed above)"
