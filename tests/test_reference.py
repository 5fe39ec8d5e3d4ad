"""Tests of tfaccum.reference, the exact pure-Python oracle of docs/numerics.md.

Every expectation here is computed independently of the reference's rounding code: casts
(numpy float16, ml_dtypes/TF bfloat16), numpy float32/float16 loops, a grid search over
enumerated tiny formats, Python's own round-half-even on Fractions, a hand-written
SplitMix64, TensorFlow's conv/patch extraction for tap geometry.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bisect
import functools
import importlib
import math
import pathlib
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

import tf_oracles

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_pure_modules():
    """tfaccum.config and tfaccum.reference, without needing the compiled ops.

    ``import tfaccum`` also imports ``tfaccum.ops``; if that does not work (yet), the two
    pure-Python modules are loaded from their files under a private package name.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from tfaccum import config, reference

        return config, reference
    except Exception:  # noqa: BLE001 - any failure of the compiled part
        pkg = types.ModuleType("_tfaccum_pure")
        pkg.__path__ = [str(ROOT / "tfaccum")]
        sys.modules["_tfaccum_pure"] = pkg
        return (importlib.import_module("_tfaccum_pure.config"),
                importlib.import_module("_tfaccum_pure.reference"))


cfgmod, ref = _load_pure_modules()
FloatFormat, AccumConfig, AccumPolicy = cfgmod.FloatFormat, cfgmod.AccumConfig, cfgmod.AccumPolicy

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

HALF_INF = FloatFormat(5, 10, overflow="inf")
BF16_INF = FloatFormat(8, 7, overflow="inf")
F32 = FloatFormat(8, 23)
F32_LOOP = AccumConfig(accumulator=F32, product=F32)  # = the float32 loop without FMA


# ---------------------------------------------------------------------------------------
# Independent helpers
# ---------------------------------------------------------------------------------------
M64 = 2 ** 64 - 1


def t_mix64(z):
    z &= M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z


def t_rbits(seed, element, counter):
    key = t_mix64((seed & M64) + (element + 1) * 0x9E3779B97F4A7C15)
    return t_mix64(key ^ ((counter + 1) * 0xD1B54A32D192ED03 & M64)) >> 40


