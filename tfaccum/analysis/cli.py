r"""Predict per-layer accumulator precision from the command line: ``python -m
tfaccum.analysis`` (``tfaccum/analysis/__main__.py``; ``python -m tfaccum.analyze`` and
the ``tfaccum-analyze`` script run the same).

::

    python -m tfaccum.analysis --model=resnet18 --batch_size=256 --chunk_size=64 \
        --product_mantissa_bits=5 --output=plan.json [--plot=vrr.png]

prints a table like Sakr et al.'s (ICLR 2019): one row per Dense/Conv2D layer, with the
FWD, BWD and GRAD accumulation lengths, effective lengths (non-zero products) and the
predicted accumulator mantissa bits, sequential and chunked. ``--output`` writes the
plan as JSON (:class:`tfaccum.analysis.PrecisionPlan`, loadable with
``PrecisionPlan.load``); ``--plot`` writes a VRR-against-n figure (needs matplotlib).

Statistics (``--sparsity``): ``measure`` (default) measures the sparsity and product
statistics of every GEMM on a few real training batches (``tfaccum.analysis.
measure_statistics``) of ``--dataset``: by default the model's own (the embedded
scikit-learn digits for ``digits_cnn``, no download; CIFAR-10 or ImageNet prepared with
tensorflow-datasets under ``--data_dir`` for the others). ``--dataset=synthetic`` measures
on N(0, 1) inputs instead, and the plan says so; ``--sparsity=none`` ignores zeros and a
number in [0, 1] is used for every GEMM, both measuring nothing (the plan states the
assumption). ``--rounding`` and ``--criterion`` select the accumulator's rounding mode and
the criterion (docs/vrr.md 2b, 12). A bad flag prints one error line and exits 2.

``--tensor_core=hopper:e4m3`` (any ``arch:operands`` of tfaccum.presets) analyses the GEMMs
as that hardware's fused adders accumulate them instead (docs/vrr.md 14)::

    python -m tfaccum.analyze --model=resnet18 --tensor_core=hopper:e4m3 --sparsity=none \
        [--promote_every=128] [--plot=promotion.png]

prints, per GEMM, the retention without promotion, whether it passes the criterion, the
longest promotion interval that does, the retention at ``--promote_every`` and the
paper-style sequential width, with the assumptions; ``--plot`` draws the retention
against the promotion interval for each distinct GEMM length (skipped without
matplotlib).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from tfaccum.models import MODELS  # noqa: E402  (imports keras, not the op library)

# A private registry: these flags never collide with another absl program's (the
# training driver's) when both modules are imported in one process.
FLAGS = flags.FlagValues()

flags.DEFINE_enum("model", "resnet18", sorted(MODELS), "Network to analyze.",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "Training batch size (sets the GRAD lengths).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 64, "Chunk size of the chunked prediction (0: sequential "
                     "only).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("product_mantissa_bits", 5, "Mantissa bits m_p of the products (5 for "
                     "FP8 E5M2 operands multiplied exactly, 23 for float32).",
                     lower_bound=0, upper_bound=23, flag_values=FLAGS)
flags.DEFINE_float("cutoff", 50.0, "Criterion cut-off: v(n) = exp(n (1 - VRR)) < cutoff.",
                   flag_values=FLAGS)
flags.DEFINE_integer("exponent_bits", 6, "Accumulator exponent bits of the plan's policies.",
                     lower_bound=2, upper_bound=8, flag_values=FLAGS)
flags.DEFINE_enum("method", "analytical", ["analytical", "monte_carlo"],
                  "VRR estimate behind the prediction.", flag_values=FLAGS)
flags.DEFINE_string("sparsity", "measure", "'measure', 'none' or a fraction in [0, 1].",
                    flag_values=FLAGS)
flags.DEFINE_enum("dataset", None, ["digits", "cifar10", "imagenet2012", "synthetic"],
                  "Real batches for --sparsity=measure (default: the model's dataset: digits "
                  "for digits_cnn, cifar10 for resnet32, imagenet2012 for resnet18/alexnet); "
                  "synthetic: N(0, 1) inputs, stated in the plan.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets directory with prepared "
                    "cifar10/imagenet2012 (never downloaded); default ~/tensorflow_datasets.",
                    flag_values=FLAGS)
flags.DEFINE_enum("rounding", "nearest_even", ["nearest_even", "toward_zero", "stochastic"],
                  "The accumulator's rounding mode.", flag_values=FLAGS)
flags.DEFINE_enum("criterion", "bounded", ["bounded", "paper"], "bounded: v(n) < cutoff and "
                  "1 - VRR <= 0.56 %; paper: v(n) < cutoff only (docs/vrr.md 2b).",
                  flag_values=FLAGS)
flags.DEFINE_integer("measure_batches", 2, "Batches to measure sparsity on.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("measure_batch_size", 8, "Batch size for measuring sparsity.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("input_shape", None, "Input shape H,W,C (default: the model's).",
                  flag_values=FLAGS)
flags.DEFINE_integer("classes", None, "Number of classes (default: the model's).",
                     lower_bound=2, flag_values=FLAGS)
flags.DEFINE_string("operands", "none", "Operand format recorded in the plan's policies: "
                    "'none' or a format such as fp8_e5m2 or e5m2.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Write the plan as JSON to this path.", flag_values=FLAGS)
flags.DEFINE_string("plot", None, "Write a VRR-vs-n PNG to this path (needs matplotlib).",
                    flag_values=FLAGS)
flags.DEFINE_integer("plot_trials", 100, "Monte Carlo trials per point of --plot.",
                     lower_bound=2, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed for synthetic inputs and Monte Carlo.", flag_values=FLAGS)
flags.DEFINE_string("tensor_core", None, "Analyse the GEMMs as this hardware accumulates them, "
                    "e.g. hopper:e4m3 (tfaccum.presets): per GEMM the retention without "
                    "promotion, whether it passes, and the longest promotion interval that "
                    "does (docs/vrr.md 14).", flag_values=FLAGS)
flags.DEFINE_integer("promote_every", 0, "With --tensor_core: also evaluate promotion every "
                     "this many products.", lower_bound=0, flag_values=FLAGS)


class UsageError(Exception):
    """A flag value that parses but makes no sense."""


def _sparsity():
    text = FLAGS.sparsity.strip().lower()
    if text == "measure":
        return "measure"
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--sparsity must be 'measure', 'none' or a number in [0, 1], "
                         f"got {FLAGS.sparsity!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--sparsity must be in [0, 1], got {value}")
    return value


def _input_shape():
    if not FLAGS.input_shape:
        return None
    try:
        shape = tuple(int(v) for v in FLAGS.input_shape)
    except ValueError:
        raise UsageError(f"--input_shape must be H,W,C integers, got "
                         f"{','.join(FLAGS.input_shape)!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input_shape must be three positive integers H,W,C, got {shape}")
    return shape


def _operands():
    text = FLAGS.operands.strip().lower()
    if text in ("none", ""):
        return None
    from tfaccum.config import as_format  # noqa: WPS433

    try:
        return as_format(text)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--operands: {err}") from None


def _real_batches(dataset: str, input_shape, count: int, batch_size: int):
    """``count`` training batches of ``dataset``, prepared as the training driver does."""
    from tfaccum.training import data as data_lib  # noqa: WPS433
    from tfaccum.training.settings import DriverError, Settings  # noqa: WPS433

    settings = Settings.resolve({"model": FLAGS.model, "dataset": dataset,
                                 "data_dir": FLAGS.data_dir, "batch_size": batch_size,
                                 "image_size": input_shape[0]})
    try:
        data = data_lib.load(settings, FLAGS.seed)
    except DriverError as err:
        raise UsageError(f"{err}; or pass --dataset=synthetic (N(0, 1) inputs) or "
                         "--sparsity=none") from None
    if tuple(data.input_shape) != tuple(input_shape):
        raise UsageError(f"--dataset={dataset} gives {tuple(data.input_shape)} inputs; the "
                         f"model takes {tuple(input_shape)} (set --input_shape)")
    return data.first_batches(FLAGS.seed, batch_size, count)


def _tensor_core_setup():
    from tfaccum.analysis.fused import fused_setup  # noqa: WPS433

    try:
        return fused_setup(FLAGS.tensor_core)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--tensor_core: {err}") from None


def _run_tensor_core(analysis, model, data, sparsity) -> str:
    """--tensor_core: the tensor-core table (and plot) instead of the precision plan."""
    plan = analysis.predict_tensor_core(
        model, _tensor_core_setup(), FLAGS.batch_size, promote_every=FLAGS.promote_every,
        data=data, sparsity=sparsity, cutoff=FLAGS.cutoff, criterion=FLAGS.criterion,
        max_batches=FLAGS.measure_batches, measure_batch_size=FLAGS.measure_batch_size,
        seed=FLAGS.seed)
    text = plan.table()
    print(text)
    if FLAGS.plot:
        try:
            analysis.plot_promotion(plan, FLAGS.plot)
            print(f"plot written to {FLAGS.plot}")
        except ImportError:
            print("plot skipped: matplotlib is not installed")
    return text


def run(argv: List[str]) -> str:
    """Parse ``argv`` (program name first), predict, print and write; returns the text."""
    FLAGS.unparse_flags()
    FLAGS(argv)
    if not FLAGS.cutoff > 1.0:
        raise UsageError(f"--cutoff must be > 1, got {FLAGS.cutoff}")
    if FLAGS.tensor_core:
        _tensor_core_setup()  # a bad spec fails before any model is built
        if FLAGS.output:
            raise UsageError("--output writes a precision plan; it does not apply with "
                             "--tensor_core")
    elif FLAGS.promote_every:
        raise UsageError("--promote_every needs --tensor_core")
    sparsity = _sparsity()
    shape = _input_shape()
    operands = _operands()
    builder = MODELS[FLAGS.model]
    kwargs = {}
    if shape is not None:
        kwargs["input_shape"] = shape
    if FLAGS.classes is not None:
        kwargs["classes"] = FLAGS.classes
    model = builder(**kwargs)

    from tfaccum import analysis  # noqa: WPS433

    data = None
    if sparsity == "measure":
        from tfaccum.training.recipes import RECIPES  # noqa: WPS433

        dataset = FLAGS.dataset or RECIPES[FLAGS.model].dataset
        if dataset != "synthetic":
            data = _real_batches(dataset, model.input_shape[1:], FLAGS.measure_batches,
                                 FLAGS.measure_batch_size)
    if FLAGS.tensor_core:
        return _run_tensor_core(analysis, model, data, sparsity)
    plan = analysis.predict(model, FLAGS.batch_size,
                            product_mantissa_bits=FLAGS.product_mantissa_bits,
                            chunk_size=FLAGS.chunk_size, data=data, sparsity=sparsity,
                            cutoff=FLAGS.cutoff, exponent_bits=FLAGS.exponent_bits,
                            method=FLAGS.method, operands=operands,
                            rounding=FLAGS.rounding, criterion=FLAGS.criterion,
                            max_batches=FLAGS.measure_batches,
                            measure_batch_size=FLAGS.measure_batch_size, seed=FLAGS.seed)
    text = plan.table()
    print(text)
    if FLAGS.output:
        plan.save(FLAGS.output)
        print(f"plan written to {FLAGS.output}")
    if FLAGS.plot:
        bits = sorted({g.mantissa_bits for l in plan for g in (l.fwd, l.bwd, l.grad)})
        shown = tuple(sorted(set(bits[::max(1, len(bits) // 5)])))[:6] or (8, 12)
        analysis.plot_vrr(FLAGS.plot, product_mantissa_bits=FLAGS.product_mantissa_bits,
                          acc_mantissa_bits=shown, chunk_size=0, trials=FLAGS.plot_trials,
                          seed=FLAGS.seed, cutoff=FLAGS.cutoff)
        print(f"plot written to {FLAGS.plot}")
    return text


def main(argv: Optional[List[str]] = None, prog: str = "python -m tfaccum.analysis") -> int:
    """Entry point: returns the exit status (0, 1 for a failure, 2 for a bad flag); errors
    are one line that starts with ``prog``."""
    argv = list(sys.argv if argv is None else argv)
    try:
        run(argv)
    except (flags.Error, UsageError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, no traceback, for the CLI
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0

