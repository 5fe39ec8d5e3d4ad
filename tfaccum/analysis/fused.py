r"""Variance retention of a fused multi-term adder chain (tensor cores; docs/vrr.md §14).

A tensor core sums a dot product as the chain of numerics.md §7: ``D_0 = +0`` and
``D_{j+1}`` = the running sum ``D_j`` and the next ``L`` exact products, each truncated
toward zero to a multiple of ``2^(E - F)`` (``E`` the largest term exponent), added
exactly and rounded once to the accumulator's ``m_out`` bits (toward zero on NVIDIA).
Promotion every ``c`` products restarts the chain and adds each chunk's result to a
float32 total (nearest-even). This module predicts the VRR of that chain and measures it
with the kernels::

    >>> from tfaccum import analysis
    >>> round(analysis.fused_variance_lost(65536, "hopper:e4m3"), 2)   # n (1 - VRR)
    3.25
    >>> round(analysis.fused_vrr(65536, "hopper:e4m3", promote_every=128), 7)
    1.0
    >>> analysis.fused_vrr_monte_carlo(16384, "hopper:e4m3", trials=100)
    VRREstimate(value=0.9999..., n=16384, m_acc=13, m_p=7, chunk=0, trials=100, ...)
    >>> search = analysis.longest_promotion_interval(802816, "hopper:e4m3")
    >>> search.passes, search.interval          # fails unpromoted; promote every 8192
    (False, 8192)

The hardware is a :class:`tfaccum.presets.TensorCoreModel`, a spec such as
``"hopper:e4m3"``, or a :class:`~tfaccum.config.FusedAdder` together with
``accumulator=`` (the result format ``D`` is rounded to) and ``operands=`` (the input
format). Operands are i.i.d. ``N(0, 1)`` rounded (nearest-even) to the operand format,
so the products are products of two rounded Gaussians (up to ``2 m + 2`` significant bits),
not the Gaussian ``m_p``-bit products of the sequential model.

The model (docs/vrr.md §14) is one step of the joint-Gaussian recursion of §12 per
*block*: the state ``(V_s, D, L)`` of the running sum ``s = D_j`` and the exact sum ``x``,
and per block the error ``e = e_p + e_D + e_o`` of (i) truncating each product relative to
``E = max(e(s), largest product exponent)``, (ii) truncating ``s`` itself when a product's
exponent exceeds it, (iii) rounding the block's sum to ``m_out`` bits; its moments
``E[e | s]``, ``E[e^2 | s]`` and ``E[P e | s]`` (``P`` the block's exact sum) are computed
per binade of ``s`` and position in it, by exact enumeration of the operand products.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple, Union

import numpy as np
from scipy.special import ndtr, ndtri

from tfaccum.analysis.plan import effective_chunk
from tfaccum.analysis.vrr import (DEFAULT_MAX_RELATIVE_LOSS, VRREstimate, _check_int,
                                  _ModeCurve, _pdf, _sequential, _sigma_key,
                                  passes_criterion)
from tfaccum.config import BINARY32, AccumConfig, FloatFormat, FusedAdder, as_format
from tfaccum.presets import OPERAND_FORMATS, TensorCoreModel, fused_config, parse_model

__all__ = ["FusedSetup", "PromotionSearch", "fused_setup", "fused_variance_lost",
           "fused_vrr", "fused_vrr_monte_carlo", "longest_promotion_interval",
           "promotion_candidates", "product_variance_of"]

HardwareLike = Union[TensorCoreModel, str, FusedAdder]

# Exact enumeration of operand values up to this many mantissa bits (FP8: 2 or 3); wider
# formats are represented by 2^_COARSE_BITS cells per binade and residuals below their
# ulp taken uniform (A4).
_COARSE_BITS = 4
# Operand values below this two-sided probability are dropped from the enumeration.
_MIN_MASS = 1e-16
# Binades of the running sum tabulated (|s| in [2^e, 2^(e+1))), and positions per binade.
_ES_LO, _ES_HI = -16, 40
_POSITIONS = 8
_NO_BITS = 10 ** 6  # "lowest set bit" of a term that is entirely truncated away


# ---------------------------------------------------------------------------------------
# The hardware
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FusedSetup:
    """What the analysis needs of one tensor core: the adder, the result format, the input
    format, and where promoted chunk results are summed (float32, nearest-even)."""

    adder: FusedAdder
    accumulator: FloatFormat
    operands: FloatFormat
    chunk_accumulator: FloatFormat = BINARY32
    name: str = ""

    def config(self, promote_every: int = 0) -> AccumConfig:
        """The AccumConfig the kernels run for this hardware (chunk_size = promotion)."""
        return fused_config(self.adder, self.accumulator, promote_every,
                            self.chunk_accumulator)

    def describe(self) -> str:
        a = self.adder
        label = self.name or a.hardware or "fused adder"
        return (f"{label}: L={a.terms}, F={a.fraction_bits}, result "
                f"{self.accumulator.name} {a.output_rounding.replace('_', '-')}, "
                f"operands {self.operands.name}")


def _operand_format(operands) -> FloatFormat:
    if isinstance(operands, str) and operands.lower() in OPERAND_FORMATS:
        return OPERAND_FORMATS[operands.lower()]
    return as_format(operands)


def fused_setup(hardware: HardwareLike, accumulator=None, operands=None) -> FusedSetup:
    """The :class:`FusedSetup` of ``hardware``: a TensorCoreModel, an ``"arch:operands"``
    spec (``"hopper:e4m3"``, optionally prefixed ``tensor_core:``), or a FusedAdder with
    ``accumulator`` and ``operands`` (formats or names) given."""
    if isinstance(hardware, FusedSetup):
        return hardware
    if isinstance(hardware, str):
        hardware = parse_model(hardware)
    if isinstance(hardware, TensorCoreModel):
        if accumulator is not None or operands is not None:
            raise ValueError("a TensorCoreModel carries its accumulator and operand formats; "
                             "do not pass accumulator= or operands=")
        return FusedSetup(hardware.adder, hardware.accumulator, hardware.operand_format,
                          name=f"{hardware.arch}:{hardware.operands}")
    if isinstance(hardware, FusedAdder):
        if accumulator is None or operands is None:
            raise ValueError("a FusedAdder needs accumulator= (the result format) and "
                             "operands= (the input format)")
        return FusedSetup(hardware, as_format(accumulator), _operand_format(operands))
    raise TypeError(f"hardware must be a TensorCoreModel, an 'arch:operands' string or a "
                    f"FusedAdder, got {type(hardware).__name__}")


# ---------------------------------------------------------------------------------------
# Bit-level helpers
# ---------------------------------------------------------------------------------------
def _floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2 x) of positive float64 values, exactly (frexp: x = f 2^e, f in [0.5, 1))."""
    return np.frexp(x)[1].astype(np.int64) - 1


