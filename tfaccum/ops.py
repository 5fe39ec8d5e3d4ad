"""The tfaccum TensorFlow ops: quantize, accum_matmul, accum_conv2d, and their gradients.

Every op computes exactly what ``docs/numerics.md`` defines (and ``tfaccum.reference``
computes in pure Python). Gradients are registered once, at import, for the raw ops:
the gradient of a GEMM is two more GEMMs of the same op, accumulated with the policy's
``bwd`` and ``grad`` configurations, which travel with the forward op in its ``policy``
attribute, and drawing from the forward op's ``step`` (its last input: the training step
whose stochastic-rounding stream the op uses, numerics §4).

    >>> import tensorflow as tf, tfaccum
    >>> a, b = tf.ones([2, 3000]), tf.ones([3000, 4])
    >>> cfg = tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(6, 9))
    >>> float(tfaccum.accum_matmul(a, b, cfg)[0, 0])   # every partial sum rounded to e6m9
    1024.0
    >>> float(tfaccum.accum_matmul(a, b, cfg.replace(chunk_size=64))[0, 0])  # chunks of 64
    3000.0

At 1024 the spacing of e6m9 is 2, so adding 1 is a tie that rounds back to 1024: the
sequential sum is swamped there, while the chunks' partial sums never get that large.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from tfaccum.config import AccumConfig, AccumPolicy, FloatFormat, as_format, as_policy

_LIBRARY_NAME = "_tfaccum_ops.so"
# Next to the library: the TensorFlow version it was compiled against, one line, written
# by custom_ops/build.py (and the Bazel rule //:tf_version_record).
_VERSION_RECORD_SUFFIX = ".tf_version"
_REBUILD = "rebuild with `make` (or `pip install --no-build-isolation -e .`) in the source tree"
_lock = threading.Lock()
_library = None


def _library_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY_NAME)


def check_library_version(path: str) -> str:
    """The TensorFlow version the op library at ``path`` was built against; ImportError
    unless it is the installed one. A library built against another TensorFlow would fail
    to load with undefined symbols, or load and misbehave: its C++ ABI is not stable."""
    record = path + _VERSION_RECORD_SUFFIX
    try:
        with open(record) as f:
            built = f.read().strip()
    except OSError:
        raise ImportError(f"tfaccum's op library {path} has no record of the TensorFlow it "
                          f"was built against ({record} is missing): {_REBUILD}") from None
    if built != tf.__version__:
        raise ImportError(f"tfaccum's op library {path} was built against TensorFlow "
                          f"{built}, but TensorFlow {tf.__version__} is installed: {_REBUILD}")
    return built


def load_library():
    """Loads the compiled op library once (lazily) and returns its module of ops."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                path = _library_path()
                if not os.path.exists(path):
                    raise ImportError(f"tfaccum's op library {path} is not built: {_REBUILD}")
                check_library_version(path)
                _library = tf.load_op_library(path)
    return _library


ConfigOrPolicy = Union[AccumConfig, AccumPolicy]


def _check_float32(name: str, x) -> tf.Tensor:
    x = tf.convert_to_tensor(x) if not isinstance(x, (tf.Tensor, tf.Variable)) else x
    if x.dtype != tf.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype.name}")
    return x


def _step_input(step) -> tf.Tensor:
    """The ops' ``step`` input: an int64 scalar >= 0 from an int, a tensor or a variable.

    Integer tensors of another dtype are cast; the kernels check the value (>= 0) and the
    shape of tensors not known statically.
    """
    if step is None:
        step = 0
    if isinstance(step, (int, np.integer)) and not isinstance(step, (bool, np.bool_)):
        if not 0 <= int(step) < 2 ** 63:
            raise ValueError(f"step must be in 0..2**63-1, got {step}")
        return tf.constant(int(step), tf.int64)
    if isinstance(step, (bool, float, np.bool_, np.floating, str)):
        raise TypeError(f"step must be an integer (int, or an integer scalar tensor or "
                        f"variable), got {type(step).__name__} {step!r}")
    tensor = tf.convert_to_tensor(step)
    if not tensor.dtype.is_integer:
        raise TypeError(f"step must be an integer scalar, got a {tensor.dtype.name} tensor")
    if tensor.shape.rank is not None and tensor.shape.rank != 0:
        raise ValueError(f"step must be a scalar, got shape {tensor.shape}")
    return tensor if tensor.dtype == tf.int64 else tf.cast(tensor, tf.int64)


