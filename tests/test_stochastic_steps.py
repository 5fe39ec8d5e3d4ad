"""Stochastic rounding draws fresh bits every training step (docs/numerics.md §4).

The ops' last input is the step; the draws are keyed by ``stream(seed, step)``. Every
expectation here is computed by ``tfaccum.reference`` (exact rationals, no shared code
with the kernels) or derived from the definition; the statistical test's bound comes
from Hoeffding's inequality, not from a run.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum import reference as ref  # noqa: E402
from tfaccum.config import AccumConfig, AccumPolicy, FloatFormat  # noqa: E402

NARROW = FloatFormat(5, 4)
STOCHASTIC = AccumConfig(accumulator=NARROW, rounding="stochastic", seed=-1234567)
BIG_STEP = 2 ** 62 + 12345


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def assert_bits_equal(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    bad = np.nonzero(bits(got).ravel() != bits(want).ravel())[0]
    assert bad.size == 0, f"{bad.size} outputs differ, first at {bad[:5]}"


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------
# The generator itself
def _mix64(z):
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_reference_generator_is_the_documented_formula():
    """The formula of numerics §4, typed in again from the document."""
    m = (1 << 64) - 1
    for seed in (0, 1, -1, 2 ** 63 - 1, -2 ** 63, 987654321):
        for step in (0, 1, 2, 77, BIG_STEP):
            stream = (seed % 2 ** 64) ^ _mix64((step * 0xC2B2AE3D27D4EB4F) & m)
            assert ref.stream_seed(seed, step) == stream
            for element, counter in ((0, 0), (5, 16), (10 ** 12, 3 * 10 ** 6 + 2)):
                key = _mix64((stream + (element + 1) * 0x9E3779B97F4A7C15) & m)
                r = _mix64(key ^ (((counter + 1) * 0xD1B54A32D192ED03) & m)) >> 40
                assert ref.random_bits(seed, element, counter, step) == r
    # Step 0 is the seed itself: the draws of the ops before they had a step.
    assert ref.stream_seed(-5, 0) == (-5) % 2 ** 64
    assert ref.random_bits(42, 7, 3, 0) == ref.random_bits(42, 7, 3)
    with pytest.raises(ValueError):
        ref.stream_seed(1, -1)
    with pytest.raises(TypeError):
        ref.stream_seed(1, 1.0)


# --------------------------------------------------------------------------------------
# Every op equals the reference at every step, bit for bit
@pytest.mark.parametrize("step", [0, 1, 2, 1000, BIG_STEP])
def test_matmul_and_gradients_match_reference_at_each_step(step):
    rng = np.random.default_rng(step % 1000)
    policy = AccumPolicy(fwd=STOCHASTIC, bwd=STOCHASTIC.replace(seed=11),
                         grad=STOCHASTIC.replace(seed=12, chunk_size=3))
    a, b, dy = rand(rng, 4, 9), rand(rng, 6, 9), rand(rng, 4, 6)  # b transposed
    a_t, b_t = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([a_t, b_t])
        y = tfaccum.accum_matmul(a_t, b_t, policy, transpose_b=True, step=step)
    da, db = tape.gradient(y, [a_t, b_t], output_gradients=tf.constant(dy))
    assert_bits_equal(y, ref.matmul(a, b, policy, transpose_b=True, step=step))
    want_da, want_db = ref.matmul_grads(a, b, dy, policy, transpose_b=True, step=step)
    assert_bits_equal(da, want_da)
    assert_bits_equal(db, want_db)


def check_conv_and_grads(rng, x, w, policy, step, geo):
    """accum_conv2d and its two gradients at ``step`` equal the reference bit for bit."""
    y_want = ref.conv2d(x, w, policy, step=step, **geo)
    dy = rand(rng, *y_want.shape)
    x_t, w_t = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([x_t, w_t])
        y = tfaccum.accum_conv2d(x_t, w_t, policy, step=step, **geo)
    dx, dw = tape.gradient(y, [x_t, w_t], output_gradients=tf.constant(dy))
    assert_bits_equal(y, y_want)
    want_dx, want_dw = ref.conv2d_grads(x, w, dy, policy, step=step, **geo)
    assert_bits_equal(dx, want_dx)
    assert_bits_equal(dw, want_dw)


@pytest.mark.parametrize("step", [0, 3, BIG_STEP])
def test_conv_and_gradients_match_reference_at_each_step(step):
    rng = np.random.default_rng(7)
    policy = AccumPolicy(fwd=STOCHASTIC, bwd=STOCHASTIC.replace(seed=5, chunk_size=4),
                         grad=STOCHASTIC.replace(seed=6))
    x, w = rand(rng, 2, 5, 4, 3), rand(rng, 3, 2, 3, 4)
    geo = dict(strides=(2, 1), padding="SAME", dilations=(1, 2))
    check_conv_and_grads(rng, x, w, policy, step, geo)


def test_quantize_matches_reference_at_each_step():
    x = np.random.default_rng(3).standard_normal(300).astype(np.float32)
    for step in (0, 1, BIG_STEP):
        got = tfaccum.quantize(x, NARROW, "stochastic", seed=99, step=step)
        assert_bits_equal(got, ref.quantize(x, NARROW, "stochastic", seed=99, step=step))


@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
def test_other_roundings_ignore_the_step(rounding):
    rng = np.random.default_rng(1)
    cfg = AccumConfig(accumulator=NARROW, rounding=rounding, seed=3, chunk_size=2)
    a, b = rand(rng, 5, 7), rand(rng, 7, 3)
    x, w = rand(rng, 1, 4, 4, 2), rand(rng, 2, 2, 2, 3)
    base_mm, base_conv = tfaccum.accum_matmul(a, b, cfg), tfaccum.accum_conv2d(x, w, cfg)
    base_q = tfaccum.quantize(a, NARROW, rounding)
    assert_bits_equal(base_mm, ref.matmul(a, b, cfg))
    for step in (1, BIG_STEP):
        assert_bits_equal(tfaccum.accum_matmul(a, b, cfg, step=step), base_mm)
        assert_bits_equal(tfaccum.accum_conv2d(x, w, cfg, step=step), base_conv)
        assert_bits_equal(tfaccum.quantize(a, NARROW, rounding, step=step), base_q)


# --------------------------------------------------------------------------------------
# Fresh draws every step, the same ones for the same step
def test_two_steps_differ_and_the_same_step_repeats():
    rng = np.random.default_rng(5)
    a, b = rand(rng, 16, 40), rand(rng, 40, 16)
    step0 = tfaccum.accum_matmul(a, b, STOCHASTIC, step=0).numpy()
    step1 = tfaccum.accum_matmul(a, b, STOCHASTIC, step=1).numpy()
    again = tfaccum.accum_matmul(a, b, STOCHASTIC, step=tf.constant(1, tf.int64)).numpy()
    assert_bits_equal(again, step1)
    differ = np.count_nonzero(bits(step0) != bits(step1))
    # 40 roundings into 5 significant bits per output: nearly every output changes.
    assert differ > 0.8 * step0.size, differ
    # The same seed's steps are distinct streams; distinct seeds at one step too.
    other_seed = tfaccum.accum_matmul(a, b, STOCHASTIC.replace(seed=1), step=1).numpy()
    assert np.count_nonzero(bits(other_seed) != bits(step1)) > 0.8 * step0.size


def test_rounding_is_unbiased_over_steps_at_a_fixed_element():
    """The mean over T steps of one output is the exact sum, within Hoeffding's bound.

    Each output sums n = 6 products in e8m3 (ulp 1/8 on [1, 2), where every partial sum
    of these values stays, whichever way it rounds). Each stochastic rounding adds an
    error that lies in an interval of width ulp and has mean in [-ulp·2^-24, 0] given
    the past (numerics §2), so the mean over T steps of the result deviates from the
    exact sum by more than n·ulp·2^-24 + ulp·sqrt(n·ln(2/δ) / (2T)) with probability at
    most δ (Azuma–Hoeffding). δ = 1e-6 per element. With draws that repeat every step
    the mean is one rounded result, a multiple of 1/8 at least 0.04 from the sum 1.21.
    """
    fmt = FloatFormat(8, 3)
    cfg = AccumConfig(accumulator=fmt, rounding="stochastic", seed=2024)
    row = np.array([1.0, 0.04, 0.07, 0.02, 0.05, 0.03], np.float32)
    a = np.tile(row, (3, 1))  # three outputs (elements 0, 1, 2), each the same dot product
    b = np.ones((6, 1), np.float32)
    exact = sum(float(v) for v in row.astype(np.float64))  # exact: few float32 terms
    n, ulp, steps, delta = len(row), 2.0 ** -3, 3000, 1e-6
    bound = n * ulp * 2.0 ** -24 + ulp * math.sqrt(n * math.log(2 / delta) / (2 * steps))

    step_var = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def run():
        return tfaccum.accum_matmul(a, b, cfg, step=step_var)

    total = np.zeros((3, 1))
    seen = set()
    for t in range(steps):
        step_var.assign(t)
        y = run().numpy()
        assert np.all((y >= 1.0) & (y < 2.0))  # the ulp assumed above
        total += y
        seen.add(float(y[0, 0]))
    mean = total / steps
    assert len(seen) > 1
    for element in range(3):
        assert abs(mean[element, 0] - exact) <= bound, (element, mean[element, 0], exact, bound)
    # One step checked against the reference, so the statistics are about the real draws.
    step_var.assign(17)
    assert_bits_equal(run(), ref.matmul(a, b, cfg, step=17))


def test_quantize_is_unbiased_over_steps_at_a_fixed_element():
    """One rounding of x = 1 + f·ulp (e5m2): the mean over T steps is x, within
    Hoeffding's bound for T draws in an interval of width ulp."""
    fmt = FloatFormat(5, 2)
    x = np.array([1.0 + 0.3 * 0.25, -(2.0 + 0.9 * 0.5)], np.float32)
    ulps = np.array([0.25, 0.5])
    steps, delta = 4000, 1e-6
    values = np.stack([tfaccum.quantize(x, fmt, "stochastic", seed=8, step=t).numpy()
                       for t in range(steps)])
    bound = ulps * (2.0 ** -24 + math.sqrt(math.log(2 / delta) / (2 * steps)))
    assert np.all(np.abs(values.mean(axis=0) - x.astype(np.float64)) <= bound)
    assert len(np.unique(values[:, 0])) == 2 and len(np.unique(values[:, 1])) == 2


