r"""Exact pure-Python reference of everything tfaccum computes.

This module is the executable form of ``docs/numerics.md``. It is written to be *obviously*
right rather than fast: every product and every sum is an exact rational number
(:class:`fractions.Fraction`), and there is exactly one rounding function,
:func:`round_to_format`, which rounds an exact rational once, straight from the definitions.
It shares no code and no tricks with the C++/CUDA kernels (which hold partial sums in
binary64 and round to odd); the tests use it as an independent oracle for them.

Formats
-------
A format ``F = (e, m)`` (:class:`tfaccum.FloatFormat`) has a sign, ``e`` exponent bits and
``m`` fraction bits. With bias ``b = 2^(e-1) - 1`` its normal values are ``±1.f × 2^E``,
``E ∈ [emin, emax] = [1-b, b]``, its subnormals ``±0.f × 2^emin`` and its largest finite
value ``max = (2 - 2^-m) × 2^emax``. Every format is a subset of float32, so every rounded
value is returned exactly as a float32.

Rounding ``Q_F(x)`` of an exact real ``x != 0``
-----------------------------------------------
::

    E    = floor(log2 |x|)                        (exact, from integer bit lengths)
    ulp  = 2^(max(E, emin) - m)                   (the grid spacing at |x|; fixed below 2^emin)
    |x| / ulp = n + f,  n integer, 0 <= f < 1     (n·ulp is |x| truncated toward zero)

    nearest_even:  n + 1 if f > 1/2, or f = 1/2 and n is odd; else n
    toward_zero:   n
    stochastic:    n + 1 iff floor(f · 2^24) + r >= 2^24,
                   r = random_bits(seed, element, counter, step)

("n odd" is "the last fraction bit is odd"; with m = 0 it still means n, so a tie between
2^E and 2^(E+1) goes up, and the tie 2^(emin-1) goes down to zero.)

then the magnitude ``n·ulp`` (which may have carried into the next binade) goes through

1. subnormals off: a non-zero result below ``2^emin`` becomes a zero of the sign of ``x``;
2. overflow (result above ``max``; the exponent range above is unbounded, so this is
   the IEEE 754 notion): ``saturate`` gives ``±max``; ``inf`` gives ``±Inf``, except
   ``toward_zero``, which gives ``±max`` as IEEE 754 does;

and the sign of ``x`` is put back (a non-zero ``x`` that rounds to zero gives a zero of its
sign). Specials: ``Q(NaN) = NaN``, ``Q(±Inf) = ±Inf`` under both overflow policies, and
``Q(±0) = ±0``.

The dot product (numerics §3)
-----------------------------
For float32 vectors ``a, b`` of length ``n`` and an :class:`tfaccum.AccumConfig` with
accumulator ``A``, product format ``P`` (``None``: exact), chunk size ``c`` and chunk-sum
format ``O`` (default ``A``)::

    p_k = a_k × b_k                          exact; 0 × Inf = NaN
    p_k = Q_P(p_k)                           if P is given          (counter 3k)
    c = 0:  s = +0;  for k = 0..n-1:  s = Q_A(s + p_k)                (counter 3k+1)
    c > 0:  s = +0;  for each chunk j = products jc .. min(n, (j+1)c) - 1:
                t = +0;  for k in chunk j:  t = Q_A(t + p_k)        (counter 3k+1, k global)
                s = Q_O(s + t)                                        (counter 3j+2)
    return s as float32

Sums are exact before rounding and follow IEEE 754 for specials: NaN propagates,
``Inf - Inf = NaN``, an exact zero sum is ``+0`` except ``(-0) + (-0) = -0``.

Stochastic rounding draws ``r`` from a counter-based generator keyed by the config's seed,
the training *step* (an integer >= 0, the ops' ``step`` input; 0 by default), the output
*element* (the flat row-major index of the value being computed; for a grouped
convolution, in the whole output) and the *counter* of the rounding (above; ``quantize``
uses counter 0)::

    mix64(z)           = SplitMix64 finalizer (all arithmetic mod 2^64)
    stream(seed, step) = seed ^ mix64(step · 0xC2B2AE3D27D4EB4F)      (= seed at step 0)
    key(s, e)          = mix64(s + (e + 1) · 0x9E3779B97F4A7C15),  s = stream(seed, step)
    r                  = mix64(key(s, e) ^ ((c + 1) · 0xD1B54A32D192ED03)) >> 40

Where the dot products come from (numerics §4–5)
------------------------------------------------
=================================  ==================  =========================  ======
op                                 output element      summed over, in order      length
=================================  ==================  =========================  ======
``y = a·b``, a [M,K], b [K,N]      ``y[i,j]``          ``k = 0..K-1``             K
bwd ``da = dy·bᵀ``                 ``da[i,k]``         ``j = 0..N-1``             N
grad ``db = aᵀ·dy``                ``db[k,j]``         ``i = 0..M-1``             M
conv2d NHWC, w [KH,KW,Cin,Cout]    ``y[b,oy,ox,co]``   ``(ky, kx, ci)`` row-major  KH·KW·Cin
conv bwd                           ``dx[b,iy,ix,ci]``  ``(ky, kx, co)`` row-major  KH·KW·Cout
conv grad                          ``dw[ky,kx,ci,co]`` ``(b, oy, ox)`` row-major   B·OH·OW
=================================  ==================  =========================  ======

Grouped convolution (``G`` groups: x has ``G·C`` channels for a filter
``[KH,KW,C,Cout]``, ``Cout = G·D``): output channel ``co`` belongs to group
``g = co // D`` and sums only its group's input channels ``g·C + ci``, ``ci < C``
(forward, ``(ky, kx, ci)``); ``dx[..., g·C + ci]`` sums ``(ky, kx, d)`` over the group's
``D`` output channels ``g·D + d``; ``dw[ky,kx,ci,co]`` reads input channel ``g·C + ci``.
The stochastic element is the flat index in the whole ``y``, ``dx`` or ``dw``.

Transposed matmul operands change only where values are read. The forward conv tap of
``(oy, ox, ky, kx)`` is the input pixel ``(oy·sy + ky·dy - pad_top, ox·sx + kx·dx - pad_left)``
(``s`` strides, ``d`` dilations); the input-gradient tap ``(ky, kx)`` of ``dx[b,iy,ix,ci]`` is
the output pixel ``oy = (iy + pad_top - ky·dy) / sy`` (likewise ``ox``). A tap that falls
outside the image, or (input gradient) whose ``oy``/``ox`` is not an integer in range, is an
exact ``+0`` operand: its product ``+0 × w`` (a zero with the sign of ``w``; NaN if ``w`` is
infinite) still counts in the length and the chunk boundaries.
Output sizes and SAME padding are TensorFlow's: ``SAME``: ``out = ceil(in / s)``,
``pad_total = max((out-1)·s + (k-1)·d + 1 - in, 0)``, ``pad_top = pad_total // 2``;
``VALID`` and explicit padding: ``out = (in + pads - (k-1)·d - 1) // s + 1``.

With an :class:`tfaccum.AccumPolicy`, ``fwd``, ``bwd`` and ``grad`` configure the three
GEMMs; if ``policy.operands`` is set, each GEMM's two inputs are first rounded to that
format (nearest-even). Every op function below takes either an AccumConfig (used as is,
no operand quantization) or an AccumPolicy (the config of that op's GEMM, and operand
quantization); ``matmul_grads`` and ``conv2d_grads`` apply an AccumConfig to both GEMMs.

Example::

    >>> import numpy as np
    >>> from tfaccum.config import AccumConfig, FloatFormat
    >>> from tfaccum.reference import dot, round_to_format
    >>> round_to_format(1 + 2**-11, FloatFormat(5, 10))      # a tie: goes to the even 1.0
    1.0
    >>> cfg = AccumConfig(accumulator=FloatFormat(5, 10))     # half-precision partial sums
    >>> float(dot(np.ones(3000, np.float32), np.ones(3000, np.float32), cfg))
    2048.0
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Tuple

import numpy as np

from .config import ROUNDING_MODES, AccumConfig, AccumPolicy, FloatFormat, as_format

__all__ = [
    "stream_seed",
    "random_bits",
    "round_to_format",
    "quantize",
    "dot",
    "matmul",
    "matmul_grads",
    "conv2d",
    "conv2d_transpose",
    "conv2d_transpose_grads",
    "conv2d_backprop_input",
    "conv2d_backprop_filter",
    "conv2d_grads",
    "conv2d_geometry",
    "batched_matmul",
    "batched_matmul_grads",
    "einsum",
    "einsum_grads",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_COUNTER_MULT = 0xD1B54A32D192ED03
_STEP_MULT = 0xC2B2AE3D27D4EB4F
_RBITS = 24  # width of the stochastic-rounding draw

# The value of an out-of-image (or, for the input gradient, non-existent) conv tap: an
# exact +0 operand. Its product follows section 3 like any other (0 × w is a zero with
# the sign of w, and 0 × Inf is NaN).
_PADDING_TAP = 0.0


# -------------------------------------------------------------------------------------
# The random generator (numerics §4)
# -------------------------------------------------------------------------------------
def _mix64(z: int) -> int:
    """SplitMix64 finalizer, arithmetic modulo 2^64."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    if not 0 <= step < 2 ** 63:
        raise ValueError(f"step must be in 0..2**63-1, got {step}")
    return int(step)


