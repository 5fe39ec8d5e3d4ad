"""One run, and an experiment made of runs.

A run lives in ``<model_dir>/<run name>/seed<seed>/``::

    config.json       the settings its result depends on (checked on every restart)
    plan.json         predicted runs: the precision plan (already shifted by the offset)
    policies.json     the AccumPolicy of every rewritten layer
    checkpoints/      model + optimizer + epoch, saved after every epoch
    history.jsonl     one line per finished epoch (train/test metrics, lr, time)
    result.json       written last: the run is finished (with the health record:
                      predicted versus measured retention of every emulated GEMM)
    train/ validation/ and HParams: TensorBoard (see ``callbacks``)

Restarting with the same flags resumes each unfinished run from its last checkpoint (the
epoch counter is in the checkpoint, the data order depends only on seed and epoch, so no
epoch is lost or repeated) and skips the finished ones. A run directory made with other
settings is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

import keras
import tensorflow as tf

from tfaccum.inventory import gemm_layers
from tfaccum.layers import set_step_counter
from tfaccum.training import callbacks as cb
from tfaccum.training import data as data_lib
from tfaccum.training import policies as pol
from tfaccum.training import summary as summary_lib
from tfaccum.training.settings import DriverError, RunSpec, Settings


class Interrupted(Exception):
    """Raised by ``--interrupt_after_epochs`` (a stand-in for a killed process)."""


# --------------------------------------------------------------------------------------
# small file helpers
def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value, text: Optional[str] = None):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text is not None else json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_history(path: str, upto_epoch: int) -> List[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def write_history(path: str, rows: List[dict]):
    write_json(path, None, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# --------------------------------------------------------------------------------------
# strategy, optimizer, loss
def make_strategy(name: str):
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        from tfaccum.training.multi_worker import patch_keras

        patch_keras()  # Keras 3's fit fails across workers without it
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@keras.saving.register_keras_serializable(package="tfaccum.training")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then ``after(step)``.

    ``after``: a learning-rate schedule or a constant rate.
    """

    def __init__(self, after, warmup_steps: int, peak: float):
        self.after, self.warmup_steps, self.peak = after, warmup_steps, peak

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        after = self.after(step) if callable(self.after) else self.after
        return keras.ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"after": after, "warmup_steps": self.warmup_steps, "peak": self.peak}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["after"], dict):  # a serialized schedule
            config["after"] = keras.optimizers.schedules.deserialize(config["after"])
        return cls(**config)


def make_optimizer(settings: Settings, steps_per_epoch: int):
    total = settings.epochs * steps_per_epoch
    lr = settings.learning_rate
    if settings.lr_schedule == "step" and settings.lr_decay_at:
        boundaries = [max(1, int(round(f * total))) for f in settings.lr_decay_at]
        values = [lr * settings.lr_decay_factor ** i for i in range(len(boundaries) + 1)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif settings.lr_schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total))
    else:
        schedule = lr
    warmup = int(round(settings.warmup_epochs * steps_per_epoch))
    if warmup:
        schedule = WarmupSchedule(schedule, warmup, lr)
    kwargs = {}
    if settings.loss_scale not in ("none", "dynamic"):
        kwargs["loss_scale_factor"] = float(settings.loss_scale)
    if settings.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=settings.momentum, **kwargs)
    else:
        optimizer = keras.optimizers.Adam(schedule, **kwargs)
    if settings.loss_scale == "dynamic":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def current_loss_scale(optimizer) -> float:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
    return float(getattr(optimizer, "loss_scale_factor", None) or 1.0)


def outputs_probabilities(model) -> bool:
    """True when the model ends in a softmax (else its outputs are logits)."""
    last = model.layers[-1]
    softmax = keras.activations.softmax
    return (isinstance(last, keras.layers.Softmax)
            or getattr(last, "activation", None) is softmax)


def add_weight_decay(model, weight_decay: float):
    """L2 on every Dense/Conv2D kernel: ``weight_decay * w`` added to its gradient."""
    if weight_decay:
        for layer in gemm_layers(model):
            layer.kernel.regularizer = keras.regularizers.L2(weight_decay / 2.0)