# --------------------------------------------------------------------------------------
# Grouped convolutions
def _grouped_inputs(rng, groups=3, cin_g=2, cout_g=2):
    x = rand(rng, 2, 4, 5, groups * cin_g)
    w = rand(rng, 3, 2, cin_g, groups * cout_g)
    return x, w


@pytest.mark.parametrize("step", [0, 9])
def test_grouped_conv_matches_reference_flat_index(step):
    """One op per group, drawing by the flat index of the whole output (reference)."""
    rng = np.random.default_rng(11)
    x, w = _grouped_inputs(rng)
    policy = AccumPolicy(fwd=STOCHASTIC, bwd=STOCHASTIC.replace(seed=1),
                         grad=STOCHASTIC.replace(seed=2))
    geo = dict(strides=(1, 2), padding="SAME")
    check_conv_and_grads(rng, x, w, policy, step, geo)


def test_grouped_conv_groups_draw_independently():
    """Every group gets the same inputs: with shared draws the groups' outputs (and
    gradients) would be equal; with the whole output's element indices they differ."""
    rng = np.random.default_rng(4)
    groups = 3
    x1, w1 = rand(rng, 2, 5, 5, 2), rand(rng, 3, 3, 2, 2)
    x = np.concatenate([x1] * groups, axis=-1)
    w = np.concatenate([w1] * groups, axis=-1)
    x_t, w_t = tf.constant(x), tf.constant(w)
    for cfg, same in ((AccumConfig(accumulator=NARROW), True), (STOCHASTIC, False)):
        with tf.GradientTape() as tape:
            tape.watch([x_t, w_t])
            y = tfaccum.accum_conv2d(x_t, w_t, cfg, step=5)
        dx, dw = tape.gradient(y, [x_t, w_t], output_gradients=tf.ones_like(y))
        for tensor in (y, dx, dw):
            parts = np.split(tensor.numpy(), groups, axis=-1)
            equal = [np.array_equal(bits(parts[0]), bits(p)) for p in parts[1:]]
            assert equal == [same] * (groups - 1), (cfg.rounding, tensor.shape)