def bits32(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def assert_same_float32(got, want):
    """Bitwise equality of float32 arrays (any NaN equals any NaN); reports the first diffs."""
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = (bits32(got) != bits32(want)) & ~both_nan
    if bad.any():
        idx = np.argwhere(bad)[:5]
        details = [(tuple(i), float(got[tuple(i)]), float(want[tuple(i)])) for i in idx]
        raise AssertionError(f"{bad.sum()} of {bad.size} differ, first (index, got, want): {details}")


def t_f32_rne(x: Fraction) -> float:
    """float32 round-to-nearest-even of an exact rational in float32's normal range,
    via Python's round-half-even of a Fraction."""
    if x == 0:
        return 0.0
    e = math.frexp(float(abs(x)))[1] - 1
    if Fraction(2) ** e > abs(x):  # float() rounded up into the next binade
        e -= 1
    assert -126 <= e <= 127, "helper is for the normal range only"
    scale = Fraction(2) ** (e - 23)
    return float(round(x / scale) * scale)


def t_round_sr(v: float, e: int, m: int, r: int) -> float:
    """Stochastic rounding of a float64-exact v to (e, m), in range (no overflow handling)."""
    if v == 0.0:
        return v
    emin = 2 - 2 ** (e - 1)
    exponent = math.frexp(abs(v))[1] - 1
    ulp = 2.0 ** (max(exponent, emin) - m)
    lo = math.floor(abs(v) / ulp)
    frac = abs(v) / ulp - lo
    up = math.floor(frac * 2 ** 24) + r >= 2 ** 24
    return math.copysign((lo + up) * ulp, v)


def half_loop(x, y, chunk=0, chunk_half=True):
    """numpy float16 dot loop: products rounded to half, partial sums in half, chunk sums in
    half (chunk_half) or float32. x, y must be half-representable."""
    with np.errstate(all="ignore"):
        p = [np.float16(np.float32(a) * np.float32(b)) for a, b in zip(x, y)]
        if chunk == 0:
            s = np.float16(0)
            for v in p:
                s = np.float16(s + v)
            return np.float32(s)
        s = np.float16(0) if chunk_half else np.float32(0)
        for start in range(0, len(p), chunk):
            t = np.float16(0)
            for v in p[start:start + chunk]:
                t = np.float16(t + v)
            s = np.float16(s + t) if chunk_half else np.float32(s + np.float32(t))
        return np.float32(s)


def float32_loop(x, y, chunk=0):
    """s = s + x[k]*y[k] in float32, no FMA (optionally chunked, chunk sums in float32)."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    with np.errstate(all="ignore"):
        if chunk == 0:
            s = np.float32(0)
            for a, b in zip(x, y):
                s = np.float32(s + np.float32(a * b))
            return s
        s = np.float32(0)
        for start in range(0, len(x), chunk):
            t = np.float32(0)
            for a, b in zip(x[start:start + chunk], y[start:start + chunk]):
                t = np.float32(t + np.float32(a * b))
            s = np.float32(s + t)
        return s


def to_half(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------
# random_bits
# ---------------------------------------------------------------------------------------
def test_random_bits_known_answers():
    golden = 0x9E3779B97F4A7C15
    # The first outputs of the reference SplitMix64 generator seeded with 0 are
    # mix64(1·golden), mix64(2·golden), ...: this pins the hand-written mix64.
    assert t_mix64(golden) == 0xE220A8397B1DCDAF
    assert t_mix64(2 * golden) == 0x6E789E6AA1B965F4
    assert t_mix64(3 * golden) == 0x06C45D188009454F
    # so key(0, e) is the (e+1)-th SplitMix64 output, and r is spelled out by hand:
    assert ref.random_bits(0, 0, 0) == t_mix64(0xE220A8397B1DCDAF ^ 0xD1B54A32D192ED03) >> 40
    c2 = (3 * 0xD1B54A32D192ED03) % 2 ** 64
    assert ref.random_bits(0, 1, 2) == t_mix64(0x6E789E6AA1B965F4 ^ c2) >> 40
    for seed, element, counter in [(0, 0, 0), (1, 0, 0), (12345, 678, 9), (2 ** 63 - 1, 5, 3),
                                   (-1, 7, 1), (-(2 ** 63), 0, 10 ** 6), (99, 10 ** 9, 3 * 511 + 2)]:
        r = ref.random_bits(seed, element, counter)
        assert r == t_rbits(seed, element, counter)
        assert 0 <= r < 2 ** 24
    # seed is taken as uint64
    assert ref.random_bits(-1, 3, 4) == ref.random_bits(2 ** 64 - 1, 3, 4)


def test_random_bits_reproducible_and_distinct():
    draws = lambda seed: [ref.random_bits(seed, e, c) for e in range(40) for c in range(25)]
    a, b, c = draws(7), draws(7), draws(8)
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) > 990  # a different seed changes (almost) all
    assert len(set(a)) > 990  # distinct positions give distinct draws
    mean = np.mean(a) / 2 ** 24
    assert abs(mean - 0.5) < 0.04


# ---------------------------------------------------------------------------------------
# quantize == float16 / bfloat16 casts
# ---------------------------------------------------------------------------------------
def _cast_test_values(rng, exp_lo, exp_hi, special):
    """float32 values: random bit patterns, ties (and their neighbours) at every bit
    position with exponents in [exp_lo, exp_hi] (biased float32 exponents), specials."""
    random_bits = rng.integers(0, 2 ** 32, size=6000, dtype=np.uint64).astype(np.uint32)
    ties = []
    for j in range(23):
        n = 150
        sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
        expo = rng.integers(exp_lo, exp_hi + 1, n).astype(np.uint32) << 23
        upper = rng.integers(0, 2 ** 23, n, dtype=np.uint32) & ~np.uint32((1 << (j + 1)) - 1)
        tie = sign | expo | upper | np.uint32(1 << j)
        ties += [tie, tie + np.uint32(1), tie - np.uint32(1)]
    values = np.concatenate([random_bits.view(np.float32),
                             np.concatenate(ties).view(np.float32),
                             np.array(special, np.float32)])
    return np.concatenate([values, -values])


def test_quantize_binary16_equals_float16_cast():
    rng = np.random.default_rng(1)
    special = [0.0, np.nan, np.inf, 65504, 65519.996, 65520, 65536, 1e6, 3.4e38,
               2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * (1 + 2 ** -23), 3 * 2.0 ** -26, 2.0 ** -26,
               2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1e-45, 1.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11]
    # biased float32 exponents 100..143 cover half's zero/subnormal/normal/overflow range
    x = _cast_test_values(rng, 100, 143, special)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    assert_same_float32(ref.quantize(x, HALF_INF), want)


def _to_bfloat16(x):
    if ml_dtypes is not None:
        with np.errstate(all="ignore"):
            return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    import tensorflow as tf

    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()


def test_quantize_bfloat16_equals_bfloat16_cast():
    rng = np.random.default_rng(2)
    f32max = float(np.finfo(np.float32).max)
    special = [0.0, np.nan, np.inf, f32max, 3.3895314e38, 3.3961776e38, 3.3961772e38,
               2.0 ** -133, 2.0 ** -134, 2.0 ** -134 * 3, 2.0 ** -149, 2.0 ** -126, 1 + 2.0 ** -8]
    x = _cast_test_values(rng, 0, 254, special)  # all finite float32 exponents incl. subnormals
    assert_same_float32(ref.quantize(x, BF16_INF), _to_bfloat16(x))
    # and with TF's cast too, on a sample (when ml_dtypes was the first witness)
    if ml_dtypes is not None:
        import tensorflow as tf

        sample = x[::7]
        tf_cast = tf.cast(tf.cast(sample, tf.bfloat16), tf.float32).numpy()
        assert_same_float32(ref.quantize(sample, BF16_INF), tf_cast)


def test_quantize_saturate_and_shapes():
    x = np.array([[70000.0, -1e9, np.inf], [-np.inf, np.nan, 65519.0]], np.float32)
    got = ref.quantize(x, FloatFormat(5, 10))  # saturate is the default
    assert got.shape == x.shape and got.dtype == np.float32
    assert_same_float32(got, [[65504, -65504, np.inf], [-np.inf, np.nan, 65504]])


# ---------------------------------------------------------------------------------------
# Exhaustive tiny formats, against a grid search over the enumerated values
# ---------------------------------------------------------------------------------------
TINY = [(e, m) for e in (2, 3) for m in range(4)]


@functools.lru_cache(maxsize=None)
def enumerate_positive(e, m):
    """All non-negative finite values of (e, m) from the bit layout, increasing."""
    bias = 2 ** (e - 1) - 1
    values = []
    for code in range(2 ** e - 1):  # the top code is Inf/NaN
        for f in range(2 ** m):
            if code == 0:
                values.append(Fraction(f, 2 ** m) * Fraction(2) ** (1 - bias))
            else:
                values.append((1 + Fraction(f, 2 ** m)) * Fraction(2) ** (code - bias))
    return values


def expected_round(x: Fraction, e, m, subnormals, overflow, rounding, r=None):
    """Q(x) from the enumeration: a grid search, not the reference's arithmetic."""
    if x < 0:
        return -expected_round(-x, e, m, subnormals, overflow, rounding, r)
    grid = enumerate_positive(e, m)
    max_value = grid[-1]
    top = 2 * Fraction(2) ** (2 ** (e - 1) - 1)  # 2^(emax+1): first value past max
    grid = grid + [top]
    if x >= top:
        result = top  # every mode rounds a value past the grid's end to at least top
    else:
        i = bisect.bisect_right(grid, x) - 1
        lo = grid[i]
        if lo == x:
            result = lo
        else:
            hi = grid[i + 1]
            if rounding == "toward_zero":
                result = lo
            elif rounding == "nearest_even":
                d_lo, d_hi = x - lo, hi - x
                if d_lo != d_hi:
                    result = lo if d_lo < d_hi else hi
                else:  # tie: the even multiple of the spacing
                    result = lo if (lo / (hi - lo)) % 2 == 0 else hi
            else:
                f24 = math.floor((x - lo) / (hi - lo) * 2 ** 24)
                result = hi if f24 + r >= 2 ** 24 else lo
    smallest_normal = Fraction(2) ** (2 - 2 ** (e - 1))
    if not subnormals and 0 < result < smallest_normal:
        result = Fraction(0)
    if result > max_value:
        if overflow == "inf" and rounding != "toward_zero":
            return math.inf
        result = max_value
    return float(result)


def _check_round(x, fmt, rounding, r=None):
    got = ref.round_to_format(x, fmt, rounding, r)
    want = expected_round(Fraction(x), fmt.exponent_bits, fmt.mantissa_bits, fmt.subnormals,
                          fmt.overflow, rounding, r)
    if want == 0:
        want = math.copysign(0.0, x)  # a non-zero x rounding to zero keeps its sign
    assert (got == want and math.copysign(1, got) == math.copysign(1, want)), \
        (fmt, rounding, r, x, got, want)


@pytest.mark.parametrize("e,m", TINY)
def test_tiny_format_enumeration_matches_config(e, m):
    values = enumerate_positive(e, m)
    fmt = FloatFormat(e, m)
    assert float(values[-1]) == fmt.max_value
    assert float(values[1]) == fmt.smallest_subnormal
    assert float(values[2 ** m]) == fmt.smallest_normal


@pytest.mark.parametrize("e,m", TINY)
def test_tiny_format_fixed_points_and_midpoints(e, m):
    rng = np.random.default_rng(e * 10 + m)
    values = enumerate_positive(e, m)
    for subnormals in (True, False):
        fmt = FloatFormat(e, m, subnormals=subnormals)
        for v in values:
            for sign in (1, -1):
                x = sign * v
                for rounding in ("nearest_even", "toward_zero", "stochastic"):
                    got = ref.round_to_format(x, fmt, rounding, int(rng.integers(2 ** 24)))
                    if subnormals or v == 0 or v >= fmt.smallest_normal:
                        assert got == x, (fmt, x, rounding, got)  # a fixed point
                    else:
                        assert got == 0 and math.copysign(1, got) == sign, (fmt, x, got)
        # midpoints go to the neighbour that is an even multiple of the spacing
        for lo, hi in zip(values, values[1:]):
            mid = (lo + hi) / 2
            even = lo if (lo / (hi - lo)) % 2 == 0 else hi
            got = ref.round_to_format(mid, fmt)
            if subnormals or even == 0 or even >= fmt.smallest_normal:
                assert got == even, (fmt, mid, got, even)
            if m > 0:  # the even neighbour has an even last fraction bit
                index = values.index(Fraction(got)) if got in values else None
                assert index is None or index % 2 == 0
            _check_round(-mid, fmt, "nearest_even")


@pytest.mark.parametrize("e,m", TINY)
def test_tiny_format_random_values_all_modes(e, m):
    rng = np.random.default_rng(100 + e * 10 + m)
    values = enumerate_positive(e, m)
    top = 4 * values[-1]
    xs = [Fraction(int(rng.integers(1, 2 ** 30)), 2 ** 30) * top for _ in range(120)]
    # just around every midpoint, and just around max / the overflow threshold
    eps = Fraction(1, 2 ** 40)
    for lo, hi in zip(values, values[1:] + [2 * Fraction(2) ** (2 ** (e - 1) - 1)]):
        mid = (lo + hi) / 2
        xs += [mid - eps, mid + eps]
    xs += [values[-1] + eps, Fraction(10) ** 9, Fraction(1, 10 ** 9), Fraction(1, 3)]
    for subnormals in (True, False):
        for overflow in ("saturate", "inf"):
            fmt = FloatFormat(e, m, subnormals=subnormals, overflow=overflow)
            for x in xs:
                for sign in (1, -1):
                    _check_round(sign * x, fmt, "nearest_even")
                    _check_round(sign * x, fmt, "toward_zero")
                    _check_round(sign * x, fmt, "stochastic", int(rng.integers(2 ** 24)))
                    # toward_zero never increases the magnitude
                    assert abs(ref.round_to_format(sign * x, fmt, "toward_zero")) <= abs(x)


@pytest.mark.parametrize("e,m", [(2, 1), (3, 2), (3, 0)])
def test_tiny_format_stochastic_threshold_and_frequency(e, m):
    rng = np.random.default_rng(7)
    values = enumerate_positive(e, m)
    fmt = FloatFormat(e, m, overflow="inf")
    for lo, hi in zip(values, values[1:]):
        for frac in (Fraction(1, 3), Fraction(1, 2), Fraction(7, 8), Fraction(1, 2 ** 25)):
            x = lo + frac * (hi - lo)
            f24 = math.floor(frac * 2 ** 24)
            # the rule, exactly: away from zero iff floor(f·2^24) + r >= 2^24
            assert ref.round_to_format(x, fmt, "stochastic", 2 ** 24 - f24 - 1) == lo
            assert ref.round_to_format(x, fmt, "stochastic", 0) == lo
            if f24 > 0:
                assert ref.round_to_format(x, fmt, "stochastic", 2 ** 24 - f24) == hi
                assert ref.round_to_format(-x, fmt, "stochastic", 2 ** 24 - f24) == -hi
    # frequency of rounding up ≈ the fraction
    lo, hi = values[len(values) // 2], values[len(values) // 2 + 1]
    for frac in (0.1, 0.5, 0.8):
        x = lo + Fraction(frac) * (hi - lo)
        n = 3000
        ups = sum(ref.round_to_format(x, fmt, "stochastic", int(r)) == hi
                  for r in rng.integers(0, 2 ** 24, n))
        assert abs(ups / n - frac) < 4 * math.sqrt(frac * (1 - frac) / n)


def test_stochastic_overflow_and_quantize_unbiased():
    fmt = FloatFormat(5, 2, overflow="inf")  # max 57344, spacing 8192 at the top
    just_above = 57344 + 2048  # f = 1/4
    assert ref.round_to_format(just_above, fmt, "stochastic", 0) == 57344
    assert ref.round_to_format(just_above, fmt, "stochastic", 2 ** 24 - 2 ** 22) == math.inf
    sat = FloatFormat(5, 2)
    assert ref.round_to_format(just_above, sat, "stochastic", 2 ** 24 - 1) == 57344
    # the mean of many stochastic roundings is unbiased
    x = np.float32(1 + 1 / 3)
    q = ref.quantize(np.full(20000, x, np.float32), FloatFormat(5, 2), "stochastic", seed=3)
    assert set(np.unique(q)) == {1.25, 1.5}
    assert abs(q.astype(np.float64).mean() - float(x)) < 4 * 0.25 * 0.5 / math.sqrt(20000)


def test_quantize_stochastic_uses_flat_index_and_counter_zero():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 5)) * 10).astype(np.float32)
    for seed in (0, 11, -5):
        got = ref.quantize(x, FloatFormat(6, 3), "stochastic", seed)
        want = [t_round_sr(float(v), 6, 3, t_rbits(seed, i, 0)) for i, v in enumerate(x.ravel())]
        assert_same_float32(got, np.array(want, np.float32).reshape(x.shape))


