"""The engine's paths (tfaccum/engine.py): the binary32 lanes and their preconditions.

test_matmul.py and test_conv.py run every test on every path. Most of their operands have
full float32 significands, for which the binary32 lanes do not apply; here the operands
are FP8, bfloat16 and float16 values, for which they do, and the engine's counters show
which lanes ran. The expectation is always tfaccum.reference (exact rationals).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, engine, reference
from test_matmul import assert_bit_equal

pytestmark = pytest.mark.usefixtures("engine_path")

E5M2, E4M3 = FloatFormat(5, 2), FloatFormat(4, 3, overflow="saturate")
BF16, FP16 = FloatFormat(8, 7), FloatFormat(5, 10)


def narrow_operands(rng, shape, fmt, scale_span=6):
    """Values of `fmt` (nearest-even), spread over 2^±scale_span, with zeros and -0."""
    values = rng.standard_normal(shape) * 2.0 ** rng.uniform(-scale_span, scale_span, shape)
    values[rng.random(shape) < 0.05] = 0.0
    values[rng.random(shape) < 0.02] = -0.0
    q = reference.quantize(values.astype(np.float32), fmt, "nearest_even")
    return np.asarray(q, np.float32)


class Counted:
    """The binary32 / binary64 tiles that run inside a `with` block."""

    def __enter__(self):
        self.before = engine.current()
        return self

    def __exit__(self, *exc):
        after = engine.current()
        self.tiles32 = after.tiles_binary32 - self.before.tiles_binary32
        self.tiles64 = after.tiles_binary64 - self.before.tiles_binary64
        self.redone = after.tiles_binary32_redone - self.before.tiles_binary32_redone


def check_matmul(a, b, config):
    assert_bit_equal(tfaccum.accum_matmul(a, b, config), reference.matmul(a, b, config),
                     f"for {config}, shapes {a.shape} {b.shape}")


def test_random_narrow_operands_take_the_binary32_lanes(engine_path):
    """FP8 / bf16 / fp16 operands, every accumulator width the lanes allow, both modes,
    chunks, rounded products, shapes off every tile and chunk multiple."""
    rng = np.random.default_rng(11)
    with Counted() as counted:
        for trial in range(60):
            fmt = [E5M2, E4M3, BF16, FP16][trial % 4]
            # e >= 5 keeps an e4m3 x e4m3 product's range within the accumulator's for
            # most trials; the others overflow and exercise the recompute.
            acc = FloatFormat(int(rng.integers(2, 9)), int(rng.integers(0, 22)),
                              overflow="inf" if rng.random() < 0.3 else "saturate")
            product = None
            if rng.random() < 0.3:
                product = FloatFormat(int(rng.integers(4, 9)), int(rng.integers(0, 22)))
            chunk = int(rng.choice([0, 0, 1, 7, 64]))
            config = AccumConfig(accumulator=acc, product=product, chunk_size=chunk,
                                 rounding=str(rng.choice(["nearest_even", "toward_zero"])))
            # M past one 16-row panel and N at the one-vector limit (16) included.
            M, N, K = (int(rng.choice([1, 3, 4, 5, 9, 16, 17, 35])),
                       int(rng.choice([1, 15, 16, 17, 31, 33, 64, 70])), int(rng.integers(0, 150)))
            span = 2 if fmt in (E5M2, E4M3) else 6
            check_matmul(narrow_operands(rng, (M, K), fmt, span),
                         narrow_operands(rng, (K, N), fmt, span), config)
    if engine_path.float32_lanes:
        assert counted.tiles32 > 0 and counted.redone > 0  # both ways through the lanes
    else:
        assert counted.tiles32 == 0


def test_ties_and_double_rounding_traps_in_binary32_lanes(engine_path):
    """Midpoints plus tails below binary32's 24 bits: a binary32 round-to-nearest sum
    would see a false tie; the sum rounded to odd keeps the tail's side."""
    for m in range(0, 22):
        u = 2.0 ** -m
        for rounding in ("nearest_even", "toward_zero"):
            config = AccumConfig(accumulator=FloatFormat(8, m), rounding=rounding)
            for tail in (2.0 ** -30, 2.0 ** -60, -(2.0 ** -30)):
                a = np.array([[tail, 1 + u / 2, 0, 0], [-tail, 1 + 1.5 * u, 0, 0],
                              [tail, -(1 + u / 2), 0, 0], [0, 1 + u / 2, 0, 0]], np.float32)
                b = np.ones((4, 33), np.float32)
                b[:, 32] = -1
                with Counted() as counted:
                    check_matmul(a, b, config)
                assert counted.tiles32 == (2 if engine_path.float32_lanes else 0)


