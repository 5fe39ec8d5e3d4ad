"""The CPU matmul and quantize kernels against the exact reference and hand-derived values."""

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, reference

F32 = FloatFormat(8, 23)

# Every test here runs on every engine path (conftest.engine_path).
pytestmark = pytest.mark.usefixtures("engine_path")


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def assert_bit_equal(got, want, context=""):
    """Equal bit patterns; any NaN equals any NaN (the model does not specify payloads)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = np.flatnonzero((bits(got) != bits(want)) & ~both_nan)
    assert bad.size == 0, (f"{bad.size} of {got.size} differ {context}: first at {bad[0]}: "
                           f"got {got.flat[bad[0]]!r} want {want.flat[bad[0]]!r}")


def kernel_dot(a, b, config):
    a = np.asarray(a, np.float32).reshape(1, -1)
    b = np.asarray(b, np.float32).reshape(-1, 1)
    return tfaccum.accum_matmul(a, b, config).numpy()[0, 0]


# --- random operands --------------------------------------------------------------------

def random_operands(rng, shape, fmt):
    """Values whose products span fmt's range: subnormal, normal and overflowing sums."""
    n = int(np.prod(shape))
    half_span = (fmt.bias + fmt.mantissa_bits + 3) / 2
    exponent = rng.uniform(-half_span, half_span / 2 + 1, n)
    mantissa = rng.uniform(1, 2, n)
    values = np.sign(rng.standard_normal(n)) * mantissa * 2.0 ** exponent
    # Few significant bits make exact ties frequent.
    short = rng.random(n) < 0.4
    keep = rng.integers(1, 6, n)
    scale = 2.0 ** np.floor(np.log2(np.abs(values)))
    values[short] = (np.round(values / scale * 2.0 ** keep) / 2.0 ** keep * scale)[short]
    values[rng.random(n) < 0.05] = 0.0
    values[rng.random(n) < 0.02] *= -0.0
    return np.clip(values, -3e38, 3e38).astype(np.float32).reshape(shape)


def random_config(rng):
    fmt = FloatFormat(int(rng.integers(2, 9)), int(rng.integers(0, 24)),
                      subnormals=bool(rng.random() < 0.7),
                      overflow="saturate" if rng.random() < 0.6 else "inf")
    product = None
    if rng.random() < 0.4:
        product = FloatFormat(int(rng.integers(2, 9)), int(rng.integers(0, 24)),
                              subnormals=bool(rng.random() < 0.7),
                              overflow="saturate" if rng.random() < 0.6 else "inf")
    chunk = int(rng.choice([0, 0, 1, 7, 64]))
    chunk_acc = None
    if chunk and rng.random() < 0.5:
        chunk_acc = FloatFormat(int(rng.integers(fmt.exponent_bits, 9)),
                                int(rng.integers(fmt.mantissa_bits, 24)))
    rounding = str(rng.choice(["nearest_even", "toward_zero", "stochastic"]))
    return AccumConfig(accumulator=fmt, product=product, chunk_size=chunk,
                       chunk_accumulator=chunk_acc, rounding=rounding,
                       seed=int(rng.integers(-2 ** 63, 2 ** 63 - 1)))


def test_random_dot_products_match_reference():
    """10,000+ dot products over every option, bit for bit."""
    rng = np.random.default_rng(1234)
    total = 0
    while total < 10_000:
        config = random_config(rng)
        M, N, K = int(rng.integers(1, 7)), int(rng.integers(1, 5)), int(rng.integers(0, 90))
        a = random_operands(rng, (M, K), config.accumulator)
        b = random_operands(rng, (K, N), config.accumulator)
        got = tfaccum.accum_matmul(a, b, config).numpy()
        assert_bit_equal(got, reference.matmul(a, b, config), f"for {config}, K={K}")
        total += M * N


def test_every_exponent_and_mantissa_width():
    rng = np.random.default_rng(7)
    for e in range(2, 9):
        for m in range(0, 24):
            for rounding in ("nearest_even", "toward_zero", "stochastic"):
                config = AccumConfig(accumulator=FloatFormat(e, m), rounding=rounding, seed=e * m)
                a = random_operands(rng, (2, 33), config.accumulator)
                b = random_operands(rng, (33, 2), config.accumulator)
                assert_bit_equal(tfaccum.accum_matmul(a, b, config),
                                 reference.matmul(a, b, config), f"for {config}")


# --- adversarial cases, with hand-derived expectations ------------------------------------