def stream_seed(seed: int, step: int = 0) -> int:
    """The seed of step ``step``'s stream: ``seed ^ mix64(step · 0xC2B2AE3D27D4EB4F)``.

    ``seed`` is taken modulo 2^64 (so a negative int64 seed is its two's-complement
    uint64); ``step`` is an int >= 0. Step 0 gives ``seed`` itself (``mix64(0) = 0``).
    """
    step = _check_step(step)
    return (seed % 2 ** 64) ^ _mix64(step * _STEP_MULT)


def random_bits(seed: int, element: int, counter: int, step: int = 0) -> int:
    """The 24-bit draw ``r(seed, element, counter)`` of step ``step``.

    ``seed`` is taken modulo 2^64 (so a negative int64 seed is its two's-complement uint64).
    """
    key = _mix64(stream_seed(seed, step) + (element + 1) * _GOLDEN)
    return _mix64(key ^ (((counter + 1) * _COUNTER_MULT) & _MASK64)) >> (64 - _RBITS)


# -------------------------------------------------------------------------------------
# Exact values with IEEE specials
#
# An exact value is either a Fraction (finite and non-zero) or a Python float that is a
# signed zero, an infinity or NaN: the Fraction carries the arithmetic, the float carries
# what a rational cannot (the sign of zero, Inf, NaN).
# -------------------------------------------------------------------------------------
def _exact(v: float):
    v = float(v)
    if v == 0.0 or math.isinf(v) or math.isnan(v):
        return v
    return Fraction(v)


def _is_special(v) -> bool:
    return isinstance(v, float)


def _negative(v) -> bool:
    return math.copysign(1.0, v) < 0 if isinstance(v, float) else v < 0


def _as_float(v) -> float:
    return v if isinstance(v, float) else float(v)


def _mul(x, y):
    """The exact product ``x × y`` (IEEE for specials)."""
    if not _is_special(x) and not _is_special(y):
        return x * y  # non-zero finite × non-zero finite
    fx, fy = _as_float(x), _as_float(y)
    if math.isnan(fx) or math.isnan(fy):
        return math.nan
    negative = _negative(x) != _negative(y)
    if math.isinf(fx) or math.isinf(fy):
        if fx == 0.0 or fy == 0.0:
            return math.nan  # 0 × Inf
        return -math.inf if negative else math.inf
    return -0.0 if negative else 0.0  # a zero times a finite value


def _add(x, y):
    """The exact sum ``x + y`` (IEEE for specials; an exact zero sum is +0 unless -0 + -0)."""
    if not _is_special(x) and not _is_special(y):
        s = x + y
        return s if s != 0 else 0.0
    fx, fy = _as_float(x), _as_float(y)
    if math.isnan(fx) or math.isnan(fy):
        return math.nan
    if math.isinf(fx) or math.isinf(fy):
        if math.isinf(fx) and math.isinf(fy) and fx != fy:
            return math.nan  # Inf - Inf
        return fx if math.isinf(fx) else fy
    if fx == 0.0 and fy == 0.0:
        return -0.0 if (_negative(x) and _negative(y)) else 0.0
    return y if fx == 0.0 else x  # zero + non-zero finite


# -------------------------------------------------------------------------------------
# Rounding one exact value (numerics §2)
# -------------------------------------------------------------------------------------
def _floor_log2(p: int, q: int) -> int:
    """``floor(log2(p / q))`` for positive integers, exactly."""
    e = p.bit_length() - q.bit_length()  # 2^(e-1) < p/q < 2^(e+1)
    # p/q >= 2^e  <=>  p >= q·2^e  (shift whichever side keeps integers)
    if (p >= q << e) if e >= 0 else (p << -e >= q):
        return e
    return e - 1


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def _dyadic(n: int, k: int) -> Fraction:
    """``n · 2^k`` as a Fraction."""
    return Fraction(n << k) if k >= 0 else Fraction(n, 1 << -k)