def test_format_subnormals_signed_zeros_and_cancellation(engine_path):
    fmt = FloatFormat(5, 3)  # smallest normal 2^-14, subnormal step 2^-17
    a = np.array([[2.0 ** -17, 2.0 ** -18, 0, 0],            # 1.5 subnormal steps: tie
                  [2.0 ** -19, 0, 0, 0],                       # below half a step: +0
                  [-(2.0 ** -19), -0.0, 0, 0],                 # rounds to -0
                  [-0.0, -0.0, -0.0, -0.0],                    # -0 + -0 ... = -0
                  [3.0, -3.0, 2.0 ** -16, -(2.0 ** -16)],      # exact cancellations
                  [-1.0, 1.0, 0, 0]], np.float32)              # exact zero: +0
    b = np.ones((4, 20), np.float32)
    for rounding in ("nearest_even", "toward_zero"):
        for chunk in (0, 1, 3):
            config = AccumConfig(accumulator=fmt, rounding=rounding, chunk_size=chunk)
            with Counted() as counted:
                check_matmul(a, b, config)
            assert (counted.tiles32 > 0) == engine_path.float32_lanes


def test_overflow_is_recomputed_in_binary64(engine_path):
    """Partial sums past the format's range leave the lanes' precondition P4: those
    tiles are redone in binary64 under both overflow policies."""
    for overflow in ("saturate", "inf"):
        config = AccumConfig(accumulator=FloatFormat(5, 3, overflow=overflow))
        a = np.full((5, 40), 48.0, np.float32)
        a[:, 30:] = -64.0
        b = np.full((40, 33), 448.0, np.float32)
        with Counted() as counted:
            check_matmul(a, b, config)
        assert counted.redone == (2 * 2 if engine_path.float32_lanes else 0)


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_nan_and_inf_operands_use_binary64(engine_path, special):
    rng = np.random.default_rng(2)
    a = narrow_operands(rng, (4, 20), E5M2)
    b = narrow_operands(rng, (20, 33), E5M2)
    b[3, 5] = special
    config = AccumConfig(accumulator=FloatFormat(6, 5))
    with Counted() as counted:
        check_matmul(a, b, config)
    assert counted.tiles32 == 0


@pytest.mark.parametrize("a_bits, b_bits, low, expect32", [
    (12, 12, -60, True),     # 24 significant bits: exact in binary32
    (12, 13, -60, False),    # 25: binary64
    (1, 1, -149, True),      # the product's lowest bit at 2^-149: exact
    (1, 1, -150, False),     # below 2^-149: binary64
])
def test_the_binary32_exactness_rule(engine_path, a_bits, b_bits, low, expect32):
    """P1 at its boundaries, on operands built to sit on them."""
    def value(bits, lowest):  # 0b1...1 with `bits` bits, its lowest bit at 2^lowest
        return float((2 ** bits - 1) * 2.0 ** lowest)

    a_low = low // 2
    b_low = low - a_low
    # The operands must be normal binary32 values (subnormal ones take binary64).
    a_low, b_low = max(a_low, -126 - a_bits + 1 + 23), low - max(a_low, -126 - a_bits + 1 + 23)
    a = np.array([[value(a_bits, a_low), 1.0]], np.float32)
    b = np.array([[value(b_bits, b_low)] * 32, [1.0] * 32], np.float32)
    assert float(a[0, 0]) == value(a_bits, a_low) and float(b[0, 0]) == value(b_bits, b_low)
    config = AccumConfig(accumulator=FloatFormat(8, 21))
    with Counted() as counted:
        check_matmul(a, b, config)
    assert counted.tiles32 == (1 if expect32 and engine_path.float32_lanes else 0)