@pytest.mark.parametrize("m", range(1, 23))
def test_no_double_rounding_at_ties(m):
    """A midpoint product plus a tail far below binary64's precision.

    A binary64 sum loses the 2^-60 tail and would see an exact tie; the exact sum is off
    the tie, so the single rounding goes the way the tail points.
    """
    cfg = AccumConfig(accumulator=FloatFormat(8, m))
    u = 2.0 ** -m
    # 1 + u/2 + 2^-60: above the tie between 1 (even) and 1 + u -> 1 + u.
    assert kernel_dot([2.0 ** -60, 1 + u / 2], [1, 1], cfg) == 1 + u
    # 1 + 3u/2 - 2^-60: below the tie between 1 + u and 1 + 2u (even) -> 1 + u.
    assert kernel_dot([-(2.0 ** -60), 1 + 1.5 * u], [1, 1], cfg) == 1 + u
    # Exact ties go to even.
    assert kernel_dot([1 + u / 2], [1], cfg) == 1
    assert kernel_dot([1 + 1.5 * u], [1], cfg) == 1 + 2 * u
    # Toward zero: 1 + u - 2^-60 truncates to 1, not to 1 + u.
    rz = cfg.replace(rounding="toward_zero")
    assert kernel_dot([-(2.0 ** -60), 1 + u], [1, 1], rz) == 1
    assert kernel_dot([2.0 ** -60, -(1 + u)], [1, 1], rz) == -1


def test_ties_at_every_bit_position_and_scale():
    rng = np.random.default_rng(3)
    for m in range(0, 24):
        for scale in (2.0 ** -140, 2.0 ** -20, 1.0, 2.0 ** 60):
            u = 2.0 ** -m
            a = np.array([[1, u / 2, u / 2, u / 2, -u / 2, 3 * u / 2]], np.float32) * np.float32(scale)
            b = np.ones((6, 3), np.float32)
            b[:, 1] = rng.permutation(b[:, 1])
            b[:, 2] = -1
            for fmt in (FloatFormat(8, m), FloatFormat(8, m, subnormals=False)):
                for rounding in ("nearest_even", "toward_zero"):
                    cfg = AccumConfig(accumulator=fmt, rounding=rounding)
                    assert_bit_equal(tfaccum.accum_matmul(a, b, cfg), reference.matmul(a, b, cfg))


def test_subnormal_partial_sums():
    fmt = FloatFormat(5, 10)  # smallest normal 2^-14, subnormal step 2^-24
    cfg = AccumConfig(accumulator=fmt)
    assert kernel_dot([2.0 ** -24, 2.0 ** -25], [1, 1], cfg) == 2.0 ** -23 * 1  # tie: 1.5 ulp -> 2
    assert kernel_dot([2.0 ** -26], [1], cfg) == 0.0  # below half the smallest subnormal
    flush = AccumConfig(accumulator=FloatFormat(5, 10, subnormals=False))
    got = kernel_dot([-(2.0 ** -20)], [1], flush)
    assert got == 0 and math.copysign(1, got) == -1  # flushed, keeps its sign
    assert kernel_dot([2.0 ** -14], [1], flush) == 2.0 ** -14  # smallest normal survives
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((4, 40)) * 2.0 ** -16).astype(np.float32)
    b = rng.standard_normal((40, 3)).astype(np.float32)
    for c in (cfg, flush, cfg.replace(rounding="stochastic"), flush.replace(chunk_size=7)):
        assert_bit_equal(tfaccum.accum_matmul(a, b, c), reference.matmul(a, b, c))


def test_overflow_policies():
    sat = AccumConfig(accumulator=FloatFormat(5, 10))
    inf = AccumConfig(accumulator=FloatFormat(5, 10, overflow="inf"))
    assert kernel_dot([60000, 60000], [1, 1], sat) == 65504
    assert kernel_dot([60000, 60000], [1, 1], inf) == math.inf
    assert kernel_dot([60000, 60000, -60000], [1, 1, 1], sat) == 65504 - 60000
    assert kernel_dot([60000, 60000, -60000], [1, 1, 1], inf) == math.inf
    assert kernel_dot([-60000, -60000], [1, 1], inf.replace(rounding="toward_zero")) == -65504
    # Rounding to nearest overflows at max + ulp/2 (a tie that goes up to 2^16).
    assert kernel_dot([65504, 16], [1, 1], inf) == math.inf
    assert kernel_dot([65504, 15.99], [1, 1], inf) == 65504
    # Product format overflow.
    prod = AccumConfig(product=FloatFormat(4, 3))  # max 240
    assert kernel_dot([100], [100], prod) == 240


