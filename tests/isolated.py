"""Runs snippets of test code in a child Python process, so that a crash (a CHECK abort,
a segfault, an out-of-memory kill) or a hang fails the test that caused it instead of
taking pytest down.

    outcomes = run_snippets({"name": "result = outcome(lambda: tfaccum.accum_matmul(...))"})

Every snippet runs in the same child, in order, with ``tf``, ``np``, ``tfaccum``, ``lib``
(the raw ops), ``outcome`` and ``eager_and_graph`` in scope; it sets ``result`` to
something JSON-serializable. The child prints one line per snippet; when it dies, the
snippet it was running is reported with the signal or exit status.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = r'''
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, ROOT)
import numpy as np
import tensorflow as tf
import tfaccum
lib = tfaccum.ops.load_library()


def _first_line(err):
    text = getattr(err, "message", None) or str(err)
    return " ".join(text.split())


def outcome(fn):
    """{"shape": [...]} or {"error": class name, "message": text} of calling fn()."""
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - the caller inspects the class
        return {"error": type(err).__name__, "message": _first_line(err)}
    if isinstance(value, (tf.Tensor, np.ndarray)):
        return {"shape": [int(d) for d in value.shape]}
    return {"value": repr(value)}


def eager_and_graph(fn, *args):
    """fn(*args) eagerly, and in a tf.function traced with the arguments' static shapes
    (so that the shape functions run)."""
    args = [tf.convert_to_tensor(a) for a in args]
    graph_fn = tf.function(fn, input_signature=[tf.TensorSpec(a.shape, a.dtype) for a in args])
    return {"eager": outcome(lambda: fn(*args)), "graph": outcome(lambda: graph_fn(*args))}
'''

_LOOP = r'''
for _name, _code in json.loads(sys.stdin.read()):
    print("START " + _name, flush=True)
    _scope = dict(globals())
    exec(_code, _scope)
    print("RESULT " + json.dumps([_name, _scope.get("result")]), flush=True)
'''


def run_snippets(snippets, timeout=300, env=None):
    """{name: code} -> {name: result}; raises AssertionError naming the snippet that
    crashed, hung or raised in the child."""
    child_env = dict(os.environ, **(env or {}))
    code = "ROOT = %r\n" % ROOT + _PRELUDE + _LOOP
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=child_env)
    try:
        out, err = proc.communicate(json.dumps(list(snippets.items())), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        running = _running(out)
        raise AssertionError(f"snippet {running!r} hung (no result within {timeout} s)")
    results = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            name, value = json.loads(line[len("RESULT "):])
            results[name] = value
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise AssertionError(f"the child {how} while running snippet {_running(out)!r}:\n"
                             + err[-3000:])
    return results


def _running(out):
    started = [l[len("START "):] for l in out.splitlines() if l.startswith("START ")]
    finished = {json.loads(l[len("RESULT "):])[0] for l in out.splitlines()
                if l.startswith("RESULT ")}
    unfinished = [s for s in started if s not in finished]
    return unfinished[-1] if unfinished else None
