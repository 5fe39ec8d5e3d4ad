"""The three conv kernels against the exact reference, TensorFlow, and hand-derived values."""

import numpy as np
import pytest
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, reference
import tf_oracles
from test_matmul import assert_bit_equal, random_operands

# Every test here runs on every engine path (conftest.engine_path).
pytestmark = pytest.mark.usefixtures("engine_path")


def conv_and_grads(x, w, dy, policy, strides, padding, dilations):
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = tfaccum.accum_conv2d(xt, wt, policy, strides=strides, padding=padding,
                                 dilations=dilations)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy))
    return y.numpy(), dx.numpy(), dw.numpy()


def check_all_passes(x, w, dy, policy, strides, padding, dilations, context=""):
    """The forward op and both gradients equal the reference bit for bit."""
    y, dx, dw = conv_and_grads(x, w, dy, policy, strides, padding, dilations)
    assert_bit_equal(y, reference.conv2d(x, w, policy, strides, padding, dilations), context)
    ref_dx, ref_dw = reference.conv2d_grads(x, w, dy, policy, strides, padding, dilations)
    assert_bit_equal(dx, ref_dx, context)
    assert_bit_equal(dw, ref_dw, context)


def random_policy(rng):
    def config():
        fmt = FloatFormat(int(rng.integers(4, 9)), int(rng.integers(0, 15)),
                          subnormals=bool(rng.random() < 0.8))
        return AccumConfig(
            accumulator=fmt,
            product=FloatFormat(5, int(rng.integers(2, 8))) if rng.random() < 0.3 else None,
            chunk_size=int(rng.choice([0, 0, 5, 7])),
            rounding=str(rng.choice(["nearest_even", "toward_zero", "stochastic"])),
            seed=int(rng.integers(0, 1000)))
    return AccumPolicy(fwd=config(), bwd=config(), grad=config())


def random_padding(rng):
    choice = rng.integers(0, 3)
    if choice == 0:
        return "SAME"
    if choice == 1:
        return "VALID"
    return [(int(rng.integers(0, 3)), int(rng.integers(0, 3))),
            (int(rng.integers(0, 3)), int(rng.integers(0, 3)))]


def test_random_shapes_all_three_passes_match_reference():
    rng = np.random.default_rng(21)
    cases = 0
    while cases < 60:
        kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dilations = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        padding = random_padding(rng)
        batch, h, w = int(rng.integers(1, 3)), int(rng.integers(3, 8)), int(rng.integers(3, 8))
        cin, cout = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        try:
            geometry = reference.conv2d_geometry((batch, h, w, cin), (kh, kw, cin, cout),
                                                 strides, padding, dilations)
        except ValueError:
            continue  # kernel larger than the padded input
        oh, ow = geometry[0], geometry[1]
        if oh * ow == 0:
            continue
        policy = random_policy(rng)
        x = random_operands(rng, (batch, h, w, cin), policy.fwd.accumulator)
        wgt = random_operands(rng, (kh, kw, cin, cout), policy.fwd.accumulator)
        dy = random_operands(rng, (batch, oh, ow, cout), policy.bwd.accumulator)
        context = f"case {cases}: {strides=} {dilations=} {padding=} {policy}"
        check_all_passes(x, wgt, dy, policy, strides, padding, dilations, context)
        cases += 1


def test_operand_quantization_and_adversarial_values():
    rng = np.random.default_rng(22)
    x = random_operands(rng, (2, 5, 6, 2), FloatFormat(5, 4))
    w = random_operands(rng, (3, 2, 2, 3), FloatFormat(5, 4))
    x[0, 1, 2, 0], x[1, 3, 3, 1], w[1, 0, 1, 2] = np.inf, np.nan, -np.inf
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 2.0 ** -140, -(2.0 ** -130)   # float32 subnormals
    cfg = AccumConfig(accumulator=FloatFormat(5, 4, overflow="inf"), chunk_size=4)
    policy = AccumPolicy(fwd=cfg, bwd=cfg.replace(rounding="stochastic"),
                         grad=cfg.replace(rounding="toward_zero", chunk_size=0),
                         operands=tfaccum.FP8_E5M2)
    for padding in ("SAME", "VALID", [(2, 0), (1, 3)]):
        geometry = reference.conv2d_geometry(x.shape, w.shape, (2, 1), padding, (1, 2))
        dy = random_operands(rng, (2, geometry[0], geometry[1], 3), FloatFormat(5, 4))
        check_all_passes(x, w, dy, policy, (2, 1), padding, (1, 2))


