"""Keras layers whose GEMMs accumulate in narrow floats.

``AccumDense`` and ``AccumConv2D`` are drop-in versions of ``keras.layers.Dense`` and
``keras.layers.Conv2D`` (subclasses, so every feature and ``isinstance`` check of the
originals still holds) that compute their matrix products through ``tfaccum.accum_matmul``
and ``tfaccum.accum_conv2d`` under an :class:`~tfaccum.AccumPolicy`; ``AccumConv1D``,
``AccumDepthwiseConv1D/2D``, ``AccumSeparableConv1D/2D`` and ``AccumConv1DTranspose/2DTranspose``
do the same for the other Keras convolutions, ``AccumEinsumDense`` for ``EinsumDense``
(through ``tfaccum.accum_einsum``), and ``AccumMultiHeadAttention`` /
``AccumGroupedQueryAttention`` for attention, projections and both attention products
(``TWINS`` lists them all)::

    >>> import keras, tfaccum
    >>> policy = tfaccum.AccumPolicy(fwd=tfaccum.AccumConfig("e6m9", chunk_size=64))
    >>> layer = tfaccum.layers.AccumDense(10, activation="relu", policy=policy)

The three GEMMs of each layer (numerics.md section 5), with ``B`` the batch size:

==============  ==========================  ==============  ==========================
layer           FWD ``y = x.w``             BWD ``dx``      GRAD ``dw``
==============  ==========================  ==============  ==========================
AccumDense      ``in_features``             ``units``       ``B`` x extra leading dims
AccumConv2D     ``KH.KW.Cin/groups``        ``KH.KW.Cout/groups``   ``B.OH.OW``
==============  ==========================  ==============  ==========================

The other convolutions' lengths are in :func:`tfaccum.inventory.gemm_rows` (and
numerics.md section 5, which says how each maps onto the 2-D ops).

Bias additions and activations are ordinary float32 (or the layer's compute dtype).
Operands in another compute dtype (mixed precision) are cast to float32 for the GEMM and
the result is cast back. ``Dense`` on inputs of rank above 2 reshapes them to 2-D so that
the GEMM is one ``[B*..., in] x [in, units]`` product. ``Conv2D`` with
``data_format="channels_first"`` is transposed to NHWC around the op (the order of each
sum is unchanged); ``groups > 1`` runs one op per group (with the stochastic element
indices of the whole output, numerics §4).

**Stochastic rounding and the training step.** The draws of a stochastic GEMM are keyed
by its seed and a *step* (numerics §4). A layer takes its step from its
``step_counter``, which :func:`set_step_counter` points at a checkpointed counter,
normally the optimizer's ``iterations``::

    >>> stochastic = tfaccum.AccumConfig("e6m9", rounding="stochastic", seed=1)
    >>> model = keras.Sequential([keras.Input((16,)), layer,
    ...                           tfaccum.layers.AccumDense(2, policy=stochastic)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> tfaccum.set_step_counter(model, model.optimizer.iterations)  # the layers it set
    2

Every training step then draws fresh bits, the same ones for the same ``(seed, step)``
on any device and thread count, and a run restored from a checkpoint that holds the
counter continues the stream where it stopped. Without a counter the step is 0: every
call draws the same bits, and the first training call of a stochastic layer warns
(:class:`StepCounterWarning`). Under ``tf.distribute`` every replica reads the same
counter value, so the replicas of one step share its stream.

Both layers set ``supports_jit = False`` (XLA has no kernel for the tfaccum ops), carry
their policy in ``get_config()`` (as ``AccumPolicy.to_dict()``) and are registered with
Keras under the package ``"tfaccum"``, so a ``.keras`` file loads in a fresh process once
``tfaccum`` is imported. Keras' own weight quantization (``layer.quantize("int8")``)
is not available on these layers: use ``AccumPolicy(operands=...)`` to round the GEMM
inputs instead.
"""

from __future__ import annotations

import warnings
from typing import Optional

import keras
import tensorflow as tf

from tfaccum.config import AccumPolicy
from tfaccum.ops import accum_conv2d, accum_conv2d_transpose, accum_einsum, accum_matmul
from tfaccum.scope import PolicyLike, accumulation_scope, coerce_policy, register_twin