def test_special_values():
    cfg = AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=2)
    assert kernel_dot([np.inf, 1, 2], [1, 1, 1], cfg) == math.inf
    assert math.isnan(kernel_dot([np.inf, 1, 1], [1, 1, -np.inf], cfg))   # Inf - Inf
    assert math.isnan(kernel_dot([0, 1], [np.inf, 1], cfg))                 # 0 x Inf
    assert math.isnan(kernel_dot([np.nan, 1], [1, 1], cfg))
    assert kernel_dot([-np.inf, 1e30], [1, 1], cfg) == -math.inf            # stays infinite
    rng = np.random.default_rng(9)
    a = random_operands(rng, (5, 20), FloatFormat(6, 9))
    a[0, 3], a[1, 7], a[2, 0], a[3, 19] = np.inf, -np.inf, np.nan, np.inf
    b = random_operands(rng, (20, 4), FloatFormat(6, 9))
    b[5, 1] = np.inf
    for rounding in ("nearest_even", "toward_zero", "stochastic"):
        for c in (cfg, cfg.replace(chunk_size=0), cfg.replace(product=FloatFormat(5, 2))):
            c = c.replace(rounding=rounding)
            assert_bit_equal(tfaccum.accum_matmul(a, b, c), reference.matmul(a, b, c))


def test_signed_zeros_and_exact_cancellation():
    cfg = AccumConfig(accumulator=FloatFormat(5, 4))
    # s starts at +0, so (+0) + (-0) = +0; a negative value that underflows gives -0,
    # and then (-0) + (-0) = -0 while (-0) + (+0) = +0.
    assert math.copysign(1, kernel_dot([-0.0], [1], cfg)) == 1
    neg_zero = kernel_dot([-1e-30, -0.0], [1, 1], cfg)
    assert neg_zero == 0 and math.copysign(1, neg_zero) == -1
    pos = kernel_dot([-1e-30, 0.0], [1, 1], cfg)
    assert math.copysign(1, pos) == 1
    cancel = kernel_dot([3, -3], [5, 5], cfg)
    assert cancel == 0 and math.copysign(1, cancel) == 1            # exact zero sum is +0
    empty = tfaccum.accum_matmul(np.zeros((2, 0), np.float32), np.zeros((0, 3), np.float32), cfg)
    assert np.all(bits(empty) == 0)                                 # K = 0: +0
    for rounding in ("toward_zero", "stochastic"):
        c = cfg.replace(rounding=rounding)
        assert math.copysign(1, kernel_dot([3, -3], [5, 5], c)) == 1
        assert math.copysign(1, kernel_dot([-1e-30, -0.0], [1, 1], c)) == -1


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 64])
def test_lengths_not_multiple_of_chunk(chunk):
    rng = np.random.default_rng(chunk)
    for K in (1, chunk - 1, chunk + 1, 2 * chunk + 3, 100):
        if K <= 0:
            continue
        cfg = AccumConfig(accumulator=FloatFormat(6, 5), chunk_size=chunk,
                          chunk_accumulator=FloatFormat(8, 12), rounding="stochastic", seed=K)
        a = rng.standard_normal((3, K)).astype(np.float32)
        b = rng.standard_normal((K, 17)).astype(np.float32)
        assert_bit_equal(tfaccum.accum_matmul(a, b, cfg), reference.matmul(a, b, cfg))


def test_summation_order_and_chunk_boundaries():
    """Products [1, 2^-5 x 8] with 3 mantissa bits: each order gives its own result.

    Sequential: every 2^-5 is swamped by 1 -> 1. Chunk 4: [1,x,x,x] -> 1, [x,x,x,x] ->
    2^-3, [x] -> 2^-5; totals 1 -> 1.125 -> 1.125. Chunk 3: [1,x,x] -> 1, then two chunks
    of 3x = 0.09375; totals 1 -> 1.125 (above the midpoint 1.0625) -> 1.25. Summing
    backwards would give 1.25 sequentially.
    """
    fmt = FloatFormat(8, 3)
    a = np.array([[1] + [2.0 ** -5] * 8], np.float32)
    b = np.ones((9, 1), np.float32)
    expect = {0: 1.0, 4: 1.125, 3: 1.25}
    for chunk, want in expect.items():
        cfg = AccumConfig(accumulator=fmt, chunk_size=chunk)
        assert tfaccum.accum_matmul(a, b, cfg).numpy()[0, 0] == want, chunk
        # Transposed storage changes where values are read, never the order.
        got = tfaccum.accum_matmul(a.T.copy(), b.T.copy(), cfg, transpose_a=True, transpose_b=True)
        assert got.numpy()[0, 0] == want
    backwards = tfaccum.accum_matmul(a[:, ::-1].copy(), b, AccumConfig(accumulator=fmt))
    assert backwards.numpy()[0, 0] == 1.25