# ---------------------------------------------------------------------------------------
# round_to_format: specials, overflow, signs
# ---------------------------------------------------------------------------------------
def test_round_specials_and_overflow():
    for overflow in ("saturate", "inf"):
        fmt = FloatFormat(5, 10, overflow=overflow)
        for rounding, r in (("nearest_even", None), ("toward_zero", None), ("stochastic", 123)):
            assert math.isnan(ref.round_to_format(math.nan, fmt, rounding, r))
            assert ref.round_to_format(math.inf, fmt, rounding, r) == math.inf
            assert ref.round_to_format(-math.inf, fmt, rounding, r) == -math.inf
            for z in (0.0, -0.0):
                got = ref.round_to_format(z, fmt, rounding, r)
                assert got == 0 and math.copysign(1, got) == math.copysign(1, z)
            tiny = ref.round_to_format(-1e-30, fmt, rounding, r)
            assert tiny == 0 and math.copysign(1, tiny) == -1
            huge = ref.round_to_format(-1e30, fmt, rounding, r)
            if overflow == "inf" and rounding != "toward_zero":
                assert huge == -math.inf
            else:
                assert huge == -65504
    # just above max but rounding back to it is not an overflow
    assert ref.round_to_format(65519, HALF_INF) == 65504
    assert ref.round_to_format(65520, HALF_INF) == math.inf  # the tie goes up: IEEE
    assert ref.round_to_format(Fraction(1), FloatFormat(2, 0)) == 1.0
    assert ref.round_to_format(Fraction(1, 3), F32) == float(np.float32(1 / 3))
    # subnormals off: rounded as if on, then flushed (2^-15 - tiny rounds up to a normal)
    no_sub = FloatFormat(5, 10, subnormals=False)
    assert ref.round_to_format(2.0 ** -14 * (1 - 2 ** -12), no_sub) == 2.0 ** -14
    assert ref.round_to_format(2.0 ** -14 * (1 - 2 ** -10), no_sub) == 0
    with pytest.raises(ValueError):
        ref.round_to_format(1.5, fmt, "stochastic")