_STEP_0 = 0  # operand rounding is nearest-even: its step is irrelevant


def _config_attrs(config: AccumConfig, policy: AccumPolicy) -> dict:
    attrs = config.kernel_attrs()
    attrs["policy"] = policy.to_json()
    return attrs


def _policy_of(op) -> AccumPolicy:
    """The AccumPolicy a gradient function needs, from the forward op's ``policy``."""
    text = op.get_attr("policy").decode()
    # Eager gradients get a stand-in op without a name.
    what = f"{op.type} {op.name!r}" if hasattr(op, "name") else op.type
    if not text:
        raise ValueError(
            f"tfaccum: cannot differentiate {what}: its `policy` attribute is "
            "empty. The gradient GEMMs take their configurations from it; call the op through "
            "tfaccum.accum_matmul / tfaccum.accum_conv2d, or pass "
            "policy=tfaccum.AccumPolicy(...).to_json() to the raw op.")
    try:
        return AccumPolicy.from_json(text)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"tfaccum: cannot differentiate {what}: its `policy` "
                         f"attribute is not an AccumPolicy JSON ({err}): {text[:200]!r}") from None


# --- quantize ---------------------------------------------------------------------------

def quantize(x, fmt, rounding: str = "nearest_even", seed: int = 0, step=0,
             name=None) -> tf.Tensor:
    """Rounds each element of float32 ``x`` once to ``fmt`` (straight-through gradient).

    ``fmt`` is a FloatFormat, a preset name ("bfloat16") or "e<E>m<M>". The stochastic
    generator's element index is the flat row-major index, counter 0, in the stream of
    ``step`` (an int >= 0 or an integer scalar tensor/variable, e.g. the optimizer's
    ``iterations``).
    """
    fmt = as_format(fmt)
    config = AccumConfig(rounding=rounding, seed=seed)  # validates rounding and seed
    x = _check_float32("x", x)
    step = _step_input(step)
    if fmt.finite:
        return _quantize_finite(x, fmt, config, step, name)
    return load_library().tfaccum_quantize(
        x, step, format=fmt.kernel_attr(), rounding=config.rounding, seed=config.seed,
        name=name)


def _quantize_finite(x, fmt: FloatFormat, config: AccumConfig, step, name):
    """Rounding to a finite (FN) format from two kernel roundings. Below ``2^emin`` its grid
    is that of the IEEE-style format of the same width (the subnormals); from ``2^emin``
    up it is that of a format with one more exponent bit (the same significand, a wider
    range), up to the FN format's largest value. Each element uses one of the two results,
    drawn (stochastic rounding) at its own element index as a single rounding would be;
    beyond the largest value the overflow rules apply (numerics.md §1)."""
    low = dataclasses.replace(fmt, finite=False, overflow="saturate")
    wide = dataclasses.replace(low, exponent_bits=fmt.exponent_bits + 1)

    def run(x, f):
        return load_library().tfaccum_quantize(x, step, format=f.kernel_attr(),
                                               rounding=config.rounding, seed=config.seed)

    @tf.custom_gradient
    def rounded(x):
        small, large = run(x, low), run(x, wide)
        largest = tf.constant(fmt.max_value, tf.float32)
        if fmt.overflow == "inf" and config.rounding != "toward_zero":
            beyond = tf.where(large > 0, tf.constant(np.inf, tf.float32),
                              tf.constant(-np.inf, tf.float32))
            large = tf.where(tf.abs(large) > largest, beyond, large)
        else:  # saturate, and IEEE toward-zero; an infinite input too (satfinite)
            large = tf.where(tf.abs(large) > largest, tf.sign(large) * largest, large)
            if fmt.overflow == "inf":  # ... but an infinity stays one (numerics.md §1)
                large = tf.where(tf.math.is_inf(x), x, large)
        y = tf.where(tf.abs(x) < tf.constant(2.0 ** fmt.emin, tf.float32), small, large)
        return y, lambda dy: dy  # straight-through, as the kernel's own quantize

    y = rounded(x)
    return tf.identity(y, name=name) if name else y


