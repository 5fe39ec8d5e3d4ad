"""The GEMMs of a Keras model: which layers compute them, on what shapes, over how many
products.

The one place that walks a model's layers, recovers the shapes a layer was called on
and computes the accumulation lengths of its three GEMMs (docs/numerics.md section 5),
with ``B`` the batch size:

=========  =============================  =====================  =======================
layer      FWD ``y = x.w``                BWD ``dx = dy.w^T``    GRAD ``dw = x^T.dy``
=========  =============================  =====================  =======================
Conv2D     ``KH*KW*Cin/groups``           ``KH*KW*Cout/groups``  ``B*OH*OW``
Dense      fan-in (last input dim)        ``units``              ``B`` x extra leading dims
=========  =============================  =====================  =======================

The 1-D, depthwise, separable and transposed convolutions: see :func:`gemm_rows`.

:func:`tfaccum.summary`, :func:`tfaccum.rewrite`, :func:`tfaccum.analysis.predict` and
the training driver's layer choices and health probe all use it, so they agree on which
layers a model has and how long their sums are::

    >>> import keras, tfaccum
    >>> from tfaccum import inventory
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    >>> outputs = keras.layers.Dense(10, name="fc")(keras.layers.Flatten()(x))
    >>> model = keras.Model(inputs, outputs)
    >>> [layer.name for layer in inventory.gemm_layers(model)]
    ['conv', 'fc']
    >>> inventory.layer_lengths(model.get_layer("conv"), (None, 8, 8, 3), (None, 6, 6, 4), 32)
    {'fwd': 27, 'bwd': 36, 'grad': 1152}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras

from tfaccum.config import AccumPolicy
from tfaccum.layers import ATTENTION, TWINS
from tfaccum.ops import einsum_lengths

__all__ = ["walk", "gemm_layers", "planned_layers", "SINGLE_GEMM", "emulated_layers", "call_shapes", "GemmLengths",
           "lengths", "gemm_rows", "layer_lengths", "gemm_lengths", "gemm_classes", "twin_class",
           "not_emulated_reason", "EMULATED"]

#: The tfaccum layer classes: the layers whose GEMMs are emulated.
EMULATED = tuple(TWINS.values())
#: The Keras attention layers (and so their twins): GEMM sets from their projections.
_ATTENTION_BASES = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
def _children(container) -> list:
    # A model's own layers as Keras lists them (graph order for a Functional model, the
    # order added for a Sequential one); the sublayers of any other layer as it tracks them.
    if isinstance(container, keras.Model):
        return container.layers
    return container._flatten_layers(include_self=False, recursive=False)


def walk(model, *, into_layers: bool = False) -> List[Tuple[Any, tuple]]:
    """Every layer of ``model`` once, in model order, with the tuple of the layers that
    enclose it (outermost first).

    The walk descends into nested models; with ``into_layers`` also into the sublayers of
    every other layer (wrappers such as ``TimeDistributed``, the blocks of a subclassed
    model), as the emulated layers of an ``accumulation_scope`` may sit anywhere. A layer
    reached twice (a shared layer, a nested model used twice) is listed where it is first
    reached.
    """
    out, seen = [], set()

    def visit(container, ancestors):
        for layer in _children(container):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            out.append((layer, ancestors))
            if into_layers or isinstance(layer, keras.Model):
                visit(layer, ancestors + (layer,))

    visit(model, ())
    return out


#: The layers of one GEMM set on one ``kernel``: Dense and the convolutions other than
#: the separable ones (whose two GEMM sets share one layer and its policy).
SINGLE_GEMM = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
               keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
               keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)


def gemm_layers(model) -> list:
    """The layers of ``model`` with one GEMM set on one ``kernel`` (:data:`SINGLE_GEMM`:
    ``Dense`` and the 1-D/2-D, depthwise and transposed convolutions, tfaccum's twins
    included; descending into nested models), in order, each once: the layers the
    analysis measures and plans."""
    return [layer for layer, _ in walk(model) if isinstance(layer, SINGLE_GEMM)]


def planned_layers(model) -> list:
    """The layers :func:`tfaccum.analysis.predict` plans and the training driver rewrites,
    in model order (descending into nested models): :func:`gemm_layers`, and every other
    layer tfaccum emulates (separable convolutions, ``EinsumDense``, attention), whose
    GEMM sets :func:`gemm_rows` lists."""
    return [layer for layer, _ in walk(model)
            if isinstance(layer, SINGLE_GEMM) or twin_class(layer) is not None]


def emulated_layers(model, *, into_layers: bool = False) -> list:
    """The tfaccum layers of ``model`` (see :func:`walk` for ``into_layers``), in order."""
    return [layer for layer, _ in walk(model, into_layers=into_layers)
            if isinstance(layer, EMULATED)]


def gemm_classes() -> tuple:
    """Keras layer classes that compute weight GEMMs (or contain layers that do)."""
    names = ["Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
             "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
             "SeparableConv1D", "SeparableConv2D", "SimpleRNN", "LSTM", "GRU",
             "SimpleRNNCell", "LSTMCell", "GRUCell", "ConvLSTM1D", "ConvLSTM2D",
             "ConvLSTM3D", "MultiHeadAttention", "GroupQueryAttention"]
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


def twin_class(layer) -> Optional[type]:
    """The tfaccum class a layer becomes under ``tfaccum.rewrite``, or None if it cannot be
    emulated (only the exact Keras classes of ``tfaccum.layers.TWINS``, unquantized, and
    tfaccum layers themselves)."""
    if isinstance(layer, EMULATED):
        return type(layer)
    twin = TWINS.get(type(layer))
    if twin is not None and layer.quantization_mode is None:
        return twin
    return None


def not_emulated_reason(layer, classes: Optional[tuple] = None) -> Optional[str]:
    """Why ``layer`` computes GEMMs that stay float32 (``"Conv1D"``, ``"TimeDistributed
    containing Dense"``, ...), or None when it computes none or can be emulated.
    ``classes``: :func:`gemm_classes`, when the caller has it already."""
    classes = gemm_classes() if classes is None else classes
    if isinstance(layer, keras.Model) or twin_class(layer) is not None:
        return None
    if isinstance(layer, classes):
        if type(layer) in TWINS:
            return (f"{type(layer).__name__} with Keras quantization "
                    f"{layer.quantization_mode!r}")
        if isinstance(layer, tuple(TWINS)):
            return f"{type(layer).__name__} (a subclass of {type(layer).__mro__[1].__name__})"
        return type(layer).__name__
    inner = [sub for sub in layer._flatten_layers(include_self=False, recursive=True)
             if isinstance(sub, classes) and not isinstance(sub, EMULATED)]
    if inner:
        kinds = ", ".join(sorted({type(sub).__name__ for sub in inner}))
        return f"{type(layer).__name__} containing {kinds}"
    return None


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------
def call_shapes(layer) -> List[Tuple[tuple, tuple]]:
    """The distinct ``(input_shape, output_shape)`` pairs ``layer`` is called on in its
    model's graph. A layer called only eagerly (inside a subclassed model) has no graph
    nodes; it remembers the input shape it was built for, which gives the one pair."""
    shapes = []
    for node in getattr(layer, "_inbound_nodes", []) or []:
        ins, outs = node.input_tensors, node.output_tensors
        if ins and outs:
            pair = (tuple(ins[0].shape), tuple(outs[0].shape))
            if pair not in shapes:
                shapes.append(pair)
    if not shapes and getattr(layer, "built", False):
        config = layer.get_build_config() or {}
        input_shape = config.get("input_shape")
        if input_shape is not None:
            input_shape = tuple(input_shape)
            shapes.append((input_shape, tuple(layer.compute_output_shape(input_shape))))
    return shapes


# --------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmLengths:
    """The accumulation lengths of one layer call (numerics.md section 5).

    ``grad`` is None when the batch size is unknown; ``grad_per_example`` is then the
    factor it multiplies (``OH*OW`` for a conv, the product of the extra leading
    dimensions for a Dense). Lengths that depend on an unknown dimension are None.
    ``policy`` is the layer's AccumPolicy (None for a native Keras layer).
    """

    layer: str
    kind: str
    input_shape: tuple
    fwd: Optional[int]
    bwd: Optional[int]
    grad: Optional[int]
    grad_per_example: Optional[int]
    policy: Optional[AccumPolicy]
    #: which GEMM set of the layer ("" for a layer with one; "depthwise" / "pointwise"
    #: for a separable convolution)
    gemm: str = ""


def _prod(values) -> Optional[int]:
    out = 1
    for v in values:
        if v is None:
            return None
        out *= int(v)
    return out


def lengths(layer, input_shape: Sequence, output_shape: Sequence,
            batch_size: Optional[int] = None) -> GemmLengths:
    """The FWD, BWD and GRAD lengths of one call of a Dense or convolution layer on
    ``input_shape`` giving ``output_shape``; the batch dimension is ``batch_size``, or the
    input's own when that is None. Lengths set by an unknown dimension are None. A
    separable convolution has two GEMM sets: this is its first, :func:`gemm_rows` both."""
    return gemm_rows(layer, input_shape, output_shape, batch_size)[0]


def _times(a, b) -> Optional[int]:
    return None if a is None or b is None else int(a) * int(b)


def gemm_rows(layer, input_shape: Sequence, output_shape: Sequence,
              batch_size: Optional[int] = None) -> List[GemmLengths]:
    """The :class:`GemmLengths` of each GEMM set of one call of a GEMM layer (two for a
    separable convolution, its depthwise and its pointwise one; one otherwise). ``K`` is
    the kernel's spatial size (``KH*KW``, or ``K`` in 1-D), ``M`` the depth multiplier:

    ==================  ===============  =================  ===========================
    layer               FWD              BWD                GRAD
    ==================  ===============  =================  ===========================
    Conv1D/2D           ``K*Cin/G``      ``K*filters/G``    ``B`` x output spatial size
    Depthwise 1D/2D     ``K``            ``K*M``            ``B`` x output spatial size
    Separable 1D/2D     depthwise, then pointwise: ``Cin*M``, ``filters``, as depthwise
    Conv1D/2DTranspose  ``K*Cin``        ``K*filters``      ``B`` x *input* spatial size
    EinsumDense         contracted       kernel's free      input's free (``B`` among them)
    ==================  ===============  =================  ===========================

    An attention layer (``MultiHeadAttention``, ``GroupQueryAttention`` or their twins;
    ``input_shape`` and ``output_shape`` are not used: the shapes its projections were
    built for are) has a set per projection, named as Keras names the projection
    (``query``, ``key``, ``value``, ``gate``, ``attention_output``: EinsumDense rows), and
    the products of every head: ``attn/qk`` (FWD the head size, BWD the key sequence,
    GRAD the query sequence) and ``attn/av`` (FWD the key sequence, BWD the value head
    size, GRAD the query sequence), numerics §8.
    """
    input_shape, output_shape = tuple(input_shape), tuple(output_shape)
    batch = batch_size if batch_size is not None else input_shape[0]
    conv_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv1D,
                  keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D,
                  keras.layers.SeparableConv2D, keras.layers.Conv1DTranspose,
                  keras.layers.Conv2DTranspose)
    sets = []  # (gemm, fwd, bwd, per_example)
    if isinstance(layer, conv_types):
        k = _prod(layer.kernel_size)
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        cin = input_shape[1] if channels_first else input_shape[-1]
        spatial_in = input_shape[2:] if channels_first else input_shape[1:-1]
        spatial_out = output_shape[2:] if channels_first else output_shape[1:-1]
        if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)):
            # y is the input gradient of a convolution of y by the kernel (numerics §5)
            sets.append(("", _times(cin, k), k * layer.filters, _prod(spatial_in)))
        elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
            groups = getattr(layer, "groups", 1) or 1
            fwd = None if cin is None else k * int(cin) // groups
            sets.append(("", fwd, k * layer.filters // groups, _prod(spatial_out)))
        else:  # depthwise: one input channel per group; separable: then a 1x1 conv
            mult = layer.depth_multiplier
            separable = not isinstance(layer, (keras.layers.DepthwiseConv1D,
                                               keras.layers.DepthwiseConv2D))
            per_example = _prod(spatial_out)
            sets.append(("depthwise" if separable else "", k, k * mult, per_example))
            if separable:
                sets.append(("pointwise", _times(cin, mult), layer.filters, per_example))
    elif isinstance(layer, keras.layers.Dense):
        fwd = None if input_shape[-1] is None else int(input_shape[-1])
        sets.append(("", fwd, int(layer.units), _prod(input_shape[1:-1])))
    elif isinstance(layer, keras.layers.EinsumDense):
        return [_einsum_dense_row(layer, input_shape, batch, layer.name, "")]
    elif isinstance(layer, _ATTENTION_BASES):
        return _attention_rows(layer, batch)
    else:
        raise TypeError(f"layer {layer.name!r} is a {type(layer).__name__}, not a Dense, "
                        "EinsumDense, attention or convolution layer")
    return [GemmLengths(layer.name, type(layer).__name__, input_shape, fwd, bwd,
                        _times(batch, per_example), per_example,
                        getattr(layer, "policy", None), gemm)
            for gemm, fwd, bwd, per_example in sets]


def _einsum_dense_row(layer, input_shape: tuple, batch, name: str, gemm: str) -> GemmLengths:
    """An EinsumDense's GEMM (numerics §8): FWD the contracted indices, BWD the kernel's
    free ones, GRAD the input's free ones, whose first (the batch) is ``batch``."""
    kernel_shape = tuple(layer.kernel.shape)
    fwd, bwd, _, _ = einsum_lengths(layer.equation, input_shape, kernel_shape)
    # GRAD per example: the same sum with a batch of one.
    _, _, per_example, _ = einsum_lengths(layer.equation, (1,) + tuple(input_shape[1:]),
                                          kernel_shape)
    return GemmLengths(name, type(layer).__name__, tuple(input_shape), fwd, bwd,
                       _times(batch, per_example), per_example,
                       getattr(layer, "policy", None), gemm)


def _built_input(sublayer) -> Optional[tuple]:
    """The input shape a (built) sublayer was built for, or None."""
    if not getattr(sublayer, "built", False):
        return None
    shape = (sublayer.get_build_config() or {}).get("input_shape")
    return None if shape is None else tuple(shape)


def _attention_rows(layer, batch) -> List[GemmLengths]:
    """The GEMMs of an attention twin, from the shapes its projections were built for:
    each projection (named as Keras names it: query, key, value, gate, attention_output),
    then ``attn/qk`` and ``attn/av``, the products of every head (numerics §8)."""
    projections = [sub for sub in (getattr(layer, "_query_dense", None),
                                   getattr(layer, "_key_dense", None),
                                   getattr(layer, "_value_dense", None),
                                   getattr(layer, "_gate_dense", None))
                   if sub is not None]
    policy = getattr(layer, "policy", None)
    if not projections or _built_input(projections[0]) is None:
        return [GemmLengths(layer.name, type(layer).__name__, (), None, None, None, None,
                            policy)]
    rows = [_einsum_dense_row(sub, _built_input(sub), batch, layer.name, sub.name)
            for sub in projections]
    # The projections' outputs (their einsums' output shapes: Keras builds some with
    # unknown sequence lengths), then the two products and the output projection.
    q_in = _built_input(projections[0])
    q, k, v = (einsum_lengths(sub.equation, _built_input(sub), tuple(sub.kernel.shape))[3]
               for sub in projections[:3])
    repeats = getattr(layer, "num_repeats", 1)  # GQA: K and V heads repeated per query head
    if repeats != 1:
        k = k[:2] + (k[2] * repeats,) + k[3:]
        v = v[:2] + (v[2] * repeats,) + v[3:]
    equation = layer._dot_product_equation
    if twin_class(layer)._KEY_FIRST:  # the twin multiplies the query first
        terms, out = equation.split("->")
        equation = ",".join(reversed(terms.split(","))) + "->" + out
    qk_fwd, qk_bwd, qk_grad, scores = einsum_lengths(equation, q, k)
    av_fwd, av_bwd, av_grad, attended = einsum_lengths(layer._combine_equation, scores, v)
    # Per-head products: their GRAD sums a sequence, not the batch.
    rows.append(GemmLengths(layer.name, type(layer).__name__, q_in, qk_fwd, qk_bwd, qk_grad,
                            None, policy, "attn/qk"))
    rows.append(GemmLengths(layer.name, type(layer).__name__, q_in, av_fwd, av_bwd, av_grad,
                            None, policy, "attn/av"))
    out_dense = layer._output_dense
    rows.append(_einsum_dense_row(out_dense, attended, batch, layer.name, out_dense.name))
    return rows


def layer_lengths(layer, input_shape: Sequence, output_shape: Sequence,
                  batch_size: int) -> Dict[str, int]:
    """``{"fwd": n, "bwd": n, "grad": n}`` for one call of a Dense/Conv2D layer on
    ``input_shape`` giving ``output_shape`` (the batch dimension is replaced by
    ``batch_size``); ValueError where a dimension they need is unknown."""
    n = lengths(layer, input_shape, output_shape, batch_size)
    if None in (n.fwd, n.grad):
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(f"layer {layer.name!r}: unknown spatial or channel size in "
                             f"{tuple(input_shape)} -> {tuple(output_shape)}")
        raise ValueError(f"layer {layer.name!r}: unknown dimension in input shape "
                         f"{tuple(input_shape)}")
    return {"fwd": n.fwd, "bwd": n.bwd, "grad": n.grad}


def gemm_lengths(model, batch_size: Optional[int] = None) -> List[GemmLengths]:
    """One :class:`GemmLengths` per emulated layer and distinct input shape it is called
    on, in the model's layer order (nested layers included). ``batch_size`` overrides the
    batch dimension."""
    rows = []
    for layer, ancestors in walk(model, into_layers=True):
        # An attention twin lists its projections (tfaccum sublayers) among its own rows.
        if not isinstance(layer, EMULATED) or any(isinstance(a, ATTENTION) for a in ancestors):
            continue
        if isinstance(layer, ATTENTION):
            rows.extend(gemm_rows(layer, (), (), batch_size))
            continue
        shapes = call_shapes(layer)
        if not shapes:
            rows.append(GemmLengths(layer.name, type(layer).__name__, (), None, None, None,
                                    None, layer.policy))
        for input_shape, output_shape in shapes:
            rows.extend(gemm_rows(layer, input_shape, output_shape, batch_size))
    return rows