# --- full-precision equivalences -----------------------------------------------------------

def _round_to_float32(x: Fraction) -> np.float32:
    """Correctly rounded Fraction -> float32 (nearest-even), by comparing neighbours exactly."""
    guess = np.float32(float(x))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]
    def key(c):
        return (abs(Fraction(float(c)) - x), int(bits(c)) & 1)
    return min(candidates, key=key)


def test_binary32_with_binary32_products_is_the_float32_loop():
    rng = np.random.default_rng(11)
    cfg = AccumConfig(accumulator=tfaccum.BINARY32, product=tfaccum.BINARY32)
    a = rng.standard_normal((6, 300)).astype(np.float32)
    b = rng.standard_normal((300, 5)).astype(np.float32)
    got = tfaccum.accum_matmul(a, b, cfg).numpy()
    want = np.zeros((6, 5), np.float32)
    for k in range(300):  # s = s + a*b in float32, in order, no FMA
        want = (want + (a[:, k:k + 1] * b[k:k + 1, :]).astype(np.float32)).astype(np.float32)
    assert_bit_equal(got, want)


def test_binary32_with_exact_products_is_the_fmaf_loop():
    rng = np.random.default_rng(12)
    a = rng.standard_normal((3, 120)).astype(np.float32)
    b = rng.standard_normal((120, 2)).astype(np.float32)
    got = tfaccum.accum_matmul(a, b, tfaccum.FLOAT32).numpy()
    for i in range(3):
        for j in range(2):
            s = np.float32(0)
            for k in range(120):
                s = _round_to_float32(Fraction(float(a[i, k])) * Fraction(float(b[k, j]))
                                      + Fraction(float(s)))
            assert bits(got[i, j]) == bits(s)


def _cast_candidates(rng):
    x = rng.standard_normal(20000).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 20, 20000).astype(np.float32)
    # Exact ties for 10 and 7 mantissa bits, subnormals of float16, overflow, specials.
    ties = np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,
                     2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -15 + 2.0 ** -25, 65520, 65519.99,
                     1e5, -1e5, 3.4e38, 0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    sub = (rng.integers(1, 1024, 2000) * 2.0 ** -24 + rng.integers(0, 2, 2000) * 2.0 ** -25)
    return np.concatenate([x, ties, sub.astype(np.float32), -sub.astype(np.float32)])


def test_quantize_equals_float16_and_bfloat16_casts():
    rng = np.random.default_rng(13)
    x = _cast_candidates(rng)
    for fmt, dtype in ((tfaccum.BINARY16, tf.float16), (tfaccum.BFLOAT16, tf.bfloat16)):
        got = tfaccum.quantize(x, fmt).numpy()
        want = tf.cast(tf.cast(x, dtype), tf.float32).numpy()
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert_bit_equal(got[~nan], want[~nan], f"for {fmt}")


def test_quantize_matches_reference_in_every_mode():
    rng = np.random.default_rng(14)
    x = _cast_candidates(rng)[::7]
    for fmt in (FloatFormat(4, 3), FloatFormat(5, 2, subnormals=False), FloatFormat(2, 0),
                FloatFormat(6, 9, overflow="inf"), FloatFormat(8, 23)):
        for rounding in ("nearest_even", "toward_zero", "stochastic"):
            got = tfaccum.quantize(x, fmt, rounding=rounding, seed=99)
            assert_bit_equal(got, reference.quantize(x, fmt, rounding=rounding, seed=99))


# --- stochastic rounding ----------------------------------------------------------------

def test_stochastic_is_reproducible_and_seeded():
    rng = np.random.default_rng(15)
    a = rng.standard_normal((16, 64)).astype(np.float32)
    b = rng.standard_normal((64, 16)).astype(np.float32)
    cfg = AccumConfig(accumulator=FloatFormat(8, 5), rounding="stochastic", seed=42)
    first = tfaccum.accum_matmul(a, b, cfg).numpy()
    assert_bit_equal(tfaccum.accum_matmul(a, b, cfg), first)
    other = tfaccum.accum_matmul(a, b, cfg.replace(seed=43)).numpy()
    assert np.mean(bits(other) != bits(first)) > 0.3


