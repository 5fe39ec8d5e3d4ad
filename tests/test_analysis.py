"""Tests of tfaccum.analysis: analytical vs Monte Carlo VRR, the criterion, sparsity,
precision plans and the ``python -m tfaccum.analyze`` CLI.

The analytical/Monte Carlo agreement tolerance (docs/vrr.md, section 7): with
``L = n (1 - VRR)`` (the error energy in units of one product variance, ``ln v(n)``),

    |L_analytical - L_mc| <= 0.30 * L_mc + 0.05 + 3 * stderr(L_mc)

i.e. 30 % of the lost variance, or 0.05 (1.3 % of ln 50) where almost nothing is lost;
and the predicted bits agree within one bit. The default run checks a subset of the
grid (about 40 s of CPU); ``TFACCUM_FULL_GRID=1`` runs the whole grid of docs/vrr.md
section 9 (n from 16 to 1e5, m_acc 3..16, m_p in {2, 5, 10, 23}, sequential and chunk
64; about 20 minutes).
"""

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum import analysis, models  # noqa: E402
from tfaccum.analysis import GemmPrediction, LayerPrediction, PrecisionPlan  # noqa: E402

FULL_GRID = bool(os.environ.get("TFACCUM_FULL_GRID"))
LN50 = math.log(50.0)
REL_TOL, ABS_TOL = 0.30, 0.05

if FULL_GRID:
    GRID_N = [16, 64, 256, 1024, 4096, 16384, 65536, 100000]
    GRID_M = list(range(3, 17))
    TRIALS = 400
else:
    GRID_N = [16, 1024, 16384, 100000]
    GRID_M = [3, 7, 11, 16]
    TRIALS = 160
GRID_MP = [2, 5, 10, 23]
GRID_C = [0, 64]


def _grid():
    for mp in GRID_MP:
        for c in GRID_C:
            for n in GRID_N:
                if c and c >= n:
                    continue
                yield mp, c, n


def _agree(n, ana, est):
    lost_a = n * (1.0 - ana)
    lost_mc = n * (1.0 - est.value)
    stderr = est.mse_stderr / analysis.product_variance(est.product_mantissa_bits)
    return abs(lost_a - lost_mc) <= REL_TOL * lost_mc + ABS_TOL + 3.0 * stderr


# ---------------------------------------------------------------------------------------
# Analytical vs Monte Carlo
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mp,c,n", list(_grid()))
def test_vrr_analytical_matches_monte_carlo(mp, c, n):
    failures = []
    for m in GRID_M:
        est = analysis.vrr_monte_carlo(n, m, mp, c, trials=TRIALS, seed=n + 31 * m + 7 * mp)
        ana = analysis.vrr(n, m, mp, c)
        assert est.low <= est.value <= est.high
        if not _agree(n, ana, est):
            failures.append((m, ana, est.value, est.low, est.high))
    assert not failures, f"n={n} m_p={mp} chunk={c}: (m, analytical, mc, low, high) {failures}"


@pytest.mark.parametrize("mp,c,n", list(_grid()))
def test_predicted_bits_match_monte_carlo_within_one_bit(mp, c, n):
    ana = analysis.min_mantissa_bits(n, mp, c, criterion="paper")
    mc = analysis.min_mantissa_bits(n, mp, c, method="monte_carlo", trials=TRIALS, seed=n + mp,
                                    criterion="paper")
    assert abs(ana - mc) <= 1, (n, mp, c, ana, mc)


def test_monte_carlo_estimate_and_interval():
    est = analysis.vrr_monte_carlo(1024, 6, 5, trials=64, seed=3)
    again = analysis.vrr_monte_carlo(1024, 6, 5, trials=64, seed=3)
    assert est == again  # reproducible from the seed
    assert est.low < est.value < est.high <= 1.0
    assert est.trials == 64 and est.n == 1024 and est.chunk_size == 0
    assert float(est) == est.value
    assert est.variance_lost == pytest.approx(1024 * (1 - est.value))
    wide = analysis.vrr_monte_carlo(1024, 6, 5, trials=64, seed=3, confidence=0.999)
    assert wide.low < est.low and wide.high >= est.high
    # A float32 accumulator of 16 products loses (almost) nothing.
    exact = analysis.vrr_monte_carlo(16, 23, 5, trials=16, seed=0)
    assert exact.value == pytest.approx(1.0, abs=1e-9)