__all__ = ["AccumDense", "AccumConv2D", "AccumConv1D", "AccumDepthwiseConv2D",
           "AccumDepthwiseConv1D", "AccumSeparableConv2D", "AccumSeparableConv1D",
           "AccumConv2DTranspose", "AccumConv1DTranspose", "AccumEinsumDense",
           "AccumMultiHeadAttention", "AccumGroupedQueryAttention", "ATTENTION",
           "coerce_policy", "set_step_counter", "StepCounterWarning", "TWINS"]


class StepCounterWarning(UserWarning):
    """A stochastic tfaccum layer trains without a step counter: its draws repeat."""


class _StepState:
    """A layer's step counter (and whether the current call trains), held in a plain
    object: Keras and TensorFlow track variables assigned to layer attributes as the
    layer's own weights, while the counter belongs to (and is saved with) its owner,
    such as the optimizer."""

    __slots__ = ("counter", "training", "warned")

    def __init__(self):
        self.counter = None
        self.training = None
        self.warned = False


def _check_counter(counter):
    if counter is None or callable(counter) and not hasattr(counter, "dtype"):
        return counter
    dtype = getattr(counter, "dtype", None)
    if dtype is None or not tf.as_dtype(dtype).is_integer:
        raise TypeError("step_counter must be None, an integer variable or tensor (such as "
                        "optimizer.iterations) or a callable returning one, got "
                        f"{type(counter).__name__} of dtype {dtype}")
    return counter


def set_step_counter(model, counter) -> int:
    """Points every tfaccum layer of ``model`` (nested layers and models included) at
    ``counter`` for its stochastic-rounding step; returns how many layers it set.

    ``counter``: an integer variable, normally ``model.optimizer.iterations`` (Keras
    increments it once per applied step and saves it with the optimizer, so a restored
    run continues the stream); an integer scalar tensor or a callable returning one; or
    ``None`` for step 0. Set it before the training function is traced (before ``fit``):
    the layers read it when traced.
    """
    counter = _check_counter(counter)
    layers = model._flatten_layers(include_self=True, recursive=True) \
        if hasattr(model, "_flatten_layers") else [model]
    count = 0
    for layer in layers:
        if isinstance(layer, _AccumMixin):
            layer.step_counter = counter
            count += 1
    return count