def _trailing_zeros(q: np.ndarray) -> np.ndarray:
    """Trailing zero bits of positive integers held exactly in float64 (< 2^62)."""
    qi = q.astype(np.int64)
    return _floor_log2((qi & -qi).astype(np.float64))


# ---------------------------------------------------------------------------------------
# The products: exact enumeration of two rounded N(0, 1) operands
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (cached)
class _Products:
    """|p| = |a b| for a, b i.i.d. N(0, 1) rounded to the operand format, as a list of
    values with probabilities (one sign; the other mirrors), the adder's exponent
    ``e(a) + e(b)``, and the exponent of the lowest set bit."""

    value: np.ndarray
    expo: np.ndarray
    lsb: np.ndarray
    prob: np.ndarray
    exact: bool          # residuals exact (True) or uniform below the ulp (A4)
    zero: float          # P(p = 0)
    variance: float      # E[p^2]
    k_lo: int            # exponent range of the non-zero products
    k_hi: int


def _operand_values(fmt: FloatFormat, emin_adder: int):
    """(values, exponents, lowest-bit exponents, two-sided probabilities, exact) of one
    operand rounded nearest-even from N(0, 1) to ``fmt``."""
    m = fmt.mantissa_bits
    exact = m <= _COARSE_BITS
    step_bits = m if exact else _COARSE_BITS
    top = min(fmt.emax, 8)  # N(0, 1) never reaches 2^9
    vals, lsbs = [], []
    if fmt.subnormals or not exact:
        k = np.arange(1, 2 ** step_bits)
        vals.append(k * 2.0 ** (fmt.emin - step_bits))
        lsbs.append(fmt.emin - step_bits + _trailing_zeros(k.astype(np.float64)))
    for e in range(max(fmt.emin, -60), top + 1):
        k = 2 ** step_bits + np.arange(2 ** step_bits)
        vals.append(k * 2.0 ** (e - step_bits))
        lsbs.append(e - step_bits + _trailing_zeros(k.astype(np.float64)))
    v = np.concatenate(vals)
    lsb = np.concatenate(lsbs)
    mids = (v[1:] + v[:-1]) / 2.0
    lo = np.concatenate([[v[0] / 2.0], mids])
    hi = np.concatenate([mids, [np.inf]])
    prob = 2.0 * (ndtr(hi) - ndtr(lo))
    if not fmt.subnormals:  # rounded as if subnormals existed, then flushed to zero
        prob = np.where(v < fmt.smallest_normal, 0.0, prob)
    expo = np.maximum(_floor_log2(v), emin_adder)
    if not exact:  # the format's own ulp: the residual below it is taken uniform (A4)
        lsb = expo - m
    keep = prob > _MIN_MASS
    return v[keep], expo[keep], lsb[keep], prob[keep], exact


