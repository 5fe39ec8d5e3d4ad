"""AccumDense / AccumConv2D: drop-in behaviour, gradients, serialization, guards."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum.layers import AccumConv2D, AccumDense  # noqa: E402

FULL = tfaccum.AccumPolicy()
REDUCED = tfaccum.AccumPolicy(
    fwd=tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(5, 2)),
    bwd=tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(6, 7), chunk_size=4),
    grad=tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(6, 9), chunk_size=8))

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def assert_close(actual, expected, rtol=1e-5):
    """Equal to float32 accuracy: tiny error relative to the tensor's magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def twin_pair(keras_cls, accum_cls, input_shape, policy=FULL, **kwargs):
    """A Keras layer and its tfaccum twin with the same config and weights."""
    ref = keras_cls(**kwargs)
    ref.build(input_shape)
    acc = accum_cls(policy=policy, **kwargs)
    acc.build(input_shape)
    acc.set_weights(ref.get_weights())
    return ref, acc


def check_forward_and_gradients(ref, acc, x, rtol=1e-5):
    x = tf.constant(x)
    outs, grads = [], []
    for layer in (ref, acc):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.cos(y))  # a non-trivial upstream gradient
        outs.append(y)
        grads.append(tape.gradient(loss, [x] + layer.trainable_variables))
    assert_close(outs[1], outs[0], rtol)
    assert len(grads[0]) == len(grads[1])
    for g_acc, g_ref in zip(grads[1], grads[0]):
        assert_close(g_acc, g_ref, rtol)


@pytest.mark.parametrize("input_shape,kwargs", [
    ((4, 6), dict(units=5)),
    ((4, 6), dict(units=3, activation="relu", use_bias=False)),
    ((2, 3, 6), dict(units=5, activation="tanh", bias_initializer="ones")),
    ((2, 2, 3, 6), dict(units=4)),
    ((4, 6), dict(units=4, lora_rank=2)),
])
def test_dense_matches_keras(input_shape, kwargs):
    ref, acc = twin_pair(keras.layers.Dense, AccumDense, input_shape, **kwargs)
    assert isinstance(acc, keras.layers.Dense)
    check_forward_and_gradients(ref, acc, rand(*input_shape))


@pytest.mark.parametrize("kwargs", [
    dict(filters=4, kernel_size=3, padding="same"),
    dict(filters=3, kernel_size=(3, 2), strides=2, padding="valid", activation="relu"),
    dict(filters=4, kernel_size=3, padding="same", strides=(2, 1)),
    dict(filters=2, kernel_size=3, dilation_rate=2, padding="same", use_bias=False),
    dict(filters=4, kernel_size=3, padding="same", groups=2),
])
def test_conv2d_matches_keras(kwargs):
    shape = (2, 7, 6, 4)
    ref, acc = twin_pair(keras.layers.Conv2D, AccumConv2D, shape, **kwargs)
    assert isinstance(acc, keras.layers.Conv2D)
    check_forward_and_gradients(ref, acc, rand(*shape))


def test_conv2d_channels_first():
    # TF on CPU has no NCHW convolution, so compare with the NHWC layer on transposed data.
    kwargs = dict(filters=3, kernel_size=3, padding="same", strides=2, activation="relu")
    ref, acc = twin_pair(keras.layers.Conv2D, AccumConv2D, (2, 6, 5, 4), **kwargs)
    acc_cf = AccumConv2D(data_format="channels_first", policy=FULL, **kwargs)
    acc_cf.build((2, 4, 6, 5))
    acc_cf.set_weights(ref.get_weights())
    x = rand(2, 6, 5, 4)
    y_cf = acc_cf(np.transpose(x, (0, 3, 1, 2)))
    assert y_cf.shape == (2, 3, 3, 3)
    assert_close(np.transpose(y_cf, (0, 2, 3, 1)), ref(x))


def test_regularizers_constraints_and_config_are_kept():
    kwargs = dict(units=3, kernel_regularizer=keras.regularizers.L2(0.1),
                  bias_regularizer="l1", activity_regularizer="l2",
                  kernel_constraint=keras.constraints.NonNeg(), name="d")
    ref, acc = twin_pair(keras.layers.Dense, AccumDense, (2, 4), **kwargs)
    x = rand(2, 4)
    ref(x), acc(x)
    assert_close(sum(acc.losses), sum(ref.losses))
    assert isinstance(acc.kernel_constraint, keras.constraints.NonNeg)
    config = acc.get_config()
    ref_config = ref.get_config()
    assert config.pop("policy") == FULL.to_dict()
    assert config == ref_config