# ---------------------------------------------------------------------------------------
# The dot product
# ---------------------------------------------------------------------------------------
def _wide_vectors(rng, n):
    a = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)
    b = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)
    a[rng.random(n) < 0.1] = 0.0  # zero products count like any other
    return a.astype(np.float32), b.astype(np.float32)


def test_dot_binary32_products_equals_float32_loop():
    rng = np.random.default_rng(10)
    for trial in range(150):
        a, b = _wide_vectors(rng, int(rng.integers(0, 60)))
        assert_same_float32(ref.dot(a, b, F32_LOOP), float32_loop(a, b))
        c = int(rng.integers(1, 9))
        assert_same_float32(ref.dot(a, b, F32_LOOP.replace(chunk_size=c)), float32_loop(a, b, c))


def test_dot_binary32_exact_products_equals_fma_loop():
    rng = np.random.default_rng(11)
    cfg = AccumConfig()  # exact products, binary32 partial sums
    for trial in range(150):
        a, b = _wide_vectors(rng, int(rng.integers(1, 60)))
        s = Fraction(0)
        for x, y in zip(a.tolist(), b.tolist()):
            s = Fraction(t_f32_rne(s + Fraction(x) * Fraction(y)))
        assert float(ref.dot(a, b, cfg)) == float(s)


def _product_just_above(target, delta):
    """float32 x, y with target < x·y < target + delta (exactly)."""
    for k in range(1, 2000):
        x = np.float32(1 + k * 2.0 ** -23)
        y0 = np.float32(target / float(x))
        for y in (y0, np.nextafter(y0, np.float32(np.inf)), np.nextafter(y0, np.float32(0))):
            excess = Fraction(float(x)) * Fraction(float(y)) - Fraction(target)
            if 0 < excess < delta:
                return x, y
    raise AssertionError("no such pair found")


def test_dot_no_double_rounding():
    e5m2 = AccumConfig(accumulator=FloatFormat(5, 2))  # spacing 0.25 at 1: 1.125 is a tie
    # a·b is just above 1.125 but rounds to 1.125 in float32
    a, b = _product_just_above(1.125, Fraction(1, 2 ** 24))
    assert np.float32(float(a) * float(b)) == np.float32(1.125)
    assert ref.dot([a], [b], e5m2) == 1.25  # single rounding of the exact product
    assert ref.dot([a], [b], e5m2.replace(product=F32)) == 1.0  # float32 first: tie to even
    # the same in a sum: 1 + c·d with c·d just above 0.125, float32(1 + c·d) == 1.125
    c, d = _product_just_above(0.125, Fraction(1, 2 ** 25))
    assert np.float32(1 + float(c) * float(d)) == np.float32(1.125)
    assert ref.dot([1, c], [1, d], e5m2) == 1.25
    assert ref.dot([1, c], [1, d], e5m2.replace(product=F32)) == 1.0


@pytest.mark.parametrize("chunk,chunk_half", [(0, True), (1, True), (3, True), (8, False),
                                              (16, True)])