@functools.lru_cache(maxsize=None)
def _products(fmt: FloatFormat, emin_adder: int) -> _Products:
    v, e, lsb, p, exact = _operand_values(fmt, emin_adder)
    value = np.multiply.outer(v, v).ravel()
    prob = np.multiply.outer(p, p).ravel()
    expo = np.add.outer(e, e).ravel()
    low = np.add.outer(lsb, lsb).ravel()  # odd times odd is odd: lowest bits add
    keep = prob > _MIN_MASS ** 2
    value, prob, expo, low = value[keep], prob[keep], expo[keep], low[keep]
    return _Products(value=value, expo=expo, lsb=low, prob=prob, exact=exact,
                     zero=max(0.0, 1.0 - float(np.sum(p)) ** 2),
                     variance=float(np.sum(prob * value ** 2)),
                     k_lo=int(expo.min()), k_hi=int(expo.max()))


def product_variance_of(operands) -> float:
    """``E[(a b)^2]`` for a, b i.i.d. N(0, 1) rounded to ``operands`` (exact enumeration)."""
    fmt = _operand_format(operands)
    return _products(fmt, fmt.emin).variance


@dataclasses.dataclass(frozen=True)
class _GridTables:
    """Products truncated toward zero to a multiple of g = 2^G, by product exponent k
    (cumulative over exponents <= k, index k - k_lo), and by lowest remaining bit."""

    below: np.ndarray     # P(e(p) <= k), zero products included
    r2: np.ndarray        # E[r^2; e(p) <= k], r = |p| mod g (the truncation error)
    pr: np.ndarray        # E[|p| r; e(p) <= k]
    bit_lo: int           # G: no remaining bit lies below the grid
    at_least: np.ndarray  # P(lowest remaining bit >= G + i), i = 0.. (all-truncated: inf)


@functools.lru_cache(maxsize=4096)
def _grid_tables(dist: _Products, grid_exp: int) -> _GridTables:
    g = math.ldexp(1.0, grid_exp)
    v, lsb = dist.value, dist.lsb
    gone = v < g  # truncated to zero entirely
    if dist.exact:
        r = np.fmod(v, g)
        r1, r2 = r, r * r
        q = np.floor(v / g)
        low = np.where(lsb >= grid_exp, lsb,
                       grid_exp + _trailing_zeros(np.maximum(q, 1.0)))
    else:  # A4: residual uniform on the 2^j points below the grid
        n_pts = np.exp2(np.clip(grid_exp - lsb, 0, 60).astype(np.float64))
        r1 = np.where(gone, v, g * (n_pts - 1) / (2 * n_pts))
        r2 = np.where(gone, v * v, g * g * (n_pts - 1) * (2 * n_pts - 1) / (6 * n_pts ** 2))
        low = np.maximum(lsb, grid_exp)
    low = np.where(gone, _NO_BITS, low)
    size = dist.k_hi - dist.k_lo + 1
    idx = dist.expo - dist.k_lo
    below = dist.zero + np.cumsum(np.bincount(idx, dist.prob, size))
    r2_k = np.cumsum(np.bincount(idx, dist.prob * r2, size))
    pr_k = np.cumsum(np.bincount(idx, dist.prob * v * r1, size))
    width = int(min(dist.k_hi + 4 - grid_exp, 200)) if dist.k_hi + 4 > grid_exp else 1
    rel = np.clip(low - grid_exp, 0, width)  # width: at or above every value
    hist = np.bincount(rel, dist.prob, width + 1)
    at_least = dist.zero + np.cumsum(hist[::-1])[::-1]
    return _GridTables(below=below, r2=r2_k, pr=pr_k, bit_lo=grid_exp, at_least=at_least)