def test_monte_carlo_matches_a_direct_kernel_measurement():
    # The same draw accumulated directly: the estimate is 1 - mean err^2 / (n sigma_p^2).
    from tfaccum.analysis.vrr import _round_mantissa

    n, m, mp, trials, seed = 300, 4, 5, 20, 11
    rng = np.random.default_rng(seed)
    p = _round_mantissa(rng.standard_normal((trials, n), dtype=np.float32), mp)
    cfg = tfaccum.AccumConfig(accumulator=tfaccum.FloatFormat(8, m))
    c = np.asarray(tfaccum.accum_matmul(p, np.ones((n, 1), np.float32), cfg))[:, 0]
    mse = np.mean((c.astype(np.float64) - p.astype(np.float64).sum(1)) ** 2)
    est = analysis.vrr_monte_carlo(n, m, mp, trials=trials, seed=seed)
    assert est.value == pytest.approx(1 - mse / (n * analysis.product_variance(mp)), rel=1e-12)


def test_empirical_vrr():
    x = np.array([1.0, -1.0, 2.0, -2.0])
    assert analysis.empirical_vrr(x, x) == 1.0
    assert analysis.empirical_vrr(np.zeros(4), x) == pytest.approx(1.0 - 2.5 / 2.5)
    assert analysis.empirical_vrr(x + 0.5, x) == pytest.approx(1 - 0.25 / 2.5)
    with pytest.raises(ValueError):
        analysis.empirical_vrr([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mp", [2, 5, 10, 23])
@pytest.mark.parametrize("c", [0, 64])
def test_vrr_falls_with_n_and_rises_with_m(mp, c):
    # Chunked sums are compared at whole numbers of chunks: a short last chunk loses
    # less than a full one, so VRR(n) can tick up just past a multiple of the chunk size.
    ns = ([2, 8, 16, 64, 100, 256, 1000, 4096, 10000, 65536, 100000, 10 ** 6] if c == 0
          else [64, 128, 256, 1024, 4096, 16384, 65536, 2 ** 17, 2 ** 20])
    for m in range(0, 24, 3):
        values = [analysis.vrr(n, m, mp, c) for n in ns]
        assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), (m, values)
    for n in ns:
        values = [analysis.vrr(n, m, mp, c) for m in range(0, 24)]
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), (n, values)
        assert values[-1] <= 1.0


@pytest.mark.parametrize("mp", [2, 5, 23])
def test_chunking_never_needs_more_bits(mp):
    for n in [16, 63, 64, 65, 100, 500, 1024, 4608, 20000, 131072, 10 ** 6]:
        for chunk in (16, 64, 256):
            for criterion in ("paper", "bounded"):
                chunked = analysis.min_mantissa_bits(n, mp, chunk, criterion=criterion)
                assert chunked <= analysis.min_mantissa_bits(n, mp, criterion=criterion), (
                    n, mp, chunk, criterion)


@pytest.mark.parametrize("mp", [2, 5, 23])
@pytest.mark.parametrize("c", [0, 64])
def test_min_mantissa_bits_is_the_smallest_passing(mp, c):
    for n in [16, 100, 1024, 4608, 50000, 3 * 10 ** 6]:
        for cutoff in (5.0, 50.0, 500.0):
            m = analysis.min_mantissa_bits(n, mp, c, cutoff=cutoff, criterion="paper")
            lost = analysis.variance_lost(n, m, mp, c)
            assert analysis.v_criterion(n, analysis.vrr(n, m, mp, c)) < cutoff
            assert lost < math.log(cutoff)
            if m > 0:
                assert analysis.variance_lost(n, m - 1, mp, c) >= math.log(cutoff)
                assert not analysis.passes_criterion(n, analysis.vrr(n, m - 1, mp, c), cutoff,
                                                     criterion="paper")
            # The bounded criterion (default): the smallest m passing both bounds.
            b = analysis.min_mantissa_bits(n, mp, c, cutoff=cutoff)
            assert b >= m
            assert analysis.passes_criterion(n, analysis.vrr(n, b, mp, c), cutoff)
            if b > 0:
                assert not analysis.passes_criterion(n, analysis.vrr(n, b - 1, mp, c), cutoff)


