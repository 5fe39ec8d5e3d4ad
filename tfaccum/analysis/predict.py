"""Predict the accumulator precision of every GEMM of a Keras model.

:func:`predict` takes the ``Dense`` and ``Conv2D`` layers of a model (tfaccum's
``AccumDense``/``AccumConv2D`` are subclasses and count too) and the accumulation length
of each layer's FWD, BWD and GRAD GEMMs from :mod:`tfaccum.inventory` (numerics.md
section 5), and computes their **effective lengths**: the number of non-zero products,
because a zero product (a ReLU zero in the activations, a zero back-propagated error, a
padding tap, a tap that a strided convolution's input gradient skips) neither swamps
nor is swamped.
:func:`measure_sparsity` counts them exactly on real batches passed through the model
under a ``GradientTape``:

* FWD: ``y = x . w`` -- per output, the products with ``x != 0`` and ``w != 0``;
* BWD: ``dx = dy . w^T`` -- per input-gradient element, ``dy != 0`` and ``w != 0`` (``dy``
  is the gradient of the loss with respect to the layer's pre-activation output);
* GRAD: ``dw = x^T . dy`` -- per weight, the positions with ``x != 0`` and ``dy != 0``;

each averaged over all outputs of the GEMM. The sparsity is ``1 - mean count / length``.
The predicted bits are then :func:`tfaccum.analysis.min_mantissa_bits` of the effective
length. In a chunked accumulation the zeros still occupy their slots, so a chunk of
``c`` products holds ``c * (1 - sparsity)`` non-zero ones on average: the chunked
prediction uses that effective chunk size.

The other layers tfaccum emulates (separable convolutions, ``EinsumDense``,
``MultiHeadAttention``, ``GroupQueryAttention``) get one plan entry per GEMM set
(:func:`tfaccum.inventory.gemm_rows`: ``depthwise``/``pointwise``; an attention layer's
projections and its per-head ``attn/qk`` and ``attn/av``), named by ``layer`` and
``gemm_set``; their zeros are not measured (none are assumed, unless ``sparsity`` gives
a fraction or a mapping that names the layer), and the layer's one policy takes, per
GEMM, the widest of its sets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import keras
import numpy as np

from tfaccum.analysis.plan import (GEMMS, GemmPrediction, LayerPrediction, PrecisionPlan,
                                   effective_chunk)
from tfaccum.analysis.measure import GemmProbe
from tfaccum.analysis.vrr import (DEFAULT_MAX_RELATIVE_LOSS, min_mantissa_bits,
                                  passes_criterion)
from tfaccum.config import ROUNDING_MODES, as_format
from tfaccum.inventory import (SINGLE_GEMM, call_shapes, gemm_layers, gemm_rows,
                               layer_lengths, planned_layers)

__all__ = ["predict", "walk_gemms", "GemmWalk", "GemmLayer", "measure_statistics",
           "measure_sparsity", "gemm_layers", "layer_lengths",
           "GemmStatistics", "Statistics"]

SparsityLike = Union[str, float, None, Mapping[str, Any]]
_MAX_BITS = 23


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def _split(element) -> Tuple[Any, Any]:
    if isinstance(element, (tuple, list)):
        if not element:
            raise ValueError("empty batch")
        return element[0], (element[1] if len(element) > 1 else None)
    if isinstance(element, Mapping):
        raise TypeError("dict batches are not supported: pass (x, y) tuples or arrays")
    return element, None


def _batches(model, data, batch_size: int, max_batches: int, seed: int):
    """Up to ``max_batches`` (x, y) pairs (y may be None)."""
    if data is None:
        shape = model.input_shape if hasattr(model, "input_shape") else None
        if isinstance(shape, list):
            raise ValueError("data=None needs a single-input model; pass data=")
        if shape is None or any(d is None for d in shape[1:]):
            raise ValueError("data=None needs a model with a fully known input shape; "
                             "pass data=")
        rng = np.random.default_rng(seed)
        for _ in range(max_batches):
            yield rng.standard_normal((batch_size,) + tuple(shape[1:])).astype("float32"), None
        return
    if isinstance(data, tuple) and len(data) in (1, 2) and not _is_dataset(data):
        x = data[0]
        y = data[1] if len(data) == 2 else None
        count = len(x)
        for i in range(max_batches):
            lo = i * batch_size
            if lo >= count:
                break
            yield x[lo:lo + batch_size], (None if y is None else y[lo:lo + batch_size])
        return
    if isinstance(data, np.ndarray) or hasattr(data, "numpy") and hasattr(data, "shape"):
        for i in range(max_batches):
            lo = i * batch_size
            if lo >= len(data):
                break
            yield data[lo:lo + batch_size], None
        return
    for i, element in enumerate(data):  # tf.data.Dataset or any iterable of batches
        if i >= max_batches:
            break
        yield _split(element)


def _is_dataset(data) -> bool:
    return type(data).__name__.endswith("Dataset")


# ---------------------------------------------------------------------------------------
# Sparsity measurement
# ---------------------------------------------------------------------------------------
class _Recorder:
    """Temporarily hooks every GEMM layer to record its input and pre-activation output."""

    def __init__(self, layers, tape, tf):
        self.layers = layers
        self.tape = tape
        self.tf = tf
        self.records: Dict[int, List[list]] = {id(l): [] for l in layers}
        self._saved = []

    def __enter__(self):
        for layer in self.layers:
            self._hook(layer)
        return self

    def _hook(self, layer):
        records = self.records[id(layer)]
        tape = self.tape
        original_call = layer.call
        original_activation = layer.activation
        pending = []

        executing_eagerly = self.tf.executing_eagerly

        # Keras may also call the layer symbolically (to build a subclassed model):
        # only eager calls, whose tensors the tape sees, are recorded.
        def call(inputs, *args, **kwargs):
            if executing_eagerly():
                pending.append(inputs)
            return original_call(inputs, *args, **kwargs)

        def activation(z):
            if executing_eagerly():
                tape.watch(z)
                records.append([pending.pop() if pending else None, z])
            return original_activation(z) if original_activation is not None else z

        had_call = "call" in layer.__dict__
        self._saved.append((layer, had_call, layer.__dict__.get("call"), original_activation))
        object.__setattr__(layer, "call", call)
        object.__setattr__(layer, "activation", activation)

    def __exit__(self, *exc):
        for layer, had_call, call, activation in reversed(self._saved):
            if had_call:
                object.__setattr__(layer, "call", call)
            else:
                object.__delattr__(layer, "call")
            object.__setattr__(layer, "activation", activation)
        self._saved = []
        return False


def _indicator(t, tf):
    return tf.cast(tf.not_equal(t, 0), tf.float32)


def _conv_gemms(layer, x, w, dz, tf):
    """The FWD, BWD and GRAD outputs of a Conv2D layer's GEMMs on (x, w, dz), groups and
    data format as the layer has them (NHWC inside)."""
    if layer.data_format == "channels_first":
        x = tf.transpose(x, [0, 2, 3, 1])
        dz = tf.transpose(dz, [0, 2, 3, 1])
    groups = getattr(layer, "groups", 1) or 1
    split = (lambda t: tf.split(t, groups, axis=-1)) if groups > 1 else (lambda t: [t])
    outs = {g: [] for g in GEMMS}
    for xg, wg, dg in zip(split(x), split(w), split(dz)):
        with tf.GradientTape() as tape:
            tape.watch([xg, wg])
            y = tf.nn.convolution(xg, wg, strides=tuple(layer.strides),
                                  padding=layer.padding.upper(),
                                  dilations=tuple(layer.dilation_rate))
            total = tf.reduce_sum(y * dg)
        gx, gw = tape.gradient(total, [xg, wg])
        for g, t in (("fwd", y), ("bwd", gx), ("grad", gw)):
            outs[g].append(t)
    return outs


def _keras_conv_gemms(layer, x, w, dz, tf):
    """The FWD, BWD and GRAD outputs of the GEMMs of a 1-D, depthwise or transposed
    convolution on (x, w, dz): its Keras convolution (bilinear in x and w, so its
    gradients are the other two GEMMs), in the layer's own data format."""
    import keras

    def conv(x, w):
        settings = dict(strides=layer.strides, dilation_rate=layer.dilation_rate,
                        data_format=layer.data_format)
        if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            return keras.ops.depthwise_conv(x, w, padding=layer.padding, **settings)
        if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)):
            return keras.ops.conv_transpose(x, w, padding=layer.padding,
                                            output_padding=layer.output_padding, **settings)
        if layer.padding == "causal":  # Conv1D: zeros on the left, as the layer pads
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            pads = [[0, 0], [left, 0], [0, 0]] if layer.data_format == "channels_last" \
                else [[0, 0], [0, 0], [left, 0]]
            return keras.ops.conv(keras.ops.pad(x, pads), w, padding="valid", **settings)
        return keras.ops.conv(x, w, padding=layer.padding, **settings)

    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = conv(x, w)
        total = tf.reduce_sum(y * dz)
    gx, gw = tape.gradient(total, [x, w])
    return {"fwd": [y], "bwd": [gx], "grad": [gw]}


