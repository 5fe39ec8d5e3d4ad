"""The tensor-core presets against the published models (tfaccum/presets.py).

Two kinds of expectation, neither computed by tfaccum:

* ``PUBLISHED``: the parameters, typed from MMA-Sim's NVIDIA models (Xie et al., arXiv
  2511.10909, microsoft/MMA-Sim: the per-architecture tables of ``nv_ptx/sim.py``, bytes
  of A per fused block 8/16/16/16/32/32 divided by the operand size, F = 23/24/24/24/25/25,
  13 with an e8m13 result for FP8 on Ada and Hopper) and the zero exponents its current
  ``MMA_T_FDPA`` is instantiated with.
* Probes in the manner of MMA-Sim's own (``mmasim/probe``) and of Fasi et al. (PeerJ CS
  2021): small dot products whose results follow by hand from the published description
  of the arithmetic (exact products, alignment to the largest exponent of the
  unnormalised products and the running sum, truncation toward zero F bits below it, one
  normalisation toward zero per block). Each probe's expected value is written out below
  with its derivation.

The probes run through the exact reference and through the kernels.
"""

import math

import numpy as np
import pytest

import tfaccum
from tfaccum import presets, reference

# (arch, operands): (L, F, result mantissa bits, zero exponent)
PUBLISHED = {
    ("volta", "fp16"): (4, 23, 23, -131),
    ("turing", "fp16"): (8, 24, 23, -132),
    ("ampere", "fp16"): (8, 24, 23, -132),
    ("ampere", "bf16"): (8, 24, 23, -132),
    ("ampere", "tf32"): (4, 24, 23, -132),
    ("ada", "fp16"): (8, 24, 23, -132),
    ("ada", "bf16"): (8, 24, 23, -132),
    ("ada", "tf32"): (4, 24, 23, -132),
    ("ada", "e4m3"): (16, 13, 13, -132),
    ("ada", "e5m2"): (16, 13, 13, -132),
    ("hopper", "fp16"): (16, 25, 23, -133),
    ("hopper", "bf16"): (16, 25, 23, -133),
    ("hopper", "tf32"): (8, 25, 23, -133),
    ("hopper", "e4m3"): (32, 13, 13, -133),
    ("hopper", "e5m2"): (32, 13, 13, -133),
    ("blackwell", "fp16"): (16, 25, 23, -133),
    ("blackwell", "bf16"): (16, 25, 23, -133),
    ("blackwell", "tf32"): (8, 25, 23, -133),
    ("blackwell", "e4m3"): (32, 25, 23, -133),
    ("blackwell", "e5m2"): (32, 25, 23, -133),
}
# The operand formats' (exponent bits, mantissa bits): IEEE half, bfloat16, TF32, FP8.
OPERAND_BITS = {"fp16": (5, 10), "bf16": (8, 7), "tf32": (8, 10), "e4m3": (4, 3),
                "e5m2": (5, 2)}
PAIRS = sorted(PUBLISHED)


def test_the_supported_pairs_are_the_published_ones():
    assert set(presets.supported()) == set(PUBLISHED)


@pytest.mark.parametrize("arch,operands", PAIRS)
def test_parameters_match_the_published_tables(arch, operands):
    terms, fraction_bits, result_bits, zero_exponent = PUBLISHED[(arch, operands)]
    policy = presets.tensor_core(arch, operands)
    assert policy.fwd == policy.bwd == policy.grad
    config = policy.fwd
    adder = config.fused
    assert (adder.terms, adder.fraction_bits, adder.zero_exponent) == (
        terms, fraction_bits, zero_exponent)
    assert adder.output_rounding == "toward_zero"
    assert (config.accumulator.exponent_bits, config.accumulator.mantissa_bits) == (8,
                                                                                   result_bits)
    assert config.chunk_size == 0 and config.product is None
    e, m = OPERAND_BITS[operands]
    assert (policy.operands.exponent_bits, policy.operands.mantissa_bits) == (e, m)
    # NVIDIA's FP8 E4M3 is the OCP E4M3FN layout (largest 448, no Inf); E5M2 is IEEE-like.
    assert policy.operands.finite == (operands == "e4m3")
    assert policy.operands.max_value == {"e4m3": 448.0, "e5m2": 57344.0}.get(
        operands, policy.operands.max_value)
    assert adder.operand_emin == 2 - 2 ** (e - 1)  # the format's smallest normal exponent
    assert arch in adder.hardware and operands in adder.hardware