def test_stochastic_rounding_is_unbiased():
    x_value = 1 + 0.3 * 2.0 ** -4  # 30 % of an ulp above 1 for 4 mantissa bits
    x = np.full(200_000, x_value, np.float32)
    q = tfaccum.quantize(x, FloatFormat(8, 4), rounding="stochastic", seed=5).numpy()
    assert set(np.unique(q)) == {1.0, 1 + 2.0 ** -4}
    frac_up = np.mean(q > 1)
    assert abs(frac_up - 0.3) < 4 * math.sqrt(0.3 * 0.7 / x.size)
    # Accumulation: the mean result of many identical dot products is the exact sum.
    n, rows = 64, 4096
    a = np.full((rows, n), 1 + 2.0 ** -7, np.float32)
    b = np.full((n, 1), 0.1, np.float32)
    cfg = AccumConfig(accumulator=FloatFormat(8, 3), rounding="stochastic", seed=3)
    y = tfaccum.accum_matmul(a, b, cfg).numpy()[:, 0].astype(np.float64)
    exact = n * float(np.float32(1 + 2.0 ** -7)) * float(np.float32(0.1))
    assert abs(y.mean() - exact) < 5 * y.std() / math.sqrt(rows)
    nearest = kernel_dot(a[0], b[:, 0], cfg.replace(rounding="nearest_even"))
    assert abs(nearest - exact) > 10 * y.std() / math.sqrt(rows)  # RN is visibly biased here


