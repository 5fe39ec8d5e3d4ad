r"""Train a network with narrow accumulators and compare it with its float32 baseline:
``python -m tfaccum.training`` (``tfaccum/training/__main__.py``; ``python -m
tfaccum.train`` and the ``tfaccum-train`` script run the same).

    python -m tfaccum.training --experiment=tightness       # digits, ~3.5 min on 2 cores
    python -m tfaccum.training --flagfile=examples/resnet32_cifar10.flags \
        --data_dir=~/tensorflow_datasets
    tensorboard --logdir /tmp/tfaccum/digits_cnn_digits

Experiments (``--experiment``):

* ``single``: one run under ``--policy`` (``fp32``, ``predicted``, or fixed bits such
  as ``10`` or ``e6m10``), shifted by ``--bits_offset``.
* ``convergence``: the float32-accumulation baseline and ``--policy`` (by default the
  precision predicted by ``tfaccum.analysis.predict`` for every GEMM of the network).
* ``tightness``: those and ``--policy`` shifted by each of ``--offsets`` (-1, -2).

Each run trains in ``<model_dir>/<run>`` with its own checkpoints and TensorBoard
events; ``<model_dir>/summary.{csv,md}`` compares the runs' final test errors with the
baseline. A killed invocation started again with the same flags resumes where it
stopped; finished runs are skipped. Flags left unset take the model's recipe
(``tfaccum.training.recipes``). Errors in flags or data print one line and exit 2.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from tfaccum.training.recipes import MODELS  # noqa: E402
from tfaccum.training.settings import (DATASETS, EXPERIMENTS, LR_SCHEDULES,  # noqa: E402
                                       OPERANDS, OPTIMIZERS, ROUNDINGS, STRATEGIES,
                                       DriverError, Settings)

FLAGS = flags.FLAGS
_ours = []


def _define(kind, name, default, help_text):
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text)
    _ours.append(name)


def _choices(values) -> str:
    return " | ".join(values)


# What to train.
_define("string", "model", "digits_cnn", f"Network of tfaccum.models: {_choices(MODELS)}.")
_define("string", "dataset", None, f"{_choices(DATASETS)}; default: the model's "
        "(digits for digits_cnn, cifar10 for resnet32, imagenet2012 for resnet18/alexnet).")
_define("string", "data_dir", None, "tensorflow-datasets directory holding prepared "
        "cifar10/imagenet2012 (never downloaded); default ~/tensorflow_datasets.")
_define("integer", "image_size", None, "ImageNet crop size (default 224).")
_define("integer", "batch_size", None, "Global batch size (split over replicas); "
        "default: the model's recipe.")
_define("integer", "epochs", None, "Training epochs; default: the model's recipe.")
_define("string", "optimizer", None, f"{_choices(OPTIMIZERS)}; default sgd.")
_define("float", "learning_rate", None, "Peak learning rate; default: the recipe's.")
_define("float", "momentum", None, "SGD momentum; default 0.9.")
_define("float", "weight_decay", None, "L2 weight decay on Dense/Conv2D kernels "
        "(gradient += wd * w); default: the recipe's.")
_define("string", "lr_schedule", None, f"{_choices(LR_SCHEDULES)}; default: the recipe's.")
_define("list", "lr_decay_at", None, "Step schedule: fractions of training where the rate "
        "is multiplied by --lr_decay_factor (resnet32: 0.5,0.75).")
_define("float", "lr_decay_factor", None, "Step schedule factor; default 0.1.")
_define("float", "warmup_epochs", None, "Linear warm-up epochs; default 0.")
_define("string", "model_dir", None, "Where runs, checkpoints, TensorBoard events and "
        "summary.{csv,md} go; default /tmp/tfaccum/<model>_<dataset>.")
_define("integer", "seed", 0, "First seed of initialization, data order, augmentation and "
        "(digits) test fold: for a given seed every configuration starts from the same "
        "weights and sees the same batches.")
_define("integer", "seeds", None, "Repeat every configuration with seeds seed .. "
        "seed+seeds-1 (paired): the summary gives means with 95 % intervals; default: the "
        "model's recipe (5 for digits_cnn, one per fold of its 5-fold split).")

# What to compare.
_define("string", "experiment", "single", f"{_choices(EXPERIMENTS)}.")
_define("string", "policy", "predicted", "Accumulation of the (reduced) run: fp32, "
        "predicted (tfaccum.analysis per GEMM), mantissa bits (10), a format (e6m10), or "
        "a GPU's tensor cores, tensor_core:<arch>:<operands> (e.g. tensor_core:hopper:e4m3; "
        "tfaccum.presets).")
_define("integer", "promote_every", 0, "Tensor-core runs: add the partial sums to a "
        "float32 total every N products (DeepSeek-V3: 128); 0: never.")
_define("integer", "acc_exponent_bits", 6, "Accumulator exponent bits (6 as in the paper).")
_define("integer", "chunk_size", 0, "Chunk-based accumulation chunk size (0: sequential).")
_define("list", "chunk_variants", [], "Experiments: also run the reduced runs with these "
        "chunk sizes (e.g. 64).")
_define("string", "operands", None, f"GEMM operand format: {_choices(OPERANDS)} or "
        "e<E>m<M>; fp8 = (5,2) as in the paper; default: the recipe's (fp8 for digits_cnn).")
_define("string", "loss_scale", "auto", "auto (dynamic with narrow operands, else none), "
        "dynamic, none, or a fixed factor.")
_define("integer", "bits_offset", 0, "Mantissa bits added to every reduced GEMM (-1: one "
        "bit fewer than predicted).")
_define("list", "offsets", ["-1", "-2"], "Tightness: the extra offsets to run.")
_define("list", "keep_full_precision", ["last"], "Layers left float32 (names, 'first', "
        "'last'; 'none' for no layer).")
_define("string", "rounding", "nearest_even", f"Accumulator rounding: {_choices(ROUNDINGS)}.")
_define("string", "criterion", "bounded", "Prediction criterion: bounded (exp(n (1 - VRR)) "
        "< cutoff and 1 - VRR <= 0.56 %) or paper (the first part only); docs/vrr.md 2b.")
_define("float", "cutoff", 50.0, "Prediction criterion's cut-off: exp(n (1 - VRR)) < cutoff.")
_define("integer", "prediction_batches", 4, "Training batches the prediction measures "
        "sparsity on.")

# How to run.
_define("string", "strategy", "default", f"tf.distribute strategy: {_choices(STRATEGIES)} "
        "(mirrored: all GPUs, else all logical CPUs; multi_worker reads TF_CONFIG).")
_define("integer", "health_every_steps", 50, "Accumulation health probe period in steps "
        "(0: off).")
_define("integer", "health_batch_size", 0, "Probe batch size (0: the per-replica batch).")
_define("integer", "max_train_examples", 0, "Use only the first N training examples (0: all).")
_define("integer", "max_test_examples", 0, "Use only the first N test examples (0: all).")
_define("integer", "interrupt_after_epochs", 0, "Testing: stop each invocation after N "
        "epochs of a run, as if killed (exit status 3); run again to resume.")


def settings_from_flags() -> Settings:
    return Settings.resolve({name: FLAGS[name].value for name in _ours})


def parse(argv) -> Settings:
    """Settings from a command line (``argv[0]`` is the program name)."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(list(argv))
    except flags.Error as err:
        raise DriverError(str(err)) from None
    if len(rest) > 1:
        raise DriverError(f"unexpected arguments: {' '.join(rest[1:])}")
    return settings_from_flags()