def test_unsupported_pairs_name_the_supported_ones():
    with pytest.raises(ValueError, match="volta tensor cores do not take 'bf16'.*ampere: fp16, "
                                         "bf16, tf32"):
        presets.tensor_core("volta", "bf16")
    with pytest.raises(ValueError, match="unknown architecture 'pascal'"):
        presets.tensor_core("pascal", "fp16")
    with pytest.raises(TypeError):
        presets.tensor_core("hopper", 8)
    with pytest.raises(ValueError, match="arch:operands"):
        presets.parse("hopper")


def test_promotion_is_a_float32_nearest_even_total():
    config = presets.tensor_core("hopper", "e4m3", promote_every=128).fwd
    assert config.chunk_size == 128
    assert config.effective_chunk_accumulator == tfaccum.BINARY32
    assert config.rounding == "nearest_even"
    with pytest.raises(ValueError):
        presets.tensor_core("hopper", "e4m3", promote_every=-1)


# --- probes ---------------------------------------------------------------------------
def _operand_pair(exponent: int, operands: str):
    """Two operands of ``operands``' format whose product is 2**exponent (normal values
    where possible, subnormal ones for FP8's short range)."""
    e, m = OPERAND_BITS[operands]
    emin, emax = 2 - 2 ** (e - 1), 2 ** (e - 1) - 1
    lowest = emin - m  # the smallest subnormal
    x = max(lowest, min(emax, exponent // 2))
    y = exponent - x
    assert lowest <= y <= emax, (exponent, operands)
    return 2.0 ** x, 2.0 ** y


class Probe:
    """A dot product built term by term, everything scaled by 2**shift (the arithmetic is
    scale-free away from the range limits; a shift lets FP8 reach the small products a
    probe needs): ``add(a, b)`` appends the product of a and b, ``small(e)`` a product
    2**e (times ``sign * scale``), ``zeros(n)`` n zero products."""

    def __init__(self, operands, shift=0):
        assert shift % 2 == 0
        self.operands, self.shift = operands, shift
        self.a, self.b = [], []

    def add(self, a, b):
        half = 2.0 ** (self.shift // 2)
        self.a.append(a * half)
        self.b.append(b * half)
        return self

    def small(self, exponent, sign=1.0, scale=1.0):
        x, y = _operand_pair(exponent + self.shift, self.operands)
        self.a.append(sign * scale * x)
        self.b.append(y)
        return self

    def zeros(self, count):
        for _ in range(count):
            self.a.append(0.0)
            self.b.append(1.0)
        return self

    def value(self, v):
        """What the probe's ``v`` is after the shift."""
        return v * 2.0 ** self.shift


def _shift_for(operands, lowest_exponent):
    """An even shift that brings products down to 2**lowest_exponent within reach."""
    e, m = OPERAND_BITS[operands]
    lowest_product = 2 * (2 - 2 ** (e - 1) - m)
    shift = max(0, lowest_product - lowest_exponent)
    return shift + shift % 2


def _evaluate(backend, probe, config):
    a = np.array(probe.a, np.float32)
    b = np.array(probe.b, np.float32)
    if backend == "reference":
        return float(reference.dot(a, b, config))
    return float(tfaccum.accum_matmul(a[None, :], b[:, None], config).numpy()[0, 0])


def _same(actual, expected):
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)


BACKENDS = ["reference", "kernel"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", PAIRS)
def test_alignment_keeps_F_bits_and_truncates_toward_zero(backend, arch, operands):
    terms, F, _, _ = PUBLISHED[(arch, operands)]
    config = presets.tensor_core(arch, operands).fwd
    shift = _shift_for(operands, -F - 1)
    # 1 - 1 + 2^-F: the largest exponent is 0, so the grid is 2^-F and 2^-F survives
    # exactly; the exact sum 2^-F is then a normal float32 (and e8m13) value.
    p = Probe(operands, shift).add(1.0, 1.0).add(-1.0, 1.0).small(-F)
    assert _same(_evaluate(backend, p, config), p.value(2.0 ** -F))
    # 2^-(F+1) lies below the grid: truncated to zero, and 1 - 1 + 0 is +0.
    p = Probe(operands, shift).add(1.0, 1.0).add(-1.0, 1.0).small(-F - 1)
    assert _same(_evaluate(backend, p, config), 0.0)
    # -1.5 * 2^-F truncates toward zero to -2^-F (toward -Inf it would be -2^(1-F)).
    p = Probe(operands, shift).add(1.0, 1.0).add(-1.0, 1.0).small(-F, sign=-1.0, scale=1.5)
    assert _same(_evaluate(backend, p, config), p.value(-(2.0 ** -F)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", PAIRS)
def test_blocks_are_L_products(backend, arch, operands):
    terms, F, _, _ = PUBLISHED[(arch, operands)]
    config = presets.tensor_core(arch, operands).fwd
    shift = _shift_for(operands, -F - 1)
    # 1 - 1 in the first block, then 2^-(F+1) as product L-1: the same block (largest
    # exponent 0), so it is truncated away: +0.
    p = Probe(operands, shift).add(1.0, 1.0).add(-1.0, 1.0).zeros(terms - 3).small(-F - 1)
    assert len(p.a) == terms
    assert _same(_evaluate(backend, p, config), 0.0)
    # As product L it opens the second block, whose running sum is +0: it is the largest
    # term there and survives exactly.
    p = Probe(operands, shift).add(1.0, 1.0).add(-1.0, 1.0).zeros(terms - 2).small(-F - 1)
    assert _same(_evaluate(backend, p, config), p.value(2.0 ** (-F - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", [p for p in PAIRS if p[1] != "e5m2"])
def test_a_product_enters_with_the_sum_of_its_operand_exponents(backend, arch, operands):
    _, F, _, _ = PUBLISHED[(arch, operands)]
    config = presets.tensor_core(arch, operands).fwd
    shift = _shift_for(operands, -F)
    # 1.5 x 1.5 = 2.25 has exponent 0 + 0 = 0 (significand 2.25, unnormalised): with
    # -(1.5 x 1.5) the largest exponent is 0 and 2^-F survives.
    p = Probe(operands, shift).add(1.5, 1.5).add(-1.5, 1.5).small(-F)
    assert _same(_evaluate(backend, p, config), p.value(2.0 ** -F))
    # The same value as -(1.125 x 2) has exponent 0 + 1 = 1: the grid becomes 2^(1-F)
    # and 2^-F is truncated away. (1.125 needs 3 fraction bits: not in E5M2.)
    p = Probe(operands, shift).add(1.5, 1.5).add(-1.125, 2.0).small(-F)
    assert _same(_evaluate(backend, p, config), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", PAIRS)
def test_the_block_result_is_normalised_toward_zero(backend, arch, operands):
    _, F, m, _ = PUBLISHED[(arch, operands)]
    config = presets.tensor_core(arch, operands).fwd
    # 1 + 1 + 1.5 x 2^(1-m) = 2 + 3 x 2^-m, kept whole by the adder (F >= m). The result
    # has m fraction bits at exponent 1, a grid of 2^(1-m): toward zero gives 2 + 2^(1-m)
    # (nearest-even would give 2 + 2^(2-m)).
    p = Probe(operands, _shift_for(operands, 1 - m)).add(1.0, 1.0).add(1.0, 1.0)
    p.small(1 - m, scale=1.5)
    assert _same(_evaluate(backend, p, config), p.value(2.0 + 2.0 ** (1 - m)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", [p for p in PAIRS if p[1] in ("bf16", "tf32")])
def test_a_zero_term_takes_the_zero_exponent(backend, arch, operands):
    # Only bf16/tf32 products reach below 2^e_zero (about 2^-132). The running sum is +0,
    # so its exponent is e_zero = Z > -148, and the grid is 2^(Z-F) although every
    # product is smaller.
    _, F, _, Z = PUBLISHED[(arch, operands)]
    config = presets.tensor_core(arch, operands).fwd
    # 2^-148 - 2^(Z-F): both on the grid, the exact sum lies just below 2^-148 and
    # truncates to the float32 subnormal 2^-149.
    p = Probe(operands).small(-148).small(Z - F, sign=-1.0)
    assert _same(_evaluate(backend, p, config), 2.0 ** -149)
    # 2^-148 - 2^(Z-F-1): the second product is below the grid, truncated to zero.
    p = Probe(operands).small(-148).small(Z - F - 1, sign=-1.0)
    assert _same(_evaluate(backend, p, config), 2.0 ** -148)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", [("volta", "fp16"), ("hopper", "e4m3"),
                                           ("ampere", "bf16")])
def test_specials(backend, arch, operands):
    config = presets.tensor_core(arch, operands).fwd
    inf, nan = math.inf, math.nan
    cases = [([inf, 1.0], [1.0, 1.0], inf),
             ([inf, -inf], [1.0, 1.0], nan),   # Inf - Inf
             ([inf, 1.0], [0.0, 1.0], nan),    # 0 x Inf
             ([nan, 1.0], [1.0, 1.0], nan),
             ([-inf, 1.0], [1.0, 1e30], -inf)]  # a finite term cannot cancel an infinity
    for a, b, expected in cases:
        p = Probe(operands)
        for x, y in zip(a, b):
            p.add(x, y)
        assert _same(_evaluate(backend, p, config), expected), (a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,operands", [p for p in PAIRS if p[1] in ("e4m3", "e5m2")])
def test_promotion_recovers_what_the_fused_sum_truncates(backend, arch, operands):
    terms, F, m, _ = PUBLISHED[(arch, operands)]
    # 1, then in the next block 2^-(F+1): without promotion the running sum 1 sets the
    # grid 2^-F and the small product is lost (F = 13 on Ada/Hopper FP8: the ~13-bit
    # accumulation the DeepSeek-V3 report describes).
    p = Probe(operands, _shift_for(operands, -F - 1)).add(1.0, 1.0).zeros(terms - 1)
    p.small(-F - 1)
    assert _same(_evaluate(backend, p, presets.tensor_core(arch, operands).fwd), p.value(1.0))
    # Promoted every L products, the second chunk starts from +0 and keeps 2^-(F+1)
    # whole; the float32 total 1 + 2^-(F+1) is exact for F <= 22 (nearest-even to 1
    # beyond).
    promoted = presets.tensor_core(arch, operands, promote_every=terms).fwd
    expected = 1.0 + 2.0 ** (-F - 1) if F <= 22 else 1.0
    assert _same(_evaluate(backend, p, promoted), p.value(expected))


def test_rewrite_and_summary_name_the_hardware():
    import keras

    keras.backend.clear_session()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    policy = presets.tensor_core("hopper", "e4m3", promote_every=128)
    emulated = tfaccum.rewrite(model, policy)
    text = tfaccum.summary(emulated, print_fn=lambda *_: None)
    assert "hopper e4m3 (wgmma)" in text and "32-term" in text and "chunk 128" in text
    assert emulated.get_layer("fc").policy == policy


@pytest.mark.parametrize("arch,operands", PAIRS)
def test_every_preset_kernels_equal_the_reference_on_random_operands(arch, operands):
    # Operands already in the format (as the bit-exactness promise reads), K not a
    # multiple of L, with and without promotion at an interval that is not a multiple of
    # L either.
    terms = PUBLISHED[(arch, operands)][0]
    rng = np.random.default_rng(abs(hash((arch, operands))) % 2 ** 32)
    fmt = presets.OPERAND_FORMATS[operands]
    k = 2 * terms + 3
    a = reference.quantize(rng.standard_normal((3, k)).astype(np.float32) * 4, fmt)
    b = reference.quantize(rng.standard_normal((k, 2)).astype(np.float32) * 4, fmt)
    for promote in (0, terms + 1):
        config = presets.tensor_core(arch, operands, promote_every=promote).fwd
        got = tfaccum.accum_matmul(a, b, config).numpy()
        np.testing.assert_array_equal(got.view(np.uint32),
                                      reference.matmul(a, b, config).view(np.uint32))