@tf.RegisterGradient("TfaccumQuantize")
def _quantize_grad(op, dy):
    del op
    return dy, None  # straight-through; the step has no gradient


def _quantize_operands(policy: AccumPolicy, *tensors):
    if policy.operands is None:
        return tensors
    return tuple(quantize(t, policy.operands, step=_STEP_0) for t in tensors)


# --- matmul -----------------------------------------------------------------------------

def _raw_matmul(a, b, step, config: AccumConfig, policy: AccumPolicy, transpose_a=False,
                transpose_b=False, name=None):
    return load_library().tfaccum_mat_mul(
        a, b, step, transpose_a=transpose_a, transpose_b=transpose_b, name=name,
        **_config_attrs(config, policy))


def accum_matmul(a, b, config_or_policy: ConfigOrPolicy, transpose_a: bool = False,
                 transpose_b: bool = False, step=0, name=None) -> tf.Tensor:
    """``a·b`` (or with transposed operands) with rounded accumulation.

    Args:
      a: float32 ``[..., M, K]`` (``[..., K, M]`` if ``transpose_a``).
      b: float32 ``[..., K, N]`` (``[..., N, K]`` if ``transpose_b``). Dimensions before
        the last two are batch dimensions, broadcast as ``tf.matmul`` broadcasts them.
      config_or_policy: an AccumConfig (used for all three training GEMMs) or an
        AccumPolicy (``fwd`` here; ``bwd`` for ``da = dy·bᵀ``; ``grad`` for
        ``db = aᵀ·dy``; ``operands`` rounds each GEMM's inputs first).
      step: the training step whose stochastic-rounding stream this product and its
        gradients draw from (numerics §4): an int >= 0, or an integer scalar tensor or
        variable such as the optimizer's ``iterations``. Irrelevant to other roundings.

    Returns: float32 ``[..., M, N]``; ``y[..., i, j]`` sums ``k = 0..K-1`` in order, and
    its stochastic element index is its flat index in the whole (batched) ``y``. The
    gradient of an operand whose batch dimensions were broadcast adds the emulated
    gradients of the matrices that share it in float32 (numerics §5, batched matmul).
    """
    policy = as_policy(config_or_policy)
    step = _step_input(step)
    a = _check_float32("a", a)
    b = _check_float32("b", b)
    for label, t in (("a", a), ("b", b)):
        if t.shape.rank is not None and t.shape.rank < 2:
            raise ValueError(f"{label} must be a matrix or a batch of matrices (rank >= 2), "
                             f"got shape {t.shape}")
    a, b = _quantize_operands(policy, a, b)
    return _raw_matmul(a, b, step, policy.fwd, policy, transpose_a, transpose_b, name=name)


def _sum_to_operand(grad, operand):
    """``grad`` (batch dimensions of the whole output) summed over the batch dimensions
    along which ``operand`` was broadcast, in float32 (``tf.reduce_sum``): outside the
    emulated accumulation, as numerics §8 states. Unchanged when nothing was broadcast."""
    if (grad.shape.rank == 2 and operand.shape.rank == 2) or (
            grad.shape.is_fully_defined() and operand.shape.is_fully_defined()
            and grad.shape[:-2] == operand.shape[:-2]):
        return grad
    operand_shape = tf.shape(operand, out_type=tf.int64)
    # The axes of the gradient's batch (the output's) that the operand lacks or has as 1.
    axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=operand_shape[:-2],
                                               s1=tf.shape(grad, out_type=tf.int64)[:-2])
    summed = tf.reduce_sum(grad, axis=axes)
    return tf.reshape(summed, operand_shape)