@functools.lru_cache(maxsize=None)
def _limits(fmt: FloatFormat) -> Tuple[Fraction, Fraction]:
    """(smallest normal 2^emin, largest finite (2^(m+1) - 1)·2^(emax-m)) of ``fmt``, exactly;
    a finite (FN) format's top significand is NaN, so its largest is (2^(m+1) - 2)·2^(emax-m)."""
    m = fmt.mantissa_bits
    return _dyadic(1, fmt.emin), _dyadic(2 ** (m + 1) - 1 - int(fmt.finite), fmt.emax - m)


def _round_exact(x, fmt: FloatFormat, rounding: str, rbits):
    """``Q_F`` of an exact value (Fraction or special float), giving an exact value."""
    if isinstance(x, float):
        if math.isinf(x) and fmt.finite and fmt.overflow == "saturate":
            return -_limits(fmt)[1] if x < 0 else _limits(fmt)[1]  # no Inf: satfinite
        return x  # NaN -> NaN, ±Inf -> ±Inf, ±0 -> ±0
    negative = x < 0
    p, q = abs(x.numerator), x.denominator  # |x| = p / q > 0

    m = fmt.mantissa_bits
    k = max(_floor_log2(p, q), fmt.emin) - m  # ulp = 2^k
    # |x| / 2^k = n + rem/den with integer n and 0 <= rem < den, i.e. n = trunc(|x| / ulp)
    num, den = (p, q << k) if k >= 0 else (p << -k, q)
    n, rem = divmod(num, den)

    if rounding == "nearest_even":
        if 2 * rem > den or (2 * rem == den and n % 2 == 1):
            n += 1
    elif rounding == "stochastic":
        f24 = (rem << _RBITS) // den  # floor(f · 2^24), f = rem/den
        if f24 + rbits >= 2 ** _RBITS:
            n += 1
    # toward_zero: n is already the truncation.

    magnitude = _dyadic(n, k)  # the rounded |x|, with unbounded exponent range
    smallest_normal, max_value = _limits(fmt)
    if not fmt.subnormals and magnitude < smallest_normal:
        magnitude = 0
    if magnitude > max_value:
        if fmt.overflow == "inf" and rounding != "toward_zero":
            return -math.inf if negative else math.inf
        magnitude = max_value
    if magnitude == 0:
        return -0.0 if negative else 0.0  # a non-zero x that rounds to zero keeps its sign
    return -magnitude if negative else magnitude


def round_to_format(x, fmt, rounding: str = "nearest_even", rbits=None) -> float:
    """``Q_F(x)``: the exact real ``x`` rounded once to format ``fmt``.

    Args:
      x: a Fraction, int or float (float NaN, ±Inf and ±0 allowed).
      fmt: a FloatFormat (or anything ``as_format`` accepts).
      rounding: ``"nearest_even"``, ``"toward_zero"`` or ``"stochastic"``.
      rbits: the 24-bit random draw ``r``; required for ``"stochastic"``.

    Returns:
      The rounded value as a Python float (exactly representable in float32).
    """
    fmt = as_format(fmt)
    _check_rounding(rounding)
    if rounding == "stochastic" and (rbits is None or not 0 <= rbits < 2 ** _RBITS):
        raise ValueError(f"stochastic rounding needs rbits in [0, 2^{_RBITS}), got {rbits!r}")
    if isinstance(x, (float, np.floating)):
        x = _exact(x)
    else:
        x = Fraction(x)
        if x == 0:
            x = 0.0  # a rational zero has no sign: +0
    return _as_float(_round_exact(x, fmt, rounding, rbits))


# -------------------------------------------------------------------------------------
# The dot product (numerics §3)
# -------------------------------------------------------------------------------------
def _accumulate(pairs, config: AccumConfig, element: int, step: int = 0) -> np.float32:
    """Sum the dot product of the exact operand pairs ``(a_k, b_k)`` of output ``element``
    as ``config`` says."""
    if config.fused is not None:
        return _accumulate_fused(pairs, config, element, step)
    stochastic = config.rounding == "stochastic"

    def q(v, fmt, counter):
        rbits = random_bits(config.seed, element, counter, step) if stochastic else None
        return _round_exact(v, fmt, config.rounding, rbits)

    products = [_mul(x, y) for x, y in pairs]
    if config.product is not None:
        products = [q(p, config.product, 3 * k) for k, p in enumerate(products)]

    n, c = len(products), config.chunk_size
    s = 0.0  # +0
    if c == 0:
        for k in range(n):
            s = q(_add(s, products[k]), config.accumulator, 3 * k + 1)
    else:
        for j, start in enumerate(range(0, n, c)):
            t = 0.0  # +0
            for k in range(start, min(n, start + c)):  # k is the global product index
                t = q(_add(t, products[k]), config.accumulator, 3 * k + 1)
            s = q(_add(s, t), config.effective_chunk_accumulator, 3 * j + 2)
    return np.float32(_as_float(s))


# -------------------------------------------------------------------------------------
# The fused multi-term adder (numerics §7)
# -------------------------------------------------------------------------------------
def _exponent(v: Fraction, emin: int) -> int:
    """The exponent a non-zero finite value enters the adder with: ``max(floor(log2|v|),
    emin)`` (a value below ``2^emin`` is a subnormal of its format)."""
    return max(_floor_log2(abs(v.numerator), v.denominator), emin)