def test_dot_half_formats_equal_float16_loop(chunk, chunk_half):
    rng = np.random.default_rng(12 + chunk)
    cfg = AccumConfig(accumulator=HALF_INF, product=HALF_INF, chunk_size=chunk,
                      chunk_accumulator=None if chunk_half else F32)
    for trial in range(60):
        n = int(rng.integers(0, 70))
        scale = 2.0 ** rng.integers(-6, 9, n)
        a = to_half(rng.standard_normal(n) * scale)
        b = to_half(rng.standard_normal(n) * 4)
        a[rng.random(n) < 0.1] = 0.0
        if trial % 10 == 0 and n > 2:  # overflow to Inf, and Inf - Inf = NaN
            a[0], a[1] = 60000.0, 60000.0 * (-1) ** (trial // 10)
            b[0] = b[1] = 2.0
        assert_same_float32(ref.dot(a, b, cfg), half_loop(a, b, chunk, chunk_half))


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes not installed")
def test_dot_bfloat16_equals_ml_dtypes_loop():
    rng = np.random.default_rng(13)
    bf = ml_dtypes.bfloat16
    cfg = AccumConfig(accumulator=BF16_INF, product=BF16_INF, chunk_size=4)
    for trial in range(60):
        n = int(rng.integers(1, 50))
        a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(bf).astype(np.float32)
        b = rng.standard_normal(n).astype(bf).astype(np.float32)
        p = [bf(np.float32(x * y)) for x, y in zip(a, b)]
        s = bf(0)
        for start in range(0, n, 4):
            t = bf(0)
            for v in p[start:start + 4]:
                t = bf(np.float32(t) + np.float32(v))
            s = bf(np.float32(s) + np.float32(t))
        assert_same_float32(ref.dot(a, b, cfg), np.float32(s))


def _sr_loop(a, b, acc, prod, chunk, chunk_fmt, seed, element):
    """Stochastic dot with float64-exact arithmetic and the documented counters."""
    p = [float(x) * float(y) for x, y in zip(a, b)]
    if prod is not None:
        p = [t_round_sr(v, *prod, t_rbits(seed, element, 3 * k)) for k, v in enumerate(p)]
    s = 0.0
    if chunk == 0:
        for k, v in enumerate(p):
            s = t_round_sr(s + v, *acc, t_rbits(seed, element, 3 * k + 1))
        return s
    for j, start in enumerate(range(0, len(p), chunk)):
        t = 0.0
        for k in range(start, min(len(p), start + chunk)):
            t = t_round_sr(t + p[k], *acc, t_rbits(seed, element, 3 * k + 1))
        s = t_round_sr(s + t, *chunk_fmt, t_rbits(seed, element, 3 * j + 2))
    return s


def _small_exact_vectors(rng, n):
    """6-bit significands, exponents -4..2: every sum here is exact in float64."""
    a = rng.integers(-63, 64, n) * 2.0 ** rng.integers(-4, 3, n)
    b = rng.integers(-63, 64, n) * 2.0 ** rng.integers(-4, 3, n)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("prod,chunk", [(None, 0), ((6, 4), 0), ((6, 4), 5), (None, 7)])
def test_dot_stochastic_counters(prod, chunk):
    rng = np.random.default_rng(14)
    acc, chunk_fmt = (6, 7), (7, 9)
    for trial in range(40):
        seed = int(rng.integers(-2 ** 63, 2 ** 63))
        element = int(rng.integers(0, 10 ** 6))
        a, b = _small_exact_vectors(rng, int(rng.integers(1, 50)))
        cfg = AccumConfig(accumulator=FloatFormat(*acc),
                          product=None if prod is None else FloatFormat(*prod),
                          chunk_size=chunk, chunk_accumulator=FloatFormat(*chunk_fmt),
                          rounding="stochastic", seed=seed)
        want = _sr_loop(a, b, acc, prod, chunk, chunk_fmt, seed, element)
        assert float(ref.dot(a, b, cfg, element=element)) == want


def test_dot_specials_and_signed_zeros():
    half = FloatFormat(5, 10)
    cfg = AccumConfig(accumulator=half)

    def dot(a, b, c=cfg):
        return float(ref.dot(np.array(a, np.float32), np.array(b, np.float32), c))

    def is_neg_zero(v):
        return v == 0 and math.copysign(1, v) < 0

    assert dot([], []) == 0 and not is_neg_zero(dot([], []))
    assert not is_neg_zero(dot([-0.0], [1.0]))  # +0 + -0 = +0
    assert not is_neg_zero(dot([1.0, -1.0], [1.0, 1.0]))  # exact zero sum is +0
    assert dot([np.inf, 1.0], [1.0, -5.0]) == math.inf
    assert math.isnan(dot([np.inf, np.inf], [1.0, -1.0]))  # Inf - Inf
    assert math.isnan(dot([0.0, 1.0], [np.inf, 1.0]))  # 0 × Inf
    assert math.isnan(dot([np.nan, 1.0], [1.0, 1.0]))
    assert dot([60000, 60000], [1, 1]) == 65504  # saturate
    assert dot([60000, 60000, -10016], [1, 1, 1]) == 55488
    # the default (BINARY32 preset) overflows to Inf like float32; a saturating e8m23 clamps
    big = [3e38, 3e38]
    assert dot(big, [1, 1], AccumConfig()) == math.inf
    assert dot(big, [1, 1], AccumConfig(accumulator=FloatFormat(8, 23))) == float(
        np.finfo(np.float32).max)
    f32_inf = FloatFormat(8, 23, overflow="inf")
    assert dot(big, [1, 1], AccumConfig(accumulator=f32_inf, product=f32_inf)) == math.inf
    assert float32_loop(big, [1, 1]) == math.inf
    inf_cfg = AccumConfig(accumulator=HALF_INF)
    assert dot([60000, 60000, -1e30], [1, 1, 1], inf_cfg) == math.inf  # Inf + finite = Inf
    # a negative sum that underflows to -0, then (-0) + (-0) = -0 and (-0) + (+0) = +0
    no_sub = AccumConfig(accumulator=FloatFormat(5, 10, subnormals=False))
    assert is_neg_zero(dot([-1e-6], [1.0], no_sub))
    assert is_neg_zero(dot([-1e-6, -0.0], [1.0, 1.0], no_sub))
    assert not is_neg_zero(dot([-1e-6, 0.0], [1.0, 1.0], no_sub))
    # a non-zero sum rounding to zero keeps its sign; a product rounded to -0 by P is a
    # zero added to the initial +0
    assert is_neg_zero(dot([-1e-9], [1.0]))
    assert not is_neg_zero(dot([-1e-9], [1.0], AccumConfig(accumulator=half, product=half)))


def test_dot_zero_products_count_in_chunks():
    # chunk 3 in half (spacing 4 at 4096): the zeros move the chunk boundaries
    cfg = AccumConfig(accumulator=HALF_INF, chunk_size=3)
    ones = [1] * 6
    assert ref.dot([4096, 0, 0, 1, 1, 1], ones, cfg) == 4100  # 4096 + 3
    assert ref.dot([4096, 1, 1, 1, 0, 0], ones, cfg) == 4096  # (4096+1+1) + (1)
    assert ref.dot([4096, 0, 0, 1, 1, 1], ones, cfg.replace(chunk_size=0)) == 4096


# ---------------------------------------------------------------------------------------
# MatMul and gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_equals_float32_loops(ta, tb):
    rng = np.random.default_rng(20)
    m, k, n = 3, 17, 4
    a = (rng.standard_normal((m, k)) * 2.0 ** rng.integers(-10, 10, (m, k))).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = ref.matmul(a.T.copy() if ta else a, b.T.copy() if tb else b, F32_LOOP, ta, tb)
    want = np.array([[float32_loop(a[i], b[:, j]) for j in range(n)] for i in range(m)])
    assert_same_float32(got, want)
    close = ref.matmul(a, b, AccumConfig())
    np.testing.assert_allclose(close, a.astype(np.float64) @ b, rtol=1e-5,
                               atol=1e-6 * (np.abs(a) @ np.abs(b)).max())


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_grads(ta, tb):
    rng = np.random.default_rng(21)
    m, k, n = 4, 3, 5
    a = to_half(rng.standard_normal((m, k)))
    b = to_half(rng.standard_normal((k, n)))
    dy = to_half(rng.standard_normal((m, n)))
    a_st, b_st = (a.T.copy() if ta else a), (b.T.copy() if tb else b)

    # full precision vs numpy, in the stored shapes
    da, db = ref.matmul_grads(a_st, b_st, dy, AccumConfig(), ta, tb)
    da_want, db_want = dy.astype(np.float64) @ b.T, a.T.astype(np.float64) @ dy
    np.testing.assert_allclose(da, da_want.T if ta else da_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, db_want.T if tb else db_want, rtol=1e-5, atol=1e-6)

    # bwd and grad use their own configs and sum in the documented order
    policy = AccumPolicy(bwd=AccumConfig(accumulator=HALF_INF, product=HALF_INF, chunk_size=2),
                         grad=AccumConfig(accumulator=HALF_INF, product=HALF_INF, chunk_size=3))
    da, db = ref.matmul_grads(a_st, b_st, dy, policy, ta, tb)
    da_want = np.array([[half_loop(dy[i], b[kk], 2) for kk in range(k)] for i in range(m)])
    db_want = np.array([[half_loop(a[:, kk], dy[:, j], 3) for j in range(n)] for kk in range(k)])
    assert_same_float32(da, da_want.T if ta else da_want)
    assert_same_float32(db, db_want.T if tb else db_want)

    # stochastic: the element is the flat index in the stored gradient
    cfg = AccumConfig(accumulator=FloatFormat(5, 3), rounding="stochastic", seed=42)
    da, db = ref.matmul_grads(a_st, b_st, dy, cfg, ta, tb)
    for i in range(m):
        for kk in range(k):
            idx = (kk, i) if ta else (i, kk)
            e = int(np.ravel_multi_index(idx, da.shape))
            assert da[idx] == ref.dot(dy[i], b[kk], cfg, element=e)
    for kk in range(k):
        for j in range(n):
            idx = (j, kk) if tb else (kk, j)
            e = int(np.ravel_multi_index(idx, db.shape))
            assert db[idx] == ref.dot(a[:, kk], dy[:, j], cfg, element=e)
    y = ref.matmul(a_st, b_st, cfg, ta, tb)
    assert y.shape == (m, n)
    for i in range(m):
        for j in range(n):
            assert y[i, j] == ref.dot(a[i], b[:, j], cfg, element=i * n + j)


def test_matmul_operand_quantization():
    rng = np.random.default_rng(22)
    a = rng.standard_normal((3, 6)).astype(np.float32)
    b = rng.standard_normal((6, 2)).astype(np.float32)
    dy = rng.standard_normal((3, 2)).astype(np.float32)
    base = AccumPolicy(fwd=AccumConfig(accumulator=FloatFormat(6, 9)),
                       bwd=AccumConfig(accumulator=FloatFormat(6, 8), chunk_size=2),
                       grad=AccumConfig(accumulator=FloatFormat(6, 7)))
    quant = base.replace(operands=FloatFormat(5, 10))
    got = ref.matmul_grads(a, b, dy, quant)
    want = ref.matmul_grads(to_half(a), to_half(b), to_half(dy), base)
    assert_same_float32(got[0], want[0])
    assert_same_float32(got[1], want[1])
    assert_same_float32(ref.matmul(a, b, quant), ref.matmul(to_half(a), to_half(b), base.fwd))
    assert not np.array_equal(got[0], ref.matmul_grads(a, b, dy, base)[0])


# ---------------------------------------------------------------------------------------
# Conv2D and gradients
# ---------------------------------------------------------------------------------------
CONV_CASES = [
    # x shape, w shape, strides, padding, dilations
    ((2, 5, 6, 3), (3, 2, 3, 4), (1, 1), "SAME", (1, 1)),
    ((1, 5, 5, 2), (2, 2, 2, 3), (2, 2), "SAME", (1, 1)),  # odd SAME split: pad 0 top, 1 bottom
    ((2, 7, 6, 2), (3, 3, 2, 2), (2, 3), "SAME", (1, 1)),
    ((1, 6, 7, 2), (2, 3, 2, 2), (1, 2), "VALID", (1, 1)),
    ((1, 7, 7, 1), (3, 2, 1, 2), (1, 1), "SAME", (2, 2)),
    ((2, 6, 5, 2), (2, 2, 2, 2), (2, 1), [(1, 2), (0, 1)], (2, 1)),
    ((1, 4, 5, 3), (2, 3, 3, 2), (3, 2), [(2, 0), (1, 3)], (1, 1)),
]


_tf_padding = tf_oracles.tf_padding


def _patches(x, w_shape, strides, padding, dilations):
    """TF's own patch extraction: [B, OH, OW, KH*KW*Cin] in (ky, kx, ci) order, zeros outside."""
    import tensorflow as tf

    if not isinstance(padding, str):
        x = np.pad(x, [(0, 0), padding[0], padding[1], (0, 0)])
        padding = "VALID"
    return tf.image.extract_patches(x, sizes=[1, w_shape[0], w_shape[1], 1],
                                    strides=[1, *strides, 1], rates=[1, *dilations, 1],
                                    padding=padding).numpy()


def _int_valued(rng, shape, lo=-3, hi=3):
    return rng.integers(lo, hi + 1, shape).astype(np.float32)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_matches_tensorflow(case):
    import tensorflow as tf

    x_shape, w_shape, strides, padding, dilations = CONV_CASES[case]
    rng = np.random.default_rng(30 + case)
    conv = lambda x, w: tf.nn.conv2d(x, w, strides=strides, padding=_tf_padding(padding),
                                     dilations=dilations).numpy()
    cfg = AccumConfig(accumulator=F32, product=F32)
    # small integers: every sum is exact, so any summation order agrees bit for bit
    x, w = _int_valued(rng, x_shape), _int_valued(rng, w_shape)
    y = ref.conv2d(x, w, cfg, strides, padding, dilations)
    assert_same_float32(y, conv(x, w))
    assert ref.conv2d_geometry(x_shape, w_shape, strides, padding, dilations)[:2] == y.shape[1:3]
    # random values, to float32 accuracy
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    y = ref.conv2d(x, w, cfg, strides, padding, dilations)
    bound = conv(np.abs(x), np.abs(w))
    assert np.all(np.abs(y - conv(x, w)) <= 1e-5 * bound + 1e-30)


def _tf_conv_grads(x, w, dy, strides, padding, dilations):
    import tensorflow as tf

    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, wt])
        # TF's CPU backprop kernels reject dilations: the oracle dilates the filter itself
        y = tf_oracles.conv2d(xt, wt, strides, padding, dilations)
    return (tape.gradient(y, xt, output_gradients=dy).numpy(),
            tape.gradient(y, wt, output_gradients=dy).numpy())


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_backprop_matches_tensorflow(case):
    x_shape, w_shape, strides, padding, dilations = CONV_CASES[case]
    rng = np.random.default_rng(40 + case)
    oh, ow, _, _ = ref.conv2d_geometry(x_shape, w_shape, strides, padding, dilations)
    dy_shape = (x_shape[0], oh, ow, w_shape[3])
    cfg = AccumConfig(accumulator=F32, product=F32)
    x, w, dy = _int_valued(rng, x_shape), _int_valued(rng, w_shape), _int_valued(rng, dy_shape)
    dx_tf, dw_tf = _tf_conv_grads(x, w, dy, strides, padding, dilations)
    dx = ref.conv2d_backprop_input(x_shape, w, dy, cfg, strides, padding, dilations)
    dw = ref.conv2d_backprop_filter(x, w_shape, dy, cfg, strides, padding, dilations)
    assert_same_float32(dx, dx_tf)
    assert_same_float32(dw, dw_tf)
    dx2, dw2 = ref.conv2d_grads(x, w, dy, cfg, strides, padding, dilations)
    assert_same_float32(dx2, dx_tf)
    assert_same_float32(dw2, dw_tf)
    # random values, to float32 accuracy
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    dy = rng.standard_normal(dy_shape).astype(np.float32)
    dx_tf, dw_tf = _tf_conv_grads(x, w, dy, strides, padding, dilations)
    dx_bound, dw_bound = _tf_conv_grads(np.abs(x), np.abs(w), np.abs(dy), strides, padding,
                                        dilations)
    dx, dw = ref.conv2d_grads(x, w, dy, AccumConfig(), strides, padding, dilations)
    assert np.all(np.abs(dx - dx_tf) <= 1e-5 * dx_bound + 1e-30)
    assert np.all(np.abs(dw - dw_tf) <= 1e-5 * dw_bound + 1e-30)