def _dense_gemms(layer, x, w, dz, tf):
    x = tf.reshape(x, [-1, x.shape[-1]])
    dz = tf.reshape(dz, [-1, layer.units])
    return {"fwd": [tf.matmul(x, w)], "bwd": [tf.matmul(dz, w, transpose_b=True)],
            "grad": [tf.matmul(x, dz, transpose_a=True)]}


#: Per GEMM and call: [non-zero products, outputs, sum of products, sum of squared
#: products, sum of squared outputs].
_MOMENTS = 5


def _gemm_moments(layer, x, dz, tf, keras) -> Dict[str, List[float]]:
    """The moments :func:`measure_statistics` accumulates, for one call of the layer.

    Every product ``p`` of a GEMM is ``a * b`` for one pair of its operands, so GEMMs of
    the operands' indicators, values and squares give, per output, the number of non-zero
    products, their sum (the output) and the sum of their squares.
    """
    if isinstance(layer, keras.layers.Conv2D):
        gemms = _conv_gemms
    elif isinstance(layer, keras.layers.Dense):
        gemms = _dense_gemms
    else:
        gemms = _keras_conv_gemms
    x = tf.cast(x, tf.float32)
    dz = tf.cast(dz, tf.float32)
    w = tf.cast(layer.kernel, tf.float32)
    counts = gemms(layer, _indicator(x, tf), _indicator(w, tf), _indicator(dz, tf), tf)
    values = gemms(layer, x, w, dz, tf)
    squares = gemms(layer, x * x, w * w, dz * dz, tf)
    out = {}
    for g in GEMMS:
        out[g] = [float(sum(tf.reduce_sum(t) for t in counts[g])),
                  float(sum(int(tf.size(t)) for t in counts[g])),
                  float(sum(tf.reduce_sum(tf.cast(t, tf.float64)) for t in values[g])),
                  float(sum(tf.reduce_sum(tf.cast(t, tf.float64)) for t in squares[g])),
                  float(sum(tf.reduce_sum(tf.square(tf.cast(t, tf.float64)))
                            for t in values[g]))]
    return out


