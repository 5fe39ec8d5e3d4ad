"""The training driver ``python -m tfaccum.train`` end to end, on tiny budgets.

In-process where possible (TensorFlow is imported once); in a subprocess where the
process itself is the point (killed runs, error lines, logical devices, TensorBoard).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# digits_cnn on a slice of digits: 8 steps per epoch, the probe every 4 steps.
TINY = ["--max_train_examples=256", "--max_test_examples=128", "--batch_size=32",
        "--health_every_steps=4", "--health_batch_size=32", "--seeds=1"]


def train_main(*args) -> int:
    from tfaccum import train

    return train.main(["tfaccum.train", *args])


def child_env():
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path)


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "tfaccum.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def history(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convergence(tmp_path_factory):
    """A finished convergence experiment (fp32 baseline + predicted), two seeds, two
    epochs (FP8 operands, the digits recipe's default)."""
    model_dir = tmp_path_factory.mktemp("convergence")
    assert train_main("--experiment=convergence", "--epochs=2", f"--model_dir={model_dir}",
                      *TINY, "--seeds=2") == 0
    return model_dir


def test_convergence_writes_summary_plan_and_results(convergence):
    import csv

    rows = list(csv.DictReader((convergence / "summary.csv").open()))
    assert [r["run"] for r in rows] == ["fp32", "predicted"]
    results = {(run, seed): json.loads((convergence / run / f"seed{seed}" / "result.json")
                                       .read_text())
               for run in ("fp32", "predicted") for seed in (0, 1)}
    for row in rows:
        assert row["seeds"] == "2"
        errors = [results[(row["run"], seed)]["test_error_pct"] for seed in (0, 1)]
        assert float(row["test_error_pct"]) == pytest.approx(sum(errors) / 2, abs=1e-3)
    assert rows[0]["verdict"] == "baseline"
    # the paired difference of the two seeds, and its 95 % t interval (t_0.975,1 = 12.706)
    diffs = [results[("predicted", s)]["test_error_pct"] - results[("fp32", s)]["test_error_pct"]
             for s in (0, 1)]
    half = 12.7062047 * abs(diffs[0] - diffs[1]) / 2  # t * (|d0 - d1| / sqrt 2) / sqrt 2
    assert float(rows[1]["delta_vs_fp32_pct"]) == pytest.approx(sum(diffs) / 2, abs=1e-3)
    assert float(rows[1]["delta_ci_high_pct"]) == pytest.approx(sum(diffs) / 2 + half, abs=2e-3)
    assert rows[1]["verdict"] in ("within 0.5 pp", "worse by more than 0.5 pp", "inconclusive")
    text = (convergence / "summary.md").read_text()
    assert "| predicted |" in text and "predicted retention" in text

    plan = json.loads((convergence / "predicted" / "seed0" / "plan.json").read_text())
    planned = {entry["layer"] for entry in plan["layers"]}
    assert {"conv1", "conv2", "fc1", "predictions"} <= planned
    assert plan["criterion"] == "bounded" and plan["rounding"] == "nearest_even"
    assert all(0 < entry[g]["retention"] <= 1 for entry in plan["layers"]
               for g in ("fwd", "bwd", "grad"))
    policies = json.loads((convergence / "predicted" / "seed0" / "policies.json").read_text())
    assert set(policies) == {"conv1", "conv2", "fc1"}  # the last layer is kept float32
    # the baseline rounds its operands to FP8 too, and accumulates in float32
    baseline = json.loads((convergence / "fp32" / "seed0" / "policies.json").read_text())
    assert set(baseline) == {"conv1", "conv2", "fc1"}
    assert all(p[g]["accumulator"]["mantissa_bits"] == 23 for p in baseline.values()
               for g in ("fwd", "bwd", "grad"))
    result = results[("predicted", 0)]
    assert result["epochs"] == 2 and result["bits"].startswith("e6")
    # the analysis-versus-monitor record: every emulated GEMM, predicted and measured
    assert set(result["health"]) == {"conv1", "conv2", "fc1"}
    for per_gemm in result["health"].values():
        for entry in per_gemm.values():
            assert entry["probes"] == 5 and 0 < entry["predicted"] <= 1
            assert entry["min"] <= entry["last"] <= 1


def test_convergence_tensorboard_scalars_hparams_and_health(convergence):
    from tensorboard.plugins.hparams import plugin_data_pb2

    for run in ("fp32", "predicted"):
        train = events(convergence / run / "seed0" / "train")
        assert {"loss", "accuracy", "learning_rate"} <= set(train.Tags()["tensors"])
        assert [e.step for e in train.Tensors("loss")] == [8, 16]  # the true step
        validation = events(convergence / run / "seed0" / "validation")
        assert {"loss", "accuracy", "error"} <= set(validation.Tags()["tensors"])

        root = events(convergence / run / "seed0")
        assert "_hparams_/session_start_info" in root.Tags()["tensors"]
        content = root.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert info.hparams["policy"].string_value == run
        assert info.hparams["offset"].number_value == 0
        assert {"chunk_size", "acc_exponent_bits"} <= set(info.hparams)
    assert "_hparams_/experiment" in events(convergence).Tags()["tensors"]

    tags = set(events(convergence / "predicted" / "seed0" / "train").Tags()["tensors"])
    for layer in ("conv1", "conv2", "fc1"):
        for gemm in ("fwd", "bwd", "grad"):
            assert f"accum_variance_ratio/{layer}/{gemm}" in tags
            assert f"accum_retention_predicted/{layer}/{gemm}" in tags
            assert f"accum_rel_error/{layer}/{gemm}" in tags
            assert f"accum_retention/{layer}/{gemm}" in tags
    assert not any("predictions" in t for t in tags if t.startswith("accum_"))
    assert not any(t.startswith("accum_vrr") for t in tags)  # the old, confusing name
    probes = events(convergence / "predicted" / "seed0" / "train").Tensors(
        "accum_retention/conv2/grad")
    assert [e.step for e in probes] == [0, 4, 8, 12, 16]
    assert not any(t.startswith("accum_") for t in
                   events(convergence / "fp32" / "seed0" / "train").Tags()["tensors"])
    summary = set(events(convergence / "summary").Tags()["tensors"])
    assert {"summary", "test_error_mean/predicted", "delta_vs_fp32_ci_high/predicted"} <= summary


def test_finished_experiment_is_skipped(convergence, capsys):
    t0 = time.time()
    assert train_main("--experiment=convergence", "--epochs=2", f"--model_dir={convergence}",
                      *TINY, "--seeds=2") == 0
    out = capsys.readouterr().out
    assert out.count("(skipped)") == 4 and time.time() - t0 < 30


def test_other_settings_in_same_model_dir_are_refused(convergence, capsys):
    assert train_main("--experiment=convergence", "--epochs=3", f"--model_dir={convergence}",
                      *TINY, "--seeds=2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "epochs" in err and "\n" not in err


def test_tensorboard_server_lists_runs(convergence):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={convergence}",
         "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs, deadline = None, time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                    runs = json.loads(r.read())
                if "predicted/seed1/train" in runs:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert runs is not None, "TensorBoard did not answer"
        assert {"fp32/seed0/train", "fp32/seed1/validation", "predicted/seed0/train",
                "predicted/seed1/validation", "summary"} <= set(runs)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# --------------------------------------------------------------------------------------
def test_resume_continues_exactly_where_it_stopped(tmp_path, capsys):
    """Interrupted after epoch 1, restarted: 3 epochs, each once, and bit for bit the
    history of an uninterrupted run of the same seed."""
    args = ["--policy=e6m10", "--epochs=3", "--health_every_steps=0", "--seeds=1", *TINY[:3]]
    assert train_main(*args, f"--model_dir={tmp_path / 'a'}", "--interrupt_after_epochs=1") == 3
    run = tmp_path / "a" / "e6m10" / "seed0"
    assert [r["epoch"] for r in history(run)] == [1]
    assert not (run / "result.json").exists()
    assert train_main(*args, f"--model_dir={tmp_path / 'a'}") == 0
    assert "resuming after epoch 1/3" in capsys.readouterr().out
    resumed = history(run)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert [r["step"] for r in resumed] == [8, 16, 24]
    assert json.loads((run / "result.json").read_text())["epochs"] == 3

    assert train_main(*args, f"--model_dir={tmp_path / 'b'}") == 0
    straight = history(tmp_path / "b" / "e6m10" / "seed0")
    for key in ("loss", "test_loss", "learning_rate"):
        assert [r[key] for r in resumed] == [r[key] for r in straight]


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL in the middle of a run; the restart finishes the epochs once."""
    args = ["--policy=fp32", "--epochs=12", "--max_train_examples=256", "--batch_size=16",
            "--seeds=1", "--operands=none", f"--model_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "tfaccum.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env())
    hist = tmp_path / "fp32" / "seed0" / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and len(hist.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(hist.read_text().splitlines())
    assert 2 <= done_before < 12, "the run was not killed in the middle"

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "resuming after epoch" in second.stdout
    assert [r["epoch"] for r in history(tmp_path / "fp32" / "seed0")] == list(range(1, 13))


# --------------------------------------------------------------------------------------
def test_tfds_path_with_mock_data(tmp_path, capsys):
    """ResNet-32 on CIFAR-10 through tensorflow-datasets (mocked: no network, no files),
    with the CIFAR augmentation; float32 to keep the test short."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=48):
        assert train_main("--model=resnet32", "--dataset=cifar10", "--policy=fp32",
                          "--epochs=1", "--batch_size=16", f"--data_dir={tmp_path / 'tfds'}",
                          f"--model_dir={tmp_path / 'runs'}") == 0
    assert "resnet32 on cifar10 (48 train / 48 test)" in capsys.readouterr().out
    result = json.loads((tmp_path / "runs" / "fp32" / "seed0" / "result.json").read_text())
    assert result["epochs"] == 1 and result["steps"] == 3


def test_layer_policies_keep_fixed_and_offset():
    import keras

    from tfaccum import models
    from tfaccum.training import policies
    from tfaccum.training.settings import RunSpec, Settings

    keras.backend.clear_session()
    model = models.digits_cnn()
    settings = Settings.resolve({"keep_full_precision": ["first", "last"],
                                 "operands": "fp8", "rounding": "stochastic"})
    chosen = policies.layer_policies(RunSpec("e6m10", offset=-2, chunk_size=16), settings,
                                     model)
    assert list(chosen) == ["conv2", "fc1"]
    for policy in chosen.values():
        assert policy.fwd.accumulator.name == "e6m8" and policy.grad.chunk_size == 16
        assert policy.operands.name == "e5m2" and policy.operands.overflow == "inf"
        assert policy.bwd.rounding == "stochastic"
    assert chosen["conv2"].fwd.seed != chosen["fc1"].fwd.seed
    assert policies.describe(chosen) == "e6m8"
    assert policies.layer_policies(RunSpec("fp32"), Settings.resolve({"operands": "none"}),
                                   model) == {}


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    script = f"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfaccum import train
sys.exit(train.main(["tfaccum.train", "--strategy=mirrored", "--policy=predicted",
                     "--epochs=1", "--model_dir={tmp_path}", {', '.join(map(repr, TINY))}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replicas" in proc.stdout
    assert "batch 16 per replica" in proc.stdout  # the plan's GRAD length is per replica
    result = json.loads((tmp_path / "predicted" / "seed0" / "result.json").read_text())
    assert result["epochs"] == 1 and result["steps"] == 8


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--model=vgg99"], ["--model", "vgg99", "resnet32"]),
    (["--model=resnet32", "--dataset=cifar10", "--data_dir={tmp}"],
     ["--dataset=cifar10", "no prepared cifar10 data", "tfds build"]),
])
def test_bad_flags_give_one_error_line(args, words, tmp_path):
    """As a user sees it: exit status 2, one ``error:`` line last, no traceback."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = cli(*args, f"--model_dir={tmp_path / 'runs'}", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for word in words:
        assert word in errors[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, words", [
    (["--policy=-3"], ["--policy", "negative"]),
    (["--policy=e9m3"], ["--policy", "e9m3"]),
    (["--acc_exponent_bits=-1"], ["--acc_exponent_bits", "2..8"]),
    (["--epochs=zero"], ["--epochs"]),
    (["--batch_size=0"], ["--batch_size", "> 0"]),
    (["--experiment=tightness", "--policy=fp32"], ["--policy", "predicted"]),
    (["--keep_full_precision=nosuchlayer", "--epochs=1"], ["nosuchlayer", "conv1"]),
    (["--strategy=tpu"], ["--strategy", "mirrored"]),
    (["--policy=tensor_core:volta:e4m3"], ["--policy", "volta", "supported pairs", "hopper"]),
    (["--policy=tensor_core:hopper"], ["--policy", "tensor_core:<arch>:<operands>"]),
    (["--policy=tensor_core:hopper:e4m3", "--experiment=tightness"],
     ["--experiment", "convergence"]),
    (["--policy=tensor_core:hopper:e4m3", "--operands=fp16"], ["--operands", "e4m3"]),
    (["--policy=e6m5", "--promote_every=128"], ["--promote_every", "tensor_core"]),
])
def test_bad_flag_values_in_process(args, words, tmp_path, capsys):
    assert train_main(*args, f"--model_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0]


def test_run_specs_of_the_experiments():
    from tfaccum.training.settings import Settings

    def names(**flags):
        return [spec.name for spec in Settings.resolve({"seeds": 1, **flags}).run_specs()]

    assert names(experiment="tightness") == ["fp32", "predicted", "predicted-1", "predicted-2"]
    assert names(experiment="convergence", chunk_variants=["64"]) == [
        "fp32", "predicted", "predicted_c64"]
    assert names(experiment="tightness", policy="10", offsets=["-1"]) == [
        "fp32", "e6m10", "e6m10-1"]
    assert names(policy="e5m7", bits_offset=-2, chunk_size=32) == ["e5m7_c32-2"]
    settings = Settings.resolve({"model": "resnet32"})
    assert (settings.dataset, settings.batch_size, settings.learning_rate,
            settings.lr_decay_at) == ("cifar10", 128, 0.1, (0.5, 0.75))
    fp8 = Settings.resolve({"operands": "fp8"})
    assert fp8.loss_scale == "dynamic" and fp8.product_mantissa_bits == 5
    # the default main job: the paper's setting in miniature, paired over 5 seeds
    default = Settings.resolve({"experiment": "tightness"})
    assert default.operands.name == "e5m2" and default.seeds == 5
    assert default.acc_exponent_bits == 6 and default.keep_full_precision == ("last",)
    specs = default.run_specs()
    assert [(s.name, s.seed) for s in specs[:5]] == [
        ("fp32", 0), ("predicted", 0), ("predicted-1", 0), ("predicted-2", 0), ("fp32", 1)]
    assert len(specs) == 20 and specs[-1].directory == "predicted-2/seed4"


def test_tensor_core_runs():
    import keras

    from tfaccum import models, presets
    from tfaccum.training import policies
    from tfaccum.training.settings import Settings

    settings = Settings.resolve({"seeds": 1, "experiment": "convergence",
                                 "policy": "tensor_core:Hopper:e4m3", "promote_every": 128,
                                 })
    assert settings.policy == "tensor_core:hopper:e4m3"
    assert settings.operands == presets.OPERAND_FORMATS["e4m3"]  # the baseline's too
    assert [s.name for s in settings.run_specs()] == ["fp32", "tc-hopper-e4m3_p128"]
    spec = settings.run_specs()[1]
    keras.backend.clear_session()
    model = models.digits_cnn()
    chosen = policies.layer_policies(spec, settings, model)
    assert list(chosen) == ["conv1", "conv2", "fc1"]  # the last layer (fc2) stays float32
    expected = presets.tensor_core("hopper", "e4m3", promote_every=128)
    for policy in chosen.values():
        # the hardware's own roundings; the operands with Inf for dynamic loss scaling
        assert (policy.fwd, policy.bwd, policy.grad) == (expected.fwd,) * 3
        assert policy.operands.mantissa_bits == 3 and policy.operands.overflow == "inf"
    assert policies.describe(chosen) == "hopper e4m3 (wgmma), promotion every 128"
    plain = Settings.resolve({"policy": "tensor_core:ampere:bf16", "seeds": 1})
    assert [s.name for s in plain.run_specs()] == ["tc-ampere-bf16"]
    assert policies.describe(policies.layer_policies(plain.run_specs()[0], plain, model)) == \
        "ampere bf16 (mma), no promotion"


@pytest.mark.parametrize("after", ["constant", "step"])
def test_warmup_schedule_config_round_trips(after):
    import keras
    import numpy as np

    from tfaccum.training.experiment import WarmupSchedule

    then = 0.05 if after == "constant" else \
        keras.optimizers.schedules.PiecewiseConstantDecay([6], [0.1, 0.01])
    schedule = WarmupSchedule(then, warmup_steps=4, peak=0.1)
    for copy in (WarmupSchedule.from_config(schedule.get_config()),
                 keras.optimizers.schedules.deserialize(
                     keras.optimizers.schedules.serialize(schedule))):
        assert type(copy) is WarmupSchedule
        steps = range(10)
        np.testing.assert_array_equal([float(copy(s)) for s in steps],
                                      [float(schedule(s)) for s in steps])
        assert copy.get_config() == schedule.get_config()