# --------------------------------------------------------------------------------------
class Experiment:
    """The runs of one invocation, sharing the data, the strategy and the plans."""

    def __init__(self, settings: Settings, log=print):
        self.settings = settings
        self.log = log
        self.specs = settings.run_specs()
        self.strategy = make_strategy(settings.strategy)
        self.chief = is_chief(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        if settings.batch_size % replicas:
            raise DriverError(f"--batch_size: {settings.batch_size} does not split evenly "
                              f"over the {replicas} replicas of --strategy={settings.strategy}")
        self.replica_batch = settings.batch_size // replicas
        self.data = data_lib.load(settings, settings.seed)
        self._data_seed = settings.seed
        # Fail now, not after the first runs, on a network that does not fit the data or
        # a --keep_full_precision name it lacks.
        keras.backend.clear_session()
        pol.kept_names(settings, pol.build_model(settings, self.data.input_shape,
                                                 self.data.classes))
        self._plans: Dict[int, object] = {}

    # ---------------------------------------------------------------------------------
    def run(self) -> List[dict]:
        s = self.settings
        os.makedirs(s.model_dir, exist_ok=True)
        names = ", ".join(spec.name for spec in self.specs)
        replicas = self.strategy.num_replicas_in_sync
        self.log(f"tfaccum.train: {s.experiment} experiment, {s.model} on {s.dataset} "
                 f"({self.data.train_size} train / {self.data.test_size} test), batch "
                 f"{s.batch_size} on {replicas} replica{'s' if replicas > 1 else ''}, "
                 f"{s.epochs} epochs; runs: {names}; in {s.model_dir}")
        if self.chief:
            cb.write_hparams_config(s.model_dir)
        results = [self.train_run(spec) for spec in self.specs]
        if self.chief:
            seeds = (f"seed {s.seed}" if s.seeds == 1 else
                     f"seeds {s.seed}-{s.seed + s.seeds - 1}, paired")
            operands = s.operands.name if s.operands is not None else "float32"
            table = summary_lib.write(
                s.model_dir, self.finished_results(results),
                title=f"{s.model} on {s.dataset}, {s.epochs} epochs, {seeds}, operands "
                      f"{operands}, accumulator exponent {s.acc_exponent_bits} bits, "
                      f"rounding {s.rounding}")
            self.log("\n" + table.rstrip())
            self.log(f"summary: {os.path.join(s.model_dir, 'summary.md')} (and summary.csv); "
                     f"TensorBoard: tensorboard --logdir {s.model_dir}")
        return results

    def finished_results(self, results: List[dict]) -> List[dict]:
        """This invocation's runs plus finished runs of the same settings in model_dir
        (a convergence experiment's baseline serves a later single run)."""
        by_dir = {RunSpec(**r["run"]).directory: r for r in results}
        training = self.settings.training_config()
        root = self.settings.model_dir
        for entry in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, entry)):
                continue
            for sub in sorted(os.listdir(os.path.join(root, entry))):
                result = read_json(os.path.join(root, entry, sub, "result.json"))
                key = f"{entry}/{sub}"
                if result and key not in by_dir and result.get("config", {}).get(
                        "training") == training:
                    by_dir[key] = result
        return list(by_dir.values())

    def data_for(self, seed: int):
        """The dataset of the runs of ``seed`` (for digits, the seed picks the fold)."""
        if seed != self._data_seed:
            self.data = data_lib.load(self.settings, seed)
            self._data_seed = seed
        return self.data

    # ---------------------------------------------------------------------------------
    def plan_for(self, spec: RunSpec, run_dir: str):
        """The run's precision plan: from its plan.json when restarting, else predicted
        (once per chunk size per invocation, on the network and batches of the first
        seed) and shifted by the offset."""
        path = os.path.join(run_dir, "plan.json")
        if os.path.exists(path):
            with open(path) as f:
                return pol.load_plan(f.read())
        base = self._plans.get(spec.chunk_size)
        if base is None:
            t0 = time.time()
            seed = self.settings.seed
            base = pol.predict_plan(self.settings, self.data_for(seed), spec.chunk_size,
                                    self.replica_batch, seed)
            self._plans[spec.chunk_size] = base
            self.log(f"predicted accumulator precision (batch {self.replica_batch} per "
                     f"replica, chunk {spec.chunk_size or 'none'}, network and batches of "
                     f"seed {seed}, {time.time() - t0:.1f} s):\n{base}")
        plan = base.shift(spec.offset) if spec.offset else base
        write_json(path, None, plan.to_json())
        return plan

    def _run_dir(self, spec: RunSpec) -> str:
        run_dir = os.path.join(self.settings.model_dir, spec.directory)
        if not self.chief:  # other workers keep their (identical) state apart
            run_dir = os.path.join(run_dir, ".workers", str(self.strategy.cluster_resolver.task_id))
        os.makedirs(run_dir, exist_ok=True)
        return run_dir

    def train_run(self, spec: RunSpec) -> dict:
        """Trains one run to the end (resuming it if it has a checkpoint) and returns its
        result; a finished run is not trained again."""
        run_dir = self._run_dir(spec)
        data = self.data_for(spec.seed)
        config = {"run": spec.to_dict(), "training": self.settings.training_config()}
        result = self._check_run_dir(run_dir, spec, config)
        if result is not None:
            return result
        write_json(os.path.join(run_dir, "config.json"), config)
        plan = self.plan_for(spec, run_dir) if spec.policy == "predicted" else None
        trainee = self._build(spec, plan)
        write_json(os.path.join(run_dir, "policies.json"),
                   {name: p.to_dict() for name, p in trainee.policies.items()})
        writer = cb.RunWriter(run_dir) if self.chief else None
        try:
            history, health = self._train(spec, run_dir, trainee, writer, data, plan)
        finally:
            if writer is not None:
                writer.close()
        last = history[-1]
        result = {
            "name": spec.name, "run": spec.to_dict(), "config": config,
            "bits": trainee.bits, "epochs": len(history), "steps": last["step"],
            "test_error_pct": last["test_error_pct"], "test_loss": last["test_loss"],
            "train_loss": last["loss"], "train_time_s": sum(r["time_s"] for r in history),
            "seed": spec.seed, "health": health,
        }
        write_json(os.path.join(run_dir, "result.json"), result)
        self.log(f"[{spec.directory}] done: test error {result['test_error_pct']:.2f}% after "
                 f"{result['epochs']} epochs ({result['train_time_s']:.0f} s of training)")
        return result

    def _check_run_dir(self, run_dir: str, spec: RunSpec, config: dict) -> Optional[dict]:
        """The finished result, None for a new or unfinished run, or DriverError when
        the directory holds a run made with other settings."""
        previous = read_json(os.path.join(run_dir, "config.json"))
        if previous is not None and previous != config:
            before, now = previous.get("training", {}), config["training"]
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise DriverError(f"{run_dir} was made with other settings ({', '.join(changed)}"
                              "); use another --model_dir or delete that directory")
        result = read_json(os.path.join(run_dir, "result.json"))
        if result is not None:
            self.log(f"[{spec.directory}] finished before: test error "
                     f"{result['test_error_pct']:.2f}% after {result['epochs']} epochs "
                     "(skipped)")
        return result

    def _build(self, spec: RunSpec, plan) -> "_Trainee":
        """Model (rewritten), optimizer and checkpoint, under the strategy's scope."""
        s = self.settings
        keras.backend.clear_session()  # same layer names in every run and in the plan
        with self.strategy.scope():
            keras.utils.set_random_seed(spec.seed)  # same initial weights for every config
            base = pol.build_model(s, self.data.input_shape, self.data.classes)
            policies = pol.layer_policies(spec, s, base, plan)
            model = pol.emulate(base, policies)
            add_weight_decay(model, s.weight_decay)
            optimizer = make_optimizer(s, self.data.steps_per_epoch(s.batch_size))
            loss_fn = keras.losses.SparseCategoricalCrossentropy(
                from_logits=not outputs_probabilities(model))
            model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"],
                          jit_compile=False)
            optimizer.build(model.trainable_variables)
            # Stochastic rounding draws from the stream of the optimizer's step, which the
            # checkpoint saves: fresh bits every step, continued on resume.
            set_step_counter(model, optimizer.iterations)
            epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
        kept = pol.kept_names(s, base) if spec.emulated else []
        return _Trainee(model, optimizer, loss_fn, checkpoint, epoch, policies,
                        pol.describe(policies), kept)

    def _health(self, spec: RunSpec, trainee: "_Trainee", writer, data,
                plan) -> Optional[cb.AccumHealth]:
        s = self.settings
        if writer is None or not s.health_every_steps or not spec.emulated:
            return None
        size = min(s.health_batch_size or self.replica_batch, data.test_size)
        optimizer = trainee.optimizer
        predicted = None
        if plan is not None:
            predicted = {l.layer: {g: (l.gemm(g).retention, l.gemm(g).effective_length)
                                   for g in ("fwd", "bwd", "grad")} for l in plan}
        health = cb.AccumHealth(trainee.model, data.probe(size), trainee.loss_fn,
                                writer.train, s.health_every_steps,
                                loss_scale=lambda: current_loss_scale(optimizer),
                                predicted=predicted)
        return health if health.layers else None

    def _train(self, spec: RunSpec, run_dir: str, trainee: "_Trainee", writer, data,
               plan) -> "tuple[List[dict], dict]":
        """The epoch loop: fit one epoch, evaluate, log, checkpoint; returns the history
        and the health record (:attr:`AccumHealth.record`)."""
        s, tag = self.settings, f"[{spec.directory}]"
        model, optimizer = trainee.model, trainee.optimizer
        manager = tf.train.CheckpointManager(trainee.checkpoint,
                                             os.path.join(run_dir, "checkpoints"), max_to_keep=2)
        start = 0
        if manager.latest_checkpoint:
            trainee.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            start = int(trainee.epoch.numpy())
            self.log(f"{tag} resuming after epoch {start}/{s.epochs} from "
                     f"{manager.latest_checkpoint}")
        history_path = os.path.join(run_dir, "history.jsonl")
        history = read_history(history_path, start)
        if writer is not None:  # drop what an interrupted invocation logged past the checkpoint
            writer.resume(int(optimizer.iterations.numpy()) if manager.latest_checkpoint else -1)

        if writer is not None and start == 0:
            writer.hparams({"policy": spec.policy, "offset": spec.offset,
                            "chunk_size": spec.chunk_size,
                            "acc_exponent_bits": s.acc_exponent_bits if spec.emulated else 8,
                            "operands": s.operands.name if s.operands else "fp32",
                            "bits": trainee.bits, "seed": spec.seed},
                           trial_id=spec.directory)
        health = self._health(spec, trainee, writer, data, plan)
        if health is not None and start == 0:
            health.probe(0)
        self.log(f"{tag} accumulators: {trainee.bits}; {len(trainee.policies)} layer(s) "
                 "rewritten" + (f", kept at full precision: {', '.join(trainee.kept)}"
                                if trainee.kept else ""))

        for epoch in range(start, s.epochs):
            t0 = time.time()
            fit = model.fit(data.train(spec.seed, epoch, s.batch_size), epochs=epoch + 1,
                            initial_epoch=epoch, shuffle=False, verbose=0,
                            callbacks=[health] if health is not None else [])
            train = {k: float(v[-1]) for k, v in fit.history.items()}
            test = model.evaluate(data.test(s.batch_size), verbose=0, return_dict=True)
            test = {k: float(v) for k, v in test.items()}
            row = {"epoch": epoch + 1, "step": int(optimizer.iterations.numpy()),
                   "loss": train["loss"], "accuracy": train["accuracy"],
                   "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                   "test_error_pct": 100.0 * (1.0 - test["accuracy"]),
                   "learning_rate": current_learning_rate(optimizer),
                   "time_s": time.time() - t0}
            if health is not None and health.last:
                row["worst_retention"] = health.worst()
            if writer is not None:
                writer.epoch(row["step"], train, test, row["learning_rate"])
            # History first, then the checkpoint: a restart truncates the history to the
            # checkpoint's epoch, so a kill between the two repeats nothing.
            history.append(row)
            write_history(history_path, history)
            trainee.epoch.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)
            self.log(f"{tag} epoch {epoch + 1:>{len(str(s.epochs))}}/{s.epochs}  "
                     f"loss {row['loss']:.4f}  acc {100 * row['accuracy']:.2f}%  "
                     f"test err {row['test_error_pct']:.2f}%  lr {row['learning_rate']:.4g}"
                     + (f"  min retention {row['worst_retention']}"
                        if row.get("worst_retention") else "")
                     + f"  {row['time_s']:.1f} s")
            if (s.interrupt_after_epochs and epoch + 1 - start >= s.interrupt_after_epochs
                    and epoch + 1 < s.epochs):
                raise Interrupted(f"{tag} stopped after epoch {epoch + 1}/{s.epochs} "
                                  "(--interrupt_after_epochs); run again with the same flags "
                                  "to resume")
        return history, (health.record if health is not None else {})


@dataclasses.dataclass
class _Trainee:
    """What one run trains: the (rewritten) model and everything saved with it."""

    model: object
    optimizer: object
    loss_fn: object
    checkpoint: object
    epoch: object  # tf.Variable: epochs finished, saved in the checkpoint
    policies: Dict[str, object]
    bits: str
    kept: List[str]


def run_experiment(settings: Settings, log=print) -> List[dict]:
    return Experiment(settings, log=log).run()