def run(settings: Settings) -> int:
    """Runs the experiment; returns the exit status (errors printed as one line)."""
    from tfaccum.training.experiment import Interrupted, run_experiment

    if not FLAGS["verbosity"].present:  # the driver prints its own progress
        logging.set_verbosity(logging.ERROR)
    try:
        run_experiment(settings)
    except DriverError as err:
        return _error(err)
    except Interrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("interrupted: run again with the same flags to resume from the last "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    return 0


def main(argv=None) -> int:
    """``python -m tfaccum.training`` in-process: parse ``argv``, run, return the status."""
    try:
        settings = parse(sys.argv if argv is None else argv)
    except DriverError as err:
        return _error(err)
    return run(settings)


def _error(err) -> int:
    message = " ".join(str(err).split())  # always one line
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def _flags_parser(argv):
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        sys.exit(_error(err))
    if len(rest) > 1:
        sys.exit(_error(f"unexpected arguments: {' '.join(rest[1:])}"))
    return rest


def _app_main(argv):
    try:
        settings = settings_from_flags()
    except DriverError as err:
        return _error(err)
    return run(settings)


def command_line():
    """The command line itself (absl's app.run: flags, logging, exit status)."""
    # absl's --help and --helpshort print the docstring and the flags of the module run
    # as __main__ (tfaccum/training/__main__.py or the tfaccum/train.py alias), while the
    # flags are defined here: show this module's.
    sys.modules["__main__"].__doc__ = __doc__
    for name in _ours:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    app.run(_app_main, flags_parser=_flags_parser)
