"""``.keras`` files written by earlier versions of tfaccum still load.

``tests/data/legacy_model.keras`` was saved by the code before the package was
restructured (issue 15): a Functional model with an ``AccumConv2D`` under a per-GEMM
policy with operand rounding and an ``AccumDense`` under one AccumConfig.
``legacy_model_io.npz`` holds an input and the output that code computed for it. Loading
needs the registered names (``tfaccum>AccumConv2D``, ``tfaccum>AccumDense``) and the
policy format of ``get_config()`` to stay as they were.
"""

import os
import subprocess
import sys

import numpy as np

import keras
import tfaccum

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(DATA, "legacy_model.keras")


def test_legacy_keras_file_loads_with_its_policies_and_outputs():
    model = keras.models.load_model(MODEL)
    conv, fc = model.get_layer("conv"), model.get_layer("fc")
    assert type(conv) is tfaccum.layers.AccumConv2D
    assert type(fc) is tfaccum.layers.AccumDense
    assert conv.policy == tfaccum.AccumPolicy(
        fwd=tfaccum.AccumConfig("e6m9", chunk_size=4),
        bwd=tfaccum.AccumConfig("e5m7", rounding="toward_zero"),
        grad=tfaccum.AccumConfig("e6m10", product="e5m10"), operands="fp8_e5m2")
    assert fc.policy == tfaccum.AccumPolicy.uniform(tfaccum.AccumConfig("e5m6"))
    io = np.load(os.path.join(DATA, "legacy_model_io.npz"))
    np.testing.assert_array_equal(model(io["x"]).numpy(), io["y"])


def test_legacy_keras_file_loads_in_a_fresh_process():
    # Only `import tfaccum` registers the classes: nothing else of this test session helps.
    code = ("import sys, keras, tfaccum; m = keras.models.load_model(sys.argv[1]); "
            "print(sorted(type(l).__name__ for l in m.layers))")
    proc = subprocess.run([sys.executable, "-c", code, MODEL], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == \
        "['AccumConv2D', 'AccumDense', 'Flatten', 'InputLayer']"
