"""Issue 10: measured product statistics, the direct measurement, the monitor's tolerance,
and the statistics of the main job (seeds, pairing, intervals, verdicts).

Independent expectations: brute-force loops over every product (numpy), the pure-Python
reference kernels (``tfaccum.reference``), Student-t quantiles from printed tables, and
the digits' labels.
"""

import math
import warnings

import numpy as np
import pytest

import keras
import tfaccum
from tfaccum import analysis, reference
from tfaccum.analysis.measure import falls_short
from tfaccum.config import AccumConfig, AccumPolicy, FloatFormat
from tfaccum.training import summary


def _dense_model(inputs: int, units: int, kernel: np.ndarray, activation=None):
    keras.backend.clear_session()
    x = keras.Input((inputs,))
    layer = keras.layers.Dense(units, use_bias=False, activation=activation, name="fc")
    out = keras.layers.Dense(2, name="head")(layer(x))
    model = keras.Model(x, out)
    layer.kernel.assign(kernel)
    return model


# ---------------------------------------------------------------------------------------
# measured statistics against brute force
# ---------------------------------------------------------------------------------------
def test_measured_statistics_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    x[x < -0.5] = 0.0  # some zero operands
    w = rng.standard_normal((12, 5)).astype(np.float32)
    model = _dense_model(12, 5, w)
    y = rng.integers(0, 2, 16)
    stats = analysis.measure_statistics(model, (x, y), batch_size=16, max_batches=1,
                                        keep_first_batch=True)
    fwd = stats.layers["fc"]["fwd"]
    products = x[:, :, None].astype(np.float64) * w[None, :, :]  # [batch, k, units]
    nonzero = products[products != 0]
    assert fwd.sparsity == pytest.approx(1 - nonzero.size / products.size, abs=1e-9)
    assert fwd.product_mean == pytest.approx(nonzero.mean(), rel=1e-5, abs=1e-9)
    assert fwd.product_std == pytest.approx(nonzero.std(), rel=1e-5)
    sums = products.sum(axis=1)
    assert fwd.coherence == pytest.approx((sums ** 2).sum() / (products ** 2).sum(), rel=1e-5)
    # GRAD: dw = x^T . dz, products over the batch
    _, dz = stats.first_batch["fc"]
    grad_products = x[:, :, None].astype(np.float64) * dz[:, None, :]
    grad = stats.layers["fc"]["grad"]
    assert grad.coherence == pytest.approx(
        (grad_products.sum(axis=0) ** 2).sum() / (grad_products ** 2).sum(), rel=1e-4)


def test_coherence_tells_iid_from_coherent_products():
    rng = np.random.default_rng(1)
    n = 64
    x = rng.standard_normal((64, n)).astype(np.float32)
    iid = analysis.measure_statistics(
        _dense_model(n, 8, rng.standard_normal((n, 8)).astype(np.float32)), x,
        batch_size=64, max_batches=1).layers["fc"]["fwd"]
    assert iid.gaussian_model_holds() and 0.5 < iid.coherence < 2
    # all products positive: y^2 ~ n^2 mu^2, sum p^2 ~ n (mu^2 + s^2)
    positive = np.abs(x) + 1.0
    coherent = analysis.measure_statistics(
        _dense_model(n, 8, np.ones((n, 8), np.float32)), positive, batch_size=64,
        max_batches=1).layers["fc"]["fwd"]
    p = positive.astype(np.float64)
    expected = (p.sum(axis=1) ** 2).sum() / (p ** 2).sum()
    assert coherent.coherence == pytest.approx(expected, rel=1e-5) and coherent.coherence > 20
    assert not coherent.gaussian_model_holds()


def _reference_retention(x, w, bits: int) -> float:
    """FWD retention of x.w at e6m<bits> accumulators with the pure-Python reference."""
    config = AccumConfig(accumulator=FloatFormat(6, bits))
    emulated = reference.matmul(x, w, config).astype(np.float64)
    exact = reference.matmul(x, w, AccumConfig(accumulator=FloatFormat(8, 23))).astype(
        np.float64)
    return 1.0 - np.mean((emulated - exact) ** 2) / exact.var()