# --- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gradients_full_precision_match_tf_matmul(transpose_a, transpose_b):
    rng = np.random.default_rng(16)
    a = tf.constant(rng.standard_normal((7, 5) if not transpose_a else (5, 7)), tf.float32)
    b = tf.constant(rng.standard_normal((5, 3) if not transpose_b else (3, 5)), tf.float32)
    dy = tf.constant(rng.standard_normal((7, 3)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([a, b])
        y = tfaccum.accum_matmul(a, b, tfaccum.FULL_PRECISION, transpose_a, transpose_b)
        y_tf = tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    np.testing.assert_allclose(y, y_tf, rtol=1e-5, atol=1e-6)
    for got, want in zip(tape.gradient(y, [a, b], output_gradients=dy),
                         tape.gradient(y_tf, [a, b], output_gradients=dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gradients_reduced_policy_match_reference(transpose_a, transpose_b):
    rng = np.random.default_rng(17)
    a = rng.standard_normal((6, 9) if not transpose_a else (9, 6)).astype(np.float32)
    b = rng.standard_normal((9, 4) if not transpose_b else (4, 9)).astype(np.float32)
    dy = rng.standard_normal((6, 4)).astype(np.float32)
    policy = AccumPolicy(
        fwd=AccumConfig(accumulator=FloatFormat(6, 5)),
        bwd=AccumConfig(accumulator=FloatFormat(5, 3), chunk_size=2, rounding="stochastic", seed=1),
        grad=AccumConfig(accumulator=FloatFormat(7, 4), product=FloatFormat(5, 2),
                         rounding="toward_zero"),
        operands=tfaccum.FP8_E5M2)
    at, bt = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([at, bt])
        y = tfaccum.accum_matmul(at, bt, policy, transpose_a, transpose_b)
    da, db = tape.gradient(y, [at, bt], output_gradients=tf.constant(dy))
    ref_y = reference.matmul(reference.quantize(a, policy.operands),
                             reference.quantize(b, policy.operands), policy.fwd,
                             transpose_a, transpose_b)
    ref_da, ref_db = reference.matmul_grads(a, b, dy, policy, transpose_a, transpose_b)
    assert_bit_equal(y, ref_y)
    assert_bit_equal(da, ref_da)
    assert_bit_equal(db, ref_db)


def test_tf_function_and_unknown_batch_shape():
    cfg = AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=64)

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def f(x):
        w = tf.ones((8, 3))
        y = tfaccum.accum_matmul(x, w, cfg)
        assert y.shape.as_list() == [None, 3]
        return y

    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    assert_bit_equal(f(x), reference.matmul(x, np.ones((8, 3), np.float32), cfg))
    assert f(np.zeros((0, 8), np.float32)).shape == (0, 3)


# --- errors -----------------------------------------------------------------------------

def test_errors_are_clear():
    cfg = AccumConfig()
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"rank >= 2"):
        tfaccum.accum_matmul(np.ones((3,), np.float32), a, cfg)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="[Dd]imensions"):
        tfaccum.accum_matmul(a, np.ones((4, 2), np.float32), cfg)
    with pytest.raises(TypeError, match="float32"):
        tfaccum.accum_matmul(a.astype(np.float64), a.T, cfg)
    with pytest.raises(TypeError, match="AccumConfig or tfaccum.AccumPolicy"):
        tfaccum.accum_matmul(a, a.T, "e6m9")

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
    def unknown_rank(x, y):
        return tfaccum.accum_matmul(x, y, cfg)

    with pytest.raises(tf.errors.InvalidArgumentError, match="inner dimensions differ"):
        unknown_rank(a, np.ones((4, 2), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"rank >= 2"):
        unknown_rank(np.ones((2,), np.float32), a)


def test_invalid_kernel_attributes_are_invalid_argument():
    lib = tfaccum.ops.load_library()
    a = np.ones((2, 2), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mantissa_bits must be in 0..23"):
        lib.tfaccum_mat_mul(a, a, 0, accumulator=[8, 24, 1, 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="exponent_bits"):
        lib.tfaccum_mat_mul(a, a, 0, accumulator=[9, 10, 1, 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="4 integers"):
        lib.tfaccum_mat_mul(a, a, 0, product=[5, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="chunk_size"):
        lib.tfaccum_mat_mul(a, a, 0, chunk_size=-1)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rounding"):
        lib.tfaccum_mat_mul(a, a, 0, rounding="up")
    with pytest.raises(tf.errors.InvalidArgumentError, match="format"):
        lib.tfaccum_quantize(a, 0, format=[5, 10, 2, 0])
    # Values beyond int32 used to give a bare "value out of range": the message names
    # the field, its value and its range.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"accumulator: mantissa_bits must be in 0\.\.23, got 4294967306"):
        lib.tfaccum_mat_mul(a, a, 0, accumulator=[8, 2 ** 32 + 10, 1, 0])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"chunk_accumulator: exponent_bits must be in 2\.\.8, got -8589934592"):
        lib.tfaccum_mat_mul(a, a, 0, chunk_accumulator=[-2 ** 33, 10, 1, 0])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"format: overflow_inf \(0: saturate, 1: inf\) must be in 0\.\.1, got 2"):
        lib.tfaccum_quantize(a, 0, format=[5, 10, 1, 2])


def test_gradient_of_a_raw_op_without_policy_is_a_clear_error():
    lib = tfaccum.ops.load_library()
    a, b = tf.ones([2, 3]), tf.ones([3, 2])
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = lib.tfaccum_mat_mul(a, b, 0)
    with pytest.raises(ValueError, match=r"cannot differentiate TfaccumMatMul: its `policy` "
                                         r"attribute is empty"):
        tape.gradient(y, [a, b])

    @tf.function
    def graph_grad(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = lib.tfaccum_mat_mul(a, b, 0, policy="{not json")
        return tape.gradient(y, [a, b])

    with pytest.raises(ValueError, match=r"cannot differentiate TfaccumMatMul.*: its `policy` "
                                         r"attribute is not an AccumPolicy JSON"):
        graph_grad(a, b)
    # With a policy the raw op differentiates like accum_matmul.
    cfg = AccumConfig(accumulator=FloatFormat(5, 4))
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = lib.tfaccum_mat_mul(a, b, 0, policy=AccumPolicy.uniform(cfg).to_json())
    da, db = tape.gradient(y, [a, b])
    assert da.shape == (2, 3) and db.shape == (3, 2)


def test_empty_inputs():
    cfg = AccumConfig(accumulator=FloatFormat(5, 4), chunk_size=3)
    y = tfaccum.accum_matmul(np.zeros((0, 4), np.float32), np.ones((4, 3), np.float32), cfg)
    assert y.shape == (0, 3)
    y = tfaccum.accum_matmul(np.ones((2, 4), np.float32), np.ones((4, 0), np.float32), cfg)
    assert y.shape == (2, 0)
    y = tfaccum.accum_matmul(np.ones((2, 0), np.float32), np.ones((0, 5), np.float32), cfg)
    assert y.shape == (2, 5) and not np.any(y.numpy())
