"""The convolution twins beyond Conv2D (issue 13): Conv1D, DepthwiseConv1D/2D,
SeparableConv1D/2D, Conv1DTranspose/2DTranspose.

* every GEMM (forward, input gradient, filter gradient) bit-exact against
  ``tfaccum.reference`` (exact rationals), on random and adversarial values;
* at full precision, outputs and one SGD step as the Keras original;
* the inventory's lengths against a brute-force count (all-ones operands through the
  Keras original), ``.keras`` round trips in a fresh process, ``rewrite`` and ``summary``.

Shapes are small: the reference is pure Python.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import keras
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, reference
from tfaccum import layers as L
from tfaccum.inventory import gemm_lengths, gemm_rows
from tfaccum.model_rewrite import NotEmulatedWarning
from test_conv import random_policy
from test_matmul import assert_bit_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# The layers' GEMMs through the reference
# --------------------------------------------------------------------------------------
def layer_passes(layer, x, dy, step):
    """(y, dx, [d kernel...]) of a built twin without bias, for upstream gradient dy."""
    layer.step_counter = tf.constant(step, tf.int64)
    xt = tf.constant(x)
    kernels = [w for w in layer.trainable_weights]
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    grads = tape.gradient(y, [xt] + kernels, output_gradients=tf.constant(dy))
    return y.numpy(), grads[0].numpy(), [g.numpy() for g in grads[1:]]


def as_2d(x):
    return x[:, None]  # [B, W, C] -> [B, 1, W, C]


def pair(v, rank):
    v = (v,) * rank if isinstance(v, int) else tuple(v)
    return (1,) + v if rank == 1 else v


def grouped(depthwise_kernel):
    """[KH, KW, C, M] -> the grouped kernel [KH, KW, 1, C*M] (numerics §5)."""
    kh, kw, c, m = depthwise_kernel.shape
    return depthwise_kernel.reshape(kh, kw, 1, c * m)


def reference_passes(layer, x, dy, policy, step):
    """What the layer must compute, from tfaccum.reference alone: channels-last inputs."""
    rank = layer.rank
    x2 = as_2d(x) if rank == 1 else x
    dy2 = as_2d(dy) if rank == 1 else dy
    strides, dil = pair(layer.strides, rank), pair(layer.dilation_rate, rank)

    def k2(w):
        return w[None] if rank == 1 else w

    def back(a):
        return a[:, 0] if rank == 1 else a

    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        padding = layer.padding.upper()
        if padding == "CAUSAL":
            padding = [(0, 0), (layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0)]
        w = k2(layer.kernel.numpy())
        y = reference.conv2d(x2, w, policy, strides, padding, dil, step)
        dx, dw = reference.conv2d_grads(x2, w, dy2, policy, strides, padding, dil, step)
        return back(y), back(dx), [dw.reshape(layer.kernel.shape)]
    padding = layer.padding.upper()
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        w = grouped(k2(layer.kernel.numpy()))
        y = reference.conv2d(x2, w, policy, strides, padding, dil, step)
        dx, dw = reference.conv2d_grads(x2, w, dy2, policy, strides, padding, dil, step)
        return back(y), back(dx), [dw.reshape(layer.kernel.shape)]
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        wd = grouped(k2(layer.depthwise_kernel.numpy()))
        wp = k2(layer.pointwise_kernel.numpy())
        z = reference.conv2d(x2, wd, policy, strides, padding, dil, step)
        y = reference.conv2d(z, wp, policy, 1, "VALID", 1, step)
        dz, dwp = reference.conv2d_grads(z, wp, dy2, policy, 1, "VALID", 1, step)
        dx, dwd = reference.conv2d_grads(x2, wd, dz, policy, strides, padding, dil, step)
        return back(y), back(dx), [dwd.reshape(layer.depthwise_kernel.shape),
                                   dwp.reshape(layer.pointwise_kernel.shape)]
    w = k2(layer.kernel.numpy())  # transposed: [KH, KW, filters, Cin]
    y = reference.conv2d_transpose(x2, w, dy2.shape, policy, strides, padding, dil, step)
    dx, dw = reference.conv2d_transpose_grads(x2, w, dy2, policy, strides, padding, dil, step)
    return back(y), back(dx), [dw.reshape(layer.kernel.shape)]


# (class, constructor arguments, channels-last input shape without the batch)
CASES = [
    (L.AccumConv1D, dict(filters=3, kernel_size=3, padding="causal", dilation_rate=2), (7, 2)),
    (L.AccumConv1D, dict(filters=4, kernel_size=2, padding="same", strides=2, groups=2),
     (6, 4)),
    (L.AccumConv1D, dict(filters=2, kernel_size=3, padding="valid"), (6, 3)),
    (L.AccumDepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2, padding="same",
                                  strides=2), (5, 4, 2)),
    (L.AccumDepthwiseConv2D, dict(kernel_size=(2, 3), padding="valid", dilation_rate=(2, 1)),
     (5, 5, 3)),
    (L.AccumDepthwiseConv1D, dict(kernel_size=3, depth_multiplier=2, padding="same"), (6, 2)),
    (L.AccumSeparableConv2D, dict(filters=3, kernel_size=2, depth_multiplier=2,
                                  padding="same", strides=(1, 2)), (4, 5, 2)),
    (L.AccumSeparableConv1D, dict(filters=2, kernel_size=3, padding="valid",
                                  dilation_rate=2), (7, 2)),
    (L.AccumConv2DTranspose, dict(filters=2, kernel_size=3, strides=2, padding="same"),
     (3, 2, 2)),
    (L.AccumConv2DTranspose, dict(filters=3, kernel_size=(2, 3), strides=(2, 1),
                                  padding="valid", output_padding=(1, 0)), (2, 3, 2)),
    (L.AccumConv2DTranspose, dict(filters=2, kernel_size=2, padding="same",
                                  dilation_rate=2), (3, 3, 2)),
    (L.AccumConv1DTranspose, dict(filters=2, kernel_size=3, strides=2, padding="same",
                                  output_padding=1), (3, 2)),
]
CASE_IDS = [f"{cls.__name__}-{i}" for i, (cls, _, _) in enumerate(CASES)]


def check_against_reference(cls, kwargs, shape, policy, values, step=3, context=""):
    layer = cls(**kwargs, use_bias=False, policy=policy)
    x = values((2,) + shape)
    layer.build((2,) + shape)
    for w in layer.trainable_weights:
        w.assign(values(tuple(w.shape)))
    out_shape = tuple(layer.compute_output_shape((2,) + shape))
    dy = values(out_shape)
    y, dx, dws = layer_passes(layer, x, dy, step)
    ref_y, ref_dx, ref_dws = reference_passes(layer, x, dy, policy, step)
    assert_bit_equal(y, ref_y, f"y {context}")
    assert_bit_equal(dx, ref_dx, f"dx {context}")
    for got, want in zip(dws, ref_dws):
        assert_bit_equal(got, want, f"dw {context}")


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=CASE_IDS)
def test_random_values_match_reference(cls, kwargs, shape):
    rng = np.random.default_rng(abs(hash(repr(kwargs))) % 2 ** 32 + len(shape))
    policy = random_policy(rng)

    def values(s):
        return rng.standard_normal(s).astype(np.float32)

    check_against_reference(cls, kwargs, shape, policy, values, context=repr(policy))


# Few distinct magnitudes, signed zeros and FP8-representable values: many exact ties
# of a narrow accumulator and cancellations to zero of either sign.
ADVERSARIAL = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, -3.0, 0.125, 6.0, -0.0],
                       np.float32)


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=CASE_IDS)
def test_adversarial_values_match_reference(cls, kwargs, shape):
    rng = np.random.default_rng(len(repr(kwargs)))
    narrow = AccumConfig(accumulator=FloatFormat(4, 2), chunk_size=2)
    policy = AccumPolicy(fwd=narrow, bwd=narrow.replace(rounding="toward_zero"),
                         grad=narrow.replace(rounding="stochastic", seed=5),
                         operands="fp8_e5m2")

    def values(s):
        return rng.choice(ADVERSARIAL, size=s).astype(np.float32)

    check_against_reference(cls, kwargs, shape, policy, values, step=7, context="adversarial")


# --------------------------------------------------------------------------------------
# Full precision: the Keras original
# --------------------------------------------------------------------------------------
KERAS_OF = {twin: base for base, twin in L.TWINS.items()}


def equivalence_cases():
    for i, (cls, kwargs, shape) in enumerate(CASES):
        if cls is L.AccumConv2DTranspose and kwargs.get("dilation_rate", 1) != 1:
            continue  # TensorFlow's CPU kernel has no dilated transposed convolution
        yield pytest.param(cls, kwargs, shape, "channels_last", id=CASE_IDS[i])
    yield pytest.param(L.AccumDepthwiseConv2D, dict(kernel_size=3, padding="same"),
                       (2, 4, 5), "channels_first", id="depthwise-channels-first")
    # Length 4 != filters: Keras 3.x's own SeparableConv1D(channels_first) adds its bias
    # along the length axis when the output length equals `filters` (seen with (2, 7)).
    yield pytest.param(L.AccumSeparableConv1D, dict(filters=3, kernel_size=2, strides=2),
                       (2, 9), "channels_first", id="separable1d-channels-first")
    yield pytest.param(L.AccumConv2DTranspose, dict(filters=2, kernel_size=3, strides=2),
                       (2, 3, 3), "channels_first", id="transpose-channels-first")


@pytest.mark.parametrize("cls,kwargs,shape,data_format", list(equivalence_cases()))
def test_full_precision_matches_keras_and_one_sgd_step(cls, kwargs, shape, data_format):
    keras.utils.set_random_seed(4)
    kwargs = dict(kwargs, data_format=data_format, activation="relu")
    original = KERAS_OF[cls](**kwargs, name="conv")
    twin = cls(**kwargs, name="conv", policy=AccumPolicy())
    x = np.random.default_rng(2).standard_normal((3,) + shape).astype(np.float32)
    original(x)
    twin(x)
    bias = [w for w in original.weights if "bias" in w.path]
    for w in bias:
        w.assign(np.linspace(-0.3, 0.3, int(np.prod(w.shape))).reshape(w.shape))
    twin.set_weights(original.get_weights())
    results = []
    for layer in (original, twin):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(0.5 * tf.square(y) - y)
        grads = tape.gradient(loss, layer.trainable_weights)
        keras.optimizers.SGD(0.1).apply(grads, layer.trainable_weights)
        results.append((y.numpy(), [w.numpy() for w in layer.trainable_weights]))
    (y0, w0), (y1, w1) = results
    assert y0.shape == y1.shape
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * np.abs(y0).max())
    for a, b in zip(w1, w0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


# --------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------
def brute_force_lengths(base, kwargs, shape, batch=2):
    """The longest sum of each GEMM: with all-ones operands through the Keras original
    (stride 1, "valid": an interior output reads every tap), its largest output."""
    layer = base(**kwargs, use_bias=False)
    x = tf.ones((batch,) + shape)
    layer.build(x.shape)
    for w in layer.weights:
        w.assign(tf.ones(w.shape))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dx, dw = tape.gradient(y, [x, layer.kernel])
    return {"fwd": int(tf.reduce_max(y)), "bwd": int(tf.reduce_max(dx)),
            "grad": int(tf.reduce_max(dw))}, tuple(x.shape), tuple(y.shape)


@pytest.mark.parametrize("base,kwargs,shape", [
    (keras.layers.Conv1D, dict(filters=6, kernel_size=3, groups=2), (8, 4)),
    (keras.layers.DepthwiseConv2D, dict(kernel_size=(2, 3), depth_multiplier=3), (5, 6, 2)),
    (keras.layers.DepthwiseConv1D, dict(kernel_size=3, depth_multiplier=2), (7, 3)),
    (keras.layers.Conv2DTranspose, dict(filters=4, kernel_size=(3, 2)), (3, 4, 5)),
    (keras.layers.Conv1DTranspose, dict(filters=2, kernel_size=4), (5, 3)),
])
def test_lengths_match_a_brute_force_count(base, kwargs, shape):
    counted, in_shape, out_shape = brute_force_lengths(base, kwargs, shape)
    layer = base(**kwargs)
    (row,) = gemm_rows(layer, in_shape, out_shape)
    assert {"fwd": row.fwd, "bwd": row.bwd, "grad": row.grad} == counted


def test_separable_lengths_are_those_of_its_two_convolutions():
    shape = (6, 5, 3)
    depthwise, in_shape, mid_shape = brute_force_lengths(
        keras.layers.DepthwiseConv2D, dict(kernel_size=(3, 2), depth_multiplier=2), shape)
    pointwise, _, out_shape = brute_force_lengths(
        keras.layers.Conv2D, dict(filters=4, kernel_size=1), mid_shape[1:])
    layer = keras.layers.SeparableConv2D(4, (3, 2), depth_multiplier=2)
    rows = gemm_rows(layer, in_shape, out_shape)
    assert [r.gemm for r in rows] == ["depthwise", "pointwise"]
    assert [{"fwd": r.fwd, "bwd": r.bwd, "grad": r.grad} for r in rows] == \
        [depthwise, pointwise]


# --------------------------------------------------------------------------------------
# Models: rewrite, summary, saving
# --------------------------------------------------------------------------------------
def mixed_model():
    inp = keras.Input((12, 3), name="seq")
    a = keras.layers.Conv1D(4, 3, padding="causal", name="c1")(inp)
    a = keras.layers.DepthwiseConv1D(3, padding="same", name="dw1")(a)
    a = keras.layers.SeparableConv1D(4, 3, name="sep1")(a)
    a = keras.layers.Conv1DTranspose(3, 3, name="tr1")(a)
    b = keras.layers.Reshape((4, 3, 3))(a)
    b = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="dw2")(b)
    b = keras.layers.SeparableConv2D(3, 2, padding="same", name="sep2")(b)
    b = keras.layers.Conv2DTranspose(2, 2, strides=2, name="tr2")(b)
    out = keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(b))
    return keras.Model(inp, out, name="mixed")


NARROW = AccumPolicy.uniform(AccumConfig("e6m8", chunk_size=4))


def test_rewrite_and_summary_cover_every_conv_kind():
    keras.utils.set_random_seed(5)
    model = mixed_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotEmulatedWarning)
        new = tfaccum.rewrite(model, NARROW)
    names = ["c1", "dw1", "sep1", "tr1", "dw2", "sep2", "tr2", "fc"]
    assert set(new.tfaccum_report.replaced) == set(names)
    assert new.tfaccum_report.not_emulated == ()
    for name in names:
        old, layer = model.get_layer(name), new.get_layer(name)
        assert type(layer) is L.TWINS[type(old)] and layer.policy == NARROW
        for a, b in zip(old.get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    rows = gemm_lengths(new, batch_size=8)
    assert [(r.layer, r.gemm) for r in rows] == [
        ("c1", ""), ("dw1", ""), ("sep1", "depthwise"), ("sep1", "pointwise"), ("tr1", ""),
        ("dw2", ""), ("sep2", "depthwise"), ("sep2", "pointwise"), ("tr2", ""), ("fc", "")]
    by = {(r.layer, r.gemm): (r.fwd, r.bwd, r.grad) for r in rows}
    assert by[("dw2", "")] == (4, 8, 8 * 3 * 2)          # KH*KW, KH*KW*M, B*OH*OW
    assert by[("sep2", "pointwise")] == (6, 3, 8 * 3 * 2)  # Cin*M, filters, B*OH*OW
    assert by[("tr2", "")] == (4 * 3, 4 * 2, 8 * 3 * 2)    # K*Cin, K*filters, B*H*W
    text = tfaccum.summary(new, batch_size=8, print_fn=None)
    assert "sep2 (AccumSeparableConv2D, pointwise)" in text
    assert "Emulated layers: 8" in text and "not emulated" not in text


def test_keras_file_reloads_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(6)
    model = tfaccum.rewrite(mixed_model(), NARROW)
    x = np.random.default_rng(3).standard_normal((2, 12, 3)).astype(np.float32)
    path, data = str(tmp_path / "mixed.keras"), str(tmp_path / "io.npz")
    model.save(path)
    np.savez(data, x=x, y=model(x).numpy())
    code = (
        "import sys, json, numpy as np, keras, tfaccum\n"
        "m = keras.models.load_model(sys.argv[1]); io = np.load(sys.argv[2])\n"
        "np.testing.assert_array_equal(m(io['x']).numpy(), io['y'])\n"
        "print(json.dumps({l.name: [type(l).__name__, l.policy.to_json()] for l in m.layers"
        " if hasattr(l, 'policy')}))\n")
    proc = subprocess.run([sys.executable, "-c", code, path, data], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {l.name: [type(l).__name__, l.policy.to_json()] for l in model.layers
                      if hasattr(l, "policy")}
    assert len(loaded) == 8


def test_mobilenet_v2_is_emulated_entirely():
    keras.utils.set_random_seed(7)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                           classes=10, classifier_activation=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotEmulatedWarning)
        new = tfaccum.rewrite(model, AccumPolicy())
    assert new.tfaccum_report.not_emulated == ()
    depthwise = [l for l in new.layers if isinstance(l, L.AccumDepthwiseConv2D)]
    assert len(depthwise) == 17
    x = np.random.default_rng(8).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want, got = model(x).numpy(), new(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_output_padding_that_does_not_invert_the_convolution_is_a_value_error():
    layer = L.AccumConv2DTranspose(2, 4, strides=2, padding="same", output_padding=0)
    with pytest.raises(ValueError, match=r"output_padding=\(0, 0\).*size 6.*not the input"):
        layer(np.zeros((1, 4, 4, 1), np.float32))


def test_transpose_op_rejects_bad_operands():
    x = tf.zeros((1, 3, 3, 2))
    with pytest.raises(ValueError, match="channel mismatch"):
        tfaccum.accum_conv2d_transpose(x, tf.zeros((2, 2, 4, 3)), [1, 4, 4, 4], AccumPolicy())
    with pytest.raises(TypeError, match="float32"):
        tfaccum.accum_conv2d_transpose(tf.zeros((1, 3, 3, 2), tf.float64),
                                       tf.zeros((2, 2, 4, 2)), [1, 4, 4, 4], AccumPolicy())


# --------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------
def test_predict_lists_the_single_kernel_convolutions_with_their_lengths():
    keras.utils.set_random_seed(9)
    inp = keras.Input((8, 8, 2))
    a = keras.layers.Conv2DTranspose(3, 2, strides=2, padding="same", name="up")(inp)
    a = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(a)
    a = keras.layers.Reshape((14 * 14, 6))(a)
    a = keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, name="c1")(a)
    a = keras.layers.DepthwiseConv1D(5, strides=3, name="dw1")(a)
    a = keras.layers.Conv1DTranspose(2, 3, name="tr1")(a)
    out = keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling1D()(a))
    model = keras.Model(inp, out)
    x = np.random.default_rng(4).standard_normal((6, 8, 8, 2)).astype(np.float32)
    x[x < -0.5] = 0.0  # some zero operands, so effective lengths differ from lengths
    plan = tfaccum.analysis.predict(model, batch_size=16, data=x, direct=False)
    names = ["up", "dw", "c1", "dw1", "tr1", "fc"]
    assert [p.layer for p in plan.layers] == names
    for p in plan.layers:
        (row,) = [r for r in gemm_lengths_of(model, p.layer, 16)]
        for g in ("fwd", "bwd", "grad"):
            gemm = p.gemm(g)
            assert gemm.length == getattr(row, g), (p.layer, g)
            assert 0 < gemm.effective_length <= gemm.length, (p.layer, g)
    dw = plan.layers[1]
    assert (dw.fwd.length, dw.bwd.length, dw.grad.length) == (9, 18, 16 * 14 * 14)
    # The measured counts are those of the bilinear convolution: the depthwise FWD of
    # inputs with zeros sums fewer non-zero products than its 9.
    assert dw.fwd.effective_length < 9


def gemm_lengths_of(model, name, batch):
    layer = model.get_layer(name)
    ((in_shape, out_shape),) = tfaccum.inventory.call_shapes(layer)
    return gemm_rows(layer, in_shape, out_shape, batch)


@pytest.mark.parametrize("layer", [
    keras.layers.DepthwiseConv2D(3, depth_multiplier=2, depthwise_regularizer="l2"),
    keras.layers.Conv1DTranspose(3, 2, strides=2, kernel_regularizer="l2"),
    keras.layers.Conv1D(4, 3, padding="causal"),
], ids=["depthwise", "transpose1d", "causal1d"])
def test_gemm_probe_measures_the_new_layers(layer):
    from tfaccum.analysis.measure import GemmProbe

    shape = (2, 6, 5, 2) if isinstance(layer, keras.layers.DepthwiseConv2D) else (2, 6, 2)
    x = tf.constant(np.random.default_rng(5).standard_normal(shape).astype(np.float32))
    y = layer(x)
    dz = tf.ones_like(y)
    narrow = AccumPolicy.uniform(AccumConfig("e6m3"))
    exact = GemmProbe(layer, AccumPolicy(), input_shape=shape).compare(x, dz)
    rough = GemmProbe(layer, narrow, input_shape=shape).compare(x, dz)
    for g in ("fwd", "bwd", "grad"):
        assert exact[g].mse == 0.0 and exact[g].count > 0
        assert rough[g].mse > 0.0