def test_direct_measurement_where_the_model_is_off():
    """Coherent products (positive inputs and weights): the plan says so, measures the
    bits with the kernels, and the pure-Python reference agrees that the chosen width is
    the smallest that passes."""
    rng = np.random.default_rng(2)
    n, units = 24, 4
    x = (np.abs(rng.standard_normal((8, n))) + 0.5).astype(np.float32)
    w = (np.abs(rng.standard_normal((n, units))) + 0.5).astype(np.float32)
    model = _dense_model(n, units, w)
    plan = analysis.predict(model, 8, product_mantissa_bits=23, data=(x, None),
                            max_batches=1, measure_batch_size=8)
    fwd = plan["fc"].fwd
    assert fwd.basis == "measured" and fwd.coherence > 2
    assert "fc/fwd" in plan.statistics and "*" in plan.table()
    bits = fwd.mantissa_bits

    def passes(m):
        r = _reference_retention(x, w, m)
        return analysis.passes_criterion(fwd.effective_length, r)

    assert passes(bits) and (bits == 0 or not passes(bits - 1))
    assert fwd.retention == pytest.approx(_reference_retention(x, w, bits), abs=1e-6)


def test_predicted_retention_is_the_analytical_vrr_and_shifts():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    model = _dense_model(64, 16, rng.standard_normal((64, 16)).astype(np.float32))
    plan = analysis.predict(model, 32, data=x, rounding="toward_zero", direct=False)
    g = plan["fc"].fwd
    assert g.basis == "analytical"
    assert g.retention == pytest.approx(
        analysis.vrr(g.effective_length, g.mantissa_bits, 5, rounding="toward_zero"))
    shifted = plan.shift(-1)["fc"].fwd
    assert shifted.retention == pytest.approx(
        analysis.vrr(g.effective_length, g.mantissa_bits - 1, 5, rounding="toward_zero"))
    again = analysis.PrecisionPlan.from_json(plan.to_json())
    assert again == plan and again.criterion == "bounded"
    assert "rounding toward_zero" in plan.header() and "1-VRR <= 0.56 %" in plan.header()