def test_grouped_layer_matches_reference():
    rng = np.random.default_rng(8)
    layer = tfaccum.layers.AccumConv2D(6, (2, 3), groups=2, padding="valid", use_bias=False,
                                       policy=STOCHASTIC)
    x = rand(rng, 1, 5, 6, 4)
    layer.build(x.shape)
    layer.step_counter = tf.constant(21, tf.int64)
    assert_bits_equal(layer(x), ref.conv2d(x, layer.kernel.numpy(), STOCHASTIC,
                                           padding="VALID", step=21))


def test_grouped_conv_errors():
    cfg = AccumConfig()
    lib = tfaccum.ops.load_library()
    x, w = np.ones((1, 4, 4, 2), np.float32), np.ones((2, 2, 2, 2), np.float32)
    for group, groups in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="group must be in"):
            lib.tfaccum_conv2d(x, w, 0, group=group, groups=groups, **cfg.kernel_attrs())
    with pytest.raises(ValueError, match="do not split into 2 groups"):
        tfaccum.accum_conv2d(np.ones((1, 4, 4, 4), np.float32), np.ones((2, 2, 2, 3),
                                                                         np.float32), cfg)


# --------------------------------------------------------------------------------------
# The step input: errors
def test_bad_steps_are_clear_errors():
    lib = tfaccum.ops.load_library()
    a = np.ones((2, 2), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="step must be a scalar"):
        lib.tfaccum_mat_mul(a, a, tf.constant([1, 2], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="step must be >= 0"):
        lib.tfaccum_conv2d(np.ones((1, 2, 2, 1), np.float32), np.ones((1, 1, 1, 1), np.float32),
                           tf.constant(-3, tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="int64"):
        lib.tfaccum_quantize(a, tf.constant(1, tf.int32), format=[5, 2, 1, 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="step must be >= 0"):
        tfaccum.accum_matmul(a, a, AccumConfig(), step=tf.constant(-1))  # int32: cast, checked

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64)])
    def unknown_shape(step):
        return tfaccum.accum_conv2d(np.ones((1, 3, 3, 1), np.float32),
                                    np.ones((2, 2, 1, 1), np.float32), AccumConfig(), step=step)

    with pytest.raises(tf.errors.InvalidArgumentError, match="step must be a scalar"):
        unknown_shape(tf.constant([[1]], tf.int64))
    assert unknown_shape(tf.constant(4, tf.int64)).shape == (1, 3, 3, 1)
    with pytest.raises(ValueError, match="step must be a scalar"):
        tfaccum.accum_matmul(a, a, AccumConfig(), step=tf.constant([1]))
    with pytest.raises(ValueError, match="step must be in"):
        tfaccum.quantize(a, NARROW, step=-1)
    for bad in (1.5, True, tf.constant(1.0), "3"):
        with pytest.raises(TypeError, match="step must be an integer"):
            tfaccum.accum_matmul(a, a, AccumConfig(), step=bad)
    with pytest.raises(TypeError, match="step_counter"):
        tfaccum.set_step_counter(keras.Sequential([tfaccum.layers.AccumDense(2)]),
                                 tf.Variable(1.0))


