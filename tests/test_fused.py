"""The fused multi-term adder (docs/numerics.md §7) in the kernels, bit for bit against
tfaccum.reference (exact rationals): matmul with its transposes and both gradients, the
three conv passes (strides, dilations, padding, groups), random and adversarial operands,
every block length and alignment width class, promotion, and the `fused` attribute's
validation. The CUDA kernels' fused path is checked by tests/gpu/gpu_check.py (through
the host emulation in tests/test_cuda_build.py).
"""

import numpy as np
import pytest
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, reference
from tfaccum.config import FusedAdder
from test_matmul import assert_bit_equal

E8M13 = FloatFormat(8, 13, overflow="inf")  # Ada/Hopper's FP8 accumulator
E8M23 = FloatFormat(8, 23, overflow="inf")  # binary32
E8M13_SAT = FloatFormat(8, 13)  # saturating
HOPPER_FP8 = FusedAdder(32, 13, -133, -6, "toward_zero")
FP16_RZ = FusedAdder(16, 25, -127, -14, "toward_zero")


def fused(adder=HOPPER_FP8, accumulator=E8M13, **config):
    return AccumConfig(accumulator=accumulator, fused=adder, **config)


_REFERENCE = {}  # the tests that run on every engine path compute each reference once


def reference_matmul(a, b, config, transpose_a=False, transpose_b=False):
    key = (a.tobytes(), a.shape, b.tobytes(), b.shape, config, transpose_a, transpose_b)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference.matmul(a, b, config, transpose_a, transpose_b)
    return _REFERENCE[key]


def check_matmul(a, b, config, transpose_a=False, transpose_b=False, context=""):
    got = tfaccum.accum_matmul(a, b, config, transpose_a=transpose_a, transpose_b=transpose_b)
    want = reference_matmul(a, b, config, transpose_a, transpose_b)
    assert_bit_equal(got, want, f"{context} {config!r}")
    return np.asarray(got)


def spread(rng, shape, span=8, zeros=0.05):
    """float32 values with full significands over 2^±span, some zeros and -0."""
    x = rng.standard_normal(shape) * 2.0 ** rng.uniform(-span, span, shape)
    x[rng.random(shape) < zeros] = 0.0
    x[rng.random(shape) < zeros / 2] = -0.0
    return x.astype(np.float32)


def narrow(rng, shape, fmt, span=6):
    """Values of an operand format (nearest-even), as a tensor core's inputs are."""
    q = reference.quantize(spread(rng, shape, span), fmt, "nearest_even")
    return np.asarray(q, np.float32)


# --- random operands, every engine path ---------------------------------------------------

def test_random_matmuls_match_reference(engine_path):
    """Shapes off every tile and block multiple, K < L and K = 0, both accumulators and
    output roundings, L and F classes, promotion (chunks a multiple of L and not), every
    chunk rounding including stochastic."""
    rng = np.random.default_rng(1)
    for trial in range(24):
        L = [1, 4, 8, 16, 32, 64][trial % 6]
        adder = FusedAdder(L, [1, 13, 23, 24, 25, 40][trial % 5], int(rng.integers(-140, 4)),
                           [-6, -14, -126, -149][trial % 4],
                           ["toward_zero", "nearest_even"][trial % 2])
        m, n = int(rng.integers(1, 7)), int(rng.integers(1, 21))
        k = [0, 1, L - 1 or 1, L, 2 * L + 3, 45][trial % 6]
        chunk = [0, 2 * L, L + 3, 0, 7, 3 * L][trial % 6]
        config = fused(adder, [E8M13, E8M23, E8M13_SAT][trial % 3], chunk_size=chunk,
                       rounding=["nearest_even", "toward_zero", "stochastic"][trial % 3],
                       seed=int(rng.integers(1 << 40)))
        check_matmul(spread(rng, (m, k)), spread(rng, (k, n)), config, context=f"#{trial}")