def test_rounding_mode_changes_the_prediction():
    """Truncation needs more bits than nearest-even for the same long sum (docs/vrr.md 12)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    model = _dense_model(512, 8, rng.standard_normal((512, 8)).astype(np.float32))
    even = analysis.predict(model, 64, data=x, sparsity=None, rounding="nearest_even")
    trunc = analysis.predict(model, 64, data=x, sparsity=None, rounding="toward_zero")
    for g in ("fwd", "grad"):
        assert trunc["fc"].gemm(g).mantissa_bits > even["fc"].gemm(g).mantissa_bits
        assert trunc["fc"].gemm(g).mantissa_bits == analysis.min_mantissa_bits(
            trunc["fc"].gemm(g).effective_length, 5, rounding="toward_zero")


def test_nothing_silently_assumes_gaussian_inputs():
    rng = np.random.default_rng(5)
    model = _dense_model(16, 4, rng.standard_normal((16, 4)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match="synthetic N\\(0, 1\\)"):
        plan = analysis.predict(model, 8)
    assert "synthetic" in plan.statistics and "NOT real data" in plan.statistics
    assert "NOT real data" in plan.header()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assumed = analysis.predict(model, 8, sparsity=None)
    assert assumed.statistics.startswith("assumed, not measured")
    assert assumed["fc"].fwd.coherence is None


# ---------------------------------------------------------------------------------------
# the monitor's tolerance
# ---------------------------------------------------------------------------------------
def test_falls_short_is_the_monte_carlo_tolerance():
    # L = n (1 - R); short when L_meas - L_pred > 0.30 L_meas + 0.05 (+ 3 n stderr)
    n = 100
    assert not falls_short(0.99, 0.99, n)
    assert not falls_short(0.99, 0.999, n)  # better than predicted
    # L_pred = 1: the limit is L_meas = 1.05 / 0.7 = 1.5, R = 0.985
    assert not falls_short(0.99, 0.9851, n)
    assert falls_short(0.99, 0.9849, n)
    assert not falls_short(0.99, 0.9849, n, loss_stderr=0.001)  # 3 n se = 0.3 more room
    assert not falls_short(float("nan"), 0.5, n)


# ---------------------------------------------------------------------------------------
# seeds, pairing, intervals, verdicts
# ---------------------------------------------------------------------------------------
def test_mean_ci_uses_student_t():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, half = summary.mean_ci(values)
    # t_0.975 with 4 degrees of freedom is 2.776 (printed tables); sd = sqrt(2.5)
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert summary.mean_ci([7.0]) == (7.0, None)
    assert summary.t_quantile(9) == pytest.approx(2.262, abs=1e-3)


@pytest.mark.parametrize("mean,half,expected", [
    (0.1, 0.3, "within 0.5 pp"), (0.2, 0.3, "within 0.5 pp"), (-1.0, 0.5, "within 0.5 pp"),
    (0.3, 0.3, "inconclusive"), (0.9, 0.5, "inconclusive"),
    (0.9, 0.3, "worse by more than 0.5 pp"), (0.0, None, "inconclusive")])
def test_verdict_from_the_interval(mean, half, expected):
    assert summary.verdict(mean, half) == expected


def _result(policy, offset, seed, error):
    name = "fp32" if policy == "fp32" else policy + (f"{offset:+d}" if offset else "")
    return {"name": name, "run": {"policy": policy, "offset": offset, "chunk_size": 0,
                                  "seed": seed},
            "seed": seed, "bits": "x", "test_error_pct": error, "train_time_s": 1.0}


def test_summary_pairs_by_seed():
    # seed effects cancel in the paired difference: +0.1 on every seed
    base = [1.0, 3.0, 2.0, 5.0]
    results = [_result("fp32", 0, s, e) for s, e in enumerate(base)]
    results += [_result("predicted", 0, s, e + 0.1) for s, e in enumerate(base)]
    results += [_result("predicted", -1, s, e + 2.0 + 0.1 * s) for s, e in enumerate(base)]
    rows = {r["run"]: r for r in summary.rows(results)}
    assert rows["predicted"]["delta_vs_fp32_pct"] == pytest.approx(0.1)
    assert rows["predicted"]["delta_ci_high_pct"] == pytest.approx(0.1)  # no spread
    assert rows["predicted"]["verdict"] == "within 0.5 pp"
    # unpaired, the errors' own interval is wide
    assert rows["predicted"]["test_error_ci_pct"] > 1.0
    assert rows["predicted-1"]["verdict"] == "worse by more than 0.5 pp"
    assert [r["run"] for r in summary.rows(results)] == ["fp32", "predicted", "predicted-1"]
    assert "± " in summary.markdown(summary.rows(results))


def test_digits_folds_partition_the_dataset():
    from sklearn.datasets import load_digits

    from tfaccum.training.data import DIGITS_FOLDS, digits_fold

    labels = load_digits().target
    tests = [digits_fold(seed)[1] for seed in range(DIGITS_FOLDS)]
    together = np.sort(np.concatenate(tests))
    assert np.array_equal(together, np.arange(len(labels)))  # each image tested once
    for seed in range(DIGITS_FOLDS):
        train, test = digits_fold(seed)
        assert not set(train) & set(test) and len(train) + len(test) == len(labels)
        # stratified: every class in every fold
        assert set(labels[test]) == set(range(10))
    assert np.array_equal(digits_fold(2)[1], digits_fold(7)[1])


def test_configurations_of_one_seed_start_from_the_same_weights(tmp_path):
    from tfaccum.training.experiment import Experiment
    from tfaccum.training.settings import RunSpec, Settings

    settings = Settings.resolve({"experiment": "tightness", "model_dir": str(tmp_path),
                                 "seeds": 2, "policy": "10"})
    experiment = Experiment(settings, log=lambda *a: None)

    def kernel(spec):
        trainee = experiment._build(spec, None)
        return trainee.model.get_layer("conv2").kernel.numpy()

    a = kernel(RunSpec("fp32", seed=0))
    b = kernel(RunSpec("e6m10", offset=-1, seed=0))
    c = kernel(RunSpec("e6m10", offset=-1, seed=1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    data = experiment.data_for(0)
    first = [y.numpy() for _, y in data.train(0, 3, 32).take(2)]
    again = [y.numpy() for _, y in experiment.data_for(0).train(0, 3, 32).take(2)]
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