def test_criterion_helpers_and_edge_cases():
    assert analysis.vrr(0, 5, 5) == 1.0
    assert analysis.vrr(1, 0, 0) == 1.0  # one product of 1 bit fits a 1-bit accumulator
    assert analysis.min_mantissa_bits(1, 5, criterion="paper") == 0
    assert analysis.v_criterion(100, 1.0) == 1.0
    assert analysis.v_criterion(10 ** 6, 0.0) == math.inf
    assert analysis.passes_criterion(100, 1 - math.log(49) / 100, criterion="paper")
    assert not analysis.passes_criterion(100, 1 - math.log(49) / 100)  # loses 3.9 %
    # A larger cut-off never asks for more bits.
    assert (analysis.min_mantissa_bits(4608, 5, cutoff=500)
            <= analysis.min_mantissa_bits(4608, 5) <= analysis.min_mantissa_bits(4608, 5, cutoff=2))
    with pytest.warns(RuntimeWarning):
        assert analysis.min_mantissa_bits(10 ** 6, 5, max_bits=4) == 4
    for bad in (dict(n=-1), dict(n=1.5), dict(acc_mantissa_bits=24),
                dict(product_mantissa_bits=-1), dict(chunk_size=-2)):
        args = dict(n=16, acc_mantissa_bits=5, product_mantissa_bits=5, chunk_size=0)
        args.update(bad)
        with pytest.raises((ValueError, TypeError)):
            analysis.vrr(**args)
    with pytest.raises(ValueError):
        analysis.min_mantissa_bits(16, 5, cutoff=1.0)
    with pytest.raises(ValueError):
        analysis.min_mantissa_bits(16, 5, method="guess")


def test_product_variance():
    assert analysis.product_variance(23) == pytest.approx(1.0, abs=1e-8)
    rng = np.random.default_rng(0)
    from tfaccum.analysis.vrr import _round_mantissa

    z = rng.standard_normal(2_000_000).astype(np.float32)
    for mp in (0, 2, 5):
        sample = np.mean(_round_mantissa(z, mp).astype(np.float64) ** 2)
        assert sample == pytest.approx(analysis.product_variance(mp), abs=4e-3)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = analysis.plot_vrr(str(tmp_path / "vrr.png"), acc_mantissa_bits=(4, 8),
                             n_max=2048, monte_carlo_n=(64,), trials=16)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# Plan lengths (numerics.md section 5, computed here from the kernels and output shapes)
# ---------------------------------------------------------------------------------------
def _expected_lengths(layer, batch):
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, cin, cout = layer.kernel.shape
        _, oh, ow, _ = layer.output.shape
        return {"fwd": kh * kw * cin, "bwd": kh * kw * cout, "grad": batch * oh * ow}
    fan_in, units = layer.kernel.shape
    extra = int(np.prod(layer.input.shape[1:-1])) if len(layer.input.shape) > 2 else 1
    return {"fwd": fan_in, "bwd": units, "grad": batch * extra}