@tf.RegisterGradient("TfaccumMatMul")
def _matmul_grad(op, dy):
    """da = dy·Bᵀ (summed over N, ``bwd``); db = Aᵀ·dy (summed over M, ``grad``).

    Each gradient is produced directly in its operand's stored layout by choosing the
    transposes, so the element index of the generator is the flat index of da / db (for a
    batched product, of the per-matrix gradients of the whole output's batch, before the
    float32 sum over any dimension an operand was broadcast along).
    """
    policy = _policy_of(op)
    a, b, step = op.inputs
    ta, tb = op.get_attr("transpose_a"), op.get_attr("transpose_b")
    (dy_q,) = _quantize_operands(policy, dy)
    if ta:   # da [K, M] = B·dyᵀ
        da = _raw_matmul(b, dy_q, step, policy.bwd, policy, transpose_a=tb, transpose_b=True)
    else:    # da [M, K] = dy·Bᵀ
        da = _raw_matmul(dy_q, b, step, policy.bwd, policy, transpose_a=False,
                         transpose_b=not tb)
    if tb:   # db [N, K] = dyᵀ·A
        db = _raw_matmul(dy_q, a, step, policy.grad, policy, transpose_a=True, transpose_b=ta)
    else:    # db [K, N] = Aᵀ·dy
        db = _raw_matmul(a, dy_q, step, policy.grad, policy, transpose_a=not ta,
                         transpose_b=False)
    return _sum_to_operand(da, a), _sum_to_operand(db, b), None


# --- einsum ----------------------------------------------------------------------------

def _einsum_plan(equation: str):
    """(term of a, term of b, output, batch, contracted, free of a, free of b) of a
    two-operand einsum that is one batched matmul (numerics §8), or ValueError naming what
    makes it something else."""
    if not isinstance(equation, str):
        raise TypeError(f"equation must be a str, got {type(equation).__name__}")
    eq = equation.replace(" ", "")
    bad = f"accum_einsum cannot express {equation!r}: "
    if "." in eq:
        raise ValueError(bad + "ellipsis ('...') needs operands of known rank")
    if eq.count("->") != 1:
        raise ValueError(bad + "it needs exactly one explicit output ('->')")
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        raise ValueError(bad + f"it has {len(terms)} operand(s); accum_einsum takes two")
    for what, term in (("operand 1", terms[0]), ("operand 2", terms[1]), ("the output", out)):
        if not all(c.isascii() and c.isalpha() for c in term):
            raise ValueError(bad + f"{what} {term!r} has a character that is not a letter")
        repeated = sorted({c for c in term if term.count(c) > 1})
        if repeated:
            raise ValueError(bad + f"index {repeated[0]!r} repeats in {what} (a diagonal or "
                             "trace is not a product of the two operands)")
    ta, tb = terms
    for c in out:
        if c not in ta and c not in tb:
            raise ValueError(bad + f"output index {c!r} is in neither operand")
    for number, (term, other) in enumerate(((ta, tb), (tb, ta)), 1):
        lone = [c for c in term if c not in other and c not in out]
        if lone:
            raise ValueError(bad + f"index {lone[0]!r} of operand {number} is summed over "
                             "that operand alone, which is not a product with the other "
                             "operand; reduce it first (tf.reduce_sum)")
    batch = [c for c in out if c in ta and c in tb]
    contracted = [c for c in ta if c in tb and c not in out]
    free_a = [c for c in out if c in ta and c not in tb]
    free_b = [c for c in out if c in tb and c not in ta]
    return ta, tb, out, batch, contracted, free_a, free_b


def _expand_ellipsis(equation: str, ranks) -> str:
    """``equation`` with each ``...`` replaced by letters it does not use, one per
    dimension the operand's rank (``ranks``: a's, b's) leaves to it, aligned on the right
    across the terms as broadcasting aligns them (NumPy's and tf.einsum's rule)."""
    eq = equation.replace(" ", "")
    if "..." not in eq or eq.count("->") != 1:
        return equation  # _einsum_plan names the problem
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or None in ranks:
        return equation
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in eq]
    widths = [rank - (len(term) - 3) if "..." in term else 0
              for term, rank in zip(terms, ranks)]
    width = max(widths)
    if min(widths) < 0 or width > len(spare):
        return equation
    letters = "".join(spare[:width])
    terms = [t.replace("...", letters[width - w:]) for t, w in zip(terms, widths)]
    return f"{terms[0]},{terms[1]}->{out.replace('...', letters)}"