def _looks_like_probabilities(outputs, tf) -> bool:
    sums = tf.reduce_sum(outputs, axis=-1)
    return bool(tf.reduce_all(outputs >= 0)) and bool(
        tf.reduce_all(tf.abs(sums - 1.0) < 1e-3))


def _sparse_ce(labels, outputs, from_logits, tf):
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    outputs = tf.reshape(outputs, [tf.shape(labels)[0], -1])
    if from_logits:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
    picked = tf.gather(outputs, labels, axis=1, batch_dims=1)
    return -tf.math.log(tf.maximum(picked, 1e-12))


def _dense_ce(targets, outputs, from_logits, tf):
    if from_logits:
        return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=outputs)
    return -tf.reduce_sum(targets * tf.math.log(tf.maximum(outputs, 1e-12)), axis=-1)


def _loss_value(outputs, y, loss, tf):
    if loss is not None:
        if y is None:
            raise ValueError("a custom loss needs labels: pass data as (x, y) batches")
        return loss(y, outputs)
    if isinstance(outputs, (list, tuple)):
        raise ValueError("the model has several outputs: pass loss=")
    from_logits = not _looks_like_probabilities(outputs, tf)
    if y is None:
        # No labels: the model's own predictions as targets. The errors still vanish
        # exactly where the network's activations do, which is what sparsity measures.
        labels = tf.stop_gradient(tf.argmax(outputs, axis=-1))
        return tf.reduce_mean(_sparse_ce(labels, outputs, from_logits, tf))
    y = tf.convert_to_tensor(y)
    if y.dtype.is_integer or y.shape.rank == outputs.shape.rank - 1:
        return tf.reduce_mean(_sparse_ce(y, outputs, from_logits, tf))
    return tf.reduce_mean(_dense_ce(tf.cast(y, outputs.dtype), outputs, from_logits, tf))