@pytest.mark.parametrize("name,batch,known", [
    ("resnet32", 128, {"conv1": (27, 144, 128 * 32 * 32),
                       "stage3_block5_conv2": (576, 576, 128 * 8 * 8),
                       "stage2_block1_shortcut": (16, 32, 128 * 16 * 16),
                       "predictions": (64, 10, 128)}),
    ("resnet18", 256, {"conv1": (147, 3136, 256 * 112 * 112),
                       "stage4_block2_conv2": (4608, 4608, 256 * 7 * 7),
                       "predictions": (512, 1000, 256)}),
    ("alexnet", 256, {"conv1": (363, 11616, 256 * 55 * 55), "conv2": (2400, 6400, 256 * 27 * 27),
                      "fc6": (9216, 4096, 256), "predictions": (4096, 1000, 256)}),
])
def test_plan_lengths(name, batch, known):
    model = models.get(name)()
    plan = analysis.predict(model, batch, sparsity=None)
    layers = analysis.gemm_layers(model)
    assert [l.layer for l in plan] == [l.name for l in layers]
    for layer in layers:
        entry = plan[layer.name]
        expected = _expected_lengths(layer, batch)
        for g in ("fwd", "bwd", "grad"):
            p = entry.gemm(g)
            assert p.length == expected[g], (layer.name, g)
            assert p.effective_length == p.length and p.sparsity == 0.0
    for layer_name, (fwd, bwd, grad) in known.items():
        entry = plan[layer_name]
        assert (entry.fwd.length, entry.bwd.length, entry.grad.length) == (fwd, bwd, grad)


def test_dense_on_rank3_inputs_and_given_sparsity():
    inputs = keras.Input((7, 12))
    y = keras.layers.Dense(5, name="proj")(inputs)
    model = keras.Model(inputs, y)
    plan = analysis.predict(model, 4, sparsity=0.25)
    entry = plan["proj"]
    assert (entry.fwd.length, entry.bwd.length, entry.grad.length) == (12, 5, 28)
    assert entry.fwd.effective_length == 9 and entry.grad.effective_length == 21
    assert entry.fwd.sparsity == 0.25 and plan.sparsity == "given 0.25"
    assert analysis.predict(model, 4, sparsity={"proj": {"fwd": 0.5}})["proj"].fwd.effective_length == 6


# ---------------------------------------------------------------------------------------
# Sparsity
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype("float32")[..., None], d.target.astype("int64")


def _mlp(activation):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(64, activation=activation, name="fc1")(x)
    x = keras.layers.Dense(32, activation=activation, name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax",
                                                  name="predictions")(x))


def test_sparsity_relu_vs_tanh(digits):
    relu = analysis.measure_sparsity(_mlp("relu"), digits, batch_size=64, max_batches=2)
    tanh = analysis.measure_sparsity(_mlp("tanh"), digits, batch_size=64, max_batches=2)
    # GEMMs fed by ReLU outputs (FWD, GRAD) and the errors through ReLU (BWD) are sparse.
    for name in ("fc2", "predictions"):
        assert relu[name]["fwd"] > 0.1 and relu[name]["grad"] > 0.1
    for name in ("fc1", "fc2"):
        assert relu[name]["bwd"] > 0.1
    # tanh has no exact zeros: nothing to skip (the analysis is not limited to ReLU).
    for name in ("fc2", "predictions"):
        assert tanh[name]["fwd"] < 0.01 and tanh[name]["grad"] < 0.01
    for name in ("fc1", "fc2"):
        assert tanh[name]["bwd"] < 0.01
    # The digits themselves have zero (background) pixels: the first layer sees them.
    assert relu["fc1"]["fwd"] > 0.2 and tanh["fc1"]["fwd"] == pytest.approx(relu["fc1"]["fwd"])


def test_sparsity_cnn_relu_vs_tanh(digits):
    keras.utils.set_random_seed(0)
    relu = analysis.predict(models.digits_cnn(), 64, data=digits, chunk_size=16)
    tanh = analysis.predict(models.digits_cnn(activation="tanh"), 64, data=digits)
    assert relu.sparsity == "measured"
    for name in ("conv2", "fc1", "predictions"):
        assert relu[name].fwd.sparsity > tanh[name].fwd.sparsity + 0.1
        assert relu[name].fwd.effective_length < relu[name].fwd.length
    for name in ("fc1", "predictions"):
        assert tanh[name].fwd.sparsity < 0.02
    # Sparser GEMMs never need more bits.
    dense = analysis.predict(models.digits_cnn(), 64, sparsity=None, chunk_size=16)
    for layer in relu:
        for g in ("fwd", "bwd", "grad"):
            assert layer.gemm(g).mantissa_bits <= dense[layer.layer].gemm(g).mantissa_bits
            assert (layer.gemm(g).sequential_mantissa_bits
                    <= dense[layer.layer].gemm(g).sequential_mantissa_bits)