def test_narrow_operands_as_tensor_cores_take_them(engine_path):
    """FP8 E4M3 operands (operand_emin -6, with format subnormals) into e8m13, and fp16
    operands into binary32 (operand_emin -14), as the Hopper presets use them."""
    rng = np.random.default_rng(2)
    e4m3, fp16 = FloatFormat(4, 3, overflow="saturate"), FloatFormat(5, 10)
    for trial in range(4):
        a, b = narrow(rng, (5, 200), e4m3, 8), narrow(rng, (200, 18), e4m3, 8)
        check_matmul(a, b, fused(HOPPER_FP8, E8M13, chunk_size=[0, 128][trial % 2]))
        a, b = narrow(rng, (3, 77), fp16, 16), narrow(rng, (77, 17), fp16, 16)
        check_matmul(a, b, fused(FP16_RZ, E8M23, chunk_size=[0, 40][trial % 2],
                                 rounding="stochastic", seed=trial))


def test_every_block_length_and_alignment_width():
    rng = np.random.default_rng(3)
    a, b = spread(rng, (2, 70), 12), spread(rng, (70, 9), 12)
    for L in (1, 4, 8, 16, 32, 64):
        for F in (1, 13, 23, 24, 25, 40):
            for out in ("toward_zero", "nearest_even"):
                check_matmul(a, b, fused(FusedAdder(L, F, -30, -126, out), E8M23))


# --- adversarial operands ----------------------------------------------------------------

def test_zero_products_take_the_zero_exponent():
    """Blocks with zero products and every other term below 2^e_zero: the zero raises the
    grid. Whole zero blocks after non-zero ones; D = 0 (first block) likewise."""
    rng = np.random.default_rng(4)
    k, L = 24, 4
    a = (1 + rng.integers(0, 1024, (3, k)) / 1024.0).astype(np.float32)  # 11-bit values ~ 1
    a[:, 5] = 0.0          # one zero product in block 1
    a[:, 8:12] = 0.0       # a whole zero block (block 2)
    a[1, 13] = -0.0
    b = np.ones((k, 2), np.float32)
    b[17, 1] = 0.0         # a zero on B's side in block 4
    for e_zero in (-200, 0, 1, 2, 3, 6, 20):
        for out in ("toward_zero", "nearest_even"):
            got = check_matmul(a, b, fused(FusedAdder(L, 6, e_zero, -126, out), E8M23))
    # e_zero far above everything truncates every block to 0: the sum is +0.
    assert not np.signbit(got).any() and (got == 0).all()


def test_exponent_spans_wider_than_F_and_significand_products_above_two():
    """Terms 2^20 apart with F = 13 lose the small ones; 1.5 x 1.5 = 2.25 has exponent 0
    (not 1), which a floor(log2 |p|) exponent would get wrong."""
    a = np.array([[1.5, 1.5 * 2 ** -12, 1.25 * 2 ** -14, 3 * 2 ** -20, -1.75, 1.5, 1.0]],
                 np.float32)
    b = np.array([[1.5], [1.0], [1.0], [1.0], [1.5], [1.5], [2 ** -11]], np.float32)
    for F in (1, 2, 3, 13, 23, 25):
        for L in (1, 2, 4, 7, 8):
            check_matmul(a, b, fused(FusedAdder(L, F, -127, -126, "toward_zero"), E8M23))
    # Hand-derived: one block of [+0 (D), 2.25, 2^-3]: e(2.25) = 0 + 0 = 0, E = 0, F = 2
    # keeps multiples of 2^-2: 2.25 + 0 = 2.25. Normalising |p| first (E = 1) would keep
    # multiples of 2^-1 and give 2.0.
    y = tfaccum.accum_matmul(np.array([[1.5, 0.5]], np.float32),
                             np.array([[1.5], [0.25]], np.float32),
                             fused(FusedAdder(2, 2, -127, -126, "toward_zero"), E8M23))
    assert float(y.numpy()[0, 0]) == 2.25