def measure_statistics(model, data=None, *, batch_size: int = 32, max_batches: int = 4,
                       loss: Optional[Callable] = None, training: bool = True,
                       seed: int = 0, keep_first_batch: bool = False) -> "Statistics":
    """Measure, per GEMM layer (inventory.gemm_layers) and GEMM, what the analysis assumes.

    Real batches go through the model under a ``GradientTape``; for each layer's input
    ``x``, kernel ``w`` and error ``dz`` at its pre-activation output, and for each of its
    three GEMMs (FWD ``x.w``, BWD ``dz.w^T``, GRAD ``x^T.dz``), it measures:

    * ``sparsity``: ``1 - mean non-zero products per output / length``;
    * ``product_mean``, ``product_std``: mean and standard deviation of the non-zero
      products (the first layer's non-negative inputs included, as they are);
    * ``coherence``: ``E[y^2] / E[sum_i p_i^2]`` over the outputs ``y = sum_i p_i``. The
      analysis assumes i.i.d. zero-mean products, for which it is 1; products that add up
      coherently (a common sign, a mean) make it larger, cancelling ones smaller. The
      partial sums' size relative to one product, which sets how much is swamped, scales
      with its square root.

    Args:
      model: a Keras model (Functional, Sequential or subclassed).
      data: ``(x, y)`` arrays, an array ``x``, a ``tf.data.Dataset`` or any iterable of
        ``(x, y)``/``x`` batches; ``None`` draws ``N(0, 1)`` inputs of the model's input
        shape, a stand-in for real data that the result says it is (``synthetic``).
      batch_size: batch size used to slice arrays (and for synthetic inputs).
      max_batches: how many batches to average over.
      loss: ``loss(y_true, y_pred) -> scalar``; default cross-entropy on the labels
        (integer or one-hot; logits or probabilities detected from the outputs), or on
        the model's own arg-max predictions when the batches carry no labels.
      training: call the model in training mode (batch statistics, dropout), as in
        training. Non-trainable variables (BatchNorm moving statistics, RNG state) are
        restored afterwards, so the model is unchanged.
      seed: for synthetic inputs.
      keep_first_batch: keep each layer's ``(x, dz)`` of the first batch (for direct
        measurements with the kernels, :class:`tfaccum.analysis.measure.GemmProbe`).

    Returns:
      A :class:`Statistics`.
    """
    import tensorflow as tf  # noqa: WPS433

    layers = gemm_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no Dense or convolution layer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    sums = {id(l): {g: [0.0] * _MOMENTS for g in GEMMS} for l in layers}
    possible = {id(l): {g: 0.0 for g in GEMMS} for l in layers}
    shapes: Dict[str, List[Tuple[tuple, tuple]]] = {l.name: [] for l in layers}
    first: Dict[str, Tuple[Any, Any]] = {}
    saved = [(v, v.numpy()) for v in model.non_trainable_variables] if training else []
    batches = 0
    try:
        for x, y in _batches(model, data, batch_size, max_batches, seed):
            batches += 1
            with tf.GradientTape(persistent=False) as tape:
                with _Recorder(layers, tape, tf) as recorder:
                    outputs = model(x, training=training)
                value = _loss_value(outputs, y, loss, tf)
            calls = [(layer, rec) for layer in layers for rec in recorder.records[id(layer)]]
            zs = [rec[1] for _, rec in calls]
            grads = tape.gradient(value, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for (layer, (x_in, z)), dz in zip(calls, grads):
                if x_in is None:
                    continue
                x_in = tf.convert_to_tensor(x_in)
                pair = (tuple(x_in.shape), tuple(z.shape))
                if pair not in shapes[layer.name]:
                    shapes[layer.name].append(pair)
                if keep_first_batch and layer.name not in first:
                    first[layer.name] = (x_in.numpy(), dz.numpy())
                moments = _gemm_moments(layer, x_in, dz, tf, keras)
                lengths = layer_lengths(layer, pair[0], pair[1], int(pair[0][0]))
                for g in GEMMS:
                    for i, v in enumerate(moments[g]):
                        sums[id(layer)][g][i] += v
                    possible[id(layer)][g] += moments[g][1] * lengths[g]
    finally:
        for variable, value in saved:
            variable.assign(value)
    if batches == 0:
        raise ValueError("measure_statistics got no batches from data")
    per_layer = {}
    for layer in layers:
        entry = {}
        for g in GEMMS:
            nonzero, outputs, total, total_sq, outputs_sq = sums[id(layer)][g]
            n_possible = possible[id(layer)][g]
            sparsity = 0.0 if n_possible == 0 else min(1.0, max(0.0, 1.0 - nonzero / n_possible))
            mean = total / nonzero if nonzero else None
            std = math.sqrt(max(0.0, total_sq / nonzero - mean * mean)) if nonzero else None
            coherence = outputs_sq / total_sq if total_sq > 0 else None
            entry[g] = GemmStatistics(sparsity=sparsity, product_mean=mean, product_std=std,
                                      coherence=coherence)
        per_layer[layer.name] = entry
    return Statistics(per_layer, shapes, first, synthetic=data is None, batches=batches)


@dataclasses.dataclass(frozen=True)
class GemmStatistics:
    """What :func:`measure_statistics` measured of one GEMM (see there)."""

    sparsity: float
    product_mean: Optional[float]
    product_std: Optional[float]
    coherence: Optional[float]

    def gaussian_model_holds(self) -> bool:
        """Whether the i.i.d. zero-mean model describes the sums to half a bit.

        The swamping the model predicts depends on the partial sums' magnitude in units of
        a product's; ``sqrt(coherence)`` is the factor by which the real magnitude differs
        from the model's. Outside ``[1/2, 2]`` for ``coherence`` the magnitude is off by
        more than ``sqrt(2)``, half a binade: half an accumulator bit.
        """
        return self.coherence is None or 0.5 <= self.coherence <= 2.0


@dataclasses.dataclass
class Statistics:
    """The result of :func:`measure_statistics`."""

    layers: Dict[str, Dict[str, GemmStatistics]]
    shapes: Dict[str, List[Tuple[tuple, tuple]]]
    first_batch: Dict[str, Tuple[Any, Any]]
    synthetic: bool
    batches: int

    def sparsity(self) -> Dict[str, Dict[str, float]]:
        return {name: {g: st.sparsity for g, st in entry.items()}
                for name, entry in self.layers.items()}


def measure_sparsity(model, data=None, *, batch_size: int = 32, max_batches: int = 4,
                     loss: Optional[Callable] = None, training: bool = True,
                     seed: int = 0, return_shapes: bool = False):
    """``{layer_name: {"fwd": s, "bwd": s, "grad": s}}``: the fraction of zero products of
    each GEMM, ``1 - mean non-zero products per output / length``, measured as
    :func:`measure_statistics` does (same arguments). ``data=None`` draws N(0, 1) inputs
    and warns that it does. With ``return_shapes``, also the recorded
    ``{layer_name: [(input_shape, output_shape), ...]}``."""
    if data is None:
        warnings.warn("measure_sparsity without data measures on synthetic N(0, 1) inputs, "
                      "not on real data: pass data=", RuntimeWarning, stacklevel=2)
    stats = measure_statistics(model, data, batch_size=batch_size, max_batches=max_batches,
                               loss=loss, training=training, seed=seed)
    result = stats.sparsity()
    return (result, stats.shapes) if return_shapes else result


# ---------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------
def _sparsity_for(spec, name: str) -> Dict[str, float]:
    if spec is None:
        return {g: 0.0 for g in GEMMS}
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return {g: float(spec) for g in GEMMS}
    if isinstance(spec, Mapping):
        if name not in spec:
            raise ValueError(f"the sparsity mapping has no entry for layer {name!r}")
        entry = spec[name]
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            return {g: float(entry) for g in GEMMS}
        if isinstance(entry, Mapping):
            return {g: float(entry.get(g, 0.0)) for g in GEMMS}
    raise TypeError(f"invalid sparsity entry for layer {name!r}: {spec!r}")


def _check_fraction(value: float, what: str) -> float:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{what} must be a fraction in [0, 1], got {value}")
    return value


def _predict_bits(length: int, effective: int, chunk_size: int, mp: int,
                  criterion_kwargs: Mapping[str, Any], method: str,
                  mc_kwargs) -> Tuple[int, int]:
    """(chunked bits, sequential bits) for one GEMM, from the analytical model (or its
    Monte Carlo)."""
    if effective <= 0:
        return 0, 0
    seq = min_mantissa_bits(effective, mp, 0, method=method, **criterion_kwargs, **mc_kwargs)
    chunk = effective_chunk(chunk_size, length, effective)
    if chunk == 0:
        return seq, seq
    chunked = min_mantissa_bits(effective, mp, chunk, method=method, **criterion_kwargs,
                                **mc_kwargs)
    return chunked, seq


def _measured_bits(probe, gemm: str, batch, passes, policy_for) -> Tuple[int, float]:
    """The smallest width whose retention, measured with the kernels on ``batch``, passes
    the criterion (bisection: retention rises with the width), and that retention."""
    cache: Dict[int, float] = {}

    def retention(m: int) -> float:
        if m not in cache:
            probe.policy = policy_for(m)
            cache[m] = probe.compare(*batch)[gemm].retention
        return cache[m]

    lo, hi = 0, _MAX_BITS
    if not passes(retention(hi)):
        return hi, retention(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(retention(mid)):
            hi = mid
        else:
            lo = mid + 1
    return lo, retention(lo)


@dataclasses.dataclass(frozen=True)
class GemmLayer:
    """One layer of the GEMM walk: its three GEMMs' lengths and sparsities, and what was
    measured of them (None when nothing was)."""

    layer: Any
    lengths: Dict[str, int]
    sparsity: Dict[str, float]
    statistics: Optional[Dict[str, "GemmStatistics"]] = None
    first_batch: Optional[Tuple[Any, Any]] = None
    gemm_set: str = ""  # which GEMMs of a layer of several ("": the layer's one set)

    def effective_length(self, gemm: str) -> int:
        """Non-zero products per output: ``round((1 - sparsity) * length)``."""
        return int(round((1.0 - self.sparsity[gemm]) * self.lengths[gemm]))


@dataclasses.dataclass(frozen=True)
class GemmWalk:
    """Every GEMM layer of a model with its lengths and sparsities (:func:`walk_gemms`),
    the statistics measured (or None) and how the sparsity was obtained, in words."""

    layers: Tuple[GemmLayer, ...]
    stats: Optional["Statistics"]
    description: str
    unmeasured: Tuple[str, ...] = ()  # layers whose sparsity a measurement did not give


def walk_gemms(model, batch_size: int, data=None, sparsity: SparsityLike = "measure", *,
               max_batches: int = 4, measure_batch_size: Optional[int] = None,
               loss: Optional[Callable] = None, training: bool = True, seed: int = 0,
               keep_first_batch: bool = False) -> GemmWalk:
    """The GEMMs a prediction walks (shared by :func:`predict` and
    :func:`tfaccum.analysis.predict_tensor_core`): for each Dense/convolution layer of
    ``model``, the FWD/BWD/GRAD lengths at ``batch_size`` (inventory.layer_lengths, the
    longest over the shapes the layer was called on) and sparsities, measured on ``data``
    (``sparsity="measure"``; synthetic N(0, 1) inputs with a warning when ``data`` is
    None), given (a fraction or a mapping), or none (``None``). Arguments as
    :func:`predict`'s."""
    # Every layer whose GEMMs tfaccum emulates, in model order: those of one GEMM set on
    # one kernel (measured as before), and the others (separable convolutions,
    # EinsumDense, attention), one entry per GEMM set.
    layers = planned_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no Dense or convolution layer")
    stats: Optional[Statistics] = None
    measured_shapes: Dict[str, list] = {}
    if isinstance(sparsity, str):
        if sparsity != "measure":
            raise ValueError(f"sparsity must be 'measure', a fraction, None or a mapping, "
                             f"got {sparsity!r}")
        if data is None:
            warnings.warn("predict without data measures sparsity on synthetic N(0, 1) "
                          "inputs, not on real data: pass data= (the plan says so)",
                          RuntimeWarning, stacklevel=3)
        stats = measure_statistics(
            model, data, batch_size=measure_batch_size or min(batch_size, 32),
            max_batches=max_batches, loss=loss, training=training, seed=seed,
            keep_first_batch=keep_first_batch)
        spec, measured_shapes = stats.sparsity(), stats.shapes
        description = "measured" if data is not None else "measured (synthetic N(0,1) inputs)"
    elif sparsity is None:
        spec, description = None, "none"
    elif isinstance(sparsity, Mapping):
        spec, description = sparsity, "given"
    elif isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        spec = _check_fraction(float(sparsity), "sparsity")
        description = f"given {spec:g}"
    else:
        raise TypeError(f"sparsity must be 'measure', a fraction, None or a mapping, "
                        f"got {type(sparsity).__name__}")

    out, unmeasured = [], []
    for layer in layers:
        if not isinstance(layer, SINGLE_GEMM):
            if isinstance(spec, Mapping) and layer.name not in spec:
                unmeasured.append(layer.name)  # measure_statistics probes SINGLE_GEMM only
                fractions = {g: 0.0 for g in GEMMS}
            else:
                fractions = _sparsity_for(spec, layer.name)
            fractions = {g: _check_fraction(fractions[g], f"sparsity of {layer.name} {g}")
                         for g in GEMMS}
            for row in _gemm_sets(layer, measured_shapes, batch_size):
                lengths = {}
                for g in GEMMS:
                    lengths[g] = getattr(row, g)
                    if lengths[g] is None:
                        raise ValueError(f"layer {layer.name!r} {row.gemm or ''} {g}: a "
                                         "dimension its length needs is unknown")
                out.append(GemmLayer(layer=layer, lengths=lengths, sparsity=fractions,
                                     gemm_set=row.gemm or ""))
            continue
        pairs = call_shapes(layer) or measured_shapes.get(layer.name, [])
        if not pairs:
            raise ValueError(f"layer {layer.name!r} has never been called, so its input "
                             "shape is unknown: call the model on data first or pass data=")
        if len({p for p in pairs}) > 1:
            warnings.warn(f"layer {layer.name!r} is called on several shapes; the plan uses "
                          "the longest accumulation of each GEMM", RuntimeWarning,
                          stacklevel=3)
        lengths = {g: 0 for g in GEMMS}
        for in_shape, out_shape in pairs:
            for g, n in layer_lengths(layer, in_shape, out_shape, batch_size).items():
                lengths[g] = max(lengths[g], n)
        fractions = _sparsity_for(spec, layer.name)
        fractions = {g: _check_fraction(fractions[g], f"sparsity of {layer.name} {g}")
                     for g in GEMMS}
        out.append(GemmLayer(
            layer=layer, lengths=lengths, sparsity=fractions,
            statistics=stats.layers.get(layer.name) if stats is not None else None,
            first_batch=stats.first_batch.get(layer.name) if stats is not None else None))
    return GemmWalk(tuple(out), stats, description, tuple(unmeasured))


def predict(model, batch_size: int, product_mantissa_bits: int = 5, chunk_size: int = 0,
            data=None, sparsity: SparsityLike = "measure", cutoff: float = 50.0,
            exponent_bits: int = 6, *, method: str = "analytical", operands=None,
            product=None, rounding: str = "nearest_even", criterion: str = "bounded",
            max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS, max_batches: int = 4,
            measure_batch_size: Optional[int] = None, loss: Optional[Callable] = None,
            training: bool = True, seed: int = 0, trials: int = 1000,
            direct: bool = True) -> PrecisionPlan:
    """Predict the accumulator mantissa bits of every GEMM of ``model``.

    Each GEMM gets the smallest width that passes ``criterion`` (see
    :func:`tfaccum.analysis.min_mantissa_bits`) for its effective length, under the
    accumulator's own ``rounding``. With ``data``, the statistics the analysis assumes are
    measured on real batches (:func:`measure_statistics`); where the i.i.d. zero-mean model
    is far off (``coherence`` outside [1/2, 2]) and ``direct`` is true, the width is
    instead the smallest whose retention, measured with the real kernels on the first real
    batch, passes the same criterion. The plan records, per GEMM, the retention it
    predicts at the width it chose, and says in ``statistics`` what was measured and what
    assumed.

    Args:
      model: a Keras model; every ``Dense``/``Conv2D`` layer (and tfaccum twin) gets an
        entry, every other layer tfaccum emulates one per GEMM set. Layers must have been called (Functional/Sequential models always are;
        a subclassed model needs ``data`` or must have been called on data).
      batch_size: the training batch size (it sets the GRAD lengths).
      product_mantissa_bits: ``m_p`` of the products (5: FP8 E5M2 operands multiplied
        exactly, as in the paper; 23: float32 operands).
      chunk_size: 0 for sequential accumulation, else the chunk size; the plan then
        also records the sequential prediction of every GEMM.
      data: real batches (see :func:`measure_statistics`). ``None``: nothing real to
        measure: sparsity is measured on synthetic N(0, 1) inputs (with a warning, and the
        plan says so), and no direct measurement is made.
      sparsity: ``"measure"`` (on ``data``), a fraction for every GEMM, ``None`` (no
        zeros: effective length = length), or a mapping ``{layer: fraction or {"fwd": s,
        "bwd": s, "grad": s}}`` (e.g. the output of :func:`measure_sparsity`). Anything
        but ``"measure"`` measures nothing: the model's i.i.d. zero-mean Gaussian products
        are assumed, and the plan says so.
      cutoff: the cut-off of ``v(n) = exp(n (1 - VRR)) < cutoff`` (50).
      exponent_bits: accumulator exponent bits for the plan's policies (6 in the paper).
      method: ``"analytical"`` or ``"monte_carlo"`` (slow: kernels for every GEMM).
      operands, product: recorded in the plan and used by ``plan.policies()`` (operand
        rounding format; product rounding format or None for exact products).
      rounding: the accumulator's rounding mode, used by the prediction and the policies.
      criterion, max_relative_loss: ``"bounded"`` (default) or ``"paper"``, see
        :func:`tfaccum.analysis.passes_criterion`.
      max_batches, measure_batch_size, loss, training, seed: passed to
        :func:`measure_statistics` (``measure_batch_size`` defaults to
        ``min(batch_size, 32)``; batches given as an iterable keep their own size).
      trials: Monte Carlo trials per estimate when ``method="monte_carlo"``.
      direct: measure directly where the model is far off (needs ``data``).

    Returns:
      A :class:`PrecisionPlan`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"predict expects a keras.Model, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be an int >= 0, got {chunk_size!r}")
    if method not in ("analytical", "monte_carlo"):
        raise ValueError(f"method must be 'analytical' or 'monte_carlo', got {method!r}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if isinstance(exponent_bits, bool) or not isinstance(exponent_bits, int) \
            or not 2 <= exponent_bits <= 8:
        raise ValueError(f"exponent_bits must be an int in 2..8, got {exponent_bits!r}")
    if isinstance(product_mantissa_bits, bool) or not isinstance(product_mantissa_bits, int) \
            or not 0 <= product_mantissa_bits <= 23:
        raise ValueError(f"product_mantissa_bits must be an int in 0..23, "
                         f"got {product_mantissa_bits!r}")
    # validates criterion, cutoff and max_relative_loss, and names them for the plan
    passes_criterion(1, 1.0, cutoff, criterion=criterion, max_relative_loss=max_relative_loss)
    operands = None if operands is None else as_format(operands)
    product = None if product is None else as_format(product)
    walk = walk_gemms(model, batch_size, data, sparsity, max_batches=max_batches,
                      measure_batch_size=measure_batch_size, loss=loss, training=training,
                      seed=seed, keep_first_batch=direct and data is not None)
    stats, description = walk.stats, walk.description

    criterion_kwargs = {"cutoff": cutoff, "rounding": rounding, "criterion": criterion,
                        "max_relative_loss": max_relative_loss}
    mc_kwargs = {"trials": trials, "seed": seed} if method == "monte_carlo" else {}
    plan_settings = dict(batch_size=batch_size, product_mantissa_bits=product_mantissa_bits,
                         chunk_size=chunk_size, cutoff=float(cutoff),
                         exponent_bits=exponent_bits, method=method, sparsity=description,
                         operands=operands, product=product, rounding=rounding,
                         model=model.name, criterion=criterion,
                         max_relative_loss=float(max_relative_loss))
    scratch = PrecisionPlan(layers=(), **plan_settings)  # for analytical retentions

    def policy_for(m: int):
        return scratch.policies_for_bits(m)

    entries, measured_gemms = [], []
    for gemm_layer in walk.layers:
        layer, lengths, fractions = gemm_layer.layer, gemm_layer.lengths, gemm_layer.sparsity
        layer_stats, batch = gemm_layer.statistics, gemm_layer.first_batch
        probe = None
        gemms = {}
        for g in GEMMS:
            s = fractions[g]
            n = lengths[g]
            effective = int(round((1.0 - s) * n))
            chunked, seq = _predict_bits(n, effective, chunk_size, product_mantissa_bits,
                                         criterion_kwargs, method, mc_kwargs)
            st = layer_stats[g] if layer_stats is not None else None
            prediction = GemmPrediction(
                length=n, effective_length=effective, sparsity=s, mantissa_bits=chunked,
                sequential_mantissa_bits=seq if chunk_size else None,
                coherence=None if st is None else st.coherence,
                product_mean=None if st is None else st.product_mean,
                product_std=None if st is None else st.product_std)
            if (st is not None and not st.gaussian_model_holds() and batch is not None
                    and effective > 0):
                if probe is None:
                    probe = GemmProbe(layer, policy_for(chunked), input_shape=batch[0].shape)
                # The retention comes from the measured batch: for GRAD, whose length is
                # set by the batch size, measure at the training batch size (the driver
                # does) for it to apply.
                passes = functools.partial(_passes_measured, n_eff=effective,
                                           criterion_kwargs=criterion_kwargs)
                bits, retention = _measured_bits(probe, g, batch, passes, policy_for)
                prediction = dataclasses.replace(prediction, mantissa_bits=bits,
                                                 retention=retention, basis="measured")
                measured_gemms.append(f"{layer.name}/{g}")
            else:
                prediction = dataclasses.replace(
                    prediction, retention=scratch.analytical_retention(prediction))
            gemms[g] = prediction
        entries.append(LayerPrediction(layer=layer.name, kind=type(layer).__name__,
                                       gemm_set=gemm_layer.gemm_set, **gemms))
    plan_settings["statistics"] = _statistics_text(stats, description, measured_gemms,
                                                   direct)
    if walk.unmeasured:
        plan_settings["statistics"] += ("; sparsity not measured (no zeros assumed) for "
                                        f"{', '.join(walk.unmeasured)}")
    return PrecisionPlan(layers=tuple(entries), **plan_settings)


def _gemm_sets(layer, measured_shapes, batch_size: int) -> list:
    """The GEMM sets of a layer of several (inventory.gemm_rows), each at the longest
    lengths of the shapes the layer is called on."""
    if isinstance(layer, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)):
        return gemm_rows(layer, (), (), batch_size)  # from its projections' shapes
    pairs = call_shapes(layer) or measured_shapes.get(layer.name, [])
    if not pairs:
        raise ValueError(f"layer {layer.name!r} has never been called, so its input "
                         "shape is unknown: call the model on data first or pass data=")
    sets = [gemm_rows(layer, i, o, batch_size) for i, o in pairs]
    longest = []
    for rows in zip(*sets):
        def most(g, rows=rows):
            values = [getattr(r, g) for r in rows]
            return None if None in values else max(values)
        longest.append(dataclasses.replace(rows[0], fwd=most("fwd"), bwd=most("bwd"),
                                           grad=most("grad")))
    return longest


def _passes_measured(retention: float, n_eff: int, criterion_kwargs) -> bool:
    if not math.isfinite(retention):
        return False
    return passes_criterion(n_eff, retention, criterion_kwargs["cutoff"],
                            criterion=criterion_kwargs["criterion"],
                            max_relative_loss=criterion_kwargs["max_relative_loss"])


def _statistics_text(stats: Optional[Statistics], sparsity: str, measured: List[str],
                     direct: bool) -> str:
    """The plan's statement of what was measured and what assumed."""
    model = ("analytical model: i.i.d. zero-mean Gaussian products rounded to m_p bits, no "
             "exponent overflow (docs/vrr.md)")
    if stats is None:
        return (f"assumed, not measured: {model}; sparsity {sparsity}")
    if stats.synthetic:
        return (f"sparsity measured on synthetic N(0,1) inputs ({stats.batches} batches), "
                f"NOT real data; {model}")
    text = (f"measured on {stats.batches} real batches: sparsity, product mean/std and "
            f"coherence E[y^2]/E[sum p^2] per GEMM; {model}, used where the coherence is in "
            "[1/2, 2]")
    if measured:
        text += ("; elsewhere bits measured directly with the real kernels on the first "
                 f"batch: {', '.join(measured)}")
    elif not direct:
        text += "; direct measurement off"
    return text