def _conv_product_lists(x, w, dy, strides, padding, dilations):
    """The documented product sequences, rebuilt from TF's patch extraction."""
    kh, kw, cin, cout = w.shape
    patches = _patches(x, w.shape, strides, padding, dilations)  # [B, OH, OW, KH*KW*Cin]
    batch, oh, ow, _ = patches.shape
    h, wid = x.shape[1:3]
    fwd = {}
    for idx in np.ndindex(batch, oh, ow, cout):
        fwd[idx] = (patches[idx[:3]], w[..., idx[3]].reshape(-1))
    grad = {}
    for ky, kx, ci, co in np.ndindex(kh, kw, cin, cout):
        col = patches[..., (ky * kw + kx) * cin + ci].reshape(-1)  # (b, oy, ox) row-major
        grad[ky, kx, ci, co] = (col, dy[..., co].reshape(-1))
    # which input pixel each (oy, ox, ky, kx) reads: patches of a pixel-index image
    pix = np.arange(1, h * wid + 1, dtype=np.float32).reshape(1, h, wid, 1)
    reads = _patches(pix, (kh, kw), strides, padding, dilations)[0]  # [OH, OW, KH*KW]
    bwd = {}
    for b, iy, ix, ci in np.ndindex(batch, h, wid, cin):
        lhs, rhs = [], []
        for t in range(kh * kw):
            hit = np.argwhere(reads[:, :, t] == iy * wid + ix + 1)
            assert len(hit) <= 1
            for co in range(cout):
                lhs.append(w[t // kw, t % kw, ci, co] if len(hit) else 0.0)
                rhs.append(dy[b, hit[0][0], hit[0][1], co] if len(hit) else 0.0)
        bwd[b, iy, ix, ci] = (np.array(lhs, np.float32), np.array(rhs, np.float32))
    return fwd, bwd, grad


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_orders_padding_and_elements(case):
    x_shape, w_shape, strides, padding, dilations = CONV_CASES[case]
    rng = np.random.default_rng(50 + case)
    oh, ow, _, _ = ref.conv2d_geometry(x_shape, w_shape, strides, padding, dilations)
    x = to_half(rng.standard_normal(x_shape) * 4)
    w = to_half(rng.standard_normal(w_shape))
    dy = to_half(rng.standard_normal((x_shape[0], oh, ow, w_shape[3])))
    fwd, bwd, grad = _conv_product_lists(x, w, dy, strides, padding, dilations)
    chunk = 1 + case % 4
    cfg = AccumConfig(accumulator=HALF_INF, product=HALF_INF, chunk_size=chunk)
    y = ref.conv2d(x, w, cfg, strides, padding, dilations)
    dx = ref.conv2d_backprop_input(x_shape, w, dy, cfg, strides, padding, dilations)
    dw = ref.conv2d_backprop_filter(x, w_shape, dy, cfg, strides, padding, dilations)
    for want, got in ((fwd, y), (bwd, dx), (grad, dw)):
        expected = np.zeros(got.shape, np.float32)
        for idx, (u, v) in want.items():
            expected[idx] = half_loop(u, v, chunk)
        assert_same_float32(got, expected)
    # stochastic: the element is the flat index of the output
    sr = AccumConfig(accumulator=FloatFormat(5, 4), rounding="stochastic", seed=case)
    y = ref.conv2d(x, w, sr, strides, padding, dilations)
    dx, dw = ref.conv2d_grads(x, w, dy, sr, strides, padding, dilations)
    for want, got in ((fwd, y), (bwd, dx), (grad, dw)):
        for idx, (u, v) in list(want.items())[::5]:
            e = int(np.ravel_multi_index(idx, got.shape))
            assert got[idx] == ref.dot(u, v, sr, element=e), idx


def test_conv2d_grads_operand_quantization():
    rng = np.random.default_rng(60)
    x = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
    w = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    dy = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    base = AccumPolicy(fwd=AccumConfig(accumulator=FloatFormat(6, 9)),
                       bwd=AccumConfig(accumulator=FloatFormat(6, 8)),
                       grad=AccumConfig(accumulator=FloatFormat(6, 7), chunk_size=2))
    quant = base.replace(operands=FloatFormat(5, 10))
    args = ((2, 2), "SAME", (1, 1))
    dx, dw = ref.conv2d_grads(x, w, dy, quant, *args)
    assert_same_float32(dx, ref.conv2d_backprop_input(x.shape, to_half(w), to_half(dy),
                                                      base.bwd, *args))
    assert_same_float32(dw, ref.conv2d_backprop_filter(to_half(x), w.shape, to_half(dy),
                                                       base.grad, *args))
    assert_same_float32(ref.conv2d(x, w, quant, *args),
                        ref.conv2d(to_half(x), to_half(w), base.fwd, *args))
    # each op given the policy uses its own GEMM's config and the operand format
    assert_same_float32(ref.conv2d_backprop_input(x.shape, w, dy, quant, *args), dx)
    assert_same_float32(ref.conv2d_backprop_filter(x, w.shape, dy, quant, *args), dw)


def test_conv2d_geometry_matches_tensorflow():
    import tensorflow as tf

    for size in (1, 4, 5, 8):
        for k in (1, 2, 3):
            for s in (1, 2, 3):
                for d in (1, 2):
                    for padding in ("SAME", "VALID", [(1, 2), (1, 2)]):
                        eff = (k - 1) * d + 1
                        pads = 0 if isinstance(padding, str) else 3
                        if padding != "SAME" and size + pads < eff:
                            continue
                        shape = tf.nn.conv2d(np.zeros((1, size, size, 1), np.float32),
                                             np.zeros((k, k, 1, 1), np.float32), strides=s,
                                             padding=_tf_padding(padding), dilations=d).shape
                        got = ref.conv2d_geometry((1, size, size, 1), (k, k, 1, 1), s, padding, d)
                        assert got[:2] == (shape[1], shape[2]), (size, k, s, d, padding)
                        if padding == "SAME":
                            out = -(-size // s)
                            assert got[2] == got[3] == max((out - 1) * s + eff - size, 0) // 2


def test_module_docstring_examples():
    if ref.__name__ != "tfaccum.reference":
        pytest.skip("tfaccum does not import (compiled ops missing); examples import it")
    import doctest

    assert doctest.testmod(ref).failed == 0


# --- the fused adder (numerics.md section 7): cases worked out by hand -----------------
def _fused(terms=4, fraction_bits=23, zero_exponent=-131, operand_emin=-126,
           accumulator=None, output_rounding="toward_zero", **config):
    adder = cfgmod.FusedAdder(terms, fraction_bits, zero_exponent, operand_emin, output_rounding)
    return AccumConfig(accumulator=accumulator or FloatFormat(8, 23, overflow="inf"),
                       fused=adder, **config)


def _fdot(a, b, config):
    return float(ref.dot(np.array(a, np.float32), np.array(b, np.float32), config))


def test_fused_overflow_is_inf_under_toward_zero_when_the_format_overflows_to_inf():
    a, b = [2.0 ** 127, 2.0 ** 127], [1.0, 1.0]  # S = 2^128
    assert _fdot(a, b, _fused()) == math.inf
    assert _fdot([-x for x in a], b, _fused()) == -math.inf
    saturating = _fused(accumulator=FloatFormat(8, 23))
    assert _fdot(a, b, saturating) == FloatFormat(8, 23).max_value
    # just below 2^128 it truncates to the largest float32
    assert _fdot([2.0 ** 127, 2.0 ** 127 * (1 - 2.0 ** -24)], b, _fused()) == \
        FloatFormat(8, 23).max_value


def test_fused_subnormal_operands_enter_with_the_formats_emin():
    # 2^-20 x 1 alone (the running sum is +0, exponent -131): with operand_emin = -14 the
    # operand counts with exponent -14, so E = -14 and F = 4 gives a grid of 2^-18: the
    # product truncates to +0. With operand_emin = -126 its exponent is -20: kept.
    assert _fdot([2.0 ** -20], [1.0], _fused(fraction_bits=4, operand_emin=-14)) == 0.0
    assert _fdot([2.0 ** -20], [1.0], _fused(fraction_bits=4)) == 2.0 ** -20


def test_fused_zero_sums_and_empty_sums_are_plus_zero():
    for a, b in ([[-0.0, -0.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, 1.0]], [[], []]):
        result = _fdot(a, b, _fused())
        assert result == 0.0 and math.copysign(1, result) == 1, (a, b)
    # a non-zero sum that truncates to zero keeps its sign: -2^-150 -> -0
    result = _fdot([-(2.0 ** -75)], [2.0 ** -75], _fused())
    assert result == 0.0 and math.copysign(1, result) == -1


def test_fused_nearest_even_output_and_partial_last_block():
    # L = 2, F = 23: blocks [1, 2^-24] -> E = 0, 2^-24 below the grid 2^-23: D = 1;
    # [2^-24] with D = 1: again truncated: 1. Sequential float32 would give the same, but
    # [2^-23 * 1.5] with D = 1 keeps 2^-23 only (truncation), nearest-even output: 1 + 2^-23.
    config = _fused(terms=2, output_rounding="nearest_even")
    assert _fdot([1.0, 2.0 ** -24, 2.0 ** -24], [1.0] * 3, config) == 1.0
    assert _fdot([1.0, 0.0, 1.5 * 2.0 ** -23], [1.0] * 3, config) == 1.0 + 2.0 ** -23
    # With F = 25 the adder keeps 1.5 * 2^-23 whole; nearest-even rounds 1 + 1.5 ulp up.
    wide = _fused(terms=2, fraction_bits=25, output_rounding="nearest_even")
    assert _fdot([1.0, 0.0, 1.5 * 2.0 ** -23], [1.0] * 3, wide) == 1.0 + 2.0 ** -22


def test_fused_promotion_restarts_every_chunk():
    # chunk 3, L = 2: chunk 0 = [1, 2^-30 | 2^-30], chunk 1 = [2^-30]. Inside chunk 0 the
    # small products are truncated against 1 (F = 23); chunk 1 starts from +0 and keeps
    # its 2^-30, which the float32 total (nearest-even) then rounds away against 1.
    config = _fused(terms=2, chunk_size=3, chunk_accumulator=cfgmod.BINARY32)
    assert _fdot([1.0] + [2.0 ** -30] * 3, [1.0] * 4, config) == 1.0
    # With the total in e8m23 but a big enough promoted part it survives: 4 chunks of one
    # product each: every 2^-23 is kept by its own chunk and added exactly.
    config = _fused(terms=2, chunk_size=1, chunk_accumulator=cfgmod.BINARY32)
    assert _fdot([1.0] + [2.0 ** -23] * 2, [1.0] * 3, config) == 1.0 + 2.0 ** -22