# --------------------------------------------------------------------------------------
# Second-order gradients round their operands (numerics §5)
OPERANDS = AccumPolicy(fwd=AccumConfig(accumulator=FloatFormat(6, 8)),
                       bwd=AccumConfig(accumulator=FloatFormat(6, 7), chunk_size=3),
                       grad=AccumConfig(accumulator=FloatFormat(6, 6)),
                       operands=FloatFormat(4, 3))


def test_second_order_conv_gradients_round_every_operand():
    """d/dw and d/ddy of <dx(w, dy), u>, and d/dx and d/ddy of <dw(x, dy), v>, as the
    reference GEMMs on operands rounded to the policy's operand format."""
    rng = np.random.default_rng(21)
    x, w = rand(rng, 1, 4, 4, 2), rand(rng, 3, 3, 2, 3)
    geo = dict(strides=(1, 1), padding="SAME")
    y_shape = ref.conv2d(x, w, OPERANDS, **geo).shape
    dy, u, v = rand(rng, *y_shape), rand(rng, *x.shape), rand(rng, *w.shape)
    x_t, w_t, dy_t = tf.constant(x), tf.constant(w), tf.constant(dy)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([x_t, w_t, dy_t])
        with tf.GradientTape() as inner:
            inner.watch([x_t, w_t])
            y = tfaccum.accum_conv2d(x_t, w_t, OPERANDS, **geo)
        dx, dw = inner.gradient(y, [x_t, w_t], output_gradients=dy_t)
        dx_u = tf.reduce_sum(dx * u)
        dw_v = tf.reduce_sum(dw * v)
    # <dx, u>: dx = bwd(w, dy), so d/dw = grad GEMM of (u, dy); d/ddy = fwd GEMM of (u, w).
    d_w, d_dy = outer.gradient(dx_u, [w_t, dy_t])
    assert_bits_equal(d_w, ref.conv2d_backprop_filter(u, w.shape, dy, OPERANDS, **geo))
    assert_bits_equal(d_dy, ref.conv2d(u, w, OPERANDS, **geo))
    # <dw, v>: dw = grad(x, dy), so d/dx = bwd GEMM of (v, dy); d/ddy = fwd GEMM of (x, v).
    d_x, d_dy2 = outer.gradient(dw_v, [x_t, dy_t])
    assert_bits_equal(d_x, ref.conv2d_backprop_input(x.shape, v, dy, OPERANDS, **geo))
    assert_bits_equal(d_dy2, ref.conv2d(x, v, OPERANDS, **geo))


