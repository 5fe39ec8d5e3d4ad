r"""Variance retention ratio (VRR) of a narrow-float accumulation: analytical and measured.

A dot product of length ``n`` is accumulated as ``s <- Q(s + p_k)`` in a float with
``m_acc`` mantissa bits (docs/numerics.md section 3). tfaccum measures what the narrow
accumulator loses with the **variance retention ratio**

.. math::

    \mathrm{VRR} = 1 - \frac{E[(c - x)^2]}{\mathrm{Var}(x)}

where ``c`` is the computed sum and ``x`` the exact one, over products ``p_k`` that are
i.i.d., zero-mean, Gaussian with variance ``sigma^2`` and rounded to ``m_p`` mantissa
bits (so ``Var(x) = n sigma^2``). When the lost part ``c - x`` is orthogonal to what the
accumulator keeps (the swamping picture of Sakr et al., ICLR 2019) this is exactly
``Var(c) / Var(x)``; under round-to-nearest it stays a retention ratio (at most 1)
because it counts rounding noise as lost information rather than as retained variance.
``docs/vrr.md`` derives the analytical form step by step and names its approximations.

Functions::

    >>> from tfaccum.analysis.vrr import min_mantissa_bits, vrr, vrr_monte_carlo
    >>> round(vrr(4608, acc_mantissa_bits=9, product_mantissa_bits=5), 4)   # analytical
    0.9996
    >>> vrr_monte_carlo(4608, 9, 5, trials=1000)     # measured with tfaccum's kernels
    VRREstimate(value=0.9995..., low=0.9994..., high=0.9996..., ...)
    >>> min_mantissa_bits(4608, product_mantissa_bits=5, chunk_size=64)   # v(n) < 50
    6

The precision criterion (Sakr et al.) is ``v(n) = exp(n (1 - VRR)) < cutoff`` (50 by
default). With this VRR, ``n (1 - VRR) = E[(c - x)^2] / sigma^2``: the accumulated error
energy in units of one product's variance must stay below ``ln(cutoff)`` (3.9 for 50).
The default criterion ``"bounded"`` also requires ``1 - VRR <= operand_noise(2)``
(~0.56 %, what FP8 E5M2 operand rounding already costs each product in the paper's
setting; docs/vrr.md section 2b), which only binds below ``n ~ 700``. ``rounding``
selects nearest-even (the model above), toward-zero or stochastic accumulation (a joint
Gaussian model of the computed and exact sums, docs/vrr.md section 12).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from scipy.special import ndtr, ndtri

from tfaccum.config import ROUNDING_MODES

__all__ = [
    "ROUNDINGS",
    "CRITERIA",
    "DEFAULT_MAX_RELATIVE_LOSS",
    "VRREstimate",
    "operand_noise",
    "criterion_description",
    "vrr",
    "variance_lost",
    "vrr_monte_carlo",
    "v_criterion",
    "passes_criterion",
    "min_mantissa_bits",
    "empirical_vrr",
    "product_variance",
    "plot_vrr",
    "MONTE_CARLO_EXPONENT_BITS",
]

#: Exponent bits of the accumulator in the Monte Carlo estimate: binary32's range, so
#: sums of N(0, 1) products never overflow or reach the subnormals (the analysis is about
#: the mantissa; tfaccum's plans then use the paper's 6 exponent bits).
MONTE_CARLO_EXPONENT_BITS = 8

#: The rounding modes the analysis models (those of tfaccum's kernels, numerics.md 2).
ROUNDINGS = tuple(ROUNDING_MODES)
#: The precision criteria: ``"bounded"`` (default) and the paper's ``"paper"``.
CRITERIA = ("bounded", "paper")

_MAX_BITS = 23
_SQRT_2PI = math.sqrt(2.0 * math.pi)
# Binade exponents E (|s| in [2^E, 2^(E+1))) tabulated for the partial sums and products.
_E = np.arange(-160, 131)
_E_OFFSET = -int(_E[0])
# Summation of the per-step losses: every step up to _EXACT_STEPS, then RK2 steps of
# about k / _STEPS_PER_E_FOLD products (the per-step loss is smooth in k there).
_EXACT_STEPS = 64
_STEPS_PER_E_FOLD = 64


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------
def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {allowed}, got {value}")
    return value


def _check_choice(name: str, value, choices) -> str:
    allowed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {allowed}; got "
                        f"{type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def _check_rounding(rounding) -> str:
    return _check_choice("rounding", rounding, ROUNDINGS)


def _check_criterion(criterion) -> str:
    return _check_choice("criterion", criterion, CRITERIA)


def _check_max_relative_loss(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating,
                                                                     np.integer)):
        raise TypeError(f"max_relative_loss must be a number in (0, 1], got "
                        f"{type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"max_relative_loss must be in (0, 1], got {value}")
    return value


def _check_args(n, acc_mantissa_bits, product_mantissa_bits, chunk_size) -> Tuple[int, ...]:
    return (_check_int("n", n, 0),
            _check_int("acc_mantissa_bits", acc_mantissa_bits, 0, _MAX_BITS),
            _check_int("product_mantissa_bits", product_mantissa_bits, 0, _MAX_BITS),
            _check_int("chunk_size", chunk_size, 0))


# ---------------------------------------------------------------------------------------
# Gaussian building blocks (standard normal, arguments in units of sigma)
# ---------------------------------------------------------------------------------------
def _pdf(x):
    return np.exp(-0.5 * np.square(x)) / _SQRT_2PI


def _mass(a, b):
    """P(a <= Z < b)."""
    return ndtr(b) - ndtr(a)


def _first_moment(a, b):
    """E[Z; a <= Z < b] for 0 <= a <= b."""
    return _pdf(a) - _pdf(b)


def _second_moment(a, b):
    """E[Z^2; a <= Z < b] for 0 <= a <= b (finite b)."""
    return _mass(a, b) - (b * _pdf(b) - a * _pdf(a))


@functools.lru_cache(maxsize=None)
def product_variance(product_mantissa_bits: int) -> float:
    """``E[Q(Z)^2]`` for ``Z ~ N(0, 1)`` rounded (nearest-even) to ``product_mantissa_bits``.

    The variance of the products tfaccum's Monte Carlo draws (and the analytical model
    assumes); 1 up to a Sheppard term ``~ 2^(-2 m_p) / 12``.
    """
    mp = _check_int("product_mantissa_bits", product_mantissa_bits, 0, _MAX_BITS)
    if mp > 12:  # within 1e-8 of 1
        return 1.0
    total = 0.0
    steps = 2 ** mp
    for e in range(-60, 8):
        ulp = math.ldexp(1.0, e - mp)
        values = math.ldexp(1.0, e) + ulp * np.arange(steps + 1)  # incl. the next power
        # Rounding cells: half an ulp either side. 2^e's cell below 2^e belongs to the
        # binade under it (as 2^(e+1)'s does here): count each part once.
        lo = values - ulp / 2.0
        lo[0] = values[0]
        hi = values + ulp / 2.0
        hi[-1] = values[-1]
        total += 2.0 * float(np.sum(values ** 2 * _mass(lo, hi)))
    return total


@functools.lru_cache(maxsize=None)
def _product_correlation(mantissa_bits: int) -> float:
    """``E[Z Q(Z)]`` for ``Z ~ N(0, 1)`` rounded (nearest-even) to ``mantissa_bits``."""
    if mantissa_bits > 12:
        return 1.0
    total = 0.0
    steps = 2 ** mantissa_bits
    for e in range(-60, 8):
        ulp = math.ldexp(1.0, e - mantissa_bits)
        values = math.ldexp(1.0, e) + ulp * np.arange(steps + 1)
        lo = values - ulp / 2.0
        lo[0] = values[0]
        hi = values + ulp / 2.0
        hi[-1] = values[-1]
        total += 2.0 * float(np.sum(values * (_pdf(lo) - _pdf(hi))))  # E[Z; cell] * value
    return total


@functools.lru_cache(maxsize=None)
def operand_noise(mantissa_bits: int) -> float:
    """Relative MSE of a product whose two operands are rounded: ``E[(Q(a) Q(b) - a b)^2]
    / E[(a b)^2]`` for independent ``a, b ~ N(0, 1)`` rounded (nearest-even) to
    ``mantissa_bits``.

    Closed form: with ``a``, ``b`` independent, ``E[(Q(a)Q(b) - ab)^2] = E[Q(Z)^2]^2
    - 2 E[Z Q(Z)]^2 + 1`` and ``E[(ab)^2] = 1``; both moments are sums over the rounding
    cells of the Gaussian (exact up to float64). ``operand_noise(2)`` (FP8 E5M2 operands,
    the paper's setting) is about 0.00557.
    """
    mb = _check_int("mantissa_bits", mantissa_bits, 0, _MAX_BITS)
    if mb > 12:  # below 1e-8
        return 0.0
    return product_variance(mb) ** 2 - 2.0 * _product_correlation(mb) ** 2 + 1.0


# ---------------------------------------------------------------------------------------
# The analytical model (docs/vrr.md)
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _StepTables:
    """Per partial-sum binade E (u = 2^(E - m_acc)) quantities of one accumulation step."""

    loss: np.ndarray        # E[e^2 | s in binade E]: full + partial swamping (grid u)
    growth: np.ndarray      # E[(p + e)^2 | s in binade E]: variance added to the sum
    up: np.ndarray          # crossing up to grid 2u: extra loss per unit density at 2^(E+1)
    up_parity: np.ndarray   # the part of `up` that needs an odd last bit of s
    down: np.ndarray        # crossing down to grid u/2: loss change per density at 2^E
    fine: np.ndarray        # P(|p| < 2^(m_p+1) u): a product has a bit at or below u
    first_step: float       # E[e^2] of the first addition, 0 + p_1 rounded to m_acc bits
    first_growth: float     # E[Q(p_1)^2]


@functools.lru_cache(maxsize=None)
def _tables(acc_bits: int, product_bits: int, sigma: float) -> _StepTables:
    m, mp = acc_bits, product_bits
    u = np.ldexp(1.0, _E - m) / sigma                 # accumulator ulp, in units of sigma
    top = np.ldexp(1.0, _E) / sigma                   # a one-binade crossing needs |p| < 2^E
    big = np.inf
    n_vals = 2.0 ** mp                                # product values per binade

    # Full swamping, |p| < u/2: the whole product is lost.
    full = 2.0 * _second_moment(0.0 * u, u / 2.0)
    # First binade, u/2 <= |p| < u: rounds to a full ulp; the error is u - |p|. Discrete
    # products sit at u/2 (1 + i/N), i = 0..N-1: mean error^2 is (N+1)(2N+1)/(2N^2) times
    # the continuous value.
    a, b = u / 2.0, u
    first_cont = 2.0 * (u * u * _mass(a, b) - 2.0 * u * _first_moment(a, b)
                        + _second_moment(a, b))
    first = first_cont * (n_vals + 1.0) * (2.0 * n_vals + 1.0) / (2.0 * n_vals * n_vals)
    # Partial swamping: binade i (|p| in [2^i u, 2^(i+1) u)) loses j = m_p - i bits, a
    # discrete uniform residual on 2^j points: E[e^2] = u^2/12 (1 + 2^(1 - 2j)).
    partial = np.zeros_like(u)
    for i in range(mp):
        j = mp - i
        partial += (2.0 * _mass(2.0 ** i * u, 2.0 ** (i + 1) * u)
                    * u * u / 12.0 * (1.0 + 2.0 ** (1 - 2 * j)))
    loss = full + first + partial
    # Variance added to the computed sum, E[(p + e)^2] = E[p^2] + 2E[pe] + E[e^2], with
    # E[pe] = -E[p^2] when swamped, Q = +-u in the first binade, E[pe] ~ 0 otherwise.
    growth = 1.0 - 2.0 * _second_moment(0.0 * u, u) + u * u * 2.0 * _mass(u / 2.0, u) + partial

    def abs_moment(lo, hi):  # E[|p|; lo <= |p| < hi, |p| < top]
        lo, hi = np.minimum(lo, top), np.minimum(hi, top)
        return 2.0 * np.maximum(_first_moment(lo, hi), 0.0)

    top_n = n_vals * u
    # Crossing up (|s + p| >= 2^(E+1)): the grid becomes 2u. Extra error^2: u^2/4 for a
    # product with bits below u, u^2/2 for one whose last bit is at u, u^2 * P(odd s) for
    # a coarser product (a tie decided by the last bit of s).
    up = u * u / 4.0 * abs_moment(u, top_n) + u * u / 2.0 * abs_moment(top_n, 2.0 * top_n)
    up_parity = u * u * abs_moment(2.0 * top_n, big * u)
    # Crossing down (|s + p| < 2^E): the grid becomes u/2.
    down = (-u * u / 16.0 * abs_moment(u, top_n / 2.0)
            - u * u / 8.0 * abs_moment(top_n / 2.0, top_n))
    fine = 2.0 * _mass(0.0 * u, 2.0 * top_n)
    # The probability that s lies within |p| of a binade edge on the side p moves it is
    # density * |p| / 2 (same sign). Density is per unit of s, so tables carry sigma^3.
    s3 = sigma ** 3

    # First step: s = 0, Q(p_1) rounds the product to m_acc bits (lossless if m_p <= m).
    binades = np.arange(-150, 130)
    pbin = 2.0 * _mass(np.ldexp(1.0, binades) / sigma, np.ldexp(1.0, binades + 1) / sigma)
    if mp <= m:
        first_step = 0.0
    else:
        j = mp - m
        first_step = float(np.sum(pbin * np.ldexp(1.0, 2 * (binades - m)))
                           / 12.0 * (1.0 + 2.0 ** (1 - 2 * j)))
    return _StepTables(loss=loss * sigma ** 2, growth=growth * sigma ** 2,
                       up=0.5 * up * s3, up_parity=0.5 * up_parity * s3,
                       down=0.5 * down * s3, fine=fine, first_step=first_step,
                       first_growth=sigma ** 2 + first_step)


def _step_rates(t: _StepTables, var: float, k: float) -> Tuple[float, float]:
    """(expected loss, expected variance growth) of step k+1 when s_k ~ N(0, var)."""
    sd = math.sqrt(var)
    centre = int(math.floor(math.log2(sd))) + _E_OFFSET
    lo, hi = max(centre - 60, 0), min(centre + 8, len(_E))
    edges = np.ldexp(1.0, _E[lo:hi]) / sd
    upper = np.ldexp(1.0, _E[lo:hi] + 1) / sd
    p_binade = 2.0 * (ndtr(upper) - ndtr(edges))
    loss = float(p_binade @ t.loss[lo:hi])
    growth = float(p_binade @ t.growth[lo:hi])
    dens_top = 2.0 * _pdf(upper) / sd
    dens_bottom = 2.0 * _pdf(edges) / sd
    p_odd = 0.5 * (1.0 - np.power(1.0 - t.fine[lo:hi], k))
    loss += float(dens_top @ (t.up[lo:hi] + t.up_parity[lo:hi] * p_odd))
    loss += float(dens_bottom @ t.down[lo:hi])
    return max(loss, 0.0), growth


class _Curve:
    """Cumulative loss M(k) and computed-sum variance v(k) on nodes k = 1..n_max.

    The sum over steps is a forward recursion on a fixed node sequence
    (``k <- k + max(1, k // 64)`` past the first 64 steps), so a curve is extended in
    place when a longer accumulation is asked for, with the same result as a fresh one.
    """

    def __init__(self, acc_bits: int, product_bits: int, sigma: float):
        self.tables = _tables(acc_bits, product_bits, sigma)
        t = self.tables
        self._k, self._loss, self._var = [1], [t.first_step], [t.first_growth]
        self.k = self.loss = self.var = None
        self._freeze()

    def _freeze(self):
        self.k = np.asarray(self._k, float)
        self.loss = np.asarray(self._loss)
        self.var = np.asarray(self._var)

    def extend(self, n_max: int) -> "_Curve":
        t = self.tables
        k, loss, var = self._k[-1], self._loss[-1], self._var[-1]
        if k >= n_max:
            return self
        while k < n_max:
            if k < _EXACT_STEPS:
                dl, dv = _step_rates(t, var, k)
                loss, var, k = loss + dl, var + dv, k + 1
            else:  # midpoint (RK2) step of dk products; the nodes do not depend on n_max
                dk = max(1, k // _STEPS_PER_E_FOLD)
                _, dv = _step_rates(t, var, k)
                dl, dv = _step_rates(t, var + 0.5 * dk * dv, k + 0.5 * dk)
                loss, var, k = loss + dk * dl, var + dk * dv, k + dk
            self._k.append(k)
            self._loss.append(loss)
            self._var.append(var)
        self._freeze()
        return self


_CURVES: Dict[Tuple[int, int, float], _Curve] = {}


def _curve(acc_bits: int, product_bits: int, sigma: float, n_max: int) -> _Curve:
    key = (acc_bits, product_bits, sigma)
    curve = _CURVES.get(key)
    if curve is None:
        if len(_CURVES) > 4096:
            _CURVES.clear()
        curve = _CURVES[key] = _Curve(acc_bits, product_bits, sigma)
    return curve.extend(n_max)


def _sequential(n: int, acc_bits: int, product_bits: int, sigma: float = 1.0):
    """(E[(c - x)^2], Var(c)) of a sequential accumulation of n products."""
    if n <= 0:
        return 0.0, 0.0
    n_max = 1 << max(10, (n - 1).bit_length())  # extend curves by powers of two
    curve = _curve(acc_bits, product_bits, float(sigma), n_max)
    return (float(np.interp(n, curve.k, curve.loss)),
            float(np.interp(n, curve.k, curve.var)))


def _sigma_key(var: float) -> float:
    # Chunk-sum scales are rounded to 4 significant digits so that curves can be cached.
    sd = math.sqrt(var)
    return float(f"{sd:.4g}")


def _loss(n: int, acc_bits: int, product_bits: int, chunk_size: int) -> float:
    """E[(c - x)^2] in units of sigma^2 = 1 (products N(0, 1) rounded to m_p bits)."""
    if chunk_size == 0 or chunk_size >= n:
        return _sequential(n, acc_bits, product_bits)[0]
    full, rest = divmod(n, chunk_size)
    chunks = full + (1 if rest else 0)
    inner, chunk_var = _sequential(chunk_size, acc_bits, product_bits)
    loss = full * inner
    if rest:
        loss += _sequential(rest, acc_bits, product_bits)[0]
    # The chunk sums (m_acc-bit values of variance Var(t)) are accumulated sequentially.
    outer, _ = _sequential(chunks, acc_bits, acc_bits, _sigma_key(chunk_var))
    return loss + outer


# ---------------------------------------------------------------------------------------
# Toward-zero and stochastic rounding: the joint Gaussian model (docs/vrr.md section 12)
# ---------------------------------------------------------------------------------------
# Summation of the per-step rates, as for nearest-even, but the step is also bounded by
# the state: truncation contracts the sum by about |E[s e]| / V_s per step, and explicit
# steps longer than _CONTRACTION_STEP V_s / |E[s e]| would not follow it.
_CONTRACTION_STEP = 0.25


@dataclasses.dataclass(frozen=True)
class _ModeTables:
    """Per partial-sum binade E (s > 0 in [2^E, 2^(E+1)), grid u = 2^(E - m_acc)), for
    products p ~ N(0, sigma^2) with m_p mantissa bits, neglecting binade crossings."""

    bias: np.ndarray      # E[e | s in E]           (toward zero: < 0; the s < 0 side mirrors)
    sq: np.ndarray        # E[e^2 | s in E]
    pe: np.ndarray        # E[p e | s in E]
    first_sq: float       # E[e_1^2] of the first step, s_1 = Q(p_1)
    first_pe: float       # E[p_1 e_1]


def _residual_moments(rounding: str, lost_bits: int) -> Tuple[float, float]:
    """(E[e] / u, E[e^2] / u^2) when a value with ``lost_bits`` bits below the grid u is
    rounded (s > 0 side for toward zero); residuals uniform on N = 2^lost_bits points."""
    n_pts = 2.0 ** lost_bits
    if rounding == "toward_zero":
        return (-(n_pts - 1.0) / (2.0 * n_pts),
                (n_pts - 1.0) * (2.0 * n_pts - 1.0) / (6.0 * n_pts * n_pts))
    return 0.0, (n_pts * n_pts - 1.0) / (6.0 * n_pts * n_pts)  # stochastic: r (u - r)


@functools.lru_cache(maxsize=None)
def _mode_tables(acc_bits: int, product_bits: int, sigma: float, rounding: str) -> _ModeTables:
    m, mp = acc_bits, product_bits
    u = np.ldexp(1.0, _E - m) / sigma                 # accumulator ulp, units of sigma
    zero = 0.0 * u
    p_small = 2.0 * _mass(zero, u)                    # P(|p| < u)
    m1 = 2.0 * _first_moment(zero, u)                 # E[|p|; |p| < u]
    m2 = 2.0 * _second_moment(zero, u)                # E[p^2; |p| < u]
    if rounding == "toward_zero":
        # |p| < u: e = -p for p > 0, e = -(u - |p|) for p < 0.
        bias = -0.5 * u * p_small
        sq = m2 + 0.5 * u * u * p_small - u * m1
        pe = 0.5 * u * m1 - m2
    else:
        # Unbiased: E[e | p] = 0; E[e^2 | r] = r (u - r) with r = |p| or u - |p|.
        bias = zero.copy()
        sq = u * m1 - m2
        pe = zero.copy()
    # Products in [2^i u, 2^(i+1) u), i < m_p, lose j = m_p - i bits (A4); E[p e] ~ 0.
    for i in range(mp):
        mean, second = _residual_moments(rounding, mp - i)
        mass = 2.0 * _mass(2.0 ** i * u, 2.0 ** (i + 1) * u)
        bias = bias + mass * mean * u
        sq = sq + mass * second * u * u
    # First step: s_1 = Q(p_1), the product rounded to m_acc bits.
    first_sq = first_pe = 0.0
    if mp > m:
        binades = np.arange(-150, 130)
        lo, hi = np.ldexp(1.0, binades) / sigma, np.ldexp(1.0, binades + 1) / sigma
        ub = np.ldexp(1.0, binades - m) / sigma
        mean, second = _residual_moments(rounding, mp - m)
        first_sq = float(np.sum(2.0 * _mass(lo, hi) * ub * ub)) * second
        # Toward zero: e_1 = -sign(p) r, r independent of |p| within a binade (A4).
        first_pe = float(np.sum(2.0 * _first_moment(lo, hi) * ub)) * mean
    return _ModeTables(bias=bias * sigma, sq=sq * sigma ** 2, pe=pe * sigma ** 2,
                       first_sq=first_sq * sigma ** 2, first_pe=first_pe * sigma ** 2)


@functools.lru_cache(maxsize=None)
def _chunk_sum_tables(acc_bits: int, product_bits: int, length: int, sigma: float,
                      rounding: str) -> _ModeTables:
    """Tables for adding chunk sums t of ``length`` products (m_p bits, N(0, 1)) with
    scale ``sigma``: t's last bit is that of its smallest product (or its own grid if the
    chunk rounded), so t has ``b = floor(log2|t|) - min_k floor(log2|p_k|) + m_p`` bits,
    capped at m_acc; the tables are the mixture over b (t and the smallest product taken
    independent)."""
    m, mp = acc_bits, product_bits
    binades = np.arange(-150, 130)
    below = 2.0 * _mass(0.0 * binades, np.ldexp(1.0, binades))   # P(|p| < 2^e)
    at_least = np.power(1.0 - below, length)                       # P(min |p| >= 2^e)
    p_min = at_least - np.append(at_least[1:], 0.0)                # P(min in binade e)
    p_t = 2.0 * _mass(np.ldexp(1.0, binades) / sigma, np.ldexp(1.0, binades + 1) / sigma)
    weights = np.zeros(m + 1)
    bits = np.clip(binades[:, None] - binades[None, :] + mp, 0, m)  # [t binade, min binade]
    np.add.at(weights, bits.ravel(), np.outer(p_t, p_min).ravel())
    weights /= weights.sum()
    parts = [(w, _mode_tables(m, int(b), sigma, rounding))
             for b, w in enumerate(weights) if w > 1e-12]
    return _ModeTables(bias=sum(w * t.bias for w, t in parts),
                       sq=sum(w * t.sq for w, t in parts),
                       pe=sum(w * t.pe for w, t in parts), first_sq=0.0, first_pe=0.0)


def _mode_rates(t: _ModeTables, state, product) -> Tuple[np.ndarray, float]:
    """d(V_s, D, L)/dk of one step, and |E[s e]| / V_s (the contraction rate).

    ``state = (V_s, D, L)`` with ``V_s = E[s^2]``, ``D = E[s (s - x)]`` and
    ``L = E[(s - x)^2]``; ``product = (V_p, D_p, L_p)`` likewise for the value added
    (``(sigma^2, 0, 0)`` for exact products, a chunk sum's state for the outer level).
    """
    vs, d, _ = state
    vp, dp, lp = product
    sd = math.sqrt(vs)
    centre = int(math.floor(math.log2(sd))) + _E_OFFSET
    lo, hi = max(centre - 60, 0), min(centre + 8, len(_E))
    edges = np.ldexp(1.0, _E[lo:hi]) / sd
    upper = np.ldexp(1.0, _E[lo:hi] + 1) / sd
    p_binade = 2.0 * (ndtr(upper) - ndtr(edges))
    abs_binade = 2.0 * sd * (_pdf(edges) - _pdf(upper))   # E[|s|; |s| in binade E]
    se = float(abs_binade @ t.bias[lo:hi])                 # E[s e]
    ee2 = float(p_binade @ t.sq[lo:hi])                    # E[e^2]
    epe = float(p_binade @ t.pe[lo:hi])                    # E[p e]
    # E[e x] ~ (C / V_s) E[s e] and E[e x_p] ~ (C_p / V_p) E[p e] (Gaussian regression),
    # with C = V_s - D, C_p = V_p - D_p.
    dvs = vp + 2.0 * se + 2.0 * epe + ee2
    dd = dp + se * (1.0 + d / vs) + epe * (1.0 + dp / vp) + ee2
    dl = lp + 2.0 * se * d / vs + 2.0 * epe * dp / vp + ee2
    return np.array([dvs, dd, dl]), abs(se) / vs


class _ModeCurve:
    """(V_s, D, L) on nodes k = 1..n_max for toward-zero or stochastic rounding: every
    step up to _EXACT_STEPS, then midpoint steps of min(k / 64, 0.25 V_s / |E[s e]|)
    products; the nodes depend only on the curve's parameters (cacheable, extensible).

    ``rates(tables, state, product)`` gives one step's d(V_s, D, L)/dk and contraction
    rate: :func:`_mode_rates` for one rounded addition; the fused-adder model
    (tfaccum.analysis.fused) steps one block at a time with its own rates."""

    rates = staticmethod(_mode_rates)

    def __init__(self, tables, product, first_state):
        self.tables, self.product = tables, tuple(float(v) for v in product)
        self._k = [1]
        self._state = [np.asarray(first_state, float)]
        self.k = self.state = None
        self._freeze()

    def _freeze(self):
        self.k = np.asarray(self._k, float)
        self.state = np.asarray(self._state)

    def extend(self, n_max: int) -> "_ModeCurve":
        k, state = self._k[-1], self._state[-1]
        if k >= n_max:
            return self
        while k < n_max:
            rate, contraction = self.rates(self.tables, state, self.product)
            if k < _EXACT_STEPS:
                state, k = state + rate, k + 1
            else:
                dk = max(1, k // _STEPS_PER_E_FOLD)
                if contraction > 0.0:
                    dk = max(1, min(dk, int(_CONTRACTION_STEP / contraction)))
                mid, _ = self.rates(self.tables, state + 0.5 * dk * rate, self.product)
                state, k = state + dk * mid, k + dk
            self._k.append(k)
            self._state.append(state)
        self._freeze()
        return self

    def at(self, n: int) -> np.ndarray:
        """(V_s, D, L) after n steps (linear interpolation between nodes)."""
        self.extend(1 << max(10, (n - 1).bit_length()))
        return np.array([np.interp(n, self.k, self.state[:, i]) for i in range(3)])


_MODE_CURVES: Dict[tuple, _ModeCurve] = {}


def _mode_sequential(n: int, acc_bits: int, product_bits: int, rounding: str) -> np.ndarray:
    """(V_s, D, L) of a sequential accumulation of n products N(0, 1) rounded to m_p."""
    if n <= 0:
        return np.zeros(3)
    key = ("seq", acc_bits, product_bits, rounding)
    curve = _MODE_CURVES.get(key)
    if curve is None:
        t = _mode_tables(acc_bits, product_bits, 1.0, rounding)
        var = product_variance(product_bits)
        first = (var + 2.0 * t.first_pe + t.first_sq, t.first_pe + t.first_sq, t.first_sq)
        curve = _MODE_CURVES[key] = _ModeCurve(t, (var, 0.0, 0.0), first)
    return curve.at(n)


def _mode_loss(n: int, acc_bits: int, product_bits: int, chunk_size: int,
               rounding: str) -> float:
    """E[(c - x)^2] (products N(0, 1) rounded to m_p bits) for toward-zero/stochastic."""
    if chunk_size == 0 or chunk_size >= n:
        return float(_mode_sequential(n, acc_bits, product_bits, rounding)[2])
    full, rest = divmod(n, chunk_size)
    chunk = _mode_sequential(chunk_size, acc_bits, product_bits, rounding)
    # The chunk sums t (m_acc-bit values; state (V_t, D_t, L_t)) are accumulated by the
    # same recursion; the first one is added to s = 0 exactly.
    key = ("outer", acc_bits, product_bits, chunk_size, rounding)
    curve = _MODE_CURVES.get(key)
    if curve is None:
        t = _chunk_sum_tables(acc_bits, product_bits, chunk_size, _sigma_key(chunk[0]),
                              rounding)
        curve = _MODE_CURVES[key] = _ModeCurve(t, chunk, chunk)
    state = curve.at(full)
    if rest:  # the last, shorter chunk: one more outer step with its own statistics
        last = _mode_sequential(rest, acc_bits, product_bits, rounding)
        t = _chunk_sum_tables(acc_bits, product_bits, rest, _sigma_key(last[0]), rounding)
        rate, _ = _mode_rates(t, state, last)
        state = state + rate
    return float(state[2])


def _any_loss(n: int, acc_bits: int, product_bits: int, chunk_size: int,
              rounding: str) -> float:
    if rounding == "nearest_even":
        return _loss(n, acc_bits, product_bits, chunk_size)
    if len(_MODE_CURVES) > 4096:
        _MODE_CURVES.clear()
    return _mode_loss(n, acc_bits, product_bits, chunk_size, rounding)


def variance_lost(n: int, acc_mantissa_bits: int, product_mantissa_bits: int,
                  chunk_size: int = 0, *, rounding: str = "nearest_even") -> float:
    """``n (1 - VRR) = E[(c - x)^2] / sigma^2`` from the analytical model: the error
    energy of the computed sum in units of one product's variance (``ln v(n)``).
    ``rounding`` is the accumulator's rounding mode (one of :data:`ROUNDINGS`)."""
    n, m, mp, c = _check_args(n, acc_mantissa_bits, product_mantissa_bits, chunk_size)
    rounding = _check_rounding(rounding)
    if n == 0:
        return 0.0
    return _any_loss(n, m, mp, c, rounding) / product_variance(mp)


def vrr(n: int, acc_mantissa_bits: int, product_mantissa_bits: int,
        chunk_size: int = 0, *, rounding: str = "nearest_even") -> float:
    """Analytical variance retention ratio ``1 - E[(c - x)^2] / (n sigma^2)``.

    Args:
      n: accumulation length (number of non-zero products), >= 0.
      acc_mantissa_bits: accumulator mantissa (fraction) bits ``m_acc``, 0..23.
      product_mantissa_bits: mantissa bits ``m_p`` of the products, 0..23 (5 for two
        FP8 E5M2 operands multiplied exactly; 23 for float32 products).
      chunk_size: 0 for sequential accumulation, else chunks of ``chunk_size`` products
        whose sums are accumulated in the same format (numerics.md section 3).
      rounding: the accumulator's rounding mode, one of :data:`ROUNDINGS`:
        ``"nearest_even"`` (docs/vrr.md sections 3-7), ``"toward_zero"`` or
        ``"stochastic"`` (the joint Gaussian model of docs/vrr.md section 12).

    Assumes i.i.d. zero-mean Gaussian products rounded to ``m_p`` bits (nearest-even)
    and an exponent range that never overflows (docs/vrr.md). Can be below 0 when the
    accumulator is so narrow that its error exceeds the sum itself.
    """
    n, m, mp, c = _check_args(n, acc_mantissa_bits, product_mantissa_bits, chunk_size)
    rounding = _check_rounding(rounding)
    if n == 0:
        return 1.0
    return 1.0 - _any_loss(n, m, mp, c, rounding) / (n * product_variance(mp))


# ---------------------------------------------------------------------------------------
# The criterion
# ---------------------------------------------------------------------------------------
#: The default bound on the relative loss ``1 - VRR`` of the ``"bounded"`` criterion:
#: ``operand_noise(2)`` (about 0.56 %), the relative MSE that rounding both operands to
#: FP8 E5M2 (2 mantissa bits) already adds to every product in the paper's setting, a
#: setting reported to train to the float32 baseline (Sakr et al. 2019; Wang et al.
#: 2018). The accumulator may lose at most as much of the output's variance as the
#: operand rounding does. Derived from the paper's setting, not tuned to any result
#: (docs/vrr.md section 2b).
DEFAULT_MAX_RELATIVE_LOSS = operand_noise(2)


def v_criterion(n: float, vrr_value: float) -> float:
    """The normalized exponential variance lost ``v(n) = exp(n (1 - VRR))`` (inf on
    overflow)."""
    exponent = float(n) * (1.0 - float(vrr_value))
    return math.inf if exponent > 700 else math.exp(exponent)


def passes_criterion(n: float, vrr_value: float, cutoff: float = 50.0, *,
                     criterion: str = "bounded",
                     max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS) -> bool:
    """Whether an accumulation of length ``n`` with this VRR has enough bits.

    ``criterion="paper"``: ``v(n) = exp(n (1 - VRR)) < cutoff`` (Sakr et al.): the error
    energy in units of one product's variance, ``n (1 - VRR)``, below ``ln(cutoff)``.
    ``criterion="bounded"`` (default): that, and ``1 - VRR <= max_relative_loss``, the
    error energy relative to the sum's variance. The paper's criterion alone lets a short
    sum lose up to ``ln(cutoff) / n`` of its variance (43 % at n = 9); the default bound
    :data:`DEFAULT_MAX_RELATIVE_LOSS` = ``operand_noise(2)`` ~ 0.56 % is what FP8 E5M2
    operand rounding already costs every product in the paper's setting. The two bounds
    cross at ``n* = ln(cutoff) / max_relative_loss`` (~700); beyond it the paper's
    criterion is the binding one (docs/vrr.md section 2b).
    """
    cutoff = _check_cutoff(cutoff)
    criterion = _check_criterion(criterion)
    max_relative_loss = _check_max_relative_loss(max_relative_loss)
    if not v_criterion(n, vrr_value) < cutoff:
        return False
    return criterion == "paper" or 1.0 - float(vrr_value) <= max_relative_loss


def criterion_description(criterion: str = "bounded", cutoff: float = 50.0,
                          max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS) -> str:
    """One line naming the criterion, as a plan prints it, e.g.
    ``"bounded: v(n) = exp(n(1-VRR)) < 50 and 1-VRR <= 0.56 %"``."""
    criterion = _check_criterion(criterion)
    cutoff = _check_cutoff(cutoff)
    max_relative_loss = _check_max_relative_loss(max_relative_loss)
    text = f"{criterion}: v(n) = exp(n(1-VRR)) < {cutoff:g}"
    if criterion == "bounded":
        text += f" and 1-VRR <= {100.0 * max_relative_loss:.2g} %"
    return text


def _check_cutoff(cutoff) -> float:
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.floating)):
        raise TypeError(f"cutoff must be a number, got {type(cutoff).__name__}")
    if not cutoff > 1.0 or not math.isfinite(cutoff):
        raise ValueError(f"cutoff must be a finite number > 1, got {cutoff}")
    return float(cutoff)


def min_mantissa_bits(n: int, product_mantissa_bits: int, chunk_size: int = 0,
                      cutoff: float = 50.0, method: str = "analytical", *,
                      rounding: str = "nearest_even", criterion: str = "bounded",
                      max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS,
                      max_bits: int = _MAX_BITS, trials: int = 1000, seed: int = 0) -> int:
    """The smallest accumulator mantissa ``m_acc`` that passes the criterion.

    Args:
      n: accumulation length (use the effective length, the number of non-zero
        products, for sparse GEMMs).
      product_mantissa_bits: ``m_p``.
      chunk_size: 0 (sequential) or the chunk size.
      cutoff: the cut-off of ``v(n) = exp(n (1 - VRR)) < cutoff`` (50 in Sakr et al.).
      method: ``"analytical"`` (:func:`vrr`) or ``"monte_carlo"`` (:func:`vrr_monte_carlo`
        point estimates with ``trials`` and ``seed``; it starts from the analytical answer
        and walks down/up, assuming VRR rises with ``m_acc``).
      rounding: the accumulator's rounding mode, one of :data:`ROUNDINGS`.
      criterion: ``"bounded"`` (default): ``v(n) < cutoff`` and
        ``1 - VRR <= max_relative_loss``; ``"paper"``: ``v(n) < cutoff`` only (see
        :func:`passes_criterion`; they agree for ``n > ln(cutoff) / max_relative_loss``).
      max_relative_loss: the bound on ``1 - VRR`` of ``"bounded"``, in (0, 1]; default
        :data:`DEFAULT_MAX_RELATIVE_LOSS` = ``operand_noise(2)`` ~ 0.56 %, the relative
        error FP8 E5M2 operand rounding already adds to each product (docs/vrr.md 2b).
      max_bits: the largest answer; if even ``max_bits`` fails the criterion, a warning is
        issued and ``max_bits`` returned.
    """
    n = _check_int("n", n, 0)
    mp = _check_int("product_mantissa_bits", product_mantissa_bits, 0, _MAX_BITS)
    c = _check_int("chunk_size", chunk_size, 0)
    cutoff = _check_cutoff(cutoff)
    rounding = _check_rounding(rounding)
    criterion = _check_criterion(criterion)
    max_relative_loss = _check_max_relative_loss(max_relative_loss)
    max_bits = _check_int("max_bits", max_bits, 0, _MAX_BITS)
    trials = _check_int("trials", trials, 2)
    seed = _check_int("seed", seed, 0, 2 ** 63 - 1)
    if method not in ("analytical", "monte_carlo"):
        raise ValueError(f"method must be 'analytical' or 'monte_carlo', got {method!r}")
    limit = math.log(cutoff)
    bounded = criterion == "bounded"
    what = criterion_description(criterion, cutoff, max_relative_loss)

    def analytical_passes(m: int) -> bool:
        if not variance_lost(n, m, mp, c, rounding=rounding) < limit:
            return False
        return not bounded or 1.0 - vrr(n, m, mp, c, rounding=rounding) <= max_relative_loss

    # VRR rises with m_acc: bisection for the smallest passing value.
    lo, hi = 0, max_bits
    if not analytical_passes(hi):
        guess = None
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if analytical_passes(mid):
                hi = mid
            else:
                lo = mid + 1
        guess = lo
    if method == "analytical":
        if guess is None:
            warnings.warn(f"no accumulator with at most {max_bits} mantissa bits passes "
                          f"{what} for n={n} (m_p={mp}, chunk {c}, {rounding}); "
                          f"returning {max_bits}", RuntimeWarning, stacklevel=2)
            return max_bits
        return guess

    def mc_passes(m: int) -> bool:
        est = vrr_monte_carlo(n, m, mp, c, trials=trials, seed=seed, rounding=rounding)
        if not n * (1.0 - est.value) < limit:
            return False
        return not bounded or 1.0 - est.value <= max_relative_loss

    m = max_bits if guess is None else guess
    if mc_passes(m):
        while m > 0 and mc_passes(m - 1):
            m -= 1
        return m
    while m < max_bits:
        m += 1
        if mc_passes(m):
            return m
    warnings.warn(f"no accumulator with at most {max_bits} mantissa bits passes {what} "
                  f"for n={n} (Monte Carlo, {rounding}); returning {max_bits}",
                  RuntimeWarning, stacklevel=2)
    return max_bits


# ---------------------------------------------------------------------------------------
# Monte Carlo with tfaccum's kernels
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VRREstimate:
    """A Monte Carlo VRR with its confidence interval ``[low, high]``.

    ``value = 1 - mean((c - x)^2) / (n sigma_p^2)`` over ``trials`` independent dot
    products; the interval is the normal-approximation (CLT) interval of the mean of the
    ``trials`` i.i.d. squared errors, at ``confidence``. ``mse`` and ``mse_stderr`` are
    that mean and its standard error.
    """

    value: float
    low: float
    high: float
    n: int
    acc_mantissa_bits: int
    product_mantissa_bits: int
    chunk_size: int
    trials: int
    confidence: float
    mse: float
    mse_stderr: float
    rounding: str = "nearest_even"

    def __float__(self) -> float:
        return self.value

    @property
    def variance_lost(self) -> float:
        """``n (1 - VRR)``, the exponent of the criterion ``v(n)``."""
        return self.n * (1.0 - self.value)

    def __repr__(self) -> str:
        return (f"VRREstimate(value={self.value:.6g}, low={self.low:.6g}, "
                f"high={self.high:.6g}, n={self.n}, m_acc={self.acc_mantissa_bits}, "
                f"m_p={self.product_mantissa_bits}, chunk={self.chunk_size}, "
                f"trials={self.trials}"
                + ("" if self.rounding == "nearest_even" else f", rounding={self.rounding}")
                + ")")


def _round_mantissa(x: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Round float32 values to ``mantissa_bits``, nearest-even, exactly (on the bits).

    Adding ``2^(s-1) - 1 + (last kept bit)`` to the bit pattern and clearing the ``s``
    dropped bits is round-to-nearest-even, carries into the exponent included; valid for
    normal numbers and zeros (Gaussian draws never reach float32's subnormals/overflow).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    shift = 23 - mantissa_bits
    if shift <= 0:
        return x
    bits = x.view(np.uint32)
    keep_lsb = (bits >> np.uint32(shift)) & np.uint32(1)
    bits = bits + (np.uint32((1 << (shift - 1)) - 1) + keep_lsb)
    bits &= np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)
    return bits.view(np.float32)


def _kernel_dot_rows(products: np.ndarray, config) -> np.ndarray:
    """Each row of ``products`` accumulated by tfaccum's kernel (a [T, n] x ones[n, 1])."""
    import tensorflow as tf  # noqa: WPS433 - heavy import only where needed

    from tfaccum.ops import accum_matmul  # noqa: WPS433

    ones = tf.ones([products.shape[1], 1], tf.float32)
    out = accum_matmul(tf.constant(products), ones, config)
    return np.asarray(out, dtype=np.float64)[:, 0]


def vrr_monte_carlo(n: int, acc_mantissa_bits: int, product_mantissa_bits: int,
                    chunk_size: int = 0, trials: int = 1000, seed: int = 0,
                    confidence: float = 0.95, *, rounding: str = "nearest_even",
                    exponent_bits: int = MONTE_CARLO_EXPONENT_BITS,
                    max_block_elements: int = 1 << 22) -> VRREstimate:
    """The VRR measured with tfaccum's accumulation kernels.

    Draws ``trials`` independent dot products: products ``p = Q_{m_p}(z)``, ``z ~ N(0, 1)``
    float32 rounded to ``m_p`` mantissa bits (nearest-even), fed to
    ``tfaccum.accum_matmul(P, ones[n, 1], cfg)`` as ``a`` times ``b = 1`` so that the
    kernel's exact product is the drawn value; ``cfg`` has accumulator
    ``FloatFormat(exponent_bits, m_acc)`` (8 exponent bits by default: no overflow or
    subnormals), ``chunk_size`` and ``rounding`` (the products themselves are always
    rounded nearest-even when drawn). Under stochastic rounding every trial is a
    different output element, so its random draws differ (numerics.md section 4); each
    block of trials gets its own generator seed, derived from ``seed``. The exact sum
    ``x`` is the float64 sum of the products (its own error is ~1e-16 relative, far
    below any accumulator's).

    Returns a :class:`VRREstimate` with ``value = 1 - mean((c - x)^2) / (n sigma_p^2)``
    (``sigma_p^2 = product_variance(m_p)``, the exact variance of the drawn products)
    and its CLT interval at ``confidence``.
    """
    n, m, mp, c = _check_args(n, acc_mantissa_bits, product_mantissa_bits, chunk_size)
    trials = _check_int("trials", trials, 2)
    seed = _check_int("seed", seed, 0, 2 ** 63 - 1)
    if (isinstance(confidence, bool)
            or not isinstance(confidence, (int, float, np.floating))):
        raise TypeError(f"confidence must be a number in (0, 1), got "
                        f"{type(confidence).__name__} {confidence!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rounding = _check_rounding(rounding)
    exponent_bits = _check_int("exponent_bits", exponent_bits, 2, 8)
    max_block_elements = _check_int("max_block_elements", max_block_elements, 1)
    from tfaccum.config import AccumConfig, FloatFormat  # noqa: WPS433

    config = AccumConfig(accumulator=FloatFormat(exponent_bits, m), chunk_size=c,
                         rounding=rounding)
    if n == 0:
        return VRREstimate(1.0, 1.0, 1.0, 0, m, mp, c, trials, confidence, 0.0, 0.0,
                           rounding)
    rng = np.random.default_rng(seed)
    rows = max(1, min(trials, max_block_elements // n))
    sq_errors = np.empty(trials)
    done = 0
    while done < trials:
        block = min(rows, trials - done)
        products = _round_mantissa(rng.standard_normal((block, n), dtype=np.float32), mp)
        exact = products.astype(np.float64).sum(axis=1)
        if rounding == "stochastic":  # a fresh stream per block (rows restart at 0)
            config = config.replace(seed=int((seed * 1_000_003 + done) % (2 ** 63)))
        computed = _kernel_dot_rows(products, config)
        sq_errors[done:done + block] = np.square(computed - exact)
        done += block
    mse = float(sq_errors.mean())
    stderr = float(sq_errors.std(ddof=1) / math.sqrt(trials))
    z = float(ndtri(0.5 + confidence / 2.0))
    total = n * product_variance(mp)
    return VRREstimate(value=1.0 - mse / total, low=1.0 - (mse + z * stderr) / total,
                       high=min(1.0, 1.0 - (mse - z * stderr) / total), n=n,
                       acc_mantissa_bits=m, product_mantissa_bits=mp, chunk_size=c,
                       trials=trials, confidence=confidence, mse=mse, mse_stderr=stderr,
                       rounding=rounding)


def empirical_vrr(computed, exact) -> float:
    """The VRR of measured outputs: ``1 - mean((computed - exact)^2) / var(exact)``.

    For comparing an emulated layer's outputs with the same outputs computed exactly
    (each output one dot product); the same definition as :func:`vrr_monte_carlo`, with
    the sample variance of ``exact`` standing for ``n sigma^2``. If ``exact`` has no
    variance the result is 1.0 when ``computed == exact`` and ``-inf`` otherwise.
    """
    c = np.asarray(computed, dtype=np.float64).ravel()
    x = np.asarray(exact, dtype=np.float64).ravel()
    if c.shape != x.shape:
        raise ValueError(f"computed and exact differ in size: {c.size} vs {x.size}")
    if c.size == 0:
        raise ValueError("empirical_vrr needs at least one value")
    mse = float(np.mean(np.square(c - x)))
    var = float(np.var(x))
    if var == 0.0:
        return 1.0 if mse == 0.0 else -math.inf
    return 1.0 - mse / var


# ---------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------
def plot_vrr(path: str, product_mantissa_bits: int = 5,
             acc_mantissa_bits: Sequence[int] = (6, 8, 10, 12, 14), chunk_size: int = 0,
             n_min: int = 16, n_max: int = 100_000,
             monte_carlo_n: Optional[Iterable[int]] = (64, 1024, 16384),
             trials: int = 200, seed: int = 0, cutoff: float = 50.0) -> str:
    """Write a PNG of VRR against n: analytical curves for each ``m_acc`` and Monte Carlo
    points (with their intervals) at ``monte_carlo_n`` (None or empty: none), plus the
    criterion boundary ``VRR = 1 - ln(cutoff) / n``; a second panel shows the lost
    variance ``n (1 - VRR)`` on a log scale against ``ln(cutoff)``, where the criterion
    is decided. Needs matplotlib. Returns ``path``."""
    try:
        import matplotlib  # noqa: WPS433

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: WPS433
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("plot_vrr needs matplotlib (pip install matplotlib)") from err
    ns = np.unique(np.geomspace(n_min, n_max, 60).astype(int))
    fig, (ax, ax_lost) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mc_n = [int(v) for v in (monte_carlo_n or []) if n_min <= int(v) <= n_max]
    for i, m in enumerate(acc_mantissa_bits):
        color = colors[i % len(colors)]
        values = np.array([vrr(int(v), m, product_mantissa_bits, chunk_size) for v in ns])
        ax.plot(ns, values, color=color, label=f"m_acc = {m}")
        lost = ns * (1.0 - values)
        ax_lost.plot(ns[lost > 0], lost[lost > 0], color=color, label=f"m_acc = {m}")
        for v in mc_n:
            est = vrr_monte_carlo(v, m, product_mantissa_bits, chunk_size, trials=trials,
                                  seed=seed)
            ax.errorbar([v], [est.value], yerr=[[est.value - est.low], [est.high - est.value]],
                        fmt="o", color=color, ms=4, capsize=2)
            if est.value < 1.0:
                lo, mid, hi = (v * (1.0 - est.high), v * (1.0 - est.value),
                               v * (1.0 - est.low))
                ax_lost.errorbar([v], [mid], yerr=[[mid - max(lo, mid * 1e-3)], [hi - mid]],
                                 fmt="o", color=color, ms=4, capsize=2)
    ax.plot(ns, 1.0 - math.log(cutoff) / ns, "k--", lw=1,
            label=f"criterion v(n) = {cutoff:g}")
    ax_lost.axhline(math.log(cutoff), color="k", ls="--", lw=1,
                    label=f"ln {cutoff:g}: v(n) = {cutoff:g}")
    chunk = f"chunk {chunk_size}" if chunk_size else "sequential"
    for axis in (ax, ax_lost):
        axis.set_xscale("log")
        axis.set_xlabel("accumulation length n (non-zero products)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="lower left" if axis is ax else "upper left")
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("VRR = 1 - E[(c - x)^2] / Var(x)")
    ax_lost.set_yscale("log")
    ax_lost.set_ylabel("n (1 - VRR) = ln v(n)")
    fig.suptitle(f"Variance retention, m_p = {product_mantissa_bits}, {chunk} "
                 "(lines: analytical, dots: Monte Carlo with 95 % intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