def test_padding_taps_count_in_the_order_and_the_chunks():
    """A 1x3 kernel at the left border: the padding tap comes first in (ky, kx, ci) order.

    With 3 mantissa bits, x = [1, 2^-5, 2^-5], w = 1 and SAME padding, output 0 sums
    (pad, 1, 2^-5) -> 1 (swamped); output 1 sums (1, 2^-5, 2^-5) -> 1. With chunk 2 the
    zero tap shifts the chunk boundary: output 0 is chunks (0, 1) and (2^-5) -> 1, while
    output 1 is (1, 2^-5) and (2^-5) -> 1; output 2 is (2^-5, 2^-5) -> 2^-4 and (pad) ->
    2^-4.
    """
    x = np.array([1, 2.0 ** -5, 2.0 ** -5], np.float32).reshape(1, 1, 3, 1)
    w = np.ones((1, 3, 1, 1), np.float32)
    cfg = AccumConfig(accumulator=FloatFormat(8, 3))
    y = tfaccum.accum_conv2d(x, w, cfg, padding="SAME").numpy().ravel()
    assert list(y) == [1.0, 1.0, 2.0 ** -4]
    y = tfaccum.accum_conv2d(x, w, cfg.replace(chunk_size=2), padding="SAME").numpy().ravel()
    assert list(y) == [1.0, 1.0, 2.0 ** -4]
    # The padding tap is a +0 operand: +0 x -1 = -0, so an all-padding window gives +0 + -0.
    y = tfaccum.accum_conv2d(np.zeros((1, 1, 1, 1), np.float32), -np.ones((1, 3, 1, 1), np.float32),
                             cfg, padding=[(0, 0), (1, 1)]).numpy().ravel()
    assert np.signbit(y).tolist() == [False]


@pytest.mark.parametrize("strides,dilations,padding", [
    ((1, 1), (1, 1), "SAME"), ((2, 2), (1, 1), "VALID"), ((1, 2), (2, 1), "SAME"),
    ((3, 1), (1, 1), [(1, 2), (0, 1)]), ((1, 1), (2, 2), "VALID"),
    ((2, 2), (2, 3), [(1, 0), (2, 1)])])
