"""tfaccum.rewrite, tfaccum.accumulation_scope and tfaccum.summary (tfaccum.model_rewrite,
tfaccum.scope, tfaccum.model_summary and the lengths of tfaccum.inventory)."""

import os
import re
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum.layers import TWINS, AccumConv2D, AccumDense  # noqa: E402
from tfaccum.inventory import gemm_lengths  # noqa: E402
from tfaccum.model_rewrite import NotEmulatedWarning  # noqa: E402

FULL = tfaccum.AccumPolicy()
NARROW = tfaccum.AccumPolicy.uniform(
    tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(6, 7), chunk_size=16))
EMULATED = (AccumDense, AccumConv2D)

RNG = np.random.default_rng(1)


def rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def assert_close(actual, expected, rtol=1e-5, scale=None):
    """Equal to float32 accuracy, relative to ``scale`` (default: expected's magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max() if scale is None else scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def all_layers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def gemm_layers(model):
    """name -> layer for every layer of a class tfaccum emulates (plain or tfaccum: Dense,
    the convolutions of TWINS) anywhere in the model."""
    return {l.name: l for l in all_layers(model) if isinstance(l, tuple(TWINS))}


def check_replaced(original, rewritten, expected_names, policy=FULL):
    before, after = gemm_layers(original), gemm_layers(rewritten)
    assert set(before) == set(after)
    for name, layer in before.items():
        assert type(layer) in TWINS, "the original model must not be modified"
        new = after[name]
        if name in expected_names:
            assert type(new) is TWINS[type(layer)], name
            assert new.policy == policy
        else:
            assert type(new) is type(layer), name
        config, new_config = layer.get_config(), dict(new.get_config())
        new_config.pop("policy", None)
        assert new_config == config
        for w, new_w in zip(layer.weights, new.weights):
            np.testing.assert_array_equal(w.numpy(), new_w.numpy())


def grads(model, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return loss, tape.gradient(loss, model.trainable_variables)


def check_same_training_step(original, rewritten, x, y, rtol=1e-5):
    assert_close(rewritten(x), original(x), rtol)
    loss0, g0 = grads(original, x, y)
    loss1, g1 = grads(rewritten, x, y)
    assert_close(loss1, loss0, rtol)
    assert [v.path.split("/")[-2:] for v in original.trainable_variables] == \
        [v.path.split("/")[-2:] for v in rewritten.trainable_variables]
    # A conv bias followed by BatchNorm has a zero gradient up to rounding noise: judge
    # each gradient against the largest gradient entry of the model.
    scale = max(float(np.abs(g).max()) for g in g0)
    for a, b in zip(g1, g0):
        assert_close(a, b, rtol, scale)


# --------------------------------------------------------------------------------------
# Models


def resnet_style():
    """Functional: skip connections, BatchNorm, a nested Sequential block, a shared layer."""
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    block = keras.Sequential([
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="block_conv1"),
        keras.layers.BatchNormalization(name="block_bn1"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="block_conv2"),
        keras.layers.BatchNormalization(name="block_bn2"),
    ], name="block")
    x = keras.layers.ReLU()(keras.layers.Add()([x, block(x)]))
    shortcut = keras.layers.Conv2D(12, 1, strides=2, name="proj")(x)
    y = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu",
                            name="down")(x)
    x = keras.layers.Add()([shortcut, y])
    shared = keras.layers.Conv2D(12, 1, name="shared")  # called twice
    x = shared(keras.layers.ReLU()(shared(x)))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="resnet_style")


def sequential_cnn(input_shape=(8, 8, 1)):
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", name="fc"),
        keras.layers.Dense(10, name="logits"),
    ], name="cnn")


@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(0)
    return resnet_style()


# --------------------------------------------------------------------------------------
# Rewriting


def test_resnet_style_functional(resnet):
    x, y = rand(4, 8, 8, 3), RNG.integers(0, 10, 4)
    new = tfaccum.rewrite(resnet, FULL)
    assert new is not resnet and new.name == resnet.name
    assert [l.name for l in new.layers] == [l.name for l in resnet.layers]
    expected = {"stem", "block_conv1", "block_conv2", "proj", "down", "shared", "fc",
                "logits"}
    check_replaced(resnet, new, expected)
    assert isinstance(new.get_layer("block"), keras.Sequential)
    assert len(new.get_layer("shared")._inbound_nodes) == 2  # still shared
    assert set(new.tfaccum_report.replaced) == expected
    check_same_training_step(resnet, new, x, y)
    # Training the rewritten model leaves the original alone.
    weights_before = [w.numpy().copy() for w in resnet.weights]
    new.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    new.train_on_batch(x, y)
    assert not np.array_equal(new.get_layer("fc").kernel.numpy(),
                              resnet.get_layer("fc").kernel.numpy())
    for w, before in zip(resnet.weights, weights_before):
        np.testing.assert_array_equal(w.numpy(), before)


def test_sequential_cnn():
    keras.utils.set_random_seed(1)
    model = sequential_cnn()
    new = tfaccum.rewrite(model, tfaccum.FLOAT32)  # an AccumConfig: all three GEMMs
    assert isinstance(new, keras.Sequential)
    check_replaced(model, new, {"conv1", "conv2", "fc", "logits"})
    check_same_training_step(model, new, rand(4, 8, 8, 1), RNG.integers(0, 10, 4))
    # Rewriting a rewritten model replaces the policies.
    again = tfaccum.rewrite(new, NARROW, layers=["fc"])
    assert again.get_layer("fc").policy == NARROW
    assert again.get_layer("conv1").policy == FULL


def test_sequential_without_input_built_by_a_call():
    model = keras.Sequential([keras.layers.Dense(6, activation="relu"),
                              keras.layers.Dense(3)])
    x = rand(5, 4)
    y = model(x)
    new = tfaccum.rewrite(model, FULL)
    assert all(isinstance(l, AccumDense) for l in new.layers)
    assert_close(new(x), y)


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_keras_applications(name):
    keras.utils.set_random_seed(2)
    # Logits rather than softmax probabilities: a stricter comparison.
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3),
                                               classes=10, classifier_activation=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        new = tfaccum.rewrite(model, FULL)
    expected = set(gemm_layers(model))
    depthwise = {l.name for l in all_layers(model)
                 if isinstance(l, keras.layers.DepthwiseConv2D)}
    assert len(depthwise) == (0 if name == "ResNet50" else 17)
    assert len(expected) == (54 if name == "ResNet50" else 36 + 17)
    check_replaced(model, new, expected)
    # Every GEMM is emulated: the 17 depthwise convolutions of MobileNetV2 too.
    assert new.tfaccum_report.not_emulated == ()
    assert set(new.tfaccum_report.replaced) == expected
    assert not [w for w in rec if issubclass(w.category, NotEmulatedWarning)]
    x = rand(2, 32, 32, 3)
    assert_close(new(x), model(x))


def test_fit_digits_under_narrow_accumulators():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int32")
    keras.utils.set_random_seed(3)
    model = tfaccum.rewrite(sequential_cnn(), NARROW)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss)
    assert loss < np.log(10)  # it learns: below the loss of a uniform guess
    assert all(l.policy == NARROW for l in model.layers if isinstance(l, EMULATED))


# --------------------------------------------------------------------------------------
# Selection


def rewritten_names(model):
    return {l.name for l in all_layers(model) if isinstance(l, EMULATED)}


ALL_RESNET = {"stem", "block_conv1", "block_conv2", "proj", "down", "shared", "fc", "logits"}


def test_exclude_first_and_last(resnet):
    new = tfaccum.rewrite(resnet, NARROW, exclude=["stem", "logits"])
    assert rewritten_names(new) == ALL_RESNET - {"stem", "logits"}
    assert set(new.tfaccum_report.kept) == {"stem", "logits"}


def test_select_by_regex_and_callable(resnet):
    assert rewritten_names(tfaccum.rewrite(resnet, NARROW, layers="block_.*")) == \
        {"block_conv1", "block_conv2"}
    # A str is a full match: "conv" alone names no layer.
    with pytest.warns(UserWarning) as record:
        tfaccum.rewrite(resnet, NARROW, layers="conv")
    messages = " ".join(str(w.message) for w in record)
    assert "'conv' matches no layer" in messages and "no layer" in messages
    assert rewritten_names(tfaccum.rewrite(resnet, NARROW, layers=re.compile(r".*conv\d"),
                                           exclude="block_conv2")) == {"block_conv1"}
    pointwise = tfaccum.rewrite(
        resnet, NARROW,
        layers=lambda l: isinstance(l, keras.layers.Conv2D) and l.kernel_size == (1, 1))
    assert rewritten_names(pointwise) == {"proj", "shared"}
    # A nested model's name stands for the layers inside it.
    assert rewritten_names(tfaccum.rewrite(resnet, NARROW, exclude=["block"])) == \
        ALL_RESNET - {"block_conv1", "block_conv2"}


def test_per_layer_mapping_and_plan(resnet):
    mapping = {"stem": NARROW, "fc": tfaccum.AccumConfig(accumulator="bfloat16"),
               "block": FULL}
    new = tfaccum.rewrite(resnet, mapping)
    assert rewritten_names(new) == {"stem", "fc", "block_conv1", "block_conv2"}
    assert new.get_layer("stem").policy == NARROW
    assert new.get_layer("fc").policy.grad.accumulator == tfaccum.BFLOAT16
    assert new.get_layer("block").get_layer("block_conv2").policy == FULL

    class Plan:
        def policies(self):
            return {"logits": NARROW, "down": NARROW}

    new = tfaccum.rewrite(resnet, Plan(), exclude=["down"])
    assert rewritten_names(new) == {"logits"}


def test_errors(resnet):
    with pytest.raises(TypeError, match="str"):
        tfaccum.rewrite(resnet, "e6m7")
    with pytest.raises(TypeError, match="FloatFormat"):
        tfaccum.rewrite(resnet, tfaccum.FloatFormat(6, 7))
    with pytest.raises(TypeError, match="'fc'.*int"):
        tfaccum.rewrite(resnet, {"fc": 3})
    with pytest.raises(ValueError, match="'stme'.*did you mean 'stem'"):
        tfaccum.rewrite(resnet, FULL, exclude=["stme"])
    with pytest.raises(ValueError, match="'nope'"):
        tfaccum.rewrite(resnet, FULL, layers=["fc", "nope"])
    with pytest.raises(ValueError, match="'nope'"):
        tfaccum.rewrite(resnet, {"nope": FULL})
    with pytest.raises(ValueError, match="stem_bn.*BatchNormalization"):
        tfaccum.rewrite(resnet, FULL, layers=["stem_bn"])
    with pytest.raises(TypeError, match="callable"):
        tfaccum.rewrite(resnet, FULL, exclude=3)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(TypeError, match=r"subclassed.*tfaccum\.accumulation_scope"):
        tfaccum.rewrite(Subclassed(), FULL)


def test_not_emulated_layers_are_reported():
    class MyDense(keras.layers.Dense):
        pass

    inp = keras.Input((6, 4))
    # Conv3D: a convolution tfaccum has no twin for (Conv1D has one now)
    x = keras.layers.Reshape((6, 2, 2, 1))(inp)
    x = keras.layers.Conv3D(1, 1, name="c1d")(x)
    x = keras.layers.Reshape((6, 4))(x)
    x = keras.layers.EinsumDense("btc,cd->btd", output_shape=(None, 5), name="ein")(x)  # a twin
    x = keras.layers.TimeDistributed(keras.layers.Dense(3), name="td")(x)
    x = MyDense(3, name="mine")(x)
    x = keras.layers.Dense(2, name="plain")(x)
    model = keras.Model(inp, x)
    with pytest.warns(NotEmulatedWarning, match="c1d.*td.*mine"):
        new = tfaccum.rewrite(model, FULL)
    assert rewritten_names(new) == {"plain"}  # see rewritten_names: Dense/Conv2D only
    assert [n for n, _ in new.tfaccum_report.not_emulated] == ["c1d", "td", "mine"]
    assert type(new.get_layer("ein")).__name__ == "AccumEinsumDense"
    text = tfaccum.summary(new, print_fn=None)
    assert "c1d (Conv3D)" in text and "mine (MyDense (a subclass of Dense))" in text


# --------------------------------------------------------------------------------------
# accumulation_scope


class TwoLayerNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.pool(self.conv(x)))


def test_accumulation_scope_subclassed_model():
    from keras.layers import Dense  # bound before the scope: still redirected

    keras.utils.set_random_seed(4)
    reference = TwoLayerNet()
    x = rand(2, 5, 5, 3)
    y = reference(x)
    with tfaccum.accumulation_scope(NARROW) as policy:
        assert policy == NARROW
        model = TwoLayerNet()
        bound = Dense(2)
        with tfaccum.accumulation_scope(tfaccum.FLOAT32):
            inner = keras.layers.Dense(2)
        after = keras.layers.Conv2D(2, 1)
        explicit = AccumDense(2, policy=FULL)
    outside = keras.layers.Dense(2)
    assert type(model.conv) is AccumConv2D and type(model.head) is AccumDense
    assert model.head.policy == NARROW and bound.policy == NARROW
    assert inner.policy == FULL and after.policy == NARROW and explicit.policy == FULL
    assert type(outside) is keras.layers.Dense
    assert model.head.name.startswith("dense") and model.conv.name.startswith("conv2d")
    assert "__new__" not in vars(keras.layers.Dense)
    assert "__new__" not in vars(keras.layers.Conv2D)
    model(x)
    model.set_weights(reference.get_weights())
    model.head.policy = model.conv.policy = FULL
    assert_close(model(x), y)
    text = tfaccum.summary(model, batch_size=7, print_fn=None)
    assert "AccumConv2D" in text and "AccumDense" in text


def test_accumulation_scope_restores_on_error():
    with pytest.raises(RuntimeError):
        with tfaccum.accumulation_scope(NARROW):
            raise RuntimeError("boom")
    assert type(keras.layers.Dense(2)) is keras.layers.Dense
    assert "__new__" not in vars(keras.layers.Dense)
    with pytest.raises(TypeError, match="None"):
        with tfaccum.accumulation_scope(None):
            pass


# --------------------------------------------------------------------------------------
# summary


def test_summary_lengths():
    inp = keras.Input((9, 9, 3))
    x = keras.layers.Conv2D(8, (3, 2), strides=2, padding="valid", name="c")(inp)  # 4x4
    x = keras.layers.Conv2D(6, 3, padding="same", groups=2, name="g")(x)
    x = keras.layers.Reshape((16, 6))(x)
    x = keras.layers.Dense(5, name="d3")(x)  # rank-3 input: [B*16, 6] x [6, 5]
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(4, name="d")(x)
    model = tfaccum.rewrite(keras.Model(inp, out), NARROW, exclude=["d"])
    batch = 32
    rows = {r.layer: r for r in gemm_lengths(model, batch_size=batch)}
    assert set(rows) == {"c", "g", "d3"}
    #                     FWD KH*KW*Cin/g  BWD KH*KW*Cout/g  GRAD B*OH*OW (or B*extra dims)
    assert (rows["c"].fwd, rows["c"].bwd, rows["c"].grad) == (3 * 2 * 3, 3 * 2 * 8,
                                                              batch * 4 * 4)
    assert (rows["g"].fwd, rows["g"].bwd, rows["g"].grad) == (3 * 3 * 4, 3 * 3 * 3,
                                                              batch * 4 * 4)
    assert (rows["d3"].fwd, rows["d3"].bwd, rows["d3"].grad) == (6, 5, batch * 16)
    assert rows["c"].policy == NARROW
    printed = []
    text = tfaccum.summary(model, batch_size=batch, print_fn=printed.append)
    assert printed == [text]
    line = next(l for l in text.splitlines() if l.startswith("c (AccumConv2D)"))
    assert line.split()[5:9] == ["3)", "FWD", "18", "e6m7,"]
    assert "e6m7, exact products, chunk 16, nearest-even" in line
    assert f"{batch * 16}" in text and "d (Dense, not rewritten)" in text
    no_batch = {r.layer: r for r in gemm_lengths(model)}
    assert no_batch["c"].grad is None and no_batch["c"].grad_per_example == 16
    assert "B*16" in tfaccum.summary(model, print_fn=None)


def test_summary_rows_follow_the_model_order_into_nested_layers():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first = keras.layers.Dense(4, name="block_first")
            self.second = keras.layers.Dense(3, name="block_second")

        def call(self, x):
            return self.second(self.first(x))

    with tfaccum.accumulation_scope(NARROW):
        inner = keras.Sequential([keras.layers.Dense(5, name="inner_first"),
                                  keras.layers.Dense(4, name="inner_second")], name="inner")
        inp = keras.Input((6,))
        out = keras.layers.Dense(2, name="last")(Block(name="block")(inner(inp)))
        model = keras.Model(inp, out)
    assert [r.layer for r in gemm_lengths(model, batch_size=8)] == [
        "inner_first", "inner_second", "block_first", "block_second", "last"]
    assert [r.fwd for r in gemm_lengths(model)] == [6, 5, 4, 4, 3]


def test_rewriting_still_exports_its_names():
    # tfaccum.rewriting was split into scope, model_rewrite, model_summary and inventory;
    # code that imported from it keeps working.
    from tfaccum import inventory, model_rewrite, model_summary, rewriting, scope

    assert rewriting.rewrite is model_rewrite.rewrite is tfaccum.rewrite
    assert rewriting.summary is model_summary.summary is tfaccum.summary
    assert rewriting.accumulation_scope is scope.accumulation_scope is \
        tfaccum.accumulation_scope
    assert rewriting.current_scope_policy is scope.current_scope_policy
    assert rewriting.gemm_lengths is inventory.gemm_lengths
    assert rewriting.GemmLengths is inventory.GemmLengths
    assert rewriting.RewriteReport is model_rewrite.RewriteReport
    assert rewriting.NotEmulatedWarning is NotEmulatedWarning
    assert tfaccum.layers.coerce_policy is scope.coerce_policy
