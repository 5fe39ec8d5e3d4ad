"""TensorBoard output of a run, and the per-layer accumulation health probe.

Layout of one run directory (``tensorboard --logdir <model_dir>`` shows every run)::

    <run>/                  HParams of the run (policy, offset, chunk size, exponent bits)
    <run>/train/            loss, accuracy, learning_rate; accum_retention/*,
                            accum_retention_predicted/*, accum_variance_ratio/*,
                            accum_rel_error/*
    <run>/validation/       loss, accuracy, error (test set, %)

Every scalar is written at the true training step (the optimizer's iteration count), so
train, test and health curves share one x axis.

**Accumulation health.** Every ``every_steps`` steps the callback takes a fixed probe
batch through the emulated model and, for each emulated layer, computes its three GEMMs
on the layer's actual input ``x`` and actual back-propagated error ``dz`` (the gradient of
the loss at the layer's pre-activation output) twice: with the layer's policy and
exactly (float32 accumulation, the same operand rounding), with
:class:`tfaccum.analysis.GemmProbe`, the measurement the analysis itself uses. Per GEMM
(``fwd``: ``x.w``, ``bwd``: ``dz.w^T``, ``grad``: ``x^T.dz``) it writes:

* ``accum_retention/<layer>/<gemm>``: ``1 - mean((emulated - exact)^2) / var(exact)``,
  the VRR exactly as ``tfaccum.analysis`` defines it (at most 1);
* ``accum_retention_predicted/<layer>/<gemm>``: what the run's precision plan predicted
  for it (predicted runs), to read side by side with the measured one; the driver's
  ``summary.md`` flags each GEMM whose measured retention falls short of it by more than
  the Monte Carlo tolerance (:func:`tfaccum.analysis.measure.falls_short`);
* ``accum_variance_ratio/<layer>/<gemm>``: ``var(emulated) / var(exact)``. Not a VRR: it
  can exceed 1, since rounding noise adds variance; below 1 it shows swamping directly;
* ``accum_rel_error/<layer>/<gemm>``: ``||emulated - exact|| / ||exact||``.

The probe runs from ``on_train_batch_end`` with the step read from the optimizer, not
from inside ``Layer.call`` (where ``tf.summary`` would see a step frozen at trace time).
BatchNorm and dropout run in inference mode, so probing changes no training state.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from tfaccum import inventory
from tfaccum.analysis import GEMMS
from tfaccum.analysis.measure import GemmProbe, falls_short, summaries
from tfaccum.config import AccumPolicy

# HParams shown for every run (the sweep's axes first).
HPARAMS = {
    "policy": hp.HParam("policy", display_name="policy"),
    "offset": hp.HParam("offset", display_name="bits offset"),
    "chunk_size": hp.HParam("chunk_size", display_name="chunk size"),
    "acc_exponent_bits": hp.HParam("acc_exponent_bits", display_name="acc. exponent bits"),
    "operands": hp.HParam("operands", display_name="operands"),
    "bits": hp.HParam("bits", display_name="accumulator bits"),
    "seed": hp.HParam("seed", display_name="seed"),
}
METRICS = [
    hp.Metric("error", group="validation", display_name="test error (%)"),
    hp.Metric("loss", group="validation", display_name="test loss"),
    hp.Metric("loss", group="train", display_name="train loss"),
]


def write_hparams_config(logdir: str):
    """The experiment's HParams definition, once, in ``<model_dir>/`` itself."""
    if tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*")):
        return
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        hp.hparams_config(hparams=list(HPARAMS.values()), metrics=METRICS)
    writer.close()