def test_stochastic_rounding_and_m_above_21_use_binary64(engine_path):
    rng = np.random.default_rng(3)
    a, b = narrow_operands(rng, (4, 30), E5M2), narrow_operands(rng, (30, 32), E5M2)
    for config in (AccumConfig(accumulator=FloatFormat(8, 10), rounding="stochastic", seed=5),
                   AccumConfig(accumulator=FloatFormat(8, 22)),
                   AccumConfig(accumulator=FloatFormat(8, 10), chunk_size=8),  # chunk total e8m10
                   AccumConfig(accumulator=FloatFormat(8, 10), chunk_size=8,
                               chunk_accumulator=FloatFormat(8, 23)),
                   AccumConfig(accumulator=FloatFormat(6, 10, subnormals=False))):
        with Counted() as counted:
            check_matmul(a, b, config)
        takes32 = (config.rounding != "stochastic" and config.accumulator.mantissa_bits <= 21
                   and config.effective_chunk_accumulator.mantissa_bits <= 21
                   and config.accumulator.subnormals)
        assert counted.tiles32 == (1 if takes32 and engine_path.float32_lanes else 0), config


def test_conv_passes_with_fp8_operands(engine_path):
    """All three conv passes through the lanes, the paper's FP8 setting."""
    rng = np.random.default_rng(4)
    x = narrow_operands(rng, (3, 7, 6, 5), E5M2, 2)
    w = narrow_operands(rng, (3, 3, 5, 33), E5M2, 2)
    dy = narrow_operands(rng, (3, 4, 3, 33), E5M2, 2)
    policy = AccumPolicy.uniform(AccumConfig(accumulator=FloatFormat(6, 5), chunk_size=16),
                                 operands=E5M2)
    args = dict(strides=(2, 2), padding="SAME", dilations=(1, 1))
    import tensorflow as tf
    with Counted() as counted:
        xt, wt = tf.constant(x), tf.constant(w)
        with tf.GradientTape() as tape:
            tape.watch([xt, wt])
            y = tfaccum.accum_conv2d(xt, wt, policy, **args)
        dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy))
    assert_bit_equal(y, reference.conv2d(x, w, policy, **args))
    ref_dx, ref_dw = reference.conv2d_grads(x, w, dy, policy, **args)
    assert_bit_equal(dx, ref_dx)
    assert_bit_equal(dw, ref_dw)
    assert (counted.tiles32 > 0) == engine_path.float32_lanes


def test_the_environment_selects_the_path_at_load():
    code = ("import tfaccum.engine as e; s = e.current(); "
            "print(s.isa, s.float32_lanes, e.set_path('generic').isa)")
    env = dict(os.environ, TFACCUM_ENGINE_ISA="generic", TFACCUM_ENGINE_FLOAT32="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["generic", "False", "generic"]


def test_set_path_errors_are_clear():
    with pytest.raises(ValueError, match="isa must be one of generic, avx2, avx512"):
        engine.set_path("sse9")
    state = engine.current()
    if state.supported_isa != "avx512":
        with pytest.raises(ValueError, match="this processor runs"):
            engine.set_path("avx512")


@pytest.mark.parametrize("special", [np.inf, np.nan])
def test_conv_checks_its_whole_input_once(engine_path, special):
    """Convolutions give the engine their input tensor to check for the lanes once (not
    every gathered panel): one special value anywhere sends the whole pass to binary64,
    with the same bits."""
    rng = np.random.default_rng(6)
    x = narrow_operands(rng, (2, 6, 6, 3), E5M2, 2)
    w = narrow_operands(rng, (3, 3, 3, 20), E5M2, 2)
    config = AccumConfig(accumulator=FloatFormat(6, 5))
    with Counted() as clean:
        y = tfaccum.accum_conv2d(x, w, config)
    assert_bit_equal(y, reference.conv2d(x, w, AccumPolicy.uniform(config)))
    assert (clean.tiles32 > 0) == engine_path.float32_lanes
    x[1, 5, 5, 2] = special  # a corner: only the last panels gather it
    with Counted() as dirty:
        y = tfaccum.accum_conv2d(x, w, config)
    assert_bit_equal(y, reference.conv2d(x, w, AccumPolicy.uniform(config)))
    assert dirty.tiles32 == 0
