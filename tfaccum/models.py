"""The networks of Sakr et al. (ICLR 2019) as plain Keras Functional models.

Every builder takes ``input_shape`` (channels last) and ``classes`` and returns an
uncompiled ``keras.Model`` made of standard ``keras.layers`` (``Conv2D``, ``Dense``,
``BatchNormalization``, ``ReLU``, pooling), so :func:`tfaccum.rewrite` and
:func:`tfaccum.analysis.predict` apply to it directly. The last ``Dense`` layer is named
``"predictions"`` (the layer the paper keeps at high precision)::

    >>> import tfaccum
    >>> model = tfaccum.models.resnet32(input_shape=(32, 32, 3), classes=10)
    >>> model.layers[-1].name
    'predictions'
    >>> model = tfaccum.models.get("resnet18")(classes=1000)

=============  ==================  ===========================================================
builder        default input       architecture
=============  ==================  ===========================================================
``resnet32``   (32, 32, 3), 10     CIFAR ResNet of He et al. (2016, section 4.2): 3x3 conv 16,
                                   three stages of five basic blocks (16, 32, 64 channels,
                                   stride 2 at the start of stages 2 and 3), global average
                                   pooling, dense. Shortcuts: identity, and **option B**
                                   (1x1 conv, stride 2, + BN) where the shape changes
                                   (two places): standard layers only, no Lambda.
``resnet18``   (224, 224, 3), 1000 ImageNet ResNet-18 (He et al. 2016): 7x7/2 conv 64,
                                   3x3/2 max pool, four stages of two basic blocks (64, 128,
                                   256, 512), option-B projection shortcuts, global average
                                   pooling, dense.
``alexnet``    (224, 224, 3), 1000 AlexNet (Krizhevsky et al. 2012), **single-tower
                                   variant**: the original channel counts (96, 256, 384,
                                   384, 256) without the two-GPU grouping and without local
                                   response normalization; dense 4096-4096-classes with
                                   dropout 0.5. Needs inputs of at least 64x64.
``digits_cnn`` (8, 8, 1), 10       A small CNN for scikit-learn's 8x8 digits: conv 3x3 32,
                                   conv 3x3 64, 2x2 max pool, dense 128, dense classes.
``vit_tiny``   (8, 8, 1), 10       A ViT-style encoder for the digits: 2x2 patches as 16
                                   tokens (a 2x2/2 conv, width 32, plus learned positions),
                                   two pre-norm blocks of multi-head attention (4 heads of
                                   8) and an MLP (64, GELU), average over tokens, layer
                                   norm, dense classes. Its attention products sum 8 (QKᵀ,
                                   the head size) and 16 (AV, the tokens) products.
=============  ==================  ===========================================================

Common keyword arguments: ``classifier_activation`` (``"softmax"`` by default as in
``keras.applications``; ``None`` for logits), ``weight_decay`` (L2 factor on the kernels,
0 by default), ``name``. ``digits_cnn`` also takes ``activation`` (``"relu"``; e.g.
``"tanh"`` for a network without ReLU sparsity).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import keras
from keras import layers

__all__ = ["resnet32", "resnet18", "alexnet", "digits_cnn", "vit_tiny", "PositionEmbedding",
           "MODELS", "get"]

_BN = dict(momentum=0.9, epsilon=1e-5)


def _check_common(input_shape, classes) -> Tuple[tuple, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any((not isinstance(d, int)) or d <= 0 for d in shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, "
                         f"got {input_shape!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    return shape, classes


def _regularizer(weight_decay: float):
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return keras.regularizers.L2(weight_decay) if weight_decay else None


def _conv(x, filters, kernel, strides, name, reg, padding="same", use_bias=False):
    return layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=use_bias,
                         kernel_initializer="he_normal", kernel_regularizer=reg,
                         name=name)(x)


def _basic_block(x, filters, strides, name, reg):
    """Two 3x3 convs with BN and ReLU; projection (1x1 conv + BN) when the shape changes."""
    shortcut = x
    y = _conv(x, filters, 3, strides, f"{name}_conv1", reg)
    y = layers.BatchNormalization(name=f"{name}_bn1", **_BN)(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, filters, 3, 1, f"{name}_conv2", reg)
    y = layers.BatchNormalization(name=f"{name}_bn2", **_BN)(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, strides, f"{name}_shortcut", reg)
        shortcut = layers.BatchNormalization(name=f"{name}_shortcut_bn", **_BN)(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def _classifier(x, classes, activation, reg):
    return layers.Dense(classes, activation=activation, kernel_regularizer=reg,
                        name="predictions")(x)


def resnet32(input_shape: Sequence[int] = (32, 32, 3), classes: int = 10, *,
             classifier_activation: Optional[str] = "softmax", weight_decay: float = 0.0,
             blocks_per_stage: int = 5, name: str = "resnet32") -> keras.Model:
    """CIFAR ResNet-32 (He et al. 2016): 6n+2 layers with n = ``blocks_per_stage`` = 5.

    Layers: ``conv1`` (3x3, 16), ``stage{1,2,3}_block{1..5}_conv{1,2}``, projection
    shortcuts ``stage2_block1_shortcut`` and ``stage3_block1_shortcut`` (option B),
    ``predictions``.
    """
    shape, classes = _check_common(input_shape, classes)
    reg = _regularizer(weight_decay)
    inputs = keras.Input(shape=shape, name="image")
    x = _conv(inputs, 16, 3, 1, "conv1", reg)
    x = layers.BatchNormalization(name="conv1_bn", **_BN)(x)
    x = layers.ReLU(name="conv1_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, blocks_per_stage + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}", reg)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _classifier(x, classes, classifier_activation, reg)
    return keras.Model(inputs, outputs, name=name)


def resnet18(input_shape: Sequence[int] = (224, 224, 3), classes: int = 1000, *,
             classifier_activation: Optional[str] = "softmax", weight_decay: float = 0.0,
             name: str = "resnet18") -> keras.Model:
    """ImageNet ResNet-18 (He et al. 2016), basic blocks [2, 2, 2, 2].

    Layers: ``conv1`` (7x7/2, 64), ``stage{1..4}_block{1,2}_conv{1,2}``, projection
    shortcuts ``stage{2,3,4}_block1_shortcut``, ``predictions``.
    """
    shape, classes = _check_common(input_shape, classes)
    reg = _regularizer(weight_decay)
    inputs = keras.Input(shape=shape, name="image")
    x = _conv(inputs, 64, 7, 2, "conv1", reg)
    x = layers.BatchNormalization(name="conv1_bn", **_BN)(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in (1, 2):
            strides = 2 if (stage > 1 and block == 1) else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}", reg)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _classifier(x, classes, classifier_activation, reg)
    return keras.Model(inputs, outputs, name=name)


def alexnet(input_shape: Sequence[int] = (224, 224, 3), classes: int = 1000, *,
            classifier_activation: Optional[str] = "softmax", weight_decay: float = 0.0,
            dropout: float = 0.5, name: str = "alexnet") -> keras.Model:
    """AlexNet, single-tower (no grouped convs, no LRN), original channel counts.

    Layers: ``conv1`` (11x11/4, 96, input zero-padded by 2 so 224 gives 55x55),
    ``conv2`` (5x5, 256), ``conv3`` (3x3, 384), ``conv4`` (3x3, 384), ``conv5`` (3x3,
    256), 3x3/2 max pools after conv1, conv2 and conv5, ``fc6`` (4096), ``fc7`` (4096),
    ``predictions``.
    """
    shape, classes = _check_common(input_shape, classes)
    if shape[0] < 64 or shape[1] < 64:
        raise ValueError(f"alexnet needs inputs of at least 64x64, got {shape}")
    reg = _regularizer(weight_decay)
    inputs = keras.Input(shape=shape, name="image")
    x = layers.ZeroPadding2D(2, name="conv1_pad")(inputs)
    x = _conv(x, 96, 11, 4, "conv1", reg, padding="valid", use_bias=True)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = _conv(x, 256, 5, 1, "conv2", reg, use_bias=True)
    x = layers.ReLU(name="conv2_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    for i, filters in ((3, 384), (4, 384), (5, 256)):
        x = _conv(x, filters, 3, 1, f"conv{i}", reg, use_bias=True)
        x = layers.ReLU(name=f"conv{i}_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
        x = layers.Dense(4096, activation="relu", kernel_regularizer=reg, name=f"fc{i}")(x)
    outputs = _classifier(x, classes, classifier_activation, reg)
    return keras.Model(inputs, outputs, name=name)


def digits_cnn(input_shape: Sequence[int] = (8, 8, 1), classes: int = 10, *,
               activation: str = "relu", classifier_activation: Optional[str] = "softmax",
               weight_decay: float = 0.0, filters: Sequence[int] = (16, 32), units: int = 64,
               name: str = "digits_cnn") -> keras.Model:
    """A small CNN for 8x8x1 digits: ``conv1`` (3x3, ``filters[0]``), ``conv2`` (3x3,
    ``filters[1]``), 2x2 max pool, ``fc1`` (``units``), ``predictions``; ``activation``
    after every hidden layer. The default widths keep the emulated tightness experiment
    (20 trainings) within minutes on two CPU cores."""
    shape, classes = _check_common(input_shape, classes)
    if (len(tuple(filters)) != 2 or any(isinstance(f, bool) or not isinstance(f, int) or f < 1
                                        for f in filters)):
        raise ValueError(f"filters must be two ints >= 1, got {filters!r}")
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"units must be an int >= 1, got {units!r}")
    reg = _regularizer(weight_decay)
    inputs = keras.Input(shape=shape, name="image")
    x = layers.Conv2D(filters[0], 3, padding="same", activation=activation,
                      kernel_regularizer=reg, name="conv1")(inputs)
    x = layers.Conv2D(filters[1], 3, padding="same", activation=activation,
                      kernel_regularizer=reg, name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(units, activation=activation, kernel_regularizer=reg, name="fc1")(x)
    outputs = _classifier(x, classes, classifier_activation, reg)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="tfaccum")
class PositionEmbedding(layers.Layer):
    """Adds a learned vector per token position to ``[batch, tokens, width]`` inputs (no
    GEMM: an elementwise float32 addition)."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]), name="positions",
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, inputs):
        return inputs + keras.ops.cast(self.positions, inputs.dtype)