def test_policy_forms_and_serialization():
    cfg = tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(6, 9), chunk_size=64)
    layer = AccumConv2D(2, 3, policy=cfg)
    assert layer.policy == tfaccum.AccumPolicy.uniform(cfg)
    assert layer.supports_jit is False
    config = layer.get_config()
    json.dumps(config)  # plain data
    clone = AccumConv2D.from_config(config)
    assert clone.policy == layer.policy and clone.kernel_size == (3, 3)
    assert AccumDense(3, policy=REDUCED.to_dict()).policy == REDUCED
    assert AccumDense(3).policy == FULL
    serialized = keras.saving.serialize_keras_object(AccumDense(3, policy=REDUCED))
    assert serialized["registered_name"] == "tfaccum>AccumDense"
    assert keras.saving.deserialize_keras_object(serialized).policy == REDUCED
    layer.policy = REDUCED
    assert layer.policy == REDUCED
    with pytest.raises(TypeError, match="str"):
        AccumDense(3, policy="e6m9")
    with pytest.raises(TypeError, match="None"):
        layer.policy = None


def test_reduced_policy_changes_the_result():
    # The GEMM really goes through tfaccum: a 2-bit mantissa accumulator is visibly off.
    ref, acc = twin_pair(keras.layers.Dense, AccumDense, (8, 64), policy=REDUCED, units=8)
    x = rand(8, 64)
    assert not np.allclose(acc(x), ref(x), rtol=1e-3)
    acc.policy = FULL
    assert_close(acc(x), ref(x))


def test_operand_format():
    # AccumPolicy(operands=F): the GEMM sees both inputs rounded to F; bias stays float32.
    policy = tfaccum.AccumPolicy(operands=tfaccum.FP8_E5M2)
    for keras_cls, accum_cls, shape, kwargs in [
            (keras.layers.Dense, AccumDense, (3, 5), dict(units=4)),
            (keras.layers.Conv2D, AccumConv2D, (1, 5, 5, 2), dict(filters=3, kernel_size=3))]:
        ref, acc = twin_pair(keras_cls, accum_cls, shape, policy=policy,
                             bias_initializer="ones", **kwargs)
        x = rand(*shape)
        ref.kernel.assign(tfaccum.quantize(ref.kernel, tfaccum.FP8_E5M2))
        assert_close(acc(x), ref(tfaccum.quantize(x, tfaccum.FP8_E5M2)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(acc(x) ** 2)
        assert all(np.isfinite(g).all() for g in tape.gradient(loss, acc.trainable_variables))


def test_mixed_precision_and_keras_quantization():
    layer = AccumDense(4, dtype="mixed_float16")
    y = layer(rand(2, 3))
    assert y.dtype == tf.float16
    layer = AccumConv2D(2, 3, dtype="mixed_bfloat16")
    assert layer(rand(1, 5, 5, 3)).dtype == tf.bfloat16
    dense = AccumDense(4)
    dense.build((2, 3))
    with pytest.raises(NotImplementedError, match="operands"):
        dense.quantize("int8")


def test_keras_file_loads_in_fresh_process(tmp_path):
    inp = keras.Input((6, 6, 2))
    x = AccumConv2D(3, 3, padding="same", policy=REDUCED, name="conv")(inp)
    x = keras.layers.Flatten()(x)
    out = AccumDense(4, activation="softmax", name="head",
                     policy=tfaccum.AccumConfig(accumulator="bfloat16"))(x)
    model = keras.Model(inp, out)
    path = tmp_path / "m.keras"
    model.save(path)
    x = rand(2, 6, 6, 2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    script = textwrap.dedent(f"""
        import json, os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        import keras, numpy as np
        import tfaccum
        model = keras.models.load_model({str(path)!r})
        y = model(np.load({str(tmp_path / "x.npy")!r})).numpy()
        np.testing.assert_array_equal(y, np.load({str(tmp_path / "y.npy")!r}))
        print(json.dumps({{l.name: [type(l).__name__, l.policy.to_dict()]
                          for l in model.layers if hasattr(l, "policy")}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(tfaccum.__file__)))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {
        "conv": ["AccumConv2D", REDUCED.to_dict()],
        "head": ["AccumDense", model.get_layer("head").policy.to_dict()],
    }
