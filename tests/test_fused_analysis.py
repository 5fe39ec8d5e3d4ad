"""Tests of the fused-adder (tensor-core) retention analysis, tfaccum.analysis.fused and
tfaccum.analysis.tensor_core (docs/vrr.md §14).

Agreement tolerance: the one of docs/vrr.md §9 and §12, with ``L = n (1 - VRR)``:
``|L_analytical - L_mc| <= 0.30 L_mc + 0.05 + 3 stderr(L_mc)`` at every point, and, where
the criterion is decided (``0.5 <= L_mc <= 50``), the median of ``L_analytical / L_mc``
within [0.75, 1.33]. The Monte Carlo runs the real kernels (``accum_matmul`` with the
adder's config). Grid: L in {4, 8, 16, 32}, F in {10, 13, 16, 23, 25}, m_out in {13, 23},
FP8 e4m3 operands (zero exponent -133, toward-zero results); the default run checks a
subset, ``TFACCUM_FULL_GRID=1`` every n in {16, ..., 65536} with and without promotion
every 128 products, at 400 trials.
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum import analysis, presets, reference  # noqa: E402
from tfaccum.config import FloatFormat, FusedAdder  # noqa: E402

FU = sys.modules["tfaccum.analysis.fused"]
FULL_GRID = bool(os.environ.get("TFACCUM_FULL_GRID"))
E4M3 = presets.OPERAND_FORMATS["e4m3"]


def setup_for(terms, fraction_bits, m_out):
    return analysis.fused_setup(FusedAdder(terms, fraction_bits, -133, E4M3.emin, "toward_zero"),
                                FloatFormat(8, m_out, overflow="inf"), "e4m3")


CONFIGS = [(L, F, m) for L in (4, 8, 16, 32) for F in (10, 13, 16, 23, 25) for m in (13, 23)]
if FULL_GRID:
    POINTS = [(L, F, m, n, c) for L, F, m in CONFIGS
              for n in (16, 64, 256, 1024, 4096, 16384, 65536)
              for c in ((0, 128) if n > 128 else (0,))]
    TRIALS = 400
else:
    POINTS = [(L, F, m, n, 0) for L, F, m in CONFIGS for n in (1024, 4096)]
    POINTS += [(L, F, 13, 16384, 0) for L in (8, 32) for F in (13, 16, 23, 25)]
    POINTS += [(32, 13, 13, 65536, 0), (32, 13, 23, 65536, 0), (4, 10, 13, 65536, 128),
               (32, 13, 13, 65536, 128), (16, 25, 23, 4096, 128), (8, 16, 13, 16384, 128)]
    TRIALS = 200


def _clear_caches():
    FU._fused_tables.cache_clear()
    FU._grid_tables.cache_clear()
    FU._FUSED_CURVES.clear()


@pytest.fixture(scope="module")
def measured():
    """Monte Carlo (L_mc, stderr of L_mc) per point, measured once for the module."""
    var = FU.product_variance_of("e4m3")
    out = {}
    for L, F, m, n, c in POINTS:
        est = analysis.fused_vrr_monte_carlo(n, setup_for(L, F, m), c, trials=TRIALS,
                                             seed=n + 31 * m + 7 * F + L + c)
        out[L, F, m, n, c] = (est.variance_lost, est.mse_stderr / var)
    return out


def _compare(measured):
    """(points outside the tolerance, ratios L_a / L_mc where 0.5 <= L_mc <= 50)."""
    failures, ratios = [], []
    for (L, F, m, n, c), (lost_mc, stderr) in measured.items():
        lost_a = analysis.fused_variance_lost(n, setup_for(L, F, m), c)
        if abs(lost_a - lost_mc) > 0.30 * lost_mc + 0.05 + 3.0 * stderr:
            failures.append((L, F, m, n, c, round(lost_a, 4), round(lost_mc, 4)))
        if 0.5 <= lost_mc <= 50.0:
            ratios.append(lost_a / lost_mc)
    return failures, ratios


def test_analytical_matches_monte_carlo(measured):
    failures, ratios = _compare(measured)
    assert not failures, f"(L, F, m_out, n, promote, L_a, L_mc) {failures}"
    assert len(ratios) >= 5, ratios
    assert 0.75 <= float(np.median(ratios)) <= 1.33, sorted(ratios)


def _no_product_truncation(dist, grid_exp, _orig=FU._grid_tables):
    t = _orig.__wrapped__(dist, grid_exp)
    return FU._GridTables(t.below, 0.0 * t.r2, 0.0 * t.pr, t.bit_lo, t.at_least)


@pytest.mark.parametrize("bug", ["no product truncation", "F + 2", "F - 2"])
def test_injected_model_bug_is_caught(bug, measured, monkeypatch):
    """The agreement check rejects a wrong model: per-product truncation ignored (only the
    truncation of D and the output rounding left), or F off by two bits."""
    _clear_caches()
    try:
        if bug == "no product truncation":
            monkeypatch.setattr(FU, "_grid_tables", FU.functools.lru_cache(None)(
                _no_product_truncation))
        else:
            shift = 2 if bug == "F + 2" else -2
            original = FU._adder_key
            monkeypatch.setattr(FU, "_adder_key", lambda setup: (
                original(setup)[0] + shift,) + original(setup)[1:])
        failures, ratios = _compare(measured)
        caught = bool(failures) or not 0.75 <= float(np.median(ratios)) <= 1.33
        assert caught, (bug, failures, ratios)
    finally:
        monkeypatch.undo()
        _clear_caches()


def test_monte_carlo_runs_the_kernels_on_independent_pairs():
    """The Monte Carlo's layout (diagonal of a [g, n] b^T) gives row t of a times row t of
    b, summed as the reference sums it, bit for bit."""
    setup = analysis.fused_setup("hopper:e4m3")
    rng = np.random.default_rng(3)
    for n, c in ((37, 0), (100, 64), (70, 16)):
        a = FU._draw_operands(rng, (40, n), setup.operands)
        b = FU._draw_operands(rng, (40, n), setup.operands)
        got = FU._kernel_trials(a, b, setup.config(c)).astype(np.float32)
        want = np.array([reference.dot(a[t], b[t], setup.config(c)) for t in range(40)],
                        np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (n, c)


def test_product_distribution():
    rng = np.random.default_rng(0)
    for name in ("e4m3", "e5m2", "bf16"):
        fmt = presets.OPERAND_FORMATS[name]
        a = np.asarray(tfaccum.quantize(rng.standard_normal(400_000).astype(np.float32), fmt),
                       np.float64)
        b = np.asarray(tfaccum.quantize(rng.standard_normal(400_000).astype(np.float32), fmt),
                       np.float64)
        sample = float(np.mean((a * b) ** 2))
        assert FU.product_variance_of(name) == pytest.approx(sample, rel=0.02), name
    dist = FU._products(E4M3, E4M3.emin)
    # an operand is zero below half the smallest subnormal, 2^-10
    p_zero = 2.0 * (FU.ndtr(2.0 ** -10) - 0.5)
    assert dist.exact and dist.zero == pytest.approx(1 - (1 - p_zero) ** 2, rel=1e-6)
    assert float(np.sum(dist.prob)) + dist.zero == pytest.approx(1.0, abs=1e-9)
    # e4m3 products have at most 8 significant bits: value / 2^lsb < 2^8
    assert np.all(dist.value / np.exp2(dist.lsb.astype(float)) < 256)


def test_properties():
    for spec in ("hopper:e4m3", "blackwell:e4m3", "ampere:bf16"):
        lost = [analysis.fused_variance_lost(n, spec) for n in (256, 4096, 65536)]
        assert lost[0] < lost[1] < lost[2], (spec, lost)
        # promotion never loses more than the chain it splits, less for long sums
        for n in (4096, 65536):
            assert analysis.fused_variance_lost(n, spec, 128) < \
                analysis.fused_variance_lost(n, spec)
    assert analysis.fused_vrr(0, "hopper:e4m3") == 1.0
    # F = 13 with an e8m13 result: the narrow FP8 path of Hopper loses far more than
    # Blackwell's F = 25, float32 result.
    assert analysis.fused_variance_lost(65536, "hopper:e4m3") > \
        100 * analysis.fused_variance_lost(65536, "blackwell:e4m3")
    # Sparsity: fewer non-zero products lose less.
    full = analysis.fused_vrr(65536, "hopper:e4m3")
    sparse = analysis.fused_vrr(65536, "hopper:e4m3", effective_length=32768)
    assert sparse > full


# ResNet-18 GEMM lengths (batch 256, no sparsity) on hopper:e4m3: whether the unpromoted
# chain passes the bounded criterion, and the longest passing interval (docs/vrr.md §14).
RESNET18_HOPPER = {576: (True, 576), 4608: (True, 4608), 12544: (True, 12544),
                   50176: (True, 50176), 200704: (False, 16384), 802816: (False, 8192),
                   3211264: (False, 2048)}


def test_resnet18_lengths_on_hopper_fp8():
    for n, (passes, interval) in RESNET18_HOPPER.items():
        search = analysis.longest_promotion_interval(n, "hopper:e4m3")
        assert (search.passes, search.interval) == (passes, interval), n
        assert analysis.passes_criterion(n, analysis.fused_vrr(n, "hopper:e4m3", 128))
        assert search.retention[-1] == (n, search.vrr)
        assert [c for c, _ in search.retention][:-1] == [32 * 2 ** k for k in
                                                           range(len(search.retention) - 1)]


def test_setup_arguments():
    setup = analysis.fused_setup("tensor_core:hopper:e4m3")
    assert setup == analysis.fused_setup(presets.model("hopper", "e4m3"))
    assert setup.adder.terms == 32 and setup.accumulator.mantissa_bits == 13
    assert "hopper:e4m3" in setup.describe()
    with pytest.raises(ValueError, match="supported pairs"):
        analysis.fused_setup("volta:e4m3")
    with pytest.raises(ValueError, match="arch:operands"):
        analysis.fused_setup("hopper")
    with pytest.raises(ValueError, match="accumulator"):
        analysis.fused_setup(setup.adder)
    with pytest.raises(ValueError, match="carries"):
        analysis.fused_setup(presets.model("hopper", "e4m3"), operands="e4m3")
    with pytest.raises(TypeError):
        analysis.fused_setup(13)
    with pytest.raises(ValueError, match="effective_length"):
        analysis.fused_vrr(100, setup, effective_length=101)


def test_predict_tensor_core_walks_the_gemms_as_predict_does():
    model = tfaccum.models.digits_cnn()
    plan = analysis.predict_tensor_core(model, "hopper:e4m3", batch_size=64, sparsity=None,
                                        promote_every=128)
    precision = analysis.predict(model, batch_size=64, sparsity=None)
    assert [l.layer for l in plan] == [l.layer for l in precision]
    for layer in precision:
        for g in analysis.GEMMS:
            assert plan[layer.layer].gemm(g).length == layer.gemm(g).length
    text = plan.table()
    assert "hopper:e4m3" in text and "assumptions (docs/vrr.md 14)" in text and "@128" in text
    assert all(p.passes for _, _, p in plan.gemms())  # short GEMMs: all pass
    half = analysis.predict_tensor_core(model, "hopper:e4m3", batch_size=64, sparsity=0.5)
    for _, _, p in half.gemms():
        assert p.effective_length == round(p.length / 2)


def test_cli_tensor_core(tmp_path, capsys):
    from tfaccum import analyze

    status = analyze.main(["analyze", "--model=digits_cnn", "--tensor_core=hopper:e4m3",
                           "--sparsity=none", "--batch_size=64", "--promote_every=128",
                           f"--plot={tmp_path / 'p.png'}"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Tensor-core plan for digits_cnn on hopper:e4m3" in out
    assert "n(1-VRR) @128" in out and "assumptions (docs/vrr.md 14)" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("args", [["--tensor_core=hopper:fp64"], ["--tensor_core=volta:e4m3"],
                                  ["--promote_every=128"],
                                  ["--tensor_core=hopper:e4m3", "--output=x.json"]])
def test_cli_tensor_core_bad_flags(args, capsys):
    from tfaccum import analyze

    assert analyze.main(["analyze", "--sparsity=none"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m tfaccum.analyze: error:") and err.count("\n") == 1


def test_predict_tensor_core_measured_sparsity():
    """Measured sparsity shortens the chains: each GEMM is modelled on its non-zero
    products, with L n_eff / n of them per block (C5)."""
    model = tfaccum.models.digits_cnn()
    with pytest.warns(RuntimeWarning, match="synthetic"):
        plan = analysis.predict_tensor_core(model, "hopper:e4m3", batch_size=64,
                                            max_batches=1, measure_batch_size=16)
    assert "synthetic" in plan.statistics and "NOT real data" in plan.statistics
    sparse = [p for _, _, p in plan.gemms() if p.effective_length < p.length]
    assert sparse  # ReLU zeros
    for p in sparse:
        assert p.vrr == analysis.fused_vrr(p.length, "hopper:e4m3",
                                           effective_length=p.effective_length)
        assert p.vrr >= analysis.fused_vrr(p.length, "hopper:e4m3")
