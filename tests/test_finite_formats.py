"""Finite (OCP "FN") operand formats: FP8 E4M3FN as NVIDIA GPUs and the OCP 8-bit
floating-point specification (v1.0, 2023) define it: bias 7, no infinities, the top
exponent code holding finite values 256..448 and only S.1111.111 being NaN.

``tfaccum.quantize`` rounds to such a format from two kernel roundings (ops.py); the
expectations are the exact reference (``tfaccum.reference.quantize``) and values written
out from the OCP specification."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tfaccum
from tfaccum import reference
from tfaccum.config import AccumConfig, AccumPolicy, FloatFormat

E4M3FN = FloatFormat(4, 3, finite=True)


def test_the_ocp_e4m3_values():
    # OCP 8-bit FP spec, E4M3: max normal S.1111.110 = 448, min normal 2^-6, min
    # subnormal 2^-9; no infinities.
    assert E4M3FN.max_value == 448.0 and E4M3FN.emax == 8
    assert E4M3FN.smallest_normal == 2.0 ** -6 and E4M3FN.smallest_subnormal == 2.0 ** -9
    assert tfaccum.FP8_E4M3FN == E4M3FN == tfaccum.as_format("e4m3fn")
    assert E4M3FN.name == "e4m3fn" and FloatFormat.from_dict(E4M3FN.to_dict()) == E4M3FN
    assert FloatFormat(5, 2, finite=True).max_value == 1.5 * 2.0 ** 16
    cases = {  # x: nearest-even, saturating, by hand on the grid ... 224, 240 | 256, 288 ...
        240.0: 240.0, 247.9: 240.0, 248.0: 256.0,  # 248 is the tie 240 | 256: even is 256
        300.0: 288.0, 304.0: 320.0,                 # spacing 32 above 256; tie to even
        448.0: 448.0, 464.0: 448.0,                 # tie 448 | 480: 448 (1.110) is even
        465.0: 448.0, 1e30: 448.0, math.inf: 448.0, -math.inf: -448.0,   # saturate
        2.0 ** -10: 0.0, 3 * 2.0 ** -11: 2.0 ** -9, 2.0 ** -6 - 2.0 ** -11: 2.0 ** -6,
    }
    for x, want in cases.items():
        assert reference.round_to_format(x, E4M3FN) == want, x
    x = np.array(list(cases), np.float32)
    np.testing.assert_array_equal(tfaccum.quantize(x, E4M3FN).numpy(),
                                  np.array(list(cases.values()), np.float32))


FORMATS = [E4M3FN, FloatFormat(4, 3, finite=True, overflow="inf"),
           FloatFormat(4, 3, finite=True, subnormals=False), FloatFormat(5, 2, finite=True),
           FloatFormat(3, 4, finite=True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: repr(f))
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero", "stochastic"])
def test_quantize_equals_the_reference(fmt, rounding):
    rng = np.random.default_rng(7)
    top = fmt.max_value
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, top, top * 1.03, top * 1.0625, top * 1.07,
               -top * 1.2, 1e30, fmt.smallest_normal, fmt.smallest_subnormal,
               fmt.smallest_subnormal * 0.5, fmt.smallest_subnormal * 1.5,
               -fmt.smallest_normal * (1 - 2.0 ** -7)]
    x = np.concatenate([rng.standard_normal(3000) * np.exp2(rng.integers(-12, 11, 3000)),
                        special]).astype(np.float32)
    got = tfaccum.quantize(x, fmt, rounding, seed=11, step=2).numpy()
    want = reference.quantize(x, fmt, rounding, seed=11, step=2)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (x[~same][:5], got[~same][:5], want[~same][:5])


def test_straight_through_gradient_and_graph_mode():
    x = tf.constant([1.1, 500.0, -2.0 ** -8, 0.3], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tfaccum.quantize(x, E4M3FN)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.ones(4, np.float32))
    graph = tf.function(lambda v: tfaccum.quantize(v, E4M3FN, "stochastic", seed=3, step=1))
    np.testing.assert_array_equal(graph(x).numpy(),
                                  tfaccum.quantize(x, E4M3FN, "stochastic", seed=3,
                                                   step=1).numpy())


def test_finite_formats_are_operand_formats_only():
    for field in ("accumulator", "product", "chunk_accumulator"):
        with pytest.raises(ValueError, match="operand formats only"):
            AccumConfig(**{field: E4M3FN})
    with pytest.raises(ValueError, match="finite"):
        E4M3FN.kernel_attr()
    for bad in [dict(mantissa_bits=0), dict(exponent_bits=8)]:
        with pytest.raises(ValueError, match="finite"):
            FloatFormat(**{**dict(exponent_bits=4, mantissa_bits=3, finite=True), **bad})
    # as operands: the matmul equals the reference with E4M3FN-rounded operands
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 9)) * 200).astype(np.float32)
    b = (rng.standard_normal((9, 2)) * 2).astype(np.float32)
    policy = AccumPolicy(operands=E4M3FN)
    np.testing.assert_array_equal(tfaccum.accum_matmul(a, b, policy).numpy(),
                                  reference.matmul(a, b, policy))