def test_second_order_matmul_gradients_round_every_operand():
    rng = np.random.default_rng(22)
    a, b = rand(rng, 3, 5), rand(rng, 5, 4)
    dy, u = rand(rng, 3, 4), rand(rng, 3, 5)
    a_t, b_t, dy_t = tf.constant(a), tf.constant(b), tf.constant(dy)
    with tf.GradientTape() as outer:
        outer.watch([b_t, dy_t])
        with tf.GradientTape() as inner:
            inner.watch(a_t)
            y = tfaccum.accum_matmul(a_t, b_t, OPERANDS)
        da = inner.gradient(y, a_t, output_gradients=dy_t)  # bwd GEMM dy·bᵀ
        da_u = tf.reduce_sum(da * u)
    d_b, d_dy = outer.gradient(da_u, [b_t, dy_t])
    # da = dy·bᵀ is a matmul under `bwd`; its gradients are its bwd and grad GEMMs.
    # Its inputs were rounded (dy here, b in the forward); u is rounded by its gradient.
    q = lambda t: ref.quantize(t, OPERANDS.operands)  # noqa: E731
    want_ddy, want_dbt = ref.matmul_grads(q(dy), q(b), u, OPERANDS, transpose_b=True)
    assert_bits_equal(d_dy, want_ddy)
    assert_bits_equal(d_b, want_dbt)


# --------------------------------------------------------------------------------------
# Layers: the step comes from a checkpointed counter
def _stochastic_model(seed=0):
    keras.utils.set_random_seed(seed)
    policy = AccumPolicy(fwd=STOCHASTIC.replace(seed=1), bwd=STOCHASTIC.replace(seed=2),
                         grad=STOCHASTIC.replace(seed=3))
    inputs = keras.Input((6, 6, 2))
    h = tfaccum.layers.AccumConv2D(4, 3, groups=2, activation="relu", policy=policy)(inputs)
    h = keras.layers.Flatten()(h)
    outputs = tfaccum.layers.AccumDense(3, policy=policy)(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)
    assert tfaccum.set_step_counter(model, model.optimizer.iterations) == 2
    return model


