"""Batched ``accum_matmul`` and ``accum_einsum`` (issue 13, numerics §8).

* forward and both gradients bit-exact against ``tfaccum.reference.batched_matmul`` /
  ``einsum`` (exact rationals, written from the numerics doc without the ops' transposes),
  with broadcasting, transposes, random policies and adversarial values (ties,
  subnormals, NaN/Inf, signed zeros), and stochastic rounding whose element indices cross
  the batch boundaries;
* at full precision the same values as ``tf.matmul`` / ``tf.einsum``;
* shape inference with unknown dimensions, and clear errors.

Shapes are small: the reference is pure Python.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, reference
from test_conv import random_policy
from test_matmul import assert_bit_equal, random_operands

E5M4 = FloatFormat(5, 4)


def _passes(fn, a, b, dy_rng):
    """(y, da, db, dy) of ``fn(A, B)`` with a random upstream gradient."""
    at, bt = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([at, bt])
        y = fn(at, bt)
    dy = dy_rng(y.shape)
    da, db = tape.gradient(y, [at, bt], output_gradients=tf.constant(dy))
    return y.numpy(), da.numpy(), db.numpy(), dy


def adversarial(rng, shape):
    """Short significands (ties), subnormal-range magnitudes, signed zeros, NaN, ±Inf."""
    x = random_operands(rng, shape, E5M4)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=flat.size // 8 if flat.size else 0, replace=False)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -2e-45, 1.5, 0.75],
                        np.float32)
    flat[picks] = specials[rng.integers(0, specials.size, picks.size)]
    return x


# (a shape, b shape, transpose_a, transpose_b): broadcasting by a factor of 2 at most, so
# that the float32 sum of a broadcast operand's gradients is the same in any order.
BATCHED = [
    ((3, 2, 4), (3, 4, 5), False, False),
    ((2, 1, 4, 3), (2, 5, 4), True, True),    # a broadcast over b's 2, b over a's 2
    ((2, 3, 4), (4, 5), False, False),        # rows stacked into one GEMM (kernel fast path)
    ((4, 3), (2, 4, 5), True, False),         # a missing batch dimension
    ((2, 2, 3, 4), (1, 5, 4), False, True),
    ((2, 3, 0), (2, 0, 2), False, False),     # empty sums
]


@pytest.mark.parametrize("a_shape,b_shape,ta,tb", BATCHED)
def test_batched_matmul_matches_reference(a_shape, b_shape, ta, tb):
    rng = np.random.default_rng(sum(a_shape) * 31 + sum(b_shape))
    for trial in range(2):
        policy = random_policy(rng)
        make = (lambda s: random_operands(rng, s, E5M4)) if trial == 0 else \
            (lambda s: adversarial(rng, s))
        a, b = make(a_shape), make(b_shape)
        y, da, db, dy = _passes(lambda x, w: tfaccum.accum_matmul(
            x, w, policy, transpose_a=ta, transpose_b=tb, step=11), a, b, make)
        assert_bit_equal(y, reference.batched_matmul(a, b, policy, ta, tb, step=11), "y")
        rda, rdb = reference.batched_matmul_grads(a, b, dy, policy, ta, tb, step=11)
        assert_bit_equal(da, rda, "da")
        assert_bit_equal(db, rdb, "db")


def test_stochastic_elements_cross_batch_boundaries():
    """1x1 matrices: output g's element index is g (its flat index), not 0. Equal operands
    in every batch make the results differ only through the element indices."""
    config = AccumConfig(accumulator=FloatFormat(4, 1), rounding="stochastic", seed=5)
    a = np.tile(np.float32([[[1.0, 0.1, 0.1, 0.1, 0.1]]]), (24, 1, 1))  # [24, 1, 5]
    b = np.full((24, 5, 1), 1.0, np.float32)
    y = tfaccum.accum_matmul(a, b, config, step=3).numpy()
    assert_bit_equal(y, reference.batched_matmul(a, b, config, step=3))
    # The same products with each matrix's element index restarting at 0 give one value.
    offset_zero = reference.matmul(a[0], b[0], config, step=3)
    assert len(np.unique(y)) > 1 and not np.all(y == offset_zero[0, 0])
    # Stacked rows (b shared): element (g, i, j) is (g*M + i)*N + j, as one big GEMM.
    a2 = np.tile(np.float32([[1.0, 0.1, 0.1, 0.1, 0.1]] * 2), (6, 1, 1))  # [6, 2, 5]
    y2 = tfaccum.accum_matmul(a2, b[0], config, step=3).numpy()
    assert_bit_equal(y2.reshape(12, 1), reference.matmul(a2.reshape(12, 5), b[0], config,
                                                         step=3))


@pytest.mark.parametrize("ta,tb", [(False, False), (True, True)])
def test_batched_full_precision_is_tf_matmul(ta, tb):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 1, 6, 5) if ta else (2, 1, 5, 6)).astype(np.float32)
    b = rng.standard_normal((3, 7, 6) if tb else (3, 6, 7)).astype(np.float32)
    fp = tfaccum.FULL_PRECISION if hasattr(tfaccum, "FULL_PRECISION") else AccumConfig()
    y, da, db, dy = _passes(lambda x, w: tfaccum.accum_matmul(x, w, fp, ta, tb), a, b,
                            lambda s: rng.standard_normal(s).astype(np.float32))
    ty, tda, tdb, _ = _passes(lambda x, w: tf.matmul(x, w, transpose_a=ta, transpose_b=tb),
                              a, b, lambda s: dy)
    for got, want in ((y, ty), (da, tda), (db, tdb)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batched_shape_inference_with_unknown_dims():
    cfg = AccumConfig("e6m9")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3, 4]),
                                  tf.TensorSpec([None, 4, 5])])
    def known_rank(x, w):
        y = tfaccum.accum_matmul(x, w, cfg)
        assert y.shape.as_list() == [None, None, 3, 5], y.shape
        return y

    @tf.function(input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)])
    def unknown_rank(x, w):
        return tfaccum.accum_matmul(x, w, cfg)

    a = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4) / 7
    b = np.ones((3, 4, 5), np.float32)
    want = reference.batched_matmul(a, b, cfg)
    assert_bit_equal(known_rank(a, b), want)
    assert_bit_equal(unknown_rank(a, b), want)
    with tf.Graph().as_default():
        y = tfaccum.accum_matmul(tf.zeros([2, 1, 3, 4]), tf.zeros([5, 4, 6]), cfg)
        assert y.shape.as_list() == [2, 5, 3, 6]


def test_batched_errors_are_clear():
    cfg = AccumConfig()
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch dimensions do not broadcast"):
        tfaccum.accum_matmul(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32), cfg)
    with tf.Graph().as_default():  # known shapes: already when the graph is built
        with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
            tfaccum.accum_matmul(tf.zeros([2, 3, 4]), tf.zeros([3, 4, 5]), cfg)
        with pytest.raises(ValueError, match="Dimensions must be equal|inner dimensions"):
            tfaccum.accum_matmul(tf.zeros([2, 3, 4]), tf.zeros([2, 5, 5]), cfg)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 4]), tf.TensorSpec([None, 4, 5])])
    def dynamic(x, w):
        return tfaccum.accum_matmul(x, w, cfg)

    with pytest.raises(tf.errors.InvalidArgumentError, match="batch dimensions do not broadcast"):
        dynamic(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"rank >= 2"):
        tfaccum.accum_matmul(np.ones((4,), np.float32), np.ones((4, 5), np.float32), cfg)


# --------------------------------------------------------------------------------------
# einsum
# --------------------------------------------------------------------------------------
EINSUMS = [
    ("abc,cd->abd", (2, 3, 4), (4, 5)),              # EinsumDense, no batch
    ("bqhd,bkhd->bhqk", (2, 3, 2, 4), (2, 5, 2, 4)),  # attention scores: batch b, h
    ("bhqk,bkhd->bqhd", (2, 2, 3, 5), (2, 5, 2, 4)),  # attention output: transposed out
    ("abcd,cde->abe", (2, 3, 2, 4), (2, 4, 3)),      # contraction over two indices
    ("dc,cd->", (3, 4), (4, 3)),                      # a full contraction (scalar)
    ("ij,jk->ki", (3, 4), (4, 5)),                    # output in b's-free-first order
    ("ij,kl->ikjl", (2, 3), (2, 2)),                  # outer product: one product each
    ("bij,bjk->bik", (3, 2, 6), (3, 6, 2)),
]


@pytest.mark.parametrize("equation,a_shape,b_shape", EINSUMS)
def test_einsum_matches_reference(equation, a_shape, b_shape):
    rng = np.random.default_rng(len(equation) * 101 + sum(a_shape))
    for trial in range(2):
        policy = random_policy(rng)
        make = (lambda s: random_operands(rng, s, E5M4)) if trial == 0 else \
            (lambda s: adversarial(rng, s))
        a, b = make(a_shape), make(b_shape)
        y, da, db, dy = _passes(lambda x, w: tfaccum.accum_einsum(equation, x, w, policy,
                                                                  step=4), a, b, make)
        assert_bit_equal(y, reference.einsum(equation, a, b, policy, step=4), equation)
        rda, rdb = reference.einsum_grads(equation, a, b, dy, policy, step=4)
        assert_bit_equal(da, rda, equation + " da")
        assert_bit_equal(db, rdb, equation + " db")


@pytest.mark.parametrize("equation,a_shape,b_shape", EINSUMS)
def test_einsum_full_precision_is_tf_einsum(equation, a_shape, b_shape):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    fp = AccumConfig()
    y, da, db, dy = _passes(lambda x, w: tfaccum.accum_einsum(equation, x, w, fp), a, b,
                            lambda s: rng.standard_normal(s).astype(np.float32))
    ty, tda, tdb, _ = _passes(lambda x, w: tf.einsum(equation, x, w), a, b, lambda s: dy)
    for got, want in ((y, ty), (da, tda), (db, tdb)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_with_unknown_dims():
    cfg = AccumConfig("e6m9")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 2, 4]),
                                  tf.TensorSpec([None, None, 2, 4])])
    def scores(q, k):
        y = tfaccum.accum_einsum("bqhd,bkhd->bhqk", q, k, cfg)
        assert y.shape.as_list() == [None, 2, None, None], y.shape
        return y

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
    k = rng.standard_normal((2, 5, 2, 4)).astype(np.float32)
    assert_bit_equal(scores(q, k), reference.einsum("bqhd,bkhd->bhqk", q, k, cfg))


@pytest.mark.parametrize("equation,match", [
    ("ij,jk", "explicit output"),
    ("ij,jk,kl->il", "3 operand"),
    ("ij,jk->i.k", "ellipsis"),
    ("ii,ij->j", "repeats in operand 1"),
    ("ij,jk->ikk", "repeats in the output"),
    ("ij,jk->iz", "in neither operand"),
    ("ijz,jk->ik", "summed over that operand alone"),
    ("i1,1k->ik", "not a letter"),
])
def test_einsum_rejects_what_it_cannot_express(equation, match):
    with pytest.raises(ValueError, match=match):
        tfaccum.accum_einsum(equation, np.ones((2, 2), np.float32),
                             np.ones((2, 2), np.float32), AccumConfig())


def test_einsum_ellipsis_is_named_letters():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4, 5)).astype(np.float32)
    policy = random_policy(rng)
    assert_bit_equal(tfaccum.accum_einsum("...ij,...jk->...ik", a, b, policy),
                     reference.einsum("zij,zjk->zik", a, b, policy))
    assert_bit_equal(tfaccum.accum_einsum("...j,jk->...k", a, b[0], policy),
                     reference.einsum("xyj,jk->xyk", a, b[0], policy))


def test_einsum_operand_errors():
    cfg = AccumConfig()
    with pytest.raises(ValueError, match="does not have the 3 dimensions"):
        tfaccum.accum_einsum("abc,cd->abd", np.ones((2, 3), np.float32),
                             np.ones((3, 4), np.float32), cfg)
    with pytest.raises(ValueError, match="contracted index 'c' has size 3 in a and 4 in b"):
        tfaccum.accum_einsum("abc,cd->abd", np.ones((2, 2, 3), np.float32),
                             np.ones((4, 4), np.float32), cfg)
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch dimensions"):
        tfaccum.accum_einsum("bij,bjk->bik", np.ones((2, 2, 3), np.float32),
                             np.ones((3, 3, 2), np.float32), cfg)


def test_huge_and_empty_batches_never_crash():
    """In a child process, so that a crash fails this test alone: empty tensors with huge
    batch dimensions, an output whose size overflows int64, empty broadcasts."""
    from isolated import run_snippets

    cfg = "tfaccum.AccumConfig('e6m9')"
    results = run_snippets({
        "empty rows, huge batch": f"result = eager_and_graph(lambda a, b: "
                                  f"tfaccum.accum_matmul(a, b, {cfg}), tf.zeros([2**40, 0, 3]),"
                                  f" tf.zeros([3, 5]))",
        "output overflows int64": f"result = eager_and_graph(lambda a, b: "
                                  f"tfaccum.accum_matmul(a, b, {cfg}), "
                                  f"tf.zeros([2**40, 3, 0]), tf.zeros([2**30, 1, 0, 2**40]))",
        "zero batch against two": f"result = eager_and_graph(lambda a, b: "
                                  f"tfaccum.accum_matmul(a, b, {cfg}), tf.zeros([0, 2, 3]), "
                                  f"tf.zeros([2, 3, 4]))",
        "zero batch broadcast": f"result = eager_and_graph(lambda a, b: "
                                f"tfaccum.accum_matmul(a, b, {cfg}), tf.zeros([0, 1, 2, 3]), "
                                f"tf.zeros([4, 3, 4]))",
    })
    for mode in ("eager", "graph"):
        assert results["empty rows, huge batch"][mode] == {"shape": [2 ** 40, 0, 5]}
        assert results["zero batch broadcast"][mode] == {"shape": [0, 4, 2, 4]}
        big = results["output overflows int64"][mode]
        assert big["error"] in ("InvalidArgumentError", "ValueError") and "too large" in \
            big["message"], big
        bad = results["zero batch against two"][mode]
        assert "batch dimensions do not broadcast" in bad["message"], bad