def _cum(table: np.ndarray, k: int, k_lo: int, empty: float) -> float:
    """A cumulative-by-exponent table at exponent k (empty below, total above)."""
    i = k - k_lo
    if i < 0:
        return empty
    return float(table[min(i, len(table) - 1)])


# ---------------------------------------------------------------------------------------
# One block: the moments of its error given the running sum
# ---------------------------------------------------------------------------------------
def _lost_moments(rounding: str, lost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(E[e] / u, E[e^2] / u^2) when a positive value with ``lost`` bits below the grid u
    (residual uniform on 2^lost points, A4) is rounded; 0 where nothing is lost."""
    n_pts = np.exp2(np.clip(lost, 0, 60).astype(np.float64))
    if rounding == "toward_zero":
        mean = -(n_pts - 1) / (2 * n_pts)
        second = (n_pts - 1) * (2 * n_pts - 1) / (6 * n_pts ** 2)
    else:  # nearest-even: unbiased, u^2/12 (1 + 2^(1 - 2j)) (docs/vrr.md §4)
        mean = np.zeros_like(n_pts)
        second = np.where(lost >= 1, (1 + 2.0 / n_pts ** 2) / 12.0, 0.0)
    return np.where(lost >= 1, mean, 0.0), second


def _block_moments(dist: _Products, adder_key: tuple, terms: int, e_s: Optional[int],
                   positions: np.ndarray):
    """(E[e | s], E[e^2 | s], E[P e | s]) for a block of ``terms`` products added to a
    running sum ``s > 0`` in binade ``e_s`` at ``positions`` (``e_s = None``: s = 0, the
    first block), e = e_p + e_D + e_o (product truncation, D truncation, output
    rounding; for s < 0 the bias mirrors)."""
    fraction_bits, m_out, rounding = adder_key
    l = terms
    s = np.asarray(positions, float)
    var_t = l * dist.variance
    sd_t = math.sqrt(var_t)
    k_lo, k_hi = dist.k_lo, dist.k_hi
    if e_s is None:
        candidates = range(k_lo, k_hi + 1)
    else:
        candidates = range(e_s, max(e_s, k_hi) + 1)
    bias = np.zeros_like(s)
    sq = np.zeros_like(s)
    pe = np.zeros_like(s)
    for big in candidates:  # E = max(e(s), largest product exponent) = big
        grid = big - fraction_bits
        gt = _grid_tables(dist, grid)
        c_at = _cum(gt.below, big, k_lo, dist.zero)
        c_under = _cum(gt.below, big - 1, k_lo, dist.zero)
        r2_at, r2_under = _cum(gt.r2, big, k_lo, 0.0), _cum(gt.r2, big - 1, k_lo, 0.0)
        pr_at, pr_under = _cum(gt.pr, big, k_lo, 0.0), _cum(gt.pr, big - 1, k_lo, 0.0)
        if e_s is not None and big == e_s:  # no product above s: every one <= e_s
            weight = c_at ** l
            j_r2 = l * r2_at * c_at ** (l - 1)
            j_pr = l * pr_at * c_at ** (l - 1)
        else:  # the largest product exponent is exactly `big`
            weight = c_at ** l - c_under ** l
            j_r2 = l * (r2_at * c_at ** (l - 1) - r2_under * c_under ** (l - 1))
            j_pr = l * (pr_at * c_at ** (l - 1) - pr_under * c_under ** (l - 1))
        # (i) product truncation: e_p = -sign(p) r, mean zero, uncorrelated with s.
        sq += j_r2
        pe -= j_pr
        if weight <= 1e-300:
            continue
        g = math.ldexp(1.0, grid)
        # (ii) truncation of D to the grid g. D's last bit is its grid 2^(e_s - m_out)
        # or, if F < m_out, the grid 2^(e_s - F) of the block that produced it (C2).
        d_mean = np.zeros_like(s)
        d_sq = np.zeros_like(s)
        low_d = _NO_BITS
        if e_s is not None:
            d_ulp = e_s - min(m_out, fraction_bits)
            if grid > e_s:  # D < g: truncated to zero
                d_mean, d_sq = s.copy(), s * s
            elif grid > d_ulp:
                n_pts = 2.0 ** (grid - d_ulp)
                d_mean += g * (n_pts - 1) / (2 * n_pts)
                d_sq += g * g * (n_pts - 1) * (2 * n_pts - 1) / (6 * n_pts ** 2)
                low_d = grid
            else:
                low_d = d_ulp
        # (iii) rounding of S = s - r_D + T to m_out bits: S's binade b, and its lowest
        # possible bit B = min(D's, the products' lowest remaining bit); b - m_out - B
        # bits are lost.
        centre = s - d_mean
        top = int(max(math.floor(math.log2(max(float(s.max()), 1e-300))) + 2,
                      math.floor(math.log2(6.0 * sd_t)) + 1))
        b_lo = grid + m_out + 1
        o_mean = np.zeros_like(s)
        o_sq = np.zeros_like(s)
        o_pt = np.zeros_like(s)
        if top >= b_lo:
            nb = len(gt.at_least)
            beta = np.arange(top - m_out - grid + 1)           # B = grid + beta
            p_ge = gt.at_least[np.minimum(beta, nb - 1)] ** l  # constant past the last bit
            p_ge = np.where(grid + beta <= low_d, p_ge, 0.0)
            p_eq = p_ge - np.append(p_ge[1:], 0.0)
            b = np.arange(b_lo, top + 1)
            lost = b[:, None] - m_out - (grid + beta[None, :])
            mean_u, sq_u = _lost_moments(rounding, lost)
            u = np.exp2((b - m_out).astype(float))
            r1 = (mean_u @ p_eq) * u                            # E[e_o | S > 0 in b]
            r2 = (sq_u @ p_eq) * u * u
            lo_e = np.exp2(b.astype(float))[None, :]
            hi_e = 2.0 * lo_e
            c = centre[:, None]
            za, zb = (lo_e - c) / sd_t, (hi_e - c) / sd_t      # S > 0 in binade b
            na, nbz = (-hi_e - c) / sd_t, (-lo_e - c) / sd_t   # S < 0 in binade b
            m_pos, m_neg = ndtr(zb) - ndtr(za), ndtr(nbz) - ndtr(na)
            t_pos = sd_t * (_pdf(za) - _pdf(zb))               # E[T; S in +b]
            t_neg = sd_t * (_pdf(na) - _pdf(nbz))
            o_mean = (m_pos - m_neg) @ r1                      # e_o = -sign(S) r
            o_sq = (m_pos + m_neg) @ r2
            o_pt = (t_pos - t_neg) @ r1
        bias += weight * (-d_mean + o_mean)
        sq += weight * (d_sq + o_sq - 2.0 * d_mean * o_mean)
        pe += weight * o_pt
    return bias, sq, pe


@dataclasses.dataclass(frozen=True)
class _FusedTables:
    """Per binade of s (rows, _ES_LO.._ES_HI) and position in it (columns): the block's
    E[e | s], E[e^2 | s], E[P e | s]; the edges of the position cells; and the first
    block's (s = 0) E[e^2] and E[P e]."""

    bias: np.ndarray
    sq: np.ndarray
    pe: np.ndarray
    edges: np.ndarray
    first_sq: float
    first_pe: float


@functools.lru_cache(maxsize=256)
def _fused_tables(dist: _Products, adder_key: tuple, terms: int) -> _FusedTables:
    rows = np.arange(_ES_LO, _ES_HI + 1)
    frac = np.linspace(0.0, 1.0, _POSITIONS + 1)
    edges = np.exp2(rows.astype(float))[:, None] * (1.0 + frac[None, :])
    mids = 0.5 * (edges[:, 1:] + edges[:, :-1])
    bias, sq, pe = (np.empty_like(mids) for _ in range(3))
    for i, e_s in enumerate(rows):
        bias[i], sq[i], pe[i] = _block_moments(dist, adder_key, terms, int(e_s), mids[i])
    edges = edges.copy()
    edges[0, 0] = 0.0  # the lowest cell also takes |s| below the tabulated binades
    _, first_sq, first_pe = _block_moments(dist, adder_key, terms, None, np.zeros(1))
    return _FusedTables(bias, sq, pe, edges, float(first_sq[0]), float(first_pe[0]))


def _fused_rates(t: _FusedTables, state, product):
    """One block as one step of the joint-Gaussian recursion (docs/vrr.md §12, §14): the
    value added is the block's exact sum P (state (l sigma^2, 0, 0)); its error e is
    tabulated against s's binade and position."""
    vs, d, _ = state
    vp = product[0]
    sd = math.sqrt(vs)
    z = t.edges / sd
    mass = 2.0 * (ndtr(z[:, 1:]) - ndtr(z[:, :-1]))           # P(|s| in cell)
    first = 2.0 * sd * (_pdf(z[:, :-1]) - _pdf(z[:, 1:]))     # E[|s|; cell]
    se = float(np.sum(first * t.bias))
    ee2 = float(np.sum(mass * t.sq))
    epe = float(np.sum(mass * t.pe))
    dvs = vp + 2.0 * se + 2.0 * epe + ee2
    dd = se * (1.0 + d / vs) + epe + ee2
    dl = 2.0 * se * d / vs + ee2
    return np.array([dvs, dd, dl]), abs(se) / vs


class _FusedCurve(_ModeCurve):
    """(V_s, D, L) after k blocks, summed as §12's curves are (exact steps, then RK2)."""

    rates = staticmethod(_fused_rates)


_FUSED_CURVES: Dict[tuple, _FusedCurve] = {}


def _adder_key(setup: FusedSetup) -> tuple:
    return (setup.adder.fraction_bits, setup.accumulator.mantissa_bits,
            setup.adder.output_rounding)


def _chain_state(n: int, setup: FusedSetup) -> np.ndarray:
    """(V_s, D, L) of the chain over n products (absolute units)."""
    if n <= 0:
        return np.zeros(3)
    dist = _products(setup.operands, setup.adder.operand_emin)
    key = _adder_key(setup)
    size = setup.adder.terms
    blocks, rest = divmod(n, size)

    def first(terms):
        t = _fused_tables(dist, key, terms)
        var = terms * dist.variance
        return np.array([var + 2.0 * t.first_pe + t.first_sq, t.first_pe + t.first_sq,
                         t.first_sq])

    if blocks == 0:
        return first(rest)
    ckey = (dist, key, size)
    curve = _FUSED_CURVES.get(ckey)
    if curve is None:
        if len(_FUSED_CURVES) > 1024:
            _FUSED_CURVES.clear()
        curve = _FUSED_CURVES[ckey] = _FusedCurve(_fused_tables(dist, key, size),
                                                  (size * dist.variance, 0.0, 0.0),
                                                  first(size))
    state = curve.at(blocks)
    if rest:  # the last, partial block
        rate, _ = _fused_rates(_fused_tables(dist, key, rest), state,
                               (rest * dist.variance, 0.0, 0.0))
        state = state + rate
    return state


def _sparse(setup: FusedSetup, n: int, effective: Optional[int], c: int):
    """(setup, length, promotion) in non-zero products: zeros keep their slots, so a
    block of L holds L n_eff / n non-zero products and an interval c holds c n_eff / n
    (as for chunks, plan.effective_chunk); a zero term adds nothing to a block (C5)."""
    if effective is None or effective == n:
        return setup, n, (0 if c >= n else c)
    effective = _check_int("effective_length", effective, 0, n)
    terms = max(1, min(64, int(round(setup.adder.terms * effective / n))))
    adder = dataclasses.replace(setup.adder, terms=terms)
    return (dataclasses.replace(setup, adder=adder), effective,
            effective_chunk(c, n, effective))


def fused_variance_lost(n: int, hardware: HardwareLike, promote_every: int = 0, *,
                        accumulator=None, operands=None,
                        effective_length: Optional[int] = None) -> float:
    """``n_eff (1 - VRR) = E[(c - x)^2] / sigma^2`` of the fused chain (docs/vrr.md §14),
    ``sigma^2 = E[(a b)^2]`` for the rounded N(0, 1) operands.

    ``promote_every = c > 0``: chunks of c products each summed by the chain, their
    results added in float32 nearest-even (numerics.md §7); inner errors of independent
    chunks are uncorrelated, the float32 level is the nearest-even model of §7.
    ``effective_length``: the non-zero products among the ``n`` (default all).
    """
    setup = fused_setup(hardware, accumulator, operands)
    n = _check_int("n", n, 0)
    c = _check_int("promote_every", promote_every, 0)
    setup, n, c = _sparse(setup, n, effective_length, c)
    if n == 0:
        return 0.0
    dist = _products(setup.operands, setup.adder.operand_emin)
    if c == 0 or c >= n:
        return float(_chain_state(n, setup)[2]) / dist.variance
    full, rest = divmod(n, c)
    chunk = _chain_state(c, setup)
    loss = full * chunk[2] + _chain_state(rest, setup)[2]
    chunks = full + (1 if rest else 0)
    outer, _ = _sequential(chunks, setup.chunk_accumulator.mantissa_bits,
                           min(setup.accumulator.mantissa_bits, 23), _sigma_key(chunk[0]))
    return float(loss + outer) / dist.variance


def fused_vrr(n: int, hardware: HardwareLike, promote_every: int = 0, *, accumulator=None,
              operands=None, effective_length: Optional[int] = None) -> float:
    """Analytical VRR ``1 - E[(c - x)^2] / (n_eff sigma^2)`` of the fused chain over n
    products, ``n_eff = effective_length`` of them non-zero (default all; docs/vrr.md
    §14); see :func:`fused_variance_lost`."""
    n = _check_int("n", n, 0)
    n_eff = n if effective_length is None else _check_int("effective_length",
                                                          effective_length, 0, n)
    if n_eff == 0:
        return 1.0
    return 1.0 - fused_variance_lost(n, hardware, promote_every, accumulator=accumulator,
                                     operands=operands, effective_length=n_eff) / n_eff


# ---------------------------------------------------------------------------------------
# The longest promotion interval that meets the criterion
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromotionSearch:
    """For one GEMM length: the retention without promotion and whether it passes, and
    the longest promotion interval (``n`` itself: none needed; 0: even promoting every
    block fails) that passes, with its retention. ``retention`` maps every interval
    tried to its VRR (``n`` standing for no promotion)."""

    n: int
    vrr: float
    passes: bool
    interval: int
    interval_vrr: float
    retention: Tuple[Tuple[int, float], ...]


def promotion_candidates(n: int, terms: int) -> Tuple[int, ...]:
    """Intervals tried: ``terms * 2^k`` below ``n``, then ``n`` itself (no promotion)."""
    out, c = [], terms
    while c < n:
        out.append(c)
        c *= 2
    return tuple(out) + ((n,) if n > 0 else ())


def longest_promotion_interval(n: int, hardware: HardwareLike, *, accumulator=None,
                               operands=None, effective_length: Optional[int] = None,
                               cutoff: float = 50.0, criterion: str = "bounded",
                               max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS
                               ) -> PromotionSearch:
    """The longest promotion interval (a multiple ``L 2^k`` of the block, or ``n``: no
    promotion) whose analytical retention passes the criterion
    (:func:`tfaccum.analysis.passes_criterion`, for the ``effective_length`` non-zero
    products)."""
    setup = fused_setup(hardware, accumulator, operands)
    n = _check_int("n", n, 0)
    n_eff = n if effective_length is None else _check_int("effective_length",
                                                          effective_length, 0, n)
    if n_eff == 0:
        return PromotionSearch(n, 1.0, True, n, 1.0, ((n, 1.0),) if n else ())
    table = [(c, fused_vrr(n, setup, 0 if c >= n else c, effective_length=n_eff))
             for c in promotion_candidates(n, setup.adder.terms)]
    ok = [passes_criterion(n_eff, v, cutoff, criterion=criterion,
                           max_relative_loss=max_relative_loss) for _, v in table]
    passing = [(c, v) for (c, v), good in zip(table, ok) if good]
    best = max(passing) if passing else (0, table[0][1])
    return PromotionSearch(n=n, vrr=table[-1][1], passes=ok[-1], interval=best[0],
                           interval_vrr=best[1], retention=tuple(table))


# ---------------------------------------------------------------------------------------
# Monte Carlo with the kernels
# ---------------------------------------------------------------------------------------
# Trials per accum_matmul call: a [g, n] times b^T [n, g] computes g^2 dot products, of
# which the diagonal's g are independent (row i of a with row i of b).
_MC_GROUP = 32


def _kernel_trials(a: np.ndarray, b: np.ndarray, config: AccumConfig) -> np.ndarray:
    """``sum_k a[t, k] b[t, k]`` for every row t, each summed by tfaccum's kernel."""
    import tensorflow as tf  # noqa: WPS433 - heavy import only where needed

    from tfaccum.ops import accum_matmul  # noqa: WPS433

    out = np.empty(a.shape[0])
    for lo in range(0, a.shape[0], _MC_GROUP):
        hi = min(a.shape[0], lo + _MC_GROUP)
        c = accum_matmul(tf.constant(a[lo:hi]), tf.constant(np.ascontiguousarray(b[lo:hi].T)),
                         config)
        out[lo:hi] = np.diagonal(np.asarray(c, dtype=np.float64))
    return out


def _draw_operands(rng, shape, fmt: FloatFormat) -> np.ndarray:
    """N(0, 1) float32 draws rounded nearest-even to the operand format (the kernel's
    quantize)."""
    from tfaccum.ops import quantize  # noqa: WPS433

    x = rng.standard_normal(shape, dtype=np.float32)
    return np.asarray(quantize(x, fmt), dtype=np.float32)


def fused_vrr_monte_carlo(n: int, hardware: HardwareLike, promote_every: int = 0,
                          trials: int = 400, seed: int = 0, confidence: float = 0.95, *,
                          accumulator=None, operands=None,
                          max_block_elements: int = 1 << 24) -> VRREstimate:
    """The VRR of the fused chain, measured with tfaccum's kernels: ``trials``
    independent dot products of operands ``a, b ~ N(0, 1)`` rounded (nearest-even) to the
    operand format, each summed by ``tfaccum.accum_matmul`` with the hardware's config
    (the diagonal of ``a [g, n] b^T [n, g]`` for groups of g trials), against the exact
    float64 sum (products of two float32 values are exact in float64; the sum's own error
    is ~1e-16 relative): ``value = 1 - mean((c - x)^2) / (n sigma^2)`` with
    ``sigma^2 = E[(a b)^2]`` (exact, by enumeration), and the CLT interval of
    docs/vrr.md §8. ``acc_mantissa_bits`` of the result is the accumulator's ``m_out``,
    ``product_mantissa_bits`` the products' ``2 m + 1``, ``chunk_size`` the promotion."""
    setup = fused_setup(hardware, accumulator, operands)
    n = _check_int("n", n, 0)
    c = _check_int("promote_every", promote_every, 0)
    trials = _check_int("trials", trials, 2)
    seed = _check_int("seed", seed, 0, 2 ** 63 - 1)
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m_out = setup.accumulator.mantissa_bits
    mp = min(23, 2 * setup.operands.mantissa_bits + 1)
    if n == 0:
        return VRREstimate(1.0, 1.0, 1.0, 0, m_out, mp, c, trials, confidence, 0.0, 0.0,
                           setup.adder.output_rounding)
    dist = _products(setup.operands, setup.adder.operand_emin)
    config = setup.config(0 if c >= n else c)
    rng = np.random.default_rng(seed)
    rows = max(1, min(trials, max_block_elements // n))
    sq = np.empty(trials)
    done = 0
    while done < trials:
        block = min(rows, trials - done)
        a = _draw_operands(rng, (block, n), setup.operands)
        b = _draw_operands(rng, (block, n), setup.operands)
        exact = np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)
        sq[done:done + block] = np.square(_kernel_trials(a, b, config) - exact)
        done += block
    mse = float(sq.mean())
    stderr = float(sq.std(ddof=1) / math.sqrt(trials))
    z = float(ndtri(0.5 + confidence / 2.0))
    total = n * dist.variance
    return VRREstimate(value=1.0 - mse / total, low=1.0 - (mse + z * stderr) / total,
                       high=min(1.0, 1.0 - (mse - z * stderr) / total), n=n,
                       acc_mantissa_bits=m_out, product_mantissa_bits=mp, chunk_size=c,
                       trials=trials, confidence=confidence, mse=mse, mse_stderr=stderr,
                       rounding=setup.adder.output_rounding)