def fused_block(d, pairs, config: AccumConfig):
    """One fused dot-product-add ``FDPA(a_block, b_block, d)`` of numerics §7, on exact
    values: ``d`` (the running sum, an exact value) plus the exact products of ``pairs``,
    each aligned to the largest term exponent and truncated ``F`` bits below it, added
    exactly and rounded once to the accumulator format. Returns an exact value."""
    adder, acc = config.fused, config.accumulator
    products = [_mul(x, y) for x, y in pairs]

    # Specials: NaN, Inf - Inf and 0 x Inf give NaN; otherwise an infinity wins.
    specials = [v for v in [d] + products if _is_special(v) and v != 0.0]
    if specials:
        total = 0.0
        for v in specials:
            total = _add(total, v)
        return total

    # Each term's exponent: a product's is the sum of its operands' exponents (its
    # significand, the product of theirs, lies in [0, 4)); a zero takes zero_exponent.
    exponents, values = [], []
    if d == 0.0:
        exponents.append(adder.zero_exponent)
        values.append(Fraction(0))
    else:
        exponents.append(_exponent(d, acc.emin))
        values.append(d)
    for (x, y), p in zip(pairs, products):
        if p == 0.0:
            exponents.append(adder.zero_exponent)
            values.append(Fraction(0))
        else:
            exponents.append(_exponent(x, adder.operand_emin) + _exponent(y, adder.operand_emin))
            values.append(p)

    # Align to the largest exponent, truncate toward zero F bits below it, add exactly.
    grid = _dyadic(1, max(exponents) - adder.fraction_bits)
    total = Fraction(0)
    for v in values:
        kept = (abs(v) // grid) * grid  # floor of the magnitude: truncation toward zero
        total += -kept if v < 0 else kept
    if total == 0:
        return 0.0  # an exact zero sum is +0

    # One rounding to the accumulator format. With overflow="inf" an overflow is Inf under
    # either rounding, as the published hardware models convert (numerics §7).
    if (adder.output_rounding == "toward_zero" and acc.overflow == "inf"
            and abs(total) >= _dyadic(1, acc.emax + 1)):
        return -math.inf if total < 0 else math.inf
    return _round_exact(total, acc, adder.output_rounding, None)


def _fused_chain(pairs, config: AccumConfig):
    """``D_0 = +0, D_{j+1} = FDPA(block_j, D_j)`` over blocks of ``L`` pairs, the last
    one partial; an empty chain is +0."""
    d = 0.0
    terms = config.fused.terms
    for start in range(0, len(pairs), terms):
        d = fused_block(d, pairs[start:start + terms], config)
    return d


def _accumulate_fused(pairs, config: AccumConfig, element: int, step: int) -> np.float32:
    """The fused chain over the whole dot product, or (promotion) over each chunk of
    ``chunk_size`` products, each chunk's result added to the total in the chunk
    format with ``config.rounding`` (counter 3j+2)."""
    c = config.chunk_size
    if c == 0:
        return np.float32(_as_float(_fused_chain(pairs, config)))
    stochastic = config.rounding == "stochastic"
    s = 0.0
    for j, start in enumerate(range(0, len(pairs), c)):
        t = _fused_chain(pairs[start:start + c], config)
        rbits = random_bits(config.seed, element, 3 * j + 2, step) if stochastic else None
        s = _round_exact(_add(s, t), config.effective_chunk_accumulator, config.rounding, rbits)
    return np.float32(_as_float(s))


def _as_f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _exact_array(x: np.ndarray) -> np.ndarray:
    """A float32 array as an object array of exact values (converted once, read many times)."""
    out = np.empty(x.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(x.reshape(-1).tolist()):
        flat[i] = _exact(v)
    return out


def _as_config(config) -> AccumConfig:
    if isinstance(config, AccumPolicy):
        raise TypeError("dot takes one AccumConfig, not an AccumPolicy")
    return AccumConfig.from_dict(config)  # an AccumConfig is returned as is


def dot(a, b, config: AccumConfig, element: int = 0, step: int = 0) -> np.float32:
    """The emulated dot product of two float32 vectors (numerics §3).

    ``element`` is the output position and ``step`` the training step the stochastic draws
    are keyed by.
    """
    a, b = _as_f32(a).reshape(-1), _as_f32(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"dot: lengths differ ({a.size} and {b.size})")
    pairs = [(_exact(x), _exact(y)) for x, y in zip(a.tolist(), b.tolist())]
    return _accumulate(pairs, _as_config(config), element, _check_step(step))


# -------------------------------------------------------------------------------------
# quantize
# -------------------------------------------------------------------------------------
def quantize(x, fmt, rounding: str = "nearest_even", seed: int = 0,
             step: int = 0) -> np.ndarray:
    """Round every element of the float32 array ``x`` to ``fmt``.

    The stochastic draw of element ``i`` (flat row-major index) is
    ``random_bits(seed, i, 0, step)``. Non-float32 input is first converted to float32.
    """
    fmt = as_format(fmt)
    _check_rounding(rounding)
    step = _check_step(step)
    x = _as_f32(x)
    flat = x.reshape(-1).tolist()
    out = np.empty(len(flat), dtype=np.float32)
    for i, v in enumerate(flat):
        rbits = random_bits(seed, i, 0, step) if rounding == "stochastic" else None
        out[i] = round_to_format(v, fmt, rounding, rbits)
    return out.reshape(x.shape)


def _quantize_operand(x: np.ndarray, operands) -> np.ndarray:
    return x if operands is None else quantize(x, operands, "nearest_even")


def _split_policy(config, gemm: str) -> Tuple[AccumConfig, object]:
    """(config, operand format) of one GEMM ("fwd", "bwd" or "grad").

    An AccumPolicy gives its config for that GEMM and its operand format; an AccumConfig
    is used as is, without operand quantization.
    """
    if isinstance(config, AccumPolicy):
        return getattr(config, gemm), config.operands
    return _as_config(config), None


def _as_policy(policy) -> AccumPolicy:
    if isinstance(policy, AccumPolicy):
        return policy
    return AccumPolicy.uniform(_as_config(policy))


# -------------------------------------------------------------------------------------
# MatMul and its gradients (numerics §5)
# -------------------------------------------------------------------------------------
def _matmul_logical(a_ex, b_ex, config: AccumConfig, element_of, step: int = 0) -> np.ndarray:
    """``y[i,j] = sum_k a[i,k] b[k,j]`` on exact logical-orientation operands.

    ``element_of(i, j)`` gives the stochastic element of ``y[i,j]``; the result is in the
    logical [M, N] orientation.
    """
    (m, k_dim), (k_dim_b, n) = a_ex.shape, b_ex.shape
    if k_dim != k_dim_b:
        raise ValueError(f"matmul: inner dimensions differ ({k_dim} and {k_dim_b})")
    y = np.empty((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            pairs = [(a_ex[i, k], b_ex[k, j]) for k in range(k_dim)]
            y[i, j] = _accumulate(pairs, config, element_of(i, j), step)
    return y


def matmul(a, b, config, transpose_a: bool = False, transpose_b: bool = False,
           step: int = 0) -> np.ndarray:
    """``y = op(a) · op(b)`` with every ``y[i,j]`` an emulated dot product over ``k``.

    ``op(a)`` is ``aᵀ`` if ``transpose_a`` (a stored [K, M]), else ``a`` ([M, K]); same for b.
    The stochastic element of ``y[i,j]`` is ``i·N + j``, drawn in ``step``'s stream.
    ``config`` may be an AccumPolicy: then its ``fwd`` config is used and operands are
    quantized to ``policy.operands``.
    """
    step = _check_step(step)
    config, operands = _split_policy(config, "fwd")
    a = _exact_array(_quantize_operand(_as_f32(a), operands))
    b = _exact_array(_quantize_operand(_as_f32(b), operands))
    a_logical = a.T if transpose_a else a
    b_logical = b.T if transpose_b else b
    n = b_logical.shape[1]
    return _matmul_logical(a_logical, b_logical, config, lambda i, j: i * n + j, step)


def matmul_grads(a, b, dy, policy, transpose_a: bool = False,
                 transpose_b: bool = False, step: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients ``(da, db)`` of ``y = op(a) · op(b)`` for upstream gradient ``dy`` [M, N].

    Logically ``da = dy · op(b)ᵀ`` (``da[i,k]`` summed over ``j = 0..N-1``, config
    ``policy.bwd``) and ``db = op(a)ᵀ · dy`` (``db[k,j]`` summed over ``i = 0..M-1``, config
    ``policy.grad``). Each is returned in its operand's *stored* shape, and its stochastic
    element is the flat row-major index in that stored tensor. With ``policy.operands``,
    each GEMM's inputs (bwd: dy, b; grad: a, dy) are first rounded to it.
    An AccumConfig is accepted as a policy with that config for all three GEMMs. Both
    draw in ``step``'s stream.
    """
    policy = _as_policy(policy)
    step = _check_step(step)
    a32, b32, dy32 = _as_f32(a), _as_f32(b), _as_f32(dy)
    a_ex = _exact_array(_quantize_operand(a32, policy.operands))
    b_ex = _exact_array(_quantize_operand(b32, policy.operands))
    dy_ex = _exact_array(_quantize_operand(dy32, policy.operands))
    a_logical = a_ex.T if transpose_a else a_ex  # [M, K]
    b_logical = b_ex.T if transpose_b else b_ex  # [K, N]
    m, k_dim = a_logical.shape
    n = b_logical.shape[1]
    if dy_ex.shape != (m, n):
        raise ValueError(f"matmul_grads: dy has shape {dy_ex.shape}, expected {(m, n)}")

    # da[i,k] = sum_j dy[i,j] · b[k,j]; stored da[i,k] (or da[k,i] if transpose_a).
    da_element = (lambda i, k: k * m + i) if transpose_a else (lambda i, k: i * k_dim + k)
    da = _matmul_logical(dy_ex, b_logical.T, policy.bwd, da_element, step)
    # db[k,j] = sum_i a[i,k] · dy[i,j]; stored db[k,j] (or db[j,k] if transpose_b).
    db_element = (lambda k, j: j * k_dim + k) if transpose_b else (lambda k, j: k * n + j)
    db = _matmul_logical(a_logical.T, dy_ex, policy.grad, db_element, step)
    return (da.T if transpose_a else da), (db.T if transpose_b else db)


# -------------------------------------------------------------------------------------
# Conv2D and its gradients (numerics §5)
# -------------------------------------------------------------------------------------
def _pair(value, name: str) -> Tuple[int, int]:
    """(h, w) from an int, an (h, w) pair or an NHWC 4-tuple ``(1, h, w, 1)``."""
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return value
    if len(value) == 4 and value[0] == 1 and value[3] == 1:
        return value[1], value[2]
    raise ValueError(f"{name} must be an int, (h, w) or (1, h, w, 1), got {value!r}")


def _explicit_padding(padding) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    pads = [tuple(int(v) for v in p) for p in padding]
    if len(pads) == 4:  # TensorFlow's NHWC form [[0,0],[top,bottom],[left,right],[0,0]]
        if pads[0] != (0, 0) or pads[3] != (0, 0):
            raise ValueError(f"explicit padding of batch/channel dims must be 0, got {padding!r}")
        pads = pads[1:3]
    if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(f"explicit padding must be [(top, bottom), (left, right)], got {padding!r}")
    return pads[0], pads[1]


def _out_size_and_pad(size: int, k: int, stride: int, dilation: int, padding, axis: int):
    """TensorFlow's output size and leading pad along one spatial axis."""
    effective_k = (k - 1) * dilation + 1
    if isinstance(padding, str):
        if padding == "SAME":
            out = -(-size // stride)  # ceil(size / stride)
            pad_total = max((out - 1) * stride + effective_k - size, 0)
            return out, pad_total // 2
        if padding == "VALID":
            before = after = 0
        else:
            raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    else:
        before, after = _explicit_padding(padding)[axis]
    if size + before + after < effective_k:
        raise ValueError(f"conv2d: input size {size} (padded {size + before + after}) is smaller "
                         f"than the dilated kernel ({effective_k})")
    return (size + before + after - effective_k) // stride + 1, before


def conv2d_geometry(input_shape, filter_shape, strides=(1, 1), padding="SAME",
                    dilations=(1, 1)):
    """``(OH, OW, pad_top, pad_left)`` of a conv of an NHWC input with a [KH,KW,Cin,Cout] filter."""
    (sy, sx), (dly, dlx) = _pair(strides, "strides"), _pair(dilations, "dilations")
    _, h, w, _ = input_shape
    kh, kw = filter_shape[0], filter_shape[1]
    oh, pad_top = _out_size_and_pad(h, kh, sy, dly, padding, 0)
    ow, pad_left = _out_size_and_pad(w, kw, sx, dlx, padding, 1)
    return oh, ow, pad_top, pad_left


def _groups(what: str, cin: int, cin_w: int, cout: int) -> int:
    """The number of groups of a convolution whose input has ``cin`` channels and whose
    filter is ``[.., .., cin_w, cout]`` (TensorFlow's rule: ``cin`` a multiple of ``cin_w``)."""
    if cin == cin_w:  # one group, an empty sum when there are no channels
        return 1
    if cin_w <= 0 or cin <= 0 or cin % cin_w or cout % (cin // cin_w):
        raise ValueError(f"{what}: input has {cin} channels, filter expects {cin_w} "
                         f"(with {cout} output channels)")
    return cin // cin_w


def conv2d(x, w, config, strides=(1, 1), padding="SAME", dilations=(1, 1),
           step: int = 0) -> np.ndarray:
    """NHWC convolution ``y[b,oy,ox,co] = sum_{ky,kx,ci} x[b, tap] · w[ky,kx,ci,co]``.

    The sum runs over ``(ky, kx, ci)`` row-major; the tap is
    ``(oy·sy + ky·dy - pad_top, ox·sx + kx·dx - pad_left)``, an exact +0 tap if outside
    the image. A filter ``[KH,KW,C,Cout]`` on an input of ``G·C`` channels is a grouped
    convolution: ``y[..., co]`` reads input channels ``g·C + ci`` of its group
    ``g = co // (Cout/G)``. Stochastic element: the flat index of ``y``, drawn in
    ``step``'s stream. ``config`` may be an AccumPolicy (its ``fwd`` config, operands
    quantized to ``policy.operands``).
    """
    config, operands = _split_policy(config, "fwd")
    step = _check_step(step)
    x32, w32 = _as_f32(x), _as_f32(w)
    (batch, h, wid, cin), (kh, kw, cin_w, cout) = x32.shape, w32.shape
    groups = _groups("conv2d", cin, cin_w, cout)
    cout_g = cout // groups
    (sy, sx), (dly, dlx) = _pair(strides, "strides"), _pair(dilations, "dilations")
    oh, ow, pad_top, pad_left = conv2d_geometry(x32.shape, w32.shape, strides, padding, dilations)
    xe = _exact_array(_quantize_operand(x32, operands))
    we = _exact_array(_quantize_operand(w32, operands))

    y = np.empty((batch, oh, ow, cout), dtype=np.float32)
    element = 0
    for b in range(batch):
        for oy in range(oh):
            for ox in range(ow):
                for co in range(cout):
                    c0 = (co // cout_g) * cin_w  # the group's first input channel
                    pairs = []
                    for ky in range(kh):
                        for kx in range(kw):
                            iy = oy * sy + ky * dly - pad_top
                            ix = ox * sx + kx * dlx - pad_left
                            inside = 0 <= iy < h and 0 <= ix < wid
                            for ci in range(cin_w):
                                tap = xe[b, iy, ix, c0 + ci] if inside else _PADDING_TAP
                                pairs.append((tap, we[ky, kx, ci, co]))
                    y[b, oy, ox, co] = _accumulate(pairs, config, element, step)
                    element += 1
    return y


def conv2d_backprop_input(input_shape, w, dy, config, strides=(1, 1), padding="SAME",
                          dilations=(1, 1), step: int = 0) -> np.ndarray:
    """Input gradient ``dx[b,iy,ix,ci] = sum_{ky,kx,co} w[ky,kx,ci,co] · dy[b,oy,ox,co]``.

    The sum runs over ``(ky, kx, co)`` row-major with ``oy = (iy + pad_top - ky·dy) / sy``
    (likewise ``ox``); a tap whose ``oy``/``ox`` is not an integer in ``[0, OH)``/``[0, OW)``
    is an exact +0 tap. ``input_shape`` is the forward input's NHWC shape. Grouped
    (``input_shape`` has ``G·C`` channels, w is ``[KH,KW,C,Cout]``): ``dx[..., g·C + ci]``
    sums over its group's ``Cout/G`` output channels ``co = g·Cout/G + d`` with
    ``w[ky,kx,ci,co]``. Stochastic element: the flat index of ``dx``, drawn in ``step``'s
    stream. ``config`` may be an AccumPolicy: then its ``bwd`` config is used and w, dy are
    first quantized to ``policy.operands``.
    """
    config, operands = _split_policy(config, "bwd")
    step = _check_step(step)
    w32 = _quantize_operand(_as_f32(w), operands)
    dy32 = _quantize_operand(_as_f32(dy), operands)
    batch, h, wid, cin = (int(v) for v in input_shape)
    kh, kw, cin_w, cout = w32.shape
    groups = _groups("conv2d_backprop_input", cin, cin_w, cout)
    cout_g = cout // groups
    (sy, sx), (dly, dlx) = _pair(strides, "strides"), _pair(dilations, "dilations")
    oh, ow, pad_top, pad_left = conv2d_geometry((batch, h, wid, cin), w32.shape, strides,
                                                padding, dilations)
    if dy32.shape != (batch, oh, ow, cout):
        raise ValueError(f"conv2d_backprop_input: dy has shape {dy32.shape}, "
                         f"expected {(batch, oh, ow, cout)}")
    we, dye = _exact_array(w32), _exact_array(dy32)

    def source(i: int, pad: int, k: int, dilation: int, stride: int, size: int):
        """The output index tap k of input index i reads, or None if there is none."""
        num = i + pad - k * dilation
        if num % stride != 0:
            return None
        o = num // stride
        return o if 0 <= o < size else None

    dx = np.empty((batch, h, wid, cin), dtype=np.float32)
    element = 0
    for b in range(batch):
        for iy in range(h):
            for ix in range(wid):
                for ci in range(cin):
                    group, ci_w = divmod(ci, cin_w)
                    pairs = []
                    for ky in range(kh):
                        for kx in range(kw):
                            oy = source(iy, pad_top, ky, dly, sy, oh)
                            ox = source(ix, pad_left, kx, dlx, sx, ow)
                            for co in range(group * cout_g, (group + 1) * cout_g):
                                if oy is None or ox is None:
                                    tap = _PADDING_TAP
                                else:
                                    tap = dye[b, oy, ox, co]
                                pairs.append((tap, we[ky, kx, ci_w, co]))
                    dx[b, iy, ix, ci] = _accumulate(pairs, config, element, step)
                    element += 1
    return dx


def conv2d_backprop_filter(x, filter_shape, dy, config, strides=(1, 1), padding="SAME",
                           dilations=(1, 1), step: int = 0) -> np.ndarray:
    """Filter gradient ``dw[ky,kx,ci,co] = sum_{b,oy,ox} x[b, tap] · dy[b,oy,ox,co]``.

    The sum runs over ``(b, oy, ox)`` row-major; the tap is the forward one (an exact +0
    product outside the image). Grouped (x has ``G·C`` channels, ``filter_shape`` is
    ``[KH,KW,C,Cout]``): ``dw[ky,kx,ci,co]`` reads input channel ``g·C + ci`` of the group
    ``g = co // (Cout/G)``. Stochastic element: the flat index of ``dw``, drawn in
    ``step``'s stream. ``config`` may be an AccumPolicy: then its ``grad`` config is used
    and x, dy are first quantized to ``policy.operands``.
    """
    config, operands = _split_policy(config, "grad")
    step = _check_step(step)
    x32 = _quantize_operand(_as_f32(x), operands)
    dy32 = _quantize_operand(_as_f32(dy), operands)
    batch, h, wid, cin = x32.shape
    kh, kw, cin_w, cout = (int(v) for v in filter_shape)
    groups = _groups("conv2d_backprop_filter", cin, cin_w, cout)
    cout_g = cout // groups
    (sy, sx), (dly, dlx) = _pair(strides, "strides"), _pair(dilations, "dilations")
    oh, ow, pad_top, pad_left = conv2d_geometry(x32.shape, (kh, kw, cin_w, cout), strides,
                                                padding, dilations)
    if dy32.shape != (batch, oh, ow, cout):
        raise ValueError(f"conv2d_backprop_filter: dy has shape {dy32.shape}, "
                         f"expected {(batch, oh, ow, cout)}")
    xe, dye = _exact_array(x32), _exact_array(dy32)

    dw = np.empty((kh, kw, cin_w, cout), dtype=np.float32)
    element = 0
    for ky in range(kh):
        for kx in range(kw):
            for ci in range(cin_w):
                for co in range(cout):
                    c = (co // cout_g) * cin_w + ci  # the input channel, in co's group
                    pairs = []
                    for b in range(batch):
                        for oy in range(oh):
                            for ox in range(ow):
                                iy = oy * sy + ky * dly - pad_top
                                ix = ox * sx + kx * dlx - pad_left
                                inside = 0 <= iy < h and 0 <= ix < wid
                                tap = xe[b, iy, ix, c] if inside else _PADDING_TAP
                                pairs.append((tap, dye[b, oy, ox, co]))
                    dw[ky, kx, ci, co] = _accumulate(pairs, config, element, step)
                    element += 1
    return dw


def conv2d_grads(x, w, dy, policy, strides=(1, 1), padding="SAME",
                 dilations=(1, 1), step: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(dx, dw)`` of ``conv2d(x, w)``: dx with ``policy.bwd``, dw with ``policy.grad``.

    With ``policy.operands``, each GEMM's inputs (bwd: dy, w; grad: x, dy) are first
    rounded to it (nearest-even). An AccumConfig is accepted for all three GEMMs. Grouped
    convolutions as in :func:`conv2d`; both draw in ``step``'s stream.
    """
    policy = _as_policy(policy)
    x32, w32 = _as_f32(x), _as_f32(w)
    dx = conv2d_backprop_input(x32.shape, w32, dy, policy, strides, padding, dilations, step)
    dw = conv2d_backprop_filter(x32, w32.shape, dy, policy, strides, padding, dilations, step)
    return dx, dw


# -------------------------------------------------------------------------------------
# Transposed convolution (numerics §5): the input gradient of a convolution, as forward
# -------------------------------------------------------------------------------------
def conv2d_transpose(x, w, output_shape, policy, strides=(1, 1), padding="SAME",
                     dilations=(1, 1), step: int = 0) -> np.ndarray:
    """``tf.nn.conv2d_transpose(x, w, output_shape)``: ``w`` is ``[KH,KW,Cout,Cin]``, x
    ``[B,H,W,Cin]``; the convolution of an ``output_shape`` input by w has x's shape.

    ``y[b,oy,ox,co] = sum_{ky,kx,ci} w[ky,kx,co,ci] · x[b, iy, ix, ci]`` over ``(ky, kx,
    ci)`` row-major, with ``iy = (oy + pad_top - ky·dy) / sy`` (likewise ``ix``); a tap
    whose ``iy``/``ix`` is not an integer inside x is an exact +0 tap. That is
    :func:`conv2d_backprop_input` with x as ``dy``, here under ``policy.fwd`` (an
    AccumConfig: used as is) with x, w rounded to ``policy.operands`` first.
    """
    config, operands = _split_policy(policy, "fwd")
    return conv2d_backprop_input(output_shape, w, x,
                                 AccumPolicy(bwd=config, operands=operands),
                                 strides, padding, dilations, step)


def conv2d_transpose_grads(x, w, dy, policy, strides=(1, 1), padding="SAME",
                           dilations=(1, 1), step: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(dx, dw)`` of :func:`conv2d_transpose` for the upstream gradient ``dy``
    (``output_shape``): ``dx = conv2d(dy, w)`` under ``policy.bwd`` (each ``dx[b,iy,ix,ci]``
    sums ``(ky, kx, co)`` of ``dy`` at the forward taps), ``dw = conv2d_backprop_filter(dy,
    w.shape, x)`` under ``policy.grad`` (each ``dw[ky,kx,co,ci]`` sums ``(b, iy, ix)`` over
    x's image). With ``policy.operands`` each GEMM's inputs are rounded to it first."""
    policy = _as_policy(policy)
    dy32, w32 = _as_f32(dy), _as_f32(w)
    dx = conv2d(dy32, w32, AccumPolicy(fwd=policy.bwd, operands=policy.operands), strides,
                padding, dilations, step)
    dw = conv2d_backprop_filter(dy32, w32.shape, x, policy, strides, padding, dilations, step)
    return dx, dw


# =====================================================================================
# Batched matmul and two-operand einsum (numerics §8)
#
# A batched matmul is one 2-D matmul per matrix of the output, its stochastic elements
# offset to their flat index in the whole output; an einsum is one batched matmul of its
# operands transposed and reshaped, so each of its outputs is one dot product over the
# contracted indices. Written straight from numerics §8, sharing nothing with
# tfaccum.ops' transposes and reshapes.
# =====================================================================================
def _batch_shape(a_batch: tuple, b_batch: tuple) -> tuple:
    try:
        return tuple(np.broadcast_shapes(tuple(a_batch), tuple(b_batch)))
    except ValueError:
        raise ValueError(f"batched matmul: batch dimensions {a_batch} and {b_batch} do not "
                         "broadcast") from None


def _batch_operand(x: np.ndarray, batch: tuple, index: tuple) -> np.ndarray:
    """The matrix of ``x`` (batch dimensions right-aligned, size 1 repeated) that output
    batch ``index`` reads."""
    lead = len(batch) - (x.ndim - 2)
    return x[tuple(0 if x.shape[d - lead] == 1 else index[d]
                   for d in range(lead, len(batch)))]


def batched_matmul(a, b, config, transpose_a: bool = False, transpose_b: bool = False,
                   step: int = 0) -> np.ndarray:
    """``y[..., :, :] = op(a[..., :, :]) · op(b[..., :, :])`` with the batch dimensions
    (all but the last two) broadcast as ``tf.matmul``'s. Matrix ``g`` of ``y`` (its flat
    batch index) is :func:`matmul` of its operands' matrices with every stochastic element
    offset by ``g·M·N``: the flat index of the output in the whole ``y``."""
    step = _check_step(step)
    config, operands = _split_policy(config, "fwd")
    a = _exact_array(_quantize_operand(_as_f32(a), operands))
    b = _exact_array(_quantize_operand(_as_f32(b), operands))
    batch = _batch_shape(a.shape[:-2], b.shape[:-2])
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    y = np.empty(batch + (m, n), np.float32)
    for g, index in enumerate(np.ndindex(*batch)):
        a_g, b_g = _batch_operand(a, batch, index), _batch_operand(b, batch, index)
        y[index] = _matmul_logical(a_g.T if transpose_a else a_g, b_g.T if transpose_b else b_g,
                                   config, lambda i, j, g=g: (g * m + i) * n + j, step)
    return y


def _sum_broadcast(grads: np.ndarray, shape: tuple) -> np.ndarray:
    """Per-output-matrix gradients summed (float32) over the batch dimensions along which
    an operand of ``shape`` was broadcast."""
    lead = grads.ndim - len(shape)
    out = grads.sum(axis=tuple(range(lead)), dtype=np.float32) if lead else grads
    axes = tuple(d for d in range(len(shape) - 2) if shape[d] == 1 and out.shape[d] != 1)
    return out.sum(axis=axes, keepdims=True, dtype=np.float32) if axes else out


def batched_matmul_grads(a, b, dy, policy, transpose_a: bool = False,
                         transpose_b: bool = False, step: int = 0):
    """``(da, db)`` of :func:`batched_matmul`: for every output matrix ``g``, the
    :func:`matmul_grads` GEMMs of its operands' matrices (``da`` under ``policy.bwd``
    summed over ``N``, ``db`` under ``policy.grad`` summed over ``M``), with stochastic
    elements at their flat index in the batch of per-output gradients (``g·M·K`` +
    the index in the stored ``da`` matrix, likewise ``db``). An operand broadcast along a
    batch dimension gets those per-output gradients summed in float32 (order unspecified
    by tfaccum for more than two terms)."""
    policy = _as_policy(policy)
    step = _check_step(step)
    a32, b32 = _as_f32(a), _as_f32(b)
    a_ex = _exact_array(_quantize_operand(a32, policy.operands))
    b_ex = _exact_array(_quantize_operand(b32, policy.operands))
    dy_ex = _exact_array(_quantize_operand(_as_f32(dy), policy.operands))
    batch = _batch_shape(a32.shape[:-2], b32.shape[:-2])
    a_mat, b_mat = a32.shape[-2:], b32.shape[-2:]  # stored shapes of one matrix
    da = np.empty(batch + a_mat, np.float32)
    db = np.empty(batch + b_mat, np.float32)
    for g, index in enumerate(np.ndindex(*batch)):
        a_g, b_g = _batch_operand(a_ex, batch, index), _batch_operand(b_ex, batch, index)
        a_l = a_g.T if transpose_a else a_g  # [M, K]
        b_l = b_g.T if transpose_b else b_g  # [K, N]
        (m, k_dim), n = a_l.shape, b_l.shape[1]
        da_off, db_off = g * m * k_dim, g * k_dim * n
        da_element = ((lambda i, k: da_off + k * m + i) if transpose_a
                      else (lambda i, k: da_off + i * k_dim + k))
        db_element = ((lambda k, j: db_off + j * k_dim + k) if transpose_b
                      else (lambda k, j: db_off + k * n + j))
        da_g = _matmul_logical(dy_ex[index], b_l.T, policy.bwd, da_element, step)
        db_g = _matmul_logical(a_l.T, dy_ex[index], policy.grad, db_element, step)
        da[index] = da_g.T if transpose_a else da_g
        db[index] = db_g.T if transpose_b else db_g
    return _sum_broadcast(da, a32.shape), _sum_broadcast(db, b32.shape)


def _einsum_roles(equation: str):
    """(terms of a and b, output, batch, contracted, free of a, free of b) of a
    two-operand einsum, as numerics §8 names them."""
    lhs, out = equation.replace(" ", "").split("->")
    ta, tb = lhs.split(",")
    batch = [c for c in out if c in ta and c in tb]
    contracted = [c for c in ta if c in tb and c not in out]  # in a's order
    free_a = [c for c in out if c in ta and c not in tb]
    free_b = [c for c in out if c in tb and c not in ta]
    return ta, tb, out, batch, contracted, free_a, free_b


def _einsum_gemm(layout, summed, sizes, factors, config, step):
    """An array over the indices ``layout`` (row-major) whose element at flat index ``e``
    sums, over the indices ``summed`` row-major, the products of ``factors`` (each an
    (exact array, its index term)); element ``e`` draws as output ``e``."""
    shape = tuple(sizes[c] for c in layout)
    out = np.empty(shape, np.float32)
    for e, index in enumerate(np.ndindex(*shape)):
        at = dict(zip(layout, index))
        pairs = []
        for k in np.ndindex(*(sizes[c] for c in summed)):
            at.update(zip(summed, k))
            (x, tx), (y, ty) = factors
            pairs.append((x[tuple(at[c] for c in tx)], y[tuple(at[c] for c in ty)]))
        out[index] = _accumulate(pairs, config, e, step)
    return out


def _einsum_sizes(terms_and_arrays) -> dict:
    sizes = {}
    for term, x in terms_and_arrays:
        for c, n in zip(term, x.shape):
            if sizes.setdefault(c, n) != n:
                raise ValueError(f"einsum: index {c!r} has sizes {sizes[c]} and {n}")
    return sizes


def einsum(equation: str, a, b, policy, step: int = 0) -> np.ndarray:
    """The two-operand einsum ``equation`` (no ellipsis) of ``accum_einsum``: every output
    sums, in order, the products over its contracted indices (those of both operands not
    in the output) row-major in the order they appear in ``a``'s term, under
    ``policy.fwd``. Its stochastic element is its flat index in the layout (batch indices,
    free indices of a, free indices of b), each group in output order."""
    step = _check_step(step)
    config, operands = _split_policy(policy, "fwd")
    a = _exact_array(_quantize_operand(_as_f32(a), operands))
    b = _exact_array(_quantize_operand(_as_f32(b), operands))
    ta, tb, out, batch, contracted, free_a, free_b = _einsum_roles(equation)
    sizes = _einsum_sizes([(ta, a), (tb, b)])
    layout = batch + free_a + free_b
    y = _einsum_gemm(layout, contracted, sizes, ((a, ta), (b, tb)), config, step)
    return y.transpose([layout.index(c) for c in out])


def einsum_grads(equation: str, a, b, dy, policy, step: int = 0):
    """``(da, db)`` of :func:`einsum` for the upstream gradient ``dy`` (shaped as the
    output). ``da`` (``policy.bwd``) sums, over the free indices of b in output order, the
    products ``dy · b``; its stochastic element is the flat index in the layout (batch,
    free of a, contracted). ``db`` (``policy.grad``) sums over the free indices of a in
    output order the products ``a · dy``; layout (batch, contracted, free of b). Each is
    returned in its operand's own index order."""
    policy = _as_policy(policy)
    step = _check_step(step)
    a = _exact_array(_quantize_operand(_as_f32(a), policy.operands))
    b = _exact_array(_quantize_operand(_as_f32(b), policy.operands))
    dy = _exact_array(_quantize_operand(_as_f32(dy), policy.operands))
    ta, tb, out, batch, contracted, free_a, free_b = _einsum_roles(equation)
    sizes = _einsum_sizes([(ta, a), (tb, b), (out, dy)])
    da_layout = batch + free_a + contracted
    da = _einsum_gemm(da_layout, free_b, sizes, ((dy, out), (b, tb)), policy.bwd, step)
    db_layout = batch + contracted + free_b
    db = _einsum_gemm(db_layout, free_a, sizes, ((a, ta), (dy, out)), policy.grad, step)
    return (da.transpose([da_layout.index(c) for c in ta]),
            db.transpose([db_layout.index(c) for c in tb]))
