"""Tests of tfaccum.models: architectures, names, shapes, parameter counts, training."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum import models  # noqa: E402


def _gemm_layers(model):
    return [l for l in model.layers if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]


def _trainable(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def test_registry():
    assert set(models.MODELS) == {"resnet32", "resnet18", "alexnet", "digits_cnn", "vit_tiny"}
    assert models.get("resnet32") is models.resnet32
    with pytest.raises(ValueError, match="unknown model"):
        models.get("vgg16")


def test_resnet32_structure():
    model = models.resnet32()
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    convs = [l for l in _gemm_layers(model) if isinstance(l, keras.layers.Conv2D)]
    main = [l for l in convs if not l.name.endswith("_shortcut")]
    shortcuts = [l for l in convs if l.name.endswith("_shortcut")]
    # 6n + 2 = 32 weighted layers: 31 3x3 convs and the classifier (option-B shortcuts aside).
    assert len(main) == 31 and all(l.kernel_size == (3, 3) for l in main)
    assert [l.name for l in shortcuts] == ["stage2_block1_shortcut", "stage3_block1_shortcut"]
    assert all(l.kernel_size == (1, 1) and l.strides == (2, 2) for l in shortcuts)
    for stage, (filters, size) in enumerate(((16, 32), (32, 16), (64, 8)), start=1):
        for block in range(1, 6):
            layer = model.get_layer(f"stage{stage}_block{block}_conv2")
            assert layer.filters == filters and layer.output.shape[1:3] == (size, size)
    assert model.layers[-1].name == "predictions"
    assert model.get_layer("predictions").kernel.shape == (64, 10)
    # He et al.: 0.46M parameters with option A; option B adds the two projections.
    assert 460_000 < _trainable(model) < 475_000


def test_resnet18_matches_the_reference_parameter_count():
    model = models.resnet18()
    assert model.output_shape == (None, 1000)
    assert len(_gemm_layers(model)) == 21  # 17 3x3/7x7 convs, 3 projections, 1 dense
    assert _trainable(model) == 11_689_512  # torchvision resnet18
    assert model.get_layer("conv1").output.shape[1:] == (112, 112, 64)
    assert model.get_layer("stage4_block2_conv2").output.shape[1:] == (7, 7, 512)


def test_alexnet_matches_the_single_tower_parameter_count():
    model = models.alexnet()
    assert model.output_shape == (None, 1000)
    assert [l.name for l in _gemm_layers(model)] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "predictions"]
    assert model.get_layer("conv1").output.shape[1:] == (55, 55, 96)
    assert model.get_layer("fc6").kernel.shape == (9216, 4096)
    assert _trainable(model) == 62_378_344


@pytest.mark.parametrize("name,shape,classes", [("resnet32", (32, 32, 3), 10),
                                                 ("resnet18", (64, 64, 3), 7),
                                                 ("alexnet", (64, 64, 3), 5),
                                                 ("digits_cnn", (8, 8, 1), 10)])
def test_forward_pass(name, shape, classes):
    model = models.get(name)(input_shape=shape, classes=classes)
    x = np.random.default_rng(0).standard_normal((2,) + shape).astype("float32")
    y = model(x, training=False).numpy()
    assert y.shape == (2, classes)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)  # softmax by default
    logits = models.get(name)(input_shape=shape, classes=classes, classifier_activation=None)
    assert logits.get_layer("predictions").activation is keras.activations.linear


def test_options_and_errors():
    model = models.digits_cnn(activation="tanh", weight_decay=1e-4)
    assert model.get_layer("conv1").activation is keras.activations.tanh
    assert model.get_layer("fc1").kernel_regularizer is not None
    for bad in (dict(input_shape=(8, 8)), dict(input_shape=(8, 8, 0)), dict(classes=1),
                dict(classes=2.5), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            models.digits_cnn(**bad)
    with pytest.raises(ValueError, match="64x64"):
        models.alexnet(input_shape=(32, 32, 3))


def test_digits_cnn_learns_and_rewrites():
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    model = models.digits_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x[:1200], y[:1200], batch_size=64, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.evaluate(x[1200:], y[1200:], verbose=0)[1] > 0.8
    # Plain Keras layers only: tfaccum.rewrite turns them into tfaccum layers.
    emulated = tfaccum.rewrite(model, tfaccum.FULL_PRECISION)
    assert all(isinstance(l, (tfaccum.layers.AccumDense, tfaccum.layers.AccumConv2D))
               for l in _gemm_layers(emulated))
    np.testing.assert_allclose(emulated(x[:8]).numpy(), model(x[:8]).numpy(), atol=1e-5)