def _brute_force_conv_counts(x, w, dy, stride):
    """Non-zero products per output of FWD, BWD and GRAD of a VALID conv, by loops; and
    the sums of the squared products."""
    b, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    _, oh, ow, _ = dy.shape
    fwd = np.zeros((b, oh, ow, cout))
    bwd = np.zeros((b, h, wd, cin))
    grad = np.zeros((kh, kw, cin, cout))
    squares = {"fwd": 0.0, "bwd": 0.0, "grad": 0.0}
    for bi in range(b):
        for oy in range(oh):
            for ox in range(ow):
                for ky in range(kh):
                    for kx in range(kw):
                        iy, ix = oy * stride + ky, ox * stride + kx
                        for ci in range(cin):
                            for co in range(cout):
                                fwd[bi, oy, ox, co] += (x[bi, iy, ix, ci] != 0) * (w[ky, kx, ci, co] != 0)
                                bwd[bi, iy, ix, ci] += (dy[bi, oy, ox, co] != 0) * (w[ky, kx, ci, co] != 0)
                                grad[ky, kx, ci, co] += (x[bi, iy, ix, ci] != 0) * (dy[bi, oy, ox, co] != 0)
                                squares["fwd"] += (x[bi, iy, ix, ci] * w[ky, kx, ci, co]) ** 2
                                squares["bwd"] += (dy[bi, oy, ox, co] * w[ky, kx, ci, co]) ** 2
                                squares["grad"] += (x[bi, iy, ix, ci] * dy[bi, oy, ox, co]) ** 2
    return (fwd.mean(), bwd.mean(), grad.mean()), squares


def test_conv_counts_match_brute_force():
    import tensorflow as tf
    from tfaccum.analysis.predict import _gemm_moments

    rng = np.random.default_rng(0)
    layer = keras.layers.Conv2D(3, 3, strides=2, padding="valid")
    x = rng.standard_normal((2, 7, 7, 2)) * (rng.random((2, 7, 7, 2)) < 0.6)
    layer.build(x.shape)
    w = layer.kernel.numpy() * (rng.random((3, 3, 2, 3)) < 0.8)
    layer.kernel.assign(w)
    dy = rng.standard_normal((2, 3, 3, 3)) * (rng.random((2, 3, 3, 3)) < 0.5)
    x, w = x.astype(np.float32), w.astype(np.float32)
    dy = dy.astype(np.float32)
    moments = _gemm_moments(layer, tf.constant(x), tf.constant(dy), tf, keras)
    expected, squares = _brute_force_conv_counts(x.astype(np.float64), w.astype(np.float64),
                                                 dy.astype(np.float64), 2)
    for g, e in zip(("fwd", "bwd", "grad"), expected):
        nonzero, outputs, _, sum_sq, _ = moments[g]
        assert nonzero / outputs == pytest.approx(e, rel=1e-6), g
        assert sum_sq == pytest.approx(squares[g], rel=1e-5), g


def test_measure_sparsity_leaves_the_model_unchanged(digits):
    model = models.resnet32(input_shape=(8, 8, 1), classes=10)
    before = [v.numpy().copy() for v in model.variables]
    out_before = model(digits[0][:4], training=False).numpy()
    analysis.measure_sparsity(model, digits, batch_size=8, max_batches=1)
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    np.testing.assert_array_equal(model(digits[0][:4], training=False).numpy(), out_before)
    layer = model.get_layer("conv1")
    assert "call" not in layer.__dict__
    assert layer.activation is keras.activations.linear