def discard_events_after(logdir: str, step: int) -> int:
    """Removes every summary written at a step above ``step`` from the event files directly
    in ``logdir``; returns how many it removed.

    A run killed in the middle of an epoch resumes from the checkpoint at ``step`` and
    repeats the steps after it, writing their summaries again: without this, TensorBoard
    would show those steps twice. Files are rewritten whole (write, then rename); a file
    without summaries (left, or never written) is deleted; a record cut short by the kill
    ends its file.
    """
    from tensorflow.core.util import event_pb2

    removed = 0
    for path in sorted(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        kept, dropped, summaries = [], 0, 0
        try:
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                if event.HasField("summary") and event.step > step:
                    dropped += 1
                    continue
                summaries += event.HasField("summary")
                kept.append(record.numpy())
        except tf.errors.DataLossError:
            dropped += 1  # the truncated last record of a killed writer
        removed += dropped
        if not summaries:  # nothing left but the file header: drop the file
            tf.io.gfile.remove(path)
            continue
        if not dropped:
            continue
        tmp = path + ".tmp"
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in kept:
                writer.write(record)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    return removed


class RunWriter:
    """The event files of one run: ``train/``, ``validation/`` and HParams at the root."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._open()

    def _open(self):
        self.train = tf.summary.create_file_writer(os.path.join(self.run_dir, "train"))
        self.validation = tf.summary.create_file_writer(os.path.join(self.run_dir, "validation"))

    def resume(self, step: int):
        """Makes the event stream read as one run that continues after ``step`` (the
        restored checkpoint's; -1 for a run starting over): the summaries an interrupted
        invocation wrote after it, which the resumed one writes again, are removed."""
        self.close()
        for logdir in (self.run_dir, os.path.join(self.run_dir, "train"),
                       os.path.join(self.run_dir, "validation")):
            discard_events_after(logdir, step)
        self._open()

    def hparams(self, values: Mapping[str, object], trial_id: str):
        writer = tf.summary.create_file_writer(self.run_dir)
        with writer.as_default():
            hp.hparams({HPARAMS[k]: v for k, v in values.items() if k in HPARAMS},
                       trial_id=trial_id)
        writer.close()

    def epoch(self, step: int, train: Mapping[str, float], test: Mapping[str, float],
              learning_rate: float):
        with self.train.as_default(step=step):
            tf.summary.scalar("loss", train["loss"])
            tf.summary.scalar("accuracy", train["accuracy"])
            tf.summary.scalar("learning_rate", learning_rate)
        with self.validation.as_default(step=step):
            tf.summary.scalar("loss", test["loss"])
            tf.summary.scalar("accuracy", test["accuracy"])
            tf.summary.scalar("error", 100.0 * (1.0 - test["accuracy"]))
        self.flush()

    def flush(self):
        self.train.flush()
        self.validation.flush()

    def close(self):
        self.train.close()
        self.validation.close()


# --------------------------------------------------------------------------------------
def _reduces_accumulation(policy: AccumPolicy) -> bool:
    return not all(getattr(policy, g).is_exact_float32 for g in GEMMS)


def emulated_layers(model) -> list:
    """The tfaccum layers of ``model`` (nested models included) that accumulate in
    something other than float32, in model order."""
    return [layer for layer in inventory.emulated_layers(model)
            if _reduces_accumulation(layer.policy)]


class AccumHealth(keras.callbacks.Callback):
    """Measures each emulated layer's accumulation health every N steps and writes it.

    Args:
      model: the emulated model being trained.
      probe: ``(x, y)``, the fixed probe batch.
      loss_fn: the training loss (``loss_fn(y, y_pred)``).
      writer: the ``tf.summary`` writer (the run's ``train/``).
      every_steps: probe period in optimizer steps.
      loss_scale: returns the current loss scale, so that the probe's errors have the
        magnitude the training errors have.
      predicted: ``{layer: {gemm: (retention, n_eff)}}`` from the run's precision plan;
        each probe then also writes the prediction and flags shortfalls.
    """

    def __init__(self, model, probe, loss_fn, writer, every_steps: int,
                 loss_scale: Callable[[], float] = lambda: 1.0,
                 predicted: Optional[Mapping[str, Mapping[str, tuple]]] = None):
        super().__init__()
        self.net = model
        self.x, self.y = probe
        self.loss_fn = loss_fn
        self.writer = writer
        self.every_steps = every_steps
        self.loss_scale = loss_scale
        self.predicted = predicted or {}
        # The probe measures layers of one GEMM set (not the separable convolutions).
        self.layers = [layer for layer in emulated_layers(model)
                       if isinstance(layer, inventory.SINGLE_GEMM) and self._single_use(layer)]
        self.last: Dict[str, Dict[str, Dict[str, float]]] = {}
        self.last_step: Optional[int] = None
        # Over every probe of this process: {layer: {gemm: {predicted, last, min, probes,
        # short}}}, the run's analysis-versus-monitor record.
        self.record: Dict[str, Dict[str, Dict[str, float]]] = {}
        if self.layers:
            inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            self.probe_model = keras.Model(
                inputs, [model.outputs[0]] + [layer.input for layer in self.layers]
                + [layer.output for layer in self.layers])
            self.probes = [GemmProbe(layer, layer.policy) for layer in self.layers]
            for probe, layer in zip(self.probes, self.layers):
                # stochastic draws of the current training step
                probe.emulated.step_counter = layer.step_counter

    def _single_use(self, layer) -> bool:
        """Layers called once in the outer graph (a shared layer has no single input)."""
        try:
            layer.input  # noqa: B018 - raises for shared layers
            return len(layer._inbound_nodes) == 1
        except (AttributeError, ValueError):
            return False

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.net.optimizer.iterations.numpy())
        if self.every_steps and step % self.every_steps == 0 and step != self.last_step:
            self.probe(step)

    def _measure(self, probe: GemmProbe, x, dy) -> Dict[str, Dict[str, float]]:
        layer = probe.layer
        x = tf.convert_to_tensor(x)
        probe.sync()  # the exact twin below must hold the layer's current kernel
        # The error at the pre-activation output, through the exact forward pass.
        with tf.GradientTape() as tape:
            z = probe.exact(x)
            if layer.bias is not None:
                z = z + layer.bias
            tape.watch(z)
            out = layer.activation(z)
        dz = tape.gradient(out, z, output_gradients=dy)
        stats = summaries(probe.compare(x, dz))
        for gemm, values in stats.items():
            expected = self.predicted.get(layer.name, {}).get(gemm)
            if expected is not None and expected[0] is not None:
                retention, n_eff = expected
                values["predicted_retention"] = float(retention)
                values["short"] = bool(falls_short(retention, values["retention"], n_eff,
                                                   values["loss_stderr"]))
        return stats

    def probe(self, step: int) -> Dict[str, Dict[str, Dict[str, float]]]:
        if not self.layers:
            return {}
        n = len(self.layers)
        with tf.GradientTape() as tape:
            outs = self.probe_model(self.x, training=False)
            loss = self.loss_fn(self.y, outs[0]) * self.loss_scale()
        dys = tape.gradient(loss, outs[1 + n:])
        stats = {}
        for probe, x, dy in zip(self.probes, outs[1:1 + n], dys):
            if dy is None:
                continue
            stats[probe.layer.name] = self._measure(probe, x, dy)
        with self.writer.as_default(step=step):
            for name, per_gemm in stats.items():
                for gemm, values in per_gemm.items():
                    tag = f"{name}/{gemm}"
                    tf.summary.scalar(f"accum_retention/{tag}", values["retention"])
                    if "predicted_retention" in values:
                        tf.summary.scalar(f"accum_retention_predicted/{tag}",
                                          values["predicted_retention"])
                    tf.summary.scalar(f"accum_variance_ratio/{tag}", values["variance_ratio"])
                    tf.summary.scalar(f"accum_rel_error/{tag}", values["rel_error"])
        self.writer.flush()
        self.last, self.last_step = stats, step
        for name, per_gemm in stats.items():
            for gemm, values in per_gemm.items():
                entry = self.record.setdefault(name, {}).setdefault(
                    gemm, {"predicted": values.get("predicted_retention"), "min": math.inf,
                           "probes": 0, "short": 0})
                entry["last"] = values["retention"]
                if math.isfinite(values["retention"]):
                    entry["min"] = min(entry["min"], values["retention"])
                entry["probes"] += 1
                entry["short"] += int(values.get("short", False))
        return stats

    def worst(self) -> Optional[str]:
        """The lowest retention of the last probe, as ``0.981 (conv2/grad)``."""
        worst = None
        for name, per_gemm in self.last.items():
            for gemm, values in per_gemm.items():
                value = values["retention"]
                if np.isfinite(value) and (worst is None or value < worst[0]):
                    worst = (value, f"{name}/{gemm}")
        return None if worst is None else f"{worst[0]:.4f} ({worst[1]})"