def test_exact_cancellation_and_signed_zeros():
    # x - x in one block, -0 products only, and negative sums that round to -0.
    a = np.array([[3.0, -3.0, 0.0, 0.0],
                  [-0.0, -0.0, -0.0, -0.0],
                  [-2 ** -140, 0.0, 0.0, 0.0],
                  [1.0, 2 ** -30, -1.0, -2 ** -30]], np.float32)
    b = np.array([[1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 1.0]], np.float32)
    flushing = FloatFormat(8, 13, subnormals=False)
    for L in (1, 2, 4):
        for acc in (E8M13, flushing):
            for out in ("toward_zero", "nearest_even"):
                got = check_matmul(a, b, fused(FusedAdder(L, 40, -149, -149, out), acc))
                assert not np.signbit(got[:2]).any()  # exact zero sums are +0
    # A non-zero sum that rounds to zero keeps its sign: -2^-140 flushed is -0.
    got = check_matmul(a, b, fused(FusedAdder(4, 40, -149, -149, "toward_zero"), flushing))
    assert np.signbit(got[2, 0]) and got[2, 0] == 0


def test_operands_below_operand_emin_and_subnormal_results():
    """float32 values below 2^operand_emin (subnormals of fp16 or e4m3) enter with
    exponent operand_emin; float32 subnormals with operand_emin -149 with their own;
    results below 2^-126 are subnormals of the accumulator (or flushed)."""
    rng = np.random.default_rng(5)
    a = (rng.uniform(1, 2, (4, 40)) * 2.0 ** rng.integers(-22, -10, (4, 40))).astype(np.float32)
    b = (rng.uniform(1, 2, (40, 3)) * 2.0 ** rng.integers(-3, 3, (40, 3))).astype(np.float32)
    for operand_emin in (-14, -6, -126, -149):
        for F in (3, 13):
            check_matmul(a, b, fused(FusedAdder(8, F, -60, operand_emin, "toward_zero"), E8M23))
    tiny = (rng.uniform(1, 2, (3, 20)) * 2.0 ** rng.integers(-149, -120, (3, 20)))
    tiny = np.where(rng.random((3, 20)) < 0.5, -tiny, tiny).astype(np.float32)
    ones = rng.uniform(0.5, 2, (20, 4)).astype(np.float32)
    for acc in (E8M13, E8M23, FloatFormat(8, 13, subnormals=False)):
        for out in ("toward_zero", "nearest_even"):
            check_matmul(tiny, ones, fused(FusedAdder(4, 25, -300, -149, out), acc))
            check_matmul(tiny, ones, fused(FusedAdder(4, 13, -140, -126, out), acc))


def test_overflow_inf_under_toward_zero_and_saturate():
    """With overflow='inf' a sum of 2^(emax+1) or more is Inf under toward-zero too; just
    below it toward-zero gives the largest value; a saturating format gives the largest
    value; nearest-even overflows as in §2."""
    big = np.float32(2.0 ** 127)
    a = np.array([[big, big, 0, 0],                    # 2^128: Inf (inf), max (saturate)
                  [big, big * np.float32(1 - 2 ** -16), 0, 0],  # above max, below 2^128
                  [-big, -big, -big, 0],               # -Inf
                  [big, big, -big, -big * 0.5]], np.float32)  # back in range in one block
    b = np.ones((4, 1), np.float32)
    for L in (1, 2, 4):
        for acc in (E8M13, E8M23, E8M13_SAT, FloatFormat(8, 23)):
            for out in ("toward_zero", "nearest_even"):
                got = check_matmul(a, b, fused(FusedAdder(L, 25, -127, -126, out), acc))
                if L == 4:
                    assert np.isinf(got[0, 0]) == (acc.overflow == "inf")
                    if out == "toward_zero" and acc.mantissa_bits == 13:
                        # 2^128 - 2^111 lies between e8m13's max and 2^128
                        assert got[1, 0] == acc.max_value


