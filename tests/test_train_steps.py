"""The training driver with stochastic rounding: resumed runs continue the stream, an
interrupted epoch is logged once, and ``--strategy=multi_worker`` trains on two local
worker processes.

Event files are read record by record (not through TensorBoard's EventAccumulator,
which hides a restarted step by purging), so a step written twice is seen twice.
"""

import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# digits_cnn on a slice of digits: 8 steps per epoch, a health probe every 4 steps,
# stochastic rounding in every emulated GEMM.
ARGS = ["--policy=e6m10", "--rounding=stochastic", "--epochs=2", "--max_train_examples=256",
        "--max_test_examples=128", "--batch_size=32", "--health_every_steps=4",
        "--health_batch_size=32", "--seeds=1"]
RUN = "e6m10/seed0"


def train_main(*args) -> int:
    from tfaccum import train

    return train.main(["tfaccum.train", *args])


def child_env(**extra):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path, **extra)


def scalars(logdir: Path):
    """``{tag: [(step, value bytes), ...]}`` of every summary in the event files directly
    in ``logdir``, in file order (duplicates kept)."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out = defaultdict(list)
    for path in sorted(tf.io.gfile.glob(str(logdir / "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                out[value.tag].append((event.step, value.tensor.SerializeToString()))
    return dict(out)


def run_events(run_dir: Path):
    return {sub: scalars(run_dir / sub) for sub in ("", "train", "validation")}


def health_tags(train_events) -> list:
    """The health probe's tags (whatever they are named): train/ less the epoch scalars."""
    tags = [t for t in train_events if t not in ("loss", "accuracy", "learning_rate")]
    assert tags
    return tags


def checkpoint_values(checkpoint_dir: Path):
    """Every variable of the latest checkpoint: weights, optimizer state and step, epoch."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(checkpoint_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH",)
            and not name.startswith("save_counter")}


def assert_same_weights(dir_a: Path, dir_b: Path):
    a, b = checkpoint_values(dir_a), checkpoint_values(dir_b)
    assert len(a) > 8 and a.keys() == b.keys()  # 8 trainable variables, and more
    for name in a:
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted stochastic run of two epochs."""
    model_dir = tmp_path_factory.mktemp("straight")
    assert train_main(*ARGS, f"--model_dir={model_dir}") == 0
    return model_dir / RUN


def test_driver_layers_draw_from_the_optimizer_step(tmp_path):
    """Every rewritten layer takes its stochastic step from the optimizer's iteration
    count, which the run's checkpoint saves."""
    from tfaccum import layers
    from tfaccum.training import experiment
    from tfaccum.training.settings import RunSpec, Settings

    settings = Settings.resolve({"policy": "e6m10", "rounding": "stochastic",
                                 "max_train_examples": 64, "batch_size": 32,
                                 "model_dir": str(tmp_path)})
    trainee = experiment.Experiment(settings, log=lambda *a: None)._build(
        RunSpec("e6m10"), None)
    emulated = [layer for layer in trainee.model._flatten_layers()
                if isinstance(layer, (layers.AccumDense, layers.AccumConv2D))]
    assert len(emulated) == 3
    for layer in emulated:
        assert layer.policy.fwd.rounding == "stochastic"
        assert layer.step_counter is trainee.optimizer.iterations
    saved = trainee.checkpoint._trackable_children()["optimizer"]
    assert saved.iterations is trainee.optimizer.iterations


def test_stochastic_run_resumed_after_an_epoch_equals_uninterrupted(straight, tmp_path):
    """The optimizer's step, saved in the checkpoint, continues the stochastic stream:
    the resumed run ends with the uninterrupted run's weights, bit for bit."""
    assert train_main(*ARGS, f"--model_dir={tmp_path}", "--interrupt_after_epochs=1") == 3
    assert train_main(*ARGS, f"--model_dir={tmp_path}") == 0
    run = tmp_path / RUN
    assert_same_weights(run / "checkpoints", straight / "checkpoints")
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == [8, 16]
    events, expected = run_events(run), run_events(straight)
    assert events["train"] == expected["train"]
    assert events["validation"] == expected["validation"]