def _dims(t) -> list:
    """t's dimensions: the static ones as ints, the others as int32 scalar tensors."""
    dynamic = None
    dims = []
    for i, d in enumerate(t.shape):
        if d is None:
            dynamic = tf.shape(t) if dynamic is None else dynamic
            d = dynamic[i]
        dims.append(d)
    return dims


def _product(dims) -> object:
    out = 1
    for d in dims:
        out = out * d
    return out


def einsum_lengths(equation: str, a_shape, b_shape):
    """``(fwd, bwd, grad, output_shape)`` of :func:`accum_einsum` on operands of these
    shapes (numerics §8): the products each output, each element of ``da`` and each
    element of ``db`` sums (the sizes of the contracted indices, of b's free indices, of
    a's free indices). A length or an output dimension set by an unknown (None) size is
    None."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    equation = _expand_ellipsis(equation, (len(a_shape), len(b_shape)))
    ta, tb, out, _, contracted, free_a, free_b = _einsum_plan(equation)
    sizes = {}
    for term, shape in ((tb, b_shape), (ta, a_shape)):  # a's sizes win (b may broadcast)
        if len(term) != len(shape):
            raise ValueError(f"einsum {equation!r}: shape {shape} does not have the "
                             f"{len(term)} dimensions of {term!r}")
        sizes.update((c, None if d is None else int(d)) for c, d in zip(term, shape))

    def length(indices):
        dims = [sizes[c] for c in indices]
        return None if None in dims else int(np.prod(dims, dtype=np.int64))

    return (length(contracted), length(free_b), length(free_a),
            tuple(sizes[c] for c in out))


def accum_einsum(equation: str, a, b, config_or_policy: ConfigOrPolicy, step=0,
                 name=None) -> tf.Tensor:
    """The two-operand ``tf.einsum(equation, a, b)`` as one :func:`accum_matmul`.

    The indices of ``equation`` (letters, no ellipsis, explicit ``->``) fall in four
    groups: *batch* (in both operands and the output), *contracted* (in both operands,
    not in the output), *free* of ``a`` or of ``b`` (in one operand and the output). The
    operands are transposed and reshaped to ``a [batch..., free_a, contracted]`` and
    ``b [batch..., contracted, free_b]`` (each group flattened) and multiplied:

    * every output sums the products over its contracted indices, row-major in the order
      they appear in ``a``'s term (length: the product of their sizes);
    * its stochastic element is its flat index in the layout (batch, free of a, free of
      b), each group in output order; the result is then transposed to ``equation``'s
      output order;
    * ``da`` (``bwd``) sums over b's free indices, ``db`` (``grad``) over a's (numerics §8).

    An ellipsis (``...``, operands of known rank) stands for unused letters, one per
    dimension it covers, aligned on the right as broadcasting aligns them.

    ``ValueError`` for an equation this cannot express: an index repeated within one
    term, an index summed over one operand alone, an output index in neither operand, an
    ellipsis on an operand of unknown rank, or a number of operands other than two. Batch
    indices broadcast (size 1) as in :func:`accum_matmul`.
    """
    a = _check_float32("a", a)
    b = _check_float32("b", b)
    equation = _expand_ellipsis(equation, (a.shape.rank, b.shape.rank))
    ta, tb, out, batch, contracted, free_a, free_b = _einsum_plan(equation)
    for label, term, t in (("a", ta, a), ("b", tb, b)):
        if t.shape.rank is not None and t.shape.rank != len(term):
            raise ValueError(f"accum_einsum {equation!r}: {label} has shape {t.shape}, "
                             f"which does not have the {len(term)} dimensions of {term!r}")
    for c in contracted:
        na, nb = a.shape[ta.index(c)], b.shape[tb.index(c)]
        if na is not None and nb is not None and na != nb:
            raise ValueError(f"accum_einsum {equation!r}: contracted index {c!r} has size "
                             f"{na} in a and {nb} in b")
    a = tf.transpose(a, [ta.index(c) for c in batch + free_a + contracted])
    b = tf.transpose(b, [tb.index(c) for c in batch + contracted + free_b])
    a_dims, b_dims = _dims(a), _dims(b)
    n_batch = len(batch)
    a_free, a_k = a_dims[n_batch:n_batch + len(free_a)], a_dims[n_batch + len(free_a):]
    b_k, b_free = b_dims[n_batch:n_batch + len(contracted)], b_dims[n_batch + len(contracted):]
    a = tf.reshape(a, a_dims[:n_batch] + [_product(a_free), _product(a_k)])
    b = tf.reshape(b, b_dims[:n_batch] + [_product(b_k), _product(b_free)])
    y = accum_matmul(a, b, config_or_policy, step=step)
    y = tf.reshape(y, _dims(y)[:n_batch] + a_free + b_free)
    layout = batch + free_a + free_b
    perm = [layout.index(c) for c in out]
    if perm != list(range(len(perm))):
        y = tf.transpose(y, perm)
    return tf.identity(y, name=name) if name else y


# --- conv2d -----------------------------------------------------------------------------

def _pair(name: str, value) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        value = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(value) == 4:  # TensorFlow style [1, h, w, 1]
        if value[0] != 1 or value[3] != 1:
            raise ValueError(f"{name} over batch or channels are not supported, got {value}")
        value = value[1:3]
    if len(value) != 2:
        raise ValueError(f"{name} must have 2 entries (height, width), got {value}")
    if any(v <= 0 for v in value):
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _padding_attrs(padding) -> dict:
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or [(top, bottom), (left, "
                             f"right)], got {padding!r}")
        return {"padding": mode, "explicit_paddings": []}
    try:
        pads = [tuple(int(v) for v in pair) for pair in padding]
    except TypeError:
        raise ValueError(f"explicit padding must be [(top, bottom), (left, right)], "
                         f"got {padding!r}") from None
    if len(pads) == 4:  # TensorFlow style [[0, 0], [t, b], [l, r], [0, 0]]
        if pads[0] != (0, 0) or pads[3] != (0, 0):
            raise ValueError(f"padding of batch or channels is not supported: {padding!r}")
        pads = pads[1:3]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"explicit padding must be [(top, bottom), (left, right)], "
                         f"got {padding!r}")
    flat = [v for p in pads for v in p]
    if any(v < 0 for v in flat):
        raise ValueError(f"explicit padding must be non-negative, got {padding!r}")
    # The attribute is int64; beyond it TensorFlow raises a bare "int too big to convert".
    if any(v > 2 ** 63 - 1 for v in flat):
        raise ValueError(f"explicit padding must be below 2**63, got {padding!r}")
    return {"padding": "EXPLICIT", "explicit_paddings": flat}


def _conv_attrs(op) -> dict:
    return {
        "strides": op.get_attr("strides"),
        "dilations": op.get_attr("dilations"),
        "padding": op.get_attr("padding").decode(),
        "explicit_paddings": op.get_attr("explicit_paddings"),
        "group": op.get_attr("group"),
        "groups": op.get_attr("groups"),
    }


def _conv_inputs(config_or_policy, step, x, w, w_layout: str):
    """(policy, step, x, w) of a convolution call, checked: float32 NHWC ``x`` and a rank-4
    filter ``w`` (``w_layout`` names its dimensions in the messages)."""
    policy = as_policy(config_or_policy)
    step = _step_input(step)
    x = _check_float32("x", x)
    w = _check_float32("w", w)
    if x.shape.rank is not None and x.shape.rank != 4:
        raise ValueError(f"x must be NHWC (rank 4), got shape {x.shape}")
    if w.shape.rank is not None and w.shape.rank != 4:
        raise ValueError(f"w must be {w_layout} (rank 4), got shape {w.shape}")
    return policy, step, x, w


def _geometry_attrs(strides, padding, dilations) -> dict:
    attrs = _padding_attrs(padding)
    attrs.update(strides=list(_pair("strides", strides)),
                 dilations=list(_pair("dilations", dilations)))
    return attrs


def accum_conv2d(x, w, config_or_policy: ConfigOrPolicy, strides=(1, 1),
                 padding: Union[str, Sequence] = "SAME", dilations=(1, 1),
                 data_format: str = "NHWC", step=0, name=None) -> tf.Tensor:
    """2-D convolution (cross-correlation, as ``tf.nn.convolution``) with rounded accumulation.

    Args:
      x: float32 ``[B, H, W, Cin]`` (NHWC only).
      w: float32 ``[KH, KW, Cin / G, Cout]``: ``G > 1`` is a grouped convolution (as in
        ``tf.nn.convolution``; ``x``'s channels must be known statically), computed as one
        op per group whose stochastic element indices are those of the whole output.
      config_or_policy: AccumConfig or AccumPolicy (fwd / bwd = input gradient /
        grad = filter gradient).
      strides, dilations: an int or ``(h, w)``.
      padding: ``"SAME"``, ``"VALID"`` or ``[(top, bottom), (left, right)]``.
      step: the training step whose stochastic-rounding stream the convolution and its
        gradients draw from (see :func:`accum_matmul`).

    ``y[b, oy, ox, co]`` sums ``(ky, kx, ci)`` in row-major order; taps outside the
    image are exact zero products that count in the length and chunk boundaries.
    """
    if data_format != "NHWC":
        raise ValueError(f"accum_conv2d supports data_format='NHWC' only, got {data_format!r}; "
                         "transpose to NHWC first")
    policy, step, x, w = _conv_inputs(config_or_policy, step, x, w, "[KH, KW, Cin, Cout]")
    cin_x, cin_w = x.shape[-1], w.shape[2] if w.shape.rank == 4 else None
    cout = w.shape[3] if w.shape.rank == 4 else None
    groups = 1
    if cin_x is not None and cin_w is not None and cin_x != cin_w:
        if not cin_w or not cin_x or cin_x % cin_w:  # 0 groups is no convolution
            raise ValueError(f"channel mismatch: x has {cin_x} input channels, w expects "
                             f"{cin_w}")
        groups = cin_x // cin_w
        if cout is None or cout % groups:
            raise ValueError(f"grouped convolution: x has {cin_x} channels, w expects "
                             f"{cin_w} ({groups} groups), but its {cout} output channels do "
                             f"not split into {groups} groups")
    attrs = _geometry_attrs(strides, padding, dilations)
    x, w = _quantize_operands(policy, x, w)
    lib = load_library()
    attrs.update(_config_attrs(policy.fwd, policy))
    if groups == 1:
        return lib.tfaccum_conv2d(x, w, step, name=name, **attrs)
    # One op per group; `group`/`groups` make its draws those of the whole output's
    # channels (numerics §4), so groups neither share draws nor depend on the split.
    outputs = [lib.tfaccum_conv2d(xg, wg, step, group=g, groups=groups, **attrs)
               for g, (xg, wg) in enumerate(zip(tf.split(x, groups, axis=-1),
                                               tf.split(w, groups, axis=-1)))]
    return tf.concat(outputs, axis=-1, name=name)


def accum_conv2d_transpose(x, w, output_shape, config_or_policy: ConfigOrPolicy,
                           strides=(1, 1), padding: Union[str, Sequence] = "SAME",
                           dilations=(1, 1), step=0, name=None) -> tf.Tensor:
    """Transposed 2-D convolution (``tf.nn.conv2d_transpose``) with rounded accumulation.

    It is the input gradient of the convolution, by ``w``, of an input of shape
    ``output_shape`` whose output has ``x``'s shape: the same op (and order of each sum,
    numerics §5) as ``accum_conv2d``'s ``bwd``, here under the policy's ``fwd``.

    Args:
      x: float32 ``[B, H, W, Cin]``.
      w: float32 ``[KH, KW, Cout, Cin]`` (``tf.nn.conv2d_transpose``'s layout).
      output_shape: ``[B, OH, OW, Cout]``, ints or an integer tensor; the convolution of
        that shape with ``strides``, ``padding``, ``dilations`` must give ``x``'s shape.
      config_or_policy: ``fwd`` for ``y``; ``bwd`` for ``dx`` (a forward convolution of
        ``dy`` by ``w``); ``grad`` for ``dw`` (a filter gradient, summed over
        ``(b, oy, ox)`` of ``dy``'s image).

    ``y[b,oy,ox,co]`` sums ``(ky, kx, ci)`` in row-major order over the taps where
    ``(oy + pad_top - ky·dy) / sy`` (likewise ``ox``) is an integer inside ``x``; the other
    taps are exact zero products that count in the length.
    """
    policy, step, x, w = _conv_inputs(config_or_policy, step, x, w, "[KH, KW, Cout, Cin]")
    if (x.shape.rank == 4 and w.shape.rank == 4 and None not in (x.shape[3], w.shape[3])
            and x.shape[3] != w.shape[3]):
        raise ValueError(f"channel mismatch: x has {x.shape[3]} channels, w (as [KH, KW, "
                         f"Cout, Cin]) expects {w.shape[3]}")
    attrs = _geometry_attrs(strides, padding, dilations)
    x, w = _quantize_operands(policy, x, w)
    # The raw op's gradient takes d(out_backprop) from its policy's `fwd` and d(filter)
    # from `grad`, their roles under a convolution's backward pass. Here the op is the
    # forward, so its attribute carries the policy with fwd and bwd exchanged: dx gets
    # `bwd`, dw `grad`, and the op itself runs under `fwd`.
    roles = AccumPolicy(fwd=policy.bwd, bwd=policy.fwd, grad=policy.grad,
                        operands=policy.operands)
    attrs.update(_config_attrs(policy.fwd, roles))
    sizes = tf.cast(tf.convert_to_tensor(output_shape), tf.int64)
    return load_library().tfaccum_conv2d_backprop_input(sizes, w, x, step, name=name, **attrs)


# The gradients pass the operands' shapes as int64 (the ops' Tsizes attribute), so that
# a dimension of 2^31 or more is a size like any other.
@tf.RegisterGradient("TfaccumConv2D")
def _conv2d_grad(op, dy):
    policy = _policy_of(op)
    x, w, step = op.inputs
    (dy_q,) = _quantize_operands(policy, dy)
    lib = load_library()
    conv = _conv_attrs(op)
    dx = lib.tfaccum_conv2d_backprop_input(
        tf.shape(x, out_type=tf.int64), w, dy_q, step, **conv,
        **_config_attrs(policy.bwd, policy))
    dw = lib.tfaccum_conv2d_backprop_filter(
        x, tf.shape(w, out_type=tf.int64), dy_q, step, **conv,
        **_config_attrs(policy.grad, policy))
    return dx, dw, None


# Second order. The forward op's operands (w, dy; x, dy) were rounded to the policy's
# operand format already; the incoming gradient is rounded here, so that every GEMM input
# is (numerics §5), as in the first-order gradients.
@tf.RegisterGradient("TfaccumConv2DBackpropInput")
def _conv2d_backprop_input_grad(op, ddx):
    """dx = conv_transpose(dy, w) is linear in dy and w."""
    policy = _policy_of(op)
    _, w, dy, step = op.inputs
    (ddx_q,) = _quantize_operands(policy, ddx)
    lib = load_library()
    conv = _conv_attrs(op)
    d_dy = lib.tfaccum_conv2d(ddx_q, w, step, **conv, **_config_attrs(policy.fwd, policy))
    d_w = lib.tfaccum_conv2d_backprop_filter(
        ddx_q, tf.shape(w, out_type=tf.int64), dy, step, **conv,
        **_config_attrs(policy.grad, policy))
    return None, d_w, d_dy, None


@tf.RegisterGradient("TfaccumConv2DBackpropFilter")
def _conv2d_backprop_filter_grad(op, ddw):
    policy = _policy_of(op)
    x, _, dy, step = op.inputs
    (ddw_q,) = _quantize_operands(policy, ddw)
    lib = load_library()
    conv = _conv_attrs(op)
    d_x = lib.tfaccum_conv2d_backprop_input(
        tf.shape(x, out_type=tf.int64), ddw_q, dy, step, **conv,
        **_config_attrs(policy.bwd, policy))
    d_dy = lib.tfaccum_conv2d(x, ddw_q, step, **conv, **_config_attrs(policy.fwd, policy))
    return d_x, None, d_dy, None


__all__ = ["quantize", "accum_matmul", "accum_einsum", "einsum_lengths", "accum_conv2d",
           "accum_conv2d_transpose", "load_library", "AccumConfig", "AccumPolicy",
           "FloatFormat"]