def test_nan_and_inf_operands():
    """0 x Inf is NaN, Inf - Inf is NaN, an Inf stays through later blocks (D = Inf), a
    NaN anywhere gives NaN; finite terms beside a special are ignored."""
    inf, nan = np.inf, np.nan
    a = np.array([[inf, 1, 1, 1, 1, 1],
                  [0.0, 1, 1, 1, 1, 1],
                  [inf, -inf, 1, 1, 1, 1],
                  [1, 1, 1, 1, 1, nan],
                  [-inf, 2 ** 100, 1, 1, 1, 1]], np.float32)
    b = np.array([[1.0], [1.0], [1.0], [1.0], [-1.0], [1.0]], np.float32)
    b2 = b.copy()
    b2[0, 0] = inf  # row 1: 0 x Inf
    for L in (1, 2, 4, 8):
        for chunk in (0, 3):
            for out in ("toward_zero", "nearest_even"):
                config = fused(FusedAdder(L, 13, -127, -126, out), E8M13, chunk_size=chunk)
                check_matmul(a, b, config)
                got = check_matmul(a, b2, config)
                assert np.isnan(got[1, 0])


# --- promotion ---------------------------------------------------------------------------

def test_promotion_restarts_blocks_at_every_chunk(engine_path):
    """Chunks a multiple of L and not (a partial block ends every chunk), chunk formats
    other than the accumulator, stochastic chunk sums at a later step."""
    rng = np.random.default_rng(6)
    a, b = spread(rng, (4, 150), 6), spread(rng, (150, 17), 6)
    for chunk in (1, 10, 32, 64, 100, 128, 149, 151):
        for rounding in ("nearest_even", "toward_zero", "stochastic"):
            config = fused(HOPPER_FP8, E8M13, chunk_size=chunk, rounding=rounding, seed=chunk,
                           chunk_accumulator=FloatFormat(8, 10) if chunk % 3 == 0 else E8M23)
            check_matmul(a, b, config)
    config = fused(FusedAdder(8, 25, -127, -126, "nearest_even"), E8M23, chunk_size=12,
                   rounding="stochastic", chunk_accumulator=FloatFormat(6, 5), seed=9)
    got = tfaccum.accum_matmul(a, b, config, step=12345)
    assert_bit_equal(got, reference.matmul(a, b, config, step=12345))


# --- every GEMM: matmul's gradients and the conv passes ---------------------------------

def policy_of(rng):
    def config(i):
        adder = FusedAdder(int(rng.choice([1, 4, 8, 16, 32])), int(rng.choice([13, 23, 25])),
                           int(rng.integers(-140, 0)), int(rng.choice([-6, -14, -126])),
                           str(rng.choice(["toward_zero", "nearest_even"])))
        return AccumConfig(accumulator=[E8M13, E8M23][i % 2], fused=adder,
                           chunk_size=int(rng.choice([0, 0, 8, 20])),
                           rounding=str(rng.choice(["nearest_even", "stochastic"])),
                           seed=int(rng.integers(1000)))
    return AccumPolicy(fwd=config(0), bwd=config(1), grad=config(2))


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False),
                                                     (False, True), (True, True)])
def test_matmul_and_both_gradients(transpose_a, transpose_b):
    rng = np.random.default_rng(7 + 2 * transpose_a + transpose_b)
    m, k, n = 7, 45, 19
    policy = policy_of(rng)
    a = spread(rng, (k, m) if transpose_a else (m, k))
    b = spread(rng, (n, k) if transpose_b else (k, n))
    dy = spread(rng, (m, n))
    at, bt = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([at, bt])
        y = tfaccum.accum_matmul(at, bt, policy, transpose_a=transpose_a,
                                 transpose_b=transpose_b, step=3)
    da, db = tape.gradient(y, [at, bt], output_gradients=tf.constant(dy))
    assert_bit_equal(y, reference.matmul(a, b, policy.fwd, transpose_a, transpose_b, step=3))
    ref_da, ref_db = reference.matmul_grads(a, b, dy, policy, transpose_a, transpose_b, step=3)
    assert_bit_equal(da, ref_da, "da")
    assert_bit_equal(db, ref_db, "db")