# ---------------------------------------------------------------------------------------
# Plans: JSON, shift, policies, rewrite
# ---------------------------------------------------------------------------------------
def _toy_plan(chunk=64):
    def gemm(n, m, seq):
        return GemmPrediction(n, n // 2, 0.5, m, seq if chunk else None)

    layers = (LayerPrediction("conv1", gemm(27, 3, 4), gemm(144, 1, 2), gemm(4096, 12, 15),
                              kind="Conv2D"),
              LayerPrediction("predictions", gemm(64, 0, 0), gemm(10, 2, 2), gemm(128, 5, 6),
                              kind="Dense"))
    return PrecisionPlan(layers=layers, batch_size=128, chunk_size=chunk, model="toy",
                         operands=tfaccum.FP8_E5M2, sparsity="measured")


def test_plan_json_round_trip(tmp_path):
    for plan in (_toy_plan(), _toy_plan(chunk=0)):
        text = plan.to_json()
        data = json.loads(text)
        assert set(data["layers"][0]) >= {"layer", "fwd", "bwd", "grad"}
        assert set(data["layers"][0]["fwd"]) >= {"length", "effective_length", "sparsity",
                                                 "mantissa_bits"}
        assert data["batch_size"] == 128 and data["exponent_bits"] == 6
        assert PrecisionPlan.from_json(text) == plan
        assert PrecisionPlan.load(plan.save(str(tmp_path / "plan.json"))) == plan
    with pytest.raises(ValueError):
        PrecisionPlan.from_dict({"batch_size": 1})
    with pytest.raises(ValueError):
        PrecisionPlan.from_dict({"layers": [{"layer": "a"}], "batch_size": 1})


def test_plan_shift_is_clamped():
    plan = _toy_plan()
    down = plan.shift(-1)
    assert down.offset == -1
    assert down["conv1"].fwd.mantissa_bits == 2 and down["predictions"].fwd.mantissa_bits == 0
    assert down["conv1"].grad.sequential_mantissa_bits == 14
    for layer in plan.shift(-100):
        for g in ("fwd", "bwd", "grad"):
            assert layer.gemm(g).mantissa_bits == 0
            assert layer.gemm(g).sequential_mantissa_bits == 0
    assert all(l.gemm(g).mantissa_bits == 23 for l in plan.shift(50) for g in ("fwd", "bwd", "grad"))
    assert plan.shift(-1).shift(1).offset == 0
    assert PrecisionPlan.from_json(down.to_json()) == down


def test_plan_policies_and_table():
    plan = _toy_plan()
    policies = plan.policies()
    assert set(policies) == {"conv1", "predictions"}
    p = policies["conv1"]
    assert p.fwd.accumulator == tfaccum.FloatFormat(6, 3)
    assert p.grad.accumulator == tfaccum.FloatFormat(6, 12)
    assert p.fwd.chunk_size == 64 and p.fwd.product is None
    assert p.operands == tfaccum.FP8_E5M2
    assert set(plan.policies(exclude=["predictions"])) == {"conv1"}
    text = str(plan)
    assert "FWD" in text and "GRAD" in text and "conv1" in text and "c64" in text
    # header and criterion, rule + two title rows + rule, two layers, rule + legend
    assert len(text.splitlines()) == 2 + 4 + 2 + 2
    assert "criterion bounded" in text and "VRR" in text


def test_rewrite_with_a_plan(digits):
    model = models.digits_cnn()
    plan = analysis.predict(model, 32, data=digits, max_batches=1)
    emulated = tfaccum.rewrite(model, plan.shift(-1))
    layer = emulated.get_layer("fc1")
    assert isinstance(layer, tfaccum.layers.AccumDense)
    assert layer.policy.fwd.accumulator.mantissa_bits == max(0, plan["fc1"].fwd.mantissa_bits - 1)
    out = emulated(digits[0][:2]).numpy()
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,gemm_layers", [("resnet32", 34), ("resnet18", 21),
                                               ("alexnet", 8)])