def _data():
    rng = np.random.default_rng(0)
    return rand(rng, 32, 6, 6, 2), rand(rng, 32, 3)


def test_layers_draw_from_the_optimizer_step():
    model = _stochastic_model()
    x, _ = _data()
    conv = model.layers[1]
    assert conv.step_counter is model.optimizer.iterations
    assert len(model.weights) == 4  # the counter is not a layer weight
    y0 = model(x[:4], training=False).numpy()
    model.optimizer.iterations.assign(1)
    y1 = model(x[:4], training=False).numpy()
    model.optimizer.iterations.assign(0)
    assert_bits_equal(model(x[:4], training=False), y0)
    assert not np.array_equal(bits(y0), bits(y1))
    # The layer's forward at step 1 is the reference's at step 1.
    inner = keras.Model(model.inputs[0], conv.output)
    model.optimizer.iterations.assign(1)
    assert_bits_equal(inner(x[:2]), np.maximum(ref.conv2d(
        x[:2], conv.kernel.numpy(), conv.policy, padding="VALID", step=1)
        + conv.bias.numpy(), 0))


def test_a_stochastic_layer_without_counter_warns_once():
    layer = tfaccum.layers.AccumDense(2, policy=STOCHASTIC)
    x = np.ones((1, 3), np.float32)
    with pytest.warns(tfaccum.layers.StepCounterWarning, match="set_step_counter"):
        layer(x, training=True)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x, training=True)  # once per layer
        tfaccum.layers.AccumDense(2, policy=STOCHASTIC)(x, training=False)  # inference
        tfaccum.layers.AccumDense(2)(x, training=True)  # not stochastic
        counted = tfaccum.layers.AccumDense(2, policy=STOCHASTIC)
        counted.step_counter = tf.Variable(3, dtype=tf.int64)
        counted(x, training=True)
    assert not [w for w in caught if issubclass(w.category, tfaccum.layers.StepCounterWarning)]


def test_keras_fit_resumed_from_checkpoint_equals_uninterrupted(tmp_path):
    """Two epochs straight vs one epoch, checkpoint (model + optimizer), a fresh model
    restored from it, one more epoch: the same weights, bit for bit. A resumed run that
    restarted the stream (its counter not restored) would not be."""
    x, y = _data()

    def fit(model, epochs, initial_epoch=0):
        model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch,
                  shuffle=False, verbose=0)

    straight = _stochastic_model()
    fit(straight, 2)
    assert int(straight.optimizer.iterations.numpy()) == 8

    first = _stochastic_model()
    fit(first, 1)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt"))
    resumed = _stochastic_model(seed=99)  # other initial weights: all must come from the file
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
        path).assert_existing_objects_matched()
    assert int(resumed.optimizer.iterations.numpy()) == 4
    fit(resumed, 2, initial_epoch=1)
    for a, b in zip(straight.weights, resumed.weights):
        assert_bits_equal(a.numpy(), b.numpy())

    # The same resume with the stream restarted at step 0 ends elsewhere.
    restarted = _stochastic_model(seed=99)
    restarted.optimizer.build(restarted.trainable_variables)
    tf.train.Checkpoint(model=restarted, optimizer=restarted.optimizer).restore(path)
    restarted.optimizer.iterations.assign(0)
    fit(restarted, 2, initial_epoch=1)
    assert not all(np.array_equal(bits(a.numpy()), bits(b.numpy()))
                   for a, b in zip(straight.weights, restarted.weights))


def test_mirrored_replicas_read_the_step(tmp_path):
    """Under MirroredStrategy (two logical CPUs) the layers read the replicated counter
    in replica context: training runs and the step advances the stream."""
    import subprocess
    import sys

    script = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
import keras, tfaccum
from test_stochastic_steps import _stochastic_model, _data
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = _stochastic_model()
x, y = _data()
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
assert int(model.optimizer.iterations.numpy()) == 4
w = [v.numpy() for v in model.weights]
assert all(np.all(np.isfinite(v)) for v in w)
print("OK", strategy.num_replicas_in_sync)
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 2" in proc.stdout