def vit_tiny(input_shape: Sequence[int] = (8, 8, 1), classes: int = 10, *,
             patch_size: int = 2, width: int = 32, heads: int = 4, blocks: int = 2,
             mlp_units: int = 64, classifier_activation: Optional[str] = "softmax",
             weight_decay: float = 0.0, name: str = "vit_tiny") -> keras.Model:
    """A small vision transformer for the 8x8 digits: ``patch_embed`` (a ``patch_size``
    convolution of stride ``patch_size``, ``width`` channels) makes one token per patch,
    ``positions`` adds learned position vectors, then ``blocks`` pre-norm encoder blocks
    ``block<i>_attn`` (``keras.layers.MultiHeadAttention``, ``heads`` heads of
    ``width / heads``) and ``block<i>_mlp1``/``_mlp2`` (GELU), each with a residual; the
    tokens are averaged, normalized and classified by ``predictions``. Every GEMM is a
    Conv2D, Dense, EinsumDense or attention product: :func:`tfaccum.rewrite` emulates all
    of them. The defaults train the emulated tightness experiment in minutes on two CPU
    cores."""
    shape, classes = _check_common(input_shape, classes)
    for label, value in (("patch_size", patch_size), ("width", width), ("heads", heads),
                         ("blocks", blocks), ("mlp_units", mlp_units)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    if shape[0] % patch_size or shape[1] % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the image {shape[:2]}")
    if width % heads:
        raise ValueError(f"width {width} does not split into {heads} heads")
    reg = _regularizer(weight_decay)
    tokens = (shape[0] // patch_size) * (shape[1] // patch_size)
    inputs = keras.Input(shape=shape, name="image")
    x = layers.Conv2D(width, patch_size, strides=patch_size, kernel_regularizer=reg,
                      name="patch_embed")(inputs)
    x = layers.Reshape((tokens, width), name="tokens")(x)
    x = PositionEmbedding(name="positions")(x)
    for i in range(1, blocks + 1):
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = layers.MultiHeadAttention(heads, width // heads, kernel_regularizer=reg,
                                      name=f"block{i}_attn")(y, y)
        x = layers.Add(name=f"block{i}_add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = layers.Dense(mlp_units, activation="gelu", kernel_regularizer=reg,
                         name=f"block{i}_mlp1")(y)
        y = layers.Dense(width, kernel_regularizer=reg, name=f"block{i}_mlp2")(y)
        x = layers.Add(name=f"block{i}_add2")([x, y])
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    outputs = _classifier(x, classes, classifier_activation, reg)
    return keras.Model(inputs, outputs, name=name)


#: Builders by name (the ``--model`` flag values of ``python -m tfaccum.analysis`` and the driver).
MODELS: Dict[str, Callable[..., keras.Model]] = {
    "resnet32": resnet32,
    "resnet18": resnet18,
    "alexnet": alexnet,
    "digits_cnn": digits_cnn,
    "vit_tiny": vit_tiny,
}


def get(name: str) -> Callable[..., keras.Model]:
    """The builder called ``name`` (ValueError listing the choices otherwise)."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of "
                         f"{', '.join(sorted(MODELS))}") from None