def test_full_precision_matches_tf_convolution(strides, dilations, padding):
    rng = np.random.default_rng(23)
    x = tf.constant(rng.standard_normal((2, 9, 8, 3)), tf.float32)
    w = tf.constant(rng.standard_normal((3, 2, 3, 4)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        y = tfaccum.accum_conv2d(x, w, tfaccum.FULL_PRECISION, strides, padding, dilations)
        # TF's CPU kernels reject dilations in backprop (and with strides): the oracle
        # convolves with an explicitly dilated filter instead.
        y_tf = tf_oracles.conv2d(x, w, strides, padding, dilations)
    np.testing.assert_allclose(y, y_tf, rtol=1e-4, atol=1e-5)
    dy = tf.constant(rng.standard_normal(y.shape), tf.float32)
    for got, want in zip(tape.gradient(y, [x, w], output_gradients=dy),
                         tape.gradient(y_tf, [x, w], output_gradients=dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_strides_with_dilations_match_reference():
    """A combination TensorFlow's CPU kernels reject; tfaccum supports it."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((1, 9, 9, 2)).astype(np.float32)
    w = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    policy = AccumPolicy.uniform(AccumConfig(accumulator=FloatFormat(8, 10)))
    y = tfaccum.accum_conv2d(x, w, policy, strides=(2, 3), padding="SAME", dilations=(2, 2))
    assert_bit_equal(y, reference.conv2d(x, w, policy, (2, 3), "SAME", (2, 2)))


def test_compute_gradient_agrees_with_registered_gradient():
    rng = np.random.default_rng(25)
    x = tf.constant(rng.standard_normal((1, 4, 5, 2)), tf.float64)
    w = tf.constant(rng.standard_normal((2, 3, 2, 2)), tf.float64)

    def f(x, w):
        return tfaccum.accum_conv2d(tf.cast(x, tf.float32), tf.cast(w, tf.float32),
                                    tfaccum.FULL_PRECISION, strides=(1, 2), padding="SAME")

    theoretical, numerical = tf.test.compute_gradient(f, [x, w], delta=1e-3)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-2, atol=2e-2)


def test_second_order_gradients_run():
    x = tf.Variable(np.ones((1, 4, 4, 1), np.float32))
    w = tf.Variable(np.full((3, 3, 1, 1), 0.5, np.float32))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            y = tfaccum.accum_conv2d(x, w, tfaccum.FULL_PRECISION)
            loss = tf.reduce_sum(y ** 2)
        dx = inner.gradient(loss, x)
        dx_norm = tf.reduce_sum(dx ** 2)
    assert np.all(np.isfinite(outer.gradient(dx_norm, w).numpy()))


@pytest.mark.parametrize("shape,kernel", [
    ((1, 5, 7, 1), (1, 1, 1, 1)), ((1, 1, 1, 3), (1, 1, 3, 2)), ((3, 6, 4, 1), (3, 1, 1, 1)),
    ((1, 4, 4, 2), (1, 4, 2, 1))])
def test_edge_shapes(shape, kernel):
    rng = np.random.default_rng(26)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(kernel).astype(np.float32)
    policy = AccumPolicy.uniform(AccumConfig(accumulator=FloatFormat(6, 7), chunk_size=2))
    for padding in ("SAME", "VALID"):
        geometry = reference.conv2d_geometry(shape, kernel, (1, 1), padding, (1, 1))
        dy = rng.standard_normal((shape[0], geometry[0], geometry[1], kernel[3])).astype(np.float32)
        check_all_passes(x, w, dy, policy, (1, 1), padding, (1, 1))


def test_shape_inference_unknown_batch_and_spatial_sizes():
    cfg = AccumConfig(accumulator=FloatFormat(6, 9))
    w = tf.ones((3, 3, 2, 5))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32)])
    def unknown(x):
        y = tfaccum.accum_conv2d(x, w, cfg, strides=2)
        assert y.shape.as_list() == [None, None, None, 5]
        return y

    @tf.function(input_signature=[tf.TensorSpec([None, 9, 7, 2], tf.float32)])
    def known_spatial(x):
        y = tfaccum.accum_conv2d(x, w, cfg, strides=2, padding="VALID")
        assert y.shape.as_list() == [None, 4, 3, 5]
        return y

    x = np.ones((2, 9, 7, 2), np.float32)
    assert unknown(x).shape == (2, 5, 4, 5)
    assert known_spatial(x).shape == (2, 4, 3, 5)


def test_empty_batch_and_kernel_larger_than_input():
    cfg = AccumConfig()
    y = tfaccum.accum_conv2d(np.zeros((0, 5, 5, 2), np.float32), np.ones((3, 3, 2, 4), np.float32), cfg)
    assert y.shape == (0, 5, 5, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the padded input"):
        tfaccum.accum_conv2d(np.ones((1, 2, 2, 1), np.float32), np.ones((3, 3, 1, 1), np.float32),
                             cfg, padding="VALID")
    # SAME always fits, as in TensorFlow.
    y = tfaccum.accum_conv2d(np.ones((1, 2, 2, 1), np.float32), np.ones((5, 5, 1, 1), np.float32), cfg)
    np.testing.assert_array_equal(y.numpy().ravel(), [4, 4, 4, 4])


def test_errors_are_clear():
    cfg = AccumConfig()
    x = np.ones((1, 5, 5, 3), np.float32)
    w = np.ones((3, 3, 3, 2), np.float32)
    with pytest.raises(ValueError, match="channel mismatch"):
        tfaccum.accum_conv2d(x, np.ones((3, 3, 2, 2), np.float32), cfg)
    with pytest.raises(ValueError, match="grouped convolution.*do not split into 2 groups"):
        tfaccum.accum_conv2d(np.ones((1, 5, 5, 4), np.float32), np.ones((3, 3, 2, 3), np.float32), cfg)
    with pytest.raises(ValueError, match="rank 4"):
        tfaccum.accum_conv2d(x[0], w, cfg)
    with pytest.raises(ValueError, match="strides must be positive"):
        tfaccum.accum_conv2d(x, w, cfg, strides=(0, 1))
    with pytest.raises(ValueError, match="dilations must be positive"):
        tfaccum.accum_conv2d(x, w, cfg, dilations=-1)
    with pytest.raises(ValueError, match="padding must be"):
        tfaccum.accum_conv2d(x, w, cfg, padding="FULL")
    with pytest.raises(ValueError, match="NHWC"):
        tfaccum.accum_conv2d(x, w, cfg, data_format="NCHW")
    with pytest.raises(TypeError, match="float32"):
        tfaccum.accum_conv2d(x.astype(np.float64), w, cfg)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
    def unknown_rank(x, w):
        return tfaccum.accum_conv2d(x, w, cfg)

    with pytest.raises(tf.errors.InvalidArgumentError, match="channel mismatch"):
        unknown_rank(x, np.ones((3, 3, 2, 2), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank 4"):
        unknown_rank(x[0], w)
    lib = tfaccum.ops.load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match="explicit_paddings"):
        lib.tfaccum_conv2d(x, w, 0, padding="EXPLICIT", explicit_paddings=[1, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out_backprop has shape"):
        lib.tfaccum_conv2d_backprop_input([1, 5, 5, 3], w, np.ones((1, 4, 4, 2), np.float32), 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="filter_sizes"):
        lib.tfaccum_conv2d_backprop_filter(x, [3, 3, 3], np.ones((1, 5, 5, 2), np.float32), 0)


def test_gradients_of_dimensions_of_2_31_and_more():
    """The gradients pass shapes as int64: a dimension >= 2^31 is a size like any other
    (it used to fail inside tf.shape(..., int32) with a message that never named tfaccum).
    Empty operands keep the test small; dw sums over an empty batch, so it is +0."""
    cfg = AccumConfig(accumulator=FloatFormat(5, 4))
    x, w = tf.zeros([0, 2 ** 31, 3, 2]), tf.ones([3, 1, 2, 4])
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = tfaccum.accum_conv2d(x, w, cfg, padding="VALID")
    # The seed gradient is given: TensorFlow's own ones-like for y would use int32.
    dx, dw = tape.gradient(y, [x, w], output_gradients=tf.zeros(y.shape))
    assert y.shape == (0, 2 ** 31 - 2, 3, 4) and dx.shape == x.shape
    assert dw.shape == w.shape and not np.any(dw.numpy()) and not np.any(np.signbit(dw.numpy()))
    lib = tfaccum.ops.load_library()
    dx = lib.tfaccum_conv2d_backprop_input(tf.constant([1, 2, 2, 1], tf.int64), tf.ones([1, 1, 1, 1]),
                                           tf.ones([1, 2, 2, 1]), 0)
    assert_bit_equal(dx, np.ones((1, 2, 2, 1), np.float32))


def test_gradient_of_a_raw_conv_without_policy_is_a_clear_error():
    lib = tfaccum.ops.load_library()
    x, w = tf.ones([1, 3, 3, 1]), tf.ones([2, 2, 1, 1])
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = lib.tfaccum_conv2d(x, w, 0)
    with pytest.raises(ValueError, match="cannot differentiate TfaccumConv2D: its `policy`"):
        tape.gradient(y, [x, w])