class _AccumMixin:
    """The policy attribute, serialization and guards shared by the tfaccum layers."""

    def _keras_default_name(self, kwargs):
        # Inside accumulation_scope, keras.layers.Dense(...) gets the name a Dense would.
        base = vars(self).pop("_tfaccum_keras_name", None)
        if base is not None and kwargs.get("name") is None:
            from keras.src.utils.naming import auto_name

            kwargs["name"] = auto_name(base)
        return kwargs

    def _init_accum(self, policy):
        self._accum_policy = coerce_policy(policy)
        self._tfaccum_step = _StepState()
        # Keras turns XLA on whenever a GPU is visible; XLA has no kernel for our ops.
        self.supports_jit = False
        if self.quantization_mode is not None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' cannot use the Keras quantized dtype "
                f"policy {self.dtype_policy.name!r}; use AccumPolicy(operands=...) to round "
                "the GEMM inputs instead")

    @property
    def policy(self) -> AccumPolicy:
        """The layer's AccumPolicy (FWD, BWD and GRAD configs, optional operand format).

        Assigning a new policy takes effect in functions traced afterwards: recompile
        the model (``model.compile(...)``) after changing it on a model already trained.
        """
        return self._accum_policy

    @policy.setter
    def policy(self, value: PolicyLike):
        if value is None:
            raise TypeError("policy must be a tfaccum.AccumPolicy or AccumConfig, got None")
        self._accum_policy = coerce_policy(value)

    @property
    def step_counter(self):
        """Where the stochastic-rounding step comes from (see :func:`set_step_counter`):
        ``None`` (step 0), an integer variable or tensor, or a callable returning one. Not
        part of ``get_config()``: it is wiring to a training run, not configuration."""
        return self._tfaccum_step.counter

    @step_counter.setter
    def step_counter(self, counter):
        self._tfaccum_step.counter = _check_counter(counter)

    def __setattr__(self, name, value):
        # Keras tracks a variable assigned to any attribute as the layer's own state, even
        # through a property: the counter must reach the property setter untracked.
        if name == "step_counter":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _current_step(self, training):
        """The step input of this call's ops: the counter's value (read when the op runs)."""
        state = self._tfaccum_step
        counter = state.counter
        if counter is None:
            stochastic = any(getattr(self._accum_policy, g).rounding == "stochastic"
                             for g in ("fwd", "bwd", "grad"))
            if training and stochastic and not state.warned:
                state.warned = True
                warnings.warn(
                    f"{type(self).__name__} '{self.name}' rounds stochastically but has no "
                    "step counter, so every training step draws the same random bits; call "
                    "tfaccum.set_step_counter(model, model.optimizer.iterations) before "
                    "training", StepCounterWarning, stacklevel=3)
            return 0
        if callable(counter) and not hasattr(counter, "dtype"):
            counter = counter()
        return tf.convert_to_tensor(counter)

    def get_config(self):
        config = super().get_config()
        config["policy"] = self._accum_policy.to_dict()
        return config

    def quantize(self, mode=None, config=None, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} does not support Keras quantization ({mode!r}); round "
            "the GEMM inputs with tfaccum.AccumPolicy(operands=...) instead")

    def _as_float32(self, tensor):
        tensor = tf.convert_to_tensor(tensor)
        return tensor if tensor.dtype == tf.float32 else tf.cast(tensor, tf.float32)

    def _bias_and_activation(self, y):
        """The float32 GEMM result in the layer's compute dtype, plus its bias, through
        its activation: what a Dense-like layer does after its product."""
        if y.dtype != self.compute_dtype:
            y = tf.cast(y, self.compute_dtype)
        if self.bias is not None:
            y = keras.ops.add(y, self.bias)
        if self.activation is not None:
            y = self.activation(y)
        return y


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumDense(_AccumMixin, keras.layers.Dense):
    """``keras.layers.Dense`` whose product ``inputs . kernel`` goes through
    ``tfaccum.accum_matmul`` under ``policy``.

    Args:
      units, ...: exactly those of ``keras.layers.Dense``.
      policy: a ``tfaccum.AccumPolicy`` (FWD/BWD/GRAD configs), an ``AccumConfig`` used
        for all three GEMMs, or a dict from ``AccumPolicy.to_dict()``. ``None`` takes the
        policy of the enclosing ``tfaccum.accumulation_scope`` (full precision outside).

    An input of shape ``[B, d1, ..., in]`` is multiplied as a ``[B*d1*..., in]`` matrix:
    FWD sums ``in`` products, BWD ``units`` and GRAD ``B*d1*...``.
    """

    def __init__(self, units, *args, policy: Optional[PolicyLike] = None, **kwargs):
        super().__init__(units, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def call(self, inputs, training=None):
        if isinstance(inputs, tf.SparseTensor):
            inputs = tf.sparse.to_dense(inputs)
        kernel = self._as_float32(self.kernel)
        x = self._as_float32(inputs)
        in_features = kernel.shape[0]
        step = self._current_step(training)
        if x.shape.rank == 2:
            y = accum_matmul(x, kernel, self._accum_policy, step=step)
        else:
            lead = tf.shape(x)[:-1]
            y = accum_matmul(tf.reshape(x, [-1, in_features]), kernel, self._accum_policy,
                             step=step)
            y = tf.reshape(y, tf.concat([lead, [self.units]], axis=0))
            y.set_shape(x.shape[:-1].concatenate([self.units]))
        return self._bias_and_activation(y)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumConv2D(_AccumMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose convolution goes through ``tfaccum.accum_conv2d``
    under ``policy``.

    Args:
      filters, kernel_size, ...: exactly those of ``keras.layers.Conv2D`` (strides,
        ``"valid"``/``"same"`` padding, dilation, both data formats, groups).
      policy: as for :class:`AccumDense`.

    FWD sums ``KH*KW*Cin/groups`` products per output, BWD ``KH*KW*Cout/groups`` and
    GRAD ``B*OH*OW``.
    """

    def __init__(self, filters, kernel_size, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(filters, kernel_size, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def call(self, inputs, training=None):
        # Conv2D.call has no `training`; convolution_op (called from it) reads it here.
        self._tfaccum_step.training = training
        try:
            return super().call(inputs)
        finally:
            self._tfaccum_step.training = None

    def convolution_op(self, inputs, kernel):
        out_dtype = inputs.dtype
        x = self._as_float32(inputs)
        w = self._as_float32(kernel)
        channels_first = self.data_format == "channels_first"
        if channels_first:
            x = tf.transpose(x, [0, 2, 3, 1])
        # groups > 1: accum_conv2d runs one op per group (w is [KH, KW, Cin/groups, Cout]).
        y = accum_conv2d(x, w, self._accum_policy, strides=tuple(self.strides),
                         padding=self.padding.upper(), dilations=tuple(self.dilation_rate),
                         step=self._current_step(self._tfaccum_step.training))
        if channels_first:
            y = tf.transpose(y, [0, 3, 1, 2])
        return y if y.dtype == out_dtype else tf.cast(y, out_dtype)


class _ConvTwin(_AccumMixin):
    """``call`` of the convolution twins below: every GEMM runs on channels-last 2-D
    images (a 1-D layer's sequence is a height-1 image, its kernel a height-1 kernel, so
    each sum and its order are those of the 1-D convolution), then bias and activation
    as Keras applies them. Subclasses define ``_gemms(x, step)`` on NHWC ``x``."""

    def call(self, inputs, training=None):
        x = self._as_float32(inputs)
        spatial = list(range(1, self.rank + 1))
        channels_first = self.data_format == "channels_first"
        if channels_first:
            x = tf.transpose(x, [0] + [d + 1 for d in spatial] + [1])
        if self.rank == 1:
            x = tf.expand_dims(x, 1)
        y = self._gemms(x, self._current_step(training))
        if self.rank == 1:
            y = tf.squeeze(y, 1)
        if y.dtype != self.compute_dtype:
            y = tf.cast(y, self.compute_dtype)
        if self.use_bias:  # elementwise: adding before the transpose back is the same sum
            y = keras.ops.add(y, self.bias)
        if channels_first:
            y = tf.transpose(y, [0, self.rank + 1] + spatial)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def _2d(self, value) -> tuple:
        """A per-axis setting of the layer for the 2-D op (height 1 for a 1-D layer)."""
        value = tuple(int(v) for v in value)
        return (1,) + value if self.rank == 1 else value

    def _kernel_2d(self, kernel):
        kernel = self._as_float32(kernel)
        return tf.expand_dims(kernel, 0) if self.rank == 1 else kernel

    def _depthwise(self, x, kernel, step):
        """The depthwise convolution of NHWC ``x`` by ``kernel`` ``[KH, KW, Cin, M]``: a
        grouped convolution with ``Cin`` groups of one input channel, kernel
        ``[KH, KW, 1, Cin*M]``. The reshape puts multiplier ``m`` of channel ``c`` at
        output channel ``c*M + m``, which is where Keras (``tf.nn.depthwise_conv2d``)
        puts it, and that is the one input channel group ``c`` reads."""
        k = self._kernel_2d(kernel)
        kh, kw, cin, mult = k.shape
        w = tf.reshape(k, [kh, kw, 1, cin * mult])
        return accum_conv2d(x, w, self._accum_policy, strides=self._2d(self.strides),
                            padding=self.padding.upper(),
                            dilations=self._2d(self.dilation_rate), step=step)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumConv1D(_ConvTwin, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` (all paddings, ``"causal"`` included, strides, dilation,
    groups, both data formats) through ``tfaccum.accum_conv2d`` as a height-1 image.

    FWD sums ``K*Cin/groups`` products per output, BWD ``K*filters/groups``, GRAD
    ``B*OW``. Causal padding is ``dilation*(K-1)`` zeros on the left, as Keras pads.
    """

    def __init__(self, filters, kernel_size, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(filters, kernel_size, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def _gemms(self, x, step):
        if self.padding == "causal":
            padding = [(0, 0), (self.dilation_rate[0] * (self.kernel_size[0] - 1), 0)]
        else:
            padding = self.padding.upper()
        return accum_conv2d(x, self._kernel_2d(self.kernel), self._accum_policy,
                            strides=self._2d(self.strides), padding=padding,
                            dilations=self._2d(self.dilation_rate), step=step)


class _AccumDepthwise(_ConvTwin):
    """FWD sums ``K`` products per output (``KH*KW`` in 2-D), BWD ``K*depth_multiplier``,
    GRAD ``B`` times the output's spatial size."""

    def __init__(self, kernel_size, *args, policy: Optional[PolicyLike] = None, **kwargs):
        super().__init__(kernel_size, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def _gemms(self, x, step):
        return self._depthwise(x, self.kernel, step)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumDepthwiseConv2D(_AccumDepthwise, keras.layers.DepthwiseConv2D):
    __doc__ = ("``keras.layers.DepthwiseConv2D`` as a grouped ``tfaccum.accum_conv2d`` "
               "(one group per input channel). " + _AccumDepthwise.__doc__)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumDepthwiseConv1D(_AccumDepthwise, keras.layers.DepthwiseConv1D):
    __doc__ = ("``keras.layers.DepthwiseConv1D`` as a grouped ``tfaccum.accum_conv2d`` "
               "on a height-1 image. " + _AccumDepthwise.__doc__)


class _AccumSeparable(_ConvTwin):
    """Two GEMM sets under the one policy: the depthwise convolution (FWD ``K``, BWD
    ``K*depth_multiplier``, GRAD ``B*OH*OW``), then the pointwise 1x1 convolution of its
    float32 output (FWD ``Cin*depth_multiplier``, BWD ``filters``, GRAD ``B*OH*OW``), as
    Keras computes it. Both draw in the layer's step, each at its own output's indices."""

    def __init__(self, filters, kernel_size, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(filters, kernel_size, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def _gemms(self, x, step):
        z = self._depthwise(x, self.depthwise_kernel, step)
        return accum_conv2d(z, self._kernel_2d(self.pointwise_kernel), self._accum_policy,
                            strides=1, padding="VALID", step=step)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumSeparableConv2D(_AccumSeparable, keras.layers.SeparableConv2D):
    __doc__ = "``keras.layers.SeparableConv2D`` through tfaccum. " + _AccumSeparable.__doc__


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumSeparableConv1D(_AccumSeparable, keras.layers.SeparableConv1D):
    __doc__ = "``keras.layers.SeparableConv1D`` through tfaccum. " + _AccumSeparable.__doc__


class _AccumTranspose(_ConvTwin):
    """The transposed convolution through ``tfaccum.accum_conv2d_transpose`` (the input
    gradient op of a convolution), with Keras' output size (``"valid"``/``"same"``,
    ``output_padding``, strides, dilation). FWD sums ``K*Cin`` products per output (``K``
    the kernel's size), BWD (a forward convolution of ``dy``) ``K*filters``, GRAD
    ``B`` times the *input's* spatial size."""

    def __init__(self, filters, kernel_size, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(filters, kernel_size, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def _gemms(self, x, step):
        from keras.src.backend.common.backend_utils import (
            compute_conv_transpose_output_shape)

        strides, dilations = self._2d(self.strides), self._2d(self.dilation_rate)
        kernel_size = self._2d(self.kernel_size)
        output_padding = self.output_padding
        if output_padding is not None and self.rank == 1:
            output_padding = (0,) + tuple(output_padding)  # height 1 stays 1
        # Keras' own output size (its TensorFlow backend computes it so), on the static
        # dims where known and the dynamic ones elsewhere.
        dynamic = tf.shape(x, out_type=tf.int64)
        dims = [d if d is not None else dynamic[i] for i, d in enumerate(x.shape)]
        shape = compute_conv_transpose_output_shape(
            dims, kernel_size, self.filters, strides, self.padding, output_padding,
            "channels_last", dilations)
        for axis in (1, 2):
            size, out = x.shape[axis], shape[axis]
            if size is not None and isinstance(out, int):
                k = (kernel_size[axis - 1] - 1) * dilations[axis - 1] + 1
                s = strides[axis - 1]
                back = -(-out // s) if self.padding == "same" else (out - k) // s + 1
                if back != size:  # the convolution of the output must give the input
                    raise ValueError(
                        f"{type(self).__name__} {self.name!r}: output_padding="
                        f"{self.output_padding} gives an output of size {out} on spatial "
                        f"axis {axis - (self.rank == 1)}, whose {self.padding!r} "
                        f"convolution has size {back}, not the input's {size}")
        sizes = tf.stack([tf.cast(d, tf.int64) for d in shape])
        y = accum_conv2d_transpose(x, self._kernel_2d(self.kernel), sizes, self._accum_policy,
                                   strides=strides, padding=self.padding.upper(),
                                   dilations=dilations, step=step)
        y.set_shape([d if isinstance(d, int) else None for d in shape])
        return y


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumConv2DTranspose(_AccumTranspose, keras.layers.Conv2DTranspose):
    __doc__ = "``keras.layers.Conv2DTranspose`` through tfaccum. " + _AccumTranspose.__doc__


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumConv1DTranspose(_AccumTranspose, keras.layers.Conv1DTranspose):
    __doc__ = ("``keras.layers.Conv1DTranspose`` through tfaccum (a height-1 image). "
               + _AccumTranspose.__doc__)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumEinsumDense(_AccumMixin, keras.layers.EinsumDense):
    """``keras.layers.EinsumDense`` whose product ``einsum(equation, inputs, kernel)`` goes
    through ``tfaccum.accum_einsum`` under ``policy`` (numerics §8): FWD sums the
    contracted indices, BWD (``dx``) the kernel's free indices, GRAD (``dkernel``) the
    input's free indices (the batch among them). ``"abc,cd->abd"`` is a ``Dense``:
    FWD ``c``, BWD ``d``, GRAD ``a*b``."""

    def __init__(self, equation, output_shape, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(equation, output_shape, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)

    def call(self, inputs, training=None):
        y = accum_einsum(self.equation, self._as_float32(inputs),
                         self._as_float32(self.kernel), self._accum_policy,
                         step=self._current_step(training))
        return self._bias_and_activation(y)


class _AttentionTwin(_AccumMixin):
    """The two attention products of ``MultiHeadAttention`` / ``GroupedQueryAttention``
    through ``tfaccum.accum_einsum``, and their projections as :class:`AccumEinsumDense`
    layers, all under the layer's one policy and step (numerics §8):

    * ``attn/qk``, the scores ``Q.K^T`` of each head: FWD sums the head size (``key_dim``
      / ``head_dim``), BWD (``dq``) the key sequence, GRAD (``dk``) the query sequence;
    * ``attn/av``, the output ``A.V`` of each head: FWD sums the key sequence, BWD (the
      scores' gradient) ``value_dim``, GRAD (``dv``) the query sequence.

    The query is the first operand of both (so ``dq`` and the scores' gradient take the
    policy's ``bwd``, ``dk`` and ``dv`` its ``grad``). The query's scaling, the masks, the
    softmax and the dropout are ordinary float32, as Keras computes them (its explicit
    path: the fused ``dot_product_attention`` is not used)."""

    #: the Keras dot-product equation lists the key first (MultiHeadAttention)
    _KEY_FIRST = False

    def build(self, query_shape, value_shape, key_shape=None):
        # Keras constructs the projections (EinsumDense) here: inside the scope they are
        # AccumEinsumDense layers with this layer's policy. (Keras matches the argument
        # names of build with those of call, so the signature is the originals'.)
        with accumulation_scope(self._accum_policy):
            super().build(query_shape, value_shape, key_shape)

    @property
    def policy(self) -> AccumPolicy:
        """The AccumPolicy of the attention products and of the projections."""
        return self._accum_policy

    @policy.setter
    def policy(self, value: PolicyLike):
        _AccumMixin.policy.fset(self, value)
        for sub in self._flatten_layers(include_self=False, recursive=True):
            if isinstance(sub, _AccumMixin):
                sub.policy = self._accum_policy

    def _attention_einsum(self, equation, a, b, training):
        dtype = a.dtype
        y = accum_einsum(equation, self._as_float32(a), self._as_float32(b),
                         self._accum_policy, step=self._current_step(training))
        return y if y.dtype == dtype else tf.cast(y, dtype)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        if use_causal_mask:  # Keras' call passes it only to its own _compute_attention
            causal = self._compute_causal_mask(query, value)
            attention_mask = causal if attention_mask is None else keras.ops.logical_and(
                keras.ops.cast(attention_mask, "bool"), causal)
        scale = getattr(self, "_inverse_sqrt_key_dim", None)
        if scale is None:
            scale = self._inverse_sqrt_head_dim
        query = keras.ops.multiply(query, keras.ops.cast(scale, query.dtype))
        equation = self._dot_product_equation
        if self._KEY_FIRST:  # "key,query->scores" as "query,key->scores"
            lhs, out = equation.split("->")
            key_term, query_term = lhs.split(",")
            equation = f"{query_term},{key_term}->{out}"
        scores = self._attention_einsum(equation, query, key, training)
        scores = self._masked_softmax(scores, attention_mask)
        rate = getattr(self, "_dropout", None)
        rate = self.dropout if rate is None else rate
        dropped = self._dropout_layer(scores, training=training) if rate > 0.0 else scores
        output = self._attention_einsum(self._combine_equation, dropped, value, training)
        return output, scores


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumMultiHeadAttention(_AttentionTwin, keras.layers.MultiHeadAttention):
    __doc__ = "``keras.layers.MultiHeadAttention`` through tfaccum. " + _AttentionTwin.__doc__
    _KEY_FIRST = True

    def __init__(self, num_heads, key_dim, *args, policy: Optional[PolicyLike] = None,
                 **kwargs):
        super().__init__(num_heads, key_dim, *args, **self._keras_default_name(kwargs))
        self._init_accum(policy)


@keras.saving.register_keras_serializable(package="tfaccum")
class AccumGroupedQueryAttention(_AttentionTwin, keras.layers.GroupQueryAttention):
    __doc__ = ("``keras.layers.GroupQueryAttention`` through tfaccum. Keras repeats each "
               "key/value head for its query heads, so a shared head's gradient is the "
               "float32 sum of theirs (outside the emulation, like a broadcast operand's, "
               "numerics §8). " + _AttentionTwin.__doc__)

    def __init__(self, head_dim, num_query_heads, num_key_value_heads, *args,
                 policy: Optional[PolicyLike] = None, **kwargs):
        super().__init__(head_dim, num_query_heads, num_key_value_heads, *args,
                         **self._keras_default_name(kwargs))
        self._init_accum(policy)


#: The attention twins (layers whose projections are tfaccum sublayers).
ATTENTION = (AccumMultiHeadAttention, AccumGroupedQueryAttention)

#: The exact Keras class each tfaccum layer stands in for.
TWINS = {
    keras.layers.Dense: AccumDense,
    keras.layers.Conv2D: AccumConv2D,
    keras.layers.Conv1D: AccumConv1D,
    keras.layers.DepthwiseConv2D: AccumDepthwiseConv2D,
    keras.layers.DepthwiseConv1D: AccumDepthwiseConv1D,
    keras.layers.SeparableConv2D: AccumSeparableConv2D,
    keras.layers.SeparableConv1D: AccumSeparableConv1D,
    keras.layers.Conv2DTranspose: AccumConv2DTranspose,
    keras.layers.Conv1DTranspose: AccumConv1DTranspose,
    keras.layers.EinsumDense: AccumEinsumDense,
    keras.layers.MultiHeadAttention: AccumMultiHeadAttention,
    keras.layers.GroupQueryAttention: AccumGroupedQueryAttention,
}
for _base, _twin in TWINS.items():  # what tfaccum.accumulation_scope constructs instead
    register_twin(_base, _twin)
del _base, _twin