CONVS = [  # x shape, kernel (KH, KW, Cin / groups, Cout), strides, dilations, padding
    ((2, 6, 7, 3), (3, 3, 3, 5), (1, 1), (1, 1), "SAME"),
    ((1, 9, 8, 2), (3, 2, 2, 4), (2, 3), (1, 2), "VALID"),
    ((2, 7, 6, 4), (2, 3, 4, 3), (2, 1), (2, 1), [(1, 2), (0, 2)]),
    ((1, 6, 6, 6), (3, 3, 2, 9), (1, 2), (1, 1), "SAME"),  # 3 groups
]


@pytest.mark.parametrize("case", range(len(CONVS)))
def test_conv_all_three_passes(case):
    x_shape, k_shape, strides, dilations, padding = CONVS[case]
    rng = np.random.default_rng(20 + case)
    policy = policy_of(rng)
    x, w = spread(rng, x_shape, 6, 0.1), spread(rng, k_shape, 6, 0.1)
    oh, ow = reference.conv2d_geometry(x_shape, k_shape, strides, padding, dilations)[:2]
    dy = spread(rng, (x_shape[0], oh, ow, k_shape[3]), 6, 0.1)
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = tfaccum.accum_conv2d(xt, wt, policy, strides=strides, padding=padding,
                                 dilations=dilations, step=5)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy))
    assert_bit_equal(y, reference.conv2d(x, w, policy, strides, padding, dilations, step=5),
                     "fwd")
    ref_dx, ref_dw = reference.conv2d_grads(x, w, dy, policy, strides, padding, dilations,
                                            step=5)
    assert_bit_equal(dx, ref_dx, "dx")
    assert_bit_equal(dw, ref_dw, "dw")


# --- the attribute -----------------------------------------------------------------------

def test_fused_attribute_is_validated():
    lib = tfaccum.ops.load_library()
    a = np.ones((2, 2), np.float32)
    good = [32, 13, -133, -6, 1]
    bad = [
        ([0, 13, -133, -6, 1], r"fused: terms must be in 1\.\.64, got 0"),
        ([65, 13, -133, -6, 1], r"terms must be in 1\.\.64, got 65"),
        ([32, 0, -133, -6, 1], r"fraction_bits must be in 1\.\.40, got 0"),
        ([32, 41, -133, -6, 1], r"fraction_bits must be in 1\.\.40, got 41"),
        ([32, 13, -513, -6, 1], r"zero_exponent must be in -512\.\.512, got -513"),
        ([32, 13, 2 ** 40, -6, 1], r"zero_exponent must be in -512\.\.512, got 1099511627776"),
        ([32, 13, 0, -150, 1], r"operand_emin must be in -149\.\.0, got -150"),
        ([32, 13, 0, 1, 1], r"operand_emin must be in -149\.\.0, got 1"),
        ([32, 13, 0, -6, 2], r"output_rounding .* must be in 0\.\.1, got 2"),
        ([32, 13, 0, -6], r"fused must be \[terms, .*5 integers.*got 4 values"),
    ]
    for values, message in bad:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            lib.tfaccum_mat_mul(a, a, 0, fused=values)
    with pytest.raises(tf.errors.InvalidArgumentError, match="exact products"):
        lib.tfaccum_mat_mul(a, a, 0, fused=good, product=[5, 2, 1, 0])
    x, w = np.ones((1, 3, 3, 1), np.float32), np.ones((2, 2, 1, 1), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="fraction_bits"):
        lib.tfaccum_conv2d(x, w, 0, fused=[4, 50, 0, -6, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="terms"):
        lib.tfaccum_conv2d_backprop_filter(x, [2, 2, 1, 1], np.ones((1, 3, 3, 1), np.float32),
                                           0, fused=[100, 13, 0, -6, 1])
    # Absent or empty: one rounding per addition, as before the attribute existed.
    assert_bit_equal(lib.tfaccum_mat_mul(a, a, 0, fused=[]), lib.tfaccum_mat_mul(a, a, 0))
    assert lib.tfaccum_mat_mul(a, a, 0, fused=good).numpy().tolist() == [[2, 2], [2, 2]]