def test_cli_runs_and_writes_the_plan(name, gemm_layers, tmp_path, capsys):
    from tfaccum import analyze

    out = tmp_path / "plan.json"
    status = analyze.main(["analyze", f"--model={name}", "--batch_size=8", "--chunk_size=64",
                           "--product_mantissa_bits=5", "--sparsity=none",
                           f"--output={out}"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    plan = PrecisionPlan.load(str(out))
    assert plan.model == name and plan.batch_size == 8 and plan.chunk_size == 64
    assert len(plan) == gemm_layers
    assert "predictions" in printed.out and "GRAD" in printed.out


def test_cli_measures_sparsity_on_digits(tmp_path, capsys):
    from tfaccum import analyze

    out = tmp_path / "plan.json"
    status = analyze.main(["analyze", "--model=digits_cnn", "--batch_size=32",
                           "--chunk_size=16", f"--output={out}", f"--plot={tmp_path / 'v.png'}",
                           "--plot_trials=8"])
    assert status == 0, capsys.readouterr().err
    plan = PrecisionPlan.load(str(out))
    assert plan.sparsity == "measured" and plan["fc1"].fwd.sparsity > 0
    assert "real batches" in plan.statistics and plan["fc1"].fwd.coherence is not None
    assert (tmp_path / "v.png").exists()


def test_cli_measures_on_real_data_or_says_why_not(tmp_path, capsys):
    """No silent N(0, 1): without the model's dataset the CLI stops and names the ways
    out; --dataset=synthetic measures on N(0, 1) inputs and the plan says so."""
    from tfaccum import analyze

    assert analyze.main(["analyze", "--model=resnet32", f"--data_dir={tmp_path}",
                         "--batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "no prepared cifar10 data" in err and "--dataset=synthetic" in err
    out = tmp_path / "plan.json"
    with pytest.warns(RuntimeWarning, match="synthetic"):
        status = analyze.main(["analyze", "--model=digits_cnn", "--dataset=synthetic",
                               "--batch_size=8", "--rounding=toward_zero", f"--output={out}"])
    assert status == 0
    plan = PrecisionPlan.load(str(out))
    assert "NOT real data" in plan.statistics and plan.rounding == "toward_zero"
    assert "NOT real data" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--model=nope"], ["--batch_size=-3"], ["--sparsity=2"],
                                  ["--product_mantissa_bits=30"], ["--input_shape=1,x,3"],
                                  ["--no_such_flag=1"]])
def test_cli_bad_flags_in_process(args, capsys):
    from tfaccum import analyze

    assert analyze.main(["analyze"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m tfaccum.analyze: error:"), err


def test_cli_bad_flag_subprocess():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run([sys.executable, "-m", "tfaccum.analyze", "--model=vgg"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert len(errors) == 1 and "vgg" in errors[0], proc.stderr


def test_subclassed_and_sequential_models():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.a = keras.layers.Dense(8, activation="relu", name="a")
            self.b = keras.layers.Dense(3, name="b")

        def call(self, x):
            return self.b(self.a(x))

    x = np.random.default_rng(0).standard_normal((32, 10)).astype("float32")
    y = np.arange(32) % 3
    with pytest.raises(ValueError, match="never been called"):
        analysis.predict(Sub(), 16, sparsity=None)
    model = Sub()
    plan = analysis.predict(model, 16, data=(x, y))  # measuring also records the shapes
    assert (plan["a"].fwd.length, plan["a"].bwd.length, plan["b"].grad.length) == (10, 8, 16)
    assert plan["a"].bwd.sparsity > 0  # errors through the ReLU
    assert analysis.predict(model, 16, sparsity=None)["b"].fwd.length == 8  # built now
    seq = keras.Sequential([keras.Input((10,)), keras.layers.Dense(4, name="h")])
    assert analysis.predict(seq, 5, sparsity=None)["h"].grad.length == 5