@pytest.mark.parametrize("kill_step", [4, 12], ids=["first_epoch", "second_epoch"])
def test_run_killed_mid_epoch_logs_every_step_once(straight, tmp_path, monkeypatch, kill_step):
    """Killed in the middle of an epoch (after the health probe of ``kill_step`` was
    written), restarted: the repeated steps are not logged twice, and every summary and
    the final weights are those of the uninterrupted run."""
    from tfaccum.training import callbacks

    probe_end = callbacks.AccumHealth.on_train_batch_end

    def killed(self, batch, logs=None):
        probe_end(self, batch, logs)
        if int(self.net.optimizer.iterations.numpy()) == kill_step:
            raise KeyboardInterrupt  # the driver's answer to Ctrl-C: exit status 130

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.AccumHealth, "on_train_batch_end", killed)
        assert train_main(*ARGS, f"--model_dir={tmp_path}") == 130
    run = tmp_path / RUN
    logged = scalars(run / "train")
    for tag in health_tags(logged):
        assert [step for step, _ in logged[tag]] == list(range(0, kill_step + 1, 4)), tag

    assert train_main(*ARGS, f"--model_dir={tmp_path}") == 0
    events, expected = run_events(run), run_events(straight)
    for tag in health_tags(events["train"]):
        assert [step for step, _ in events["train"][tag]] == [0, 4, 8, 12, 16], tag
    assert [step for step, _ in events["train"]["loss"]] == [8, 16]
    assert [step for step, _ in events["validation"]["error"]] == [8, 16]
    assert len(events[""]["_hparams_/session_start_info"]) == 1  # the HParams of one run
    assert events["train"] == expected["train"]  # the same values as uninterrupted
    assert events["validation"] == expected["validation"]
    assert_same_weights(run / "checkpoints", straight / "checkpoints")


def test_discard_events_after_drops_later_and_truncated_records(tmp_path):
    import tensorflow as tf

    from tfaccum.training.callbacks import discard_events_after

    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step in range(8):
            tf.summary.scalar("x", float(step), step=step)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-5])  # a kill in the middle of the last record
    assert discard_events_after(str(tmp_path), 4) == 3  # steps 5, 6 and the cut step 7
    assert [step for step, _ in scalars(tmp_path)["x"]] == [0, 1, 2, 3, 4]
    assert discard_events_after(str(tmp_path), 4) == 0
    assert discard_events_after(str(tmp_path), -1) == 5
    assert not list(tmp_path.glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------
def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_multi_worker_strategy_on_two_local_workers(tmp_path):
    """Two worker processes of the driver under MultiWorkerMirroredStrategy (TF_CONFIG on
    127.0.0.1): both train the same steps to the same weights; only the chief (worker 0)
    writes summaries and the experiment summary."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    args = ["--strategy=multi_worker", "--policy=e6m10", "--rounding=stochastic",
            "--epochs=1", "--max_train_examples=256", "--max_test_examples=64",
            "--batch_size=32", "--health_every_steps=4", "--health_batch_size=16",
            "--seeds=1", f"--model_dir={tmp_path}"]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tfaccum.train", *args], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(TF_CONFIG=tf_config)))
    deadline = time.time() + 180
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1, deadline - time.time()))
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
    assert "batch 32 on 2 replicas" in outputs[0][1]

    chief, worker = tmp_path / RUN, tmp_path / RUN / ".workers" / "1"
    for run in (chief, worker):
        result = json.loads((run / "result.json").read_text())
        assert result["steps"] == 8  # 256 examples, global batch 32
    assert_same_weights(chief / "checkpoints", worker / "checkpoints")
    assert (tmp_path / "summary.md").exists()
    events = run_events(chief)
    assert [step for step, _ in events["train"]["loss"]] == [8]
    for tag in health_tags(events["train"]):
        assert [step for step, _ in events["train"][tag]] == [0, 4, 8], tag
    assert [step for step, _ in events["validation"]["error"]] == [8]
    assert not list(worker.glob("**/events.out.tfevents.*"))
