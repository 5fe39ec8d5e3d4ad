"""The validated settings of one driver invocation, and the runs it makes.

``Settings.resolve(values)`` takes the raw flag values (a plain dict, so that it is usable
without absl), fills what was left unset from the model's recipe, checks everything and
raises :class:`DriverError` with a one-line message on anything wrong. No TensorFlow here.

A *run* is one training of the network under one accumulation policy, in its own
directory ``<model_dir>/<RunSpec.name>``:

==================  =================================================================
``RunSpec.policy``  meaning
==================  =================================================================
``"fp32"``          float32 accumulation everywhere (the baseline)
``"predicted"``     each GEMM at the mantissa width predicted by ``tfaccum.analysis``
``"e6m10"``, ...    every emulated GEMM accumulates in that fixed format
``"tensor_core:``   every emulated GEMM accumulates as that GPU's tensor cores do
``hopper:e4m3"``    (``tfaccum.presets.tensor_core``), on operands of its input format
==================  =================================================================

``offset`` shifts every emulated GEMM's mantissa by that many bits (never below 0) and
``chunk_size`` selects chunk-based accumulation (0: sequential); for a tensor-core run it
is the promotion interval (``--promote_every``: the partial sums go to a float32 total
every that many products; 0: never).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from tfaccum import presets
from tfaccum.config import FloatFormat, as_format
from tfaccum.training.recipes import MODELS, RECIPES

DATASETS = ("digits", "cifar10", "imagenet2012")
EXPERIMENTS = ("single", "convergence", "tightness")
STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("step", "cosine", "constant")
ROUNDINGS = ("nearest_even", "toward_zero", "stochastic")
OPERANDS = {"none": None, "fp8": FloatFormat(5, 2), "fp8_e5m2": FloatFormat(5, 2),
            "fp8_e4m3": FloatFormat(4, 3), "fp16": FloatFormat(5, 10),
            "bfloat16": FloatFormat(8, 7)}
FP32_NAMES = ("fp32", "float32", "binary32")


class DriverError(Exception):
    """A problem the user can fix (a bad flag, missing data): printed as one line."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: an accumulation policy, a bit offset and a chunk size."""

    policy: str  # "fp32", "predicted", a format name such as "e6m10", "tensor_core:hopper:e4m3"
    offset: int = 0
    chunk_size: int = 0
    seed: int = 0  # initial weights, data order (and, for digits, the test fold)

    @property
    def emulated(self) -> bool:
        return self.policy != "fp32"

    @property
    def tensor_core(self) -> Optional[Tuple[str, str]]:
        """(arch, operands) of a tensor-core run, else None."""
        if not self.policy.startswith(TENSOR_CORE_PREFIX):
            return None
        arch, operands = self.policy[len(TENSOR_CORE_PREFIX):].split(":")
        return arch, operands

    @property
    def name(self) -> str:
        """The run's directory name: ``fp32``, ``predicted``, ``predicted-1``,
        ``predicted_c64-2``, ``e6m10``, ``tc-hopper-e4m3_p128``..."""
        if not self.emulated:
            return "fp32"
        if self.tensor_core is not None:
            name = "tc-" + "-".join(self.tensor_core)
            return name + (f"_p{self.chunk_size}" if self.chunk_size else "")
        name = self.policy
        if self.chunk_size:
            name += f"_c{self.chunk_size}"
        if self.offset:
            name += f"{self.offset:+d}"
        return name

    @property
    def directory(self) -> str:
        """The run's directory under the model dir: ``<name>/seed<seed>``."""
        return f"{self.name}/seed{self.seed}"

    def fixed_format(self) -> Optional[FloatFormat]:
        """The accumulator of a fixed-format run, offset applied (mantissa clamped at 0)."""
        if self.policy in ("fp32", "predicted") or self.tensor_core is not None:
            return None
        fmt = as_format(self.policy)
        return fmt.with_mantissa_bits(min(23, max(0, fmt.mantissa_bits + self.offset)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fail(flag: str, message: str):
    raise DriverError(f"--{flag}: {message}")


def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _int_list(flag: str, value) -> Tuple[int, ...]:
    out = []
    for item in _as_list(value):
        try:
            out.append(int(item))
        except ValueError:
            _fail(flag, f"expected integers, got {item!r}")
    return tuple(out)


TENSOR_CORE_PREFIX = "tensor_core:"


def parse_policy(text: str, exponent_bits: int) -> str:
    """``fp32``, ``predicted``, a fixed accumulator format normalized to ``e<E>m<M>``, or
    ``tensor_core:<arch>:<operands>``.

    A bare integer is a mantissa width with ``exponent_bits`` exponent bits; a preset
    name (``bfloat16``, ``float16``...) or ``e<E>m<M>`` gives the whole format.
    """
    key = str(text).strip().lower()
    if key in FP32_NAMES:
        return "fp32"
    if key == "predicted":
        return "predicted"
    if key.startswith(TENSOR_CORE_PREFIX):
        try:
            tc = presets.parse_model(key)
        except (TypeError, ValueError) as err:
            _fail("policy", f"{text!r}: {err} (write tensor_core:<arch>:<operands>, e.g. "
                            "tensor_core:hopper:e4m3)")
        return f"{TENSOR_CORE_PREFIX}{tc.arch}:{tc.operands}"
    try:
        bits = int(key)
    except ValueError:
        bits = None
    if bits is not None:
        if bits < 0:
            _fail("policy", f"negative mantissa bits {bits}: give 0..23 bits, 'predicted' or "
                            "'fp32'")
        if bits > 23:
            _fail("policy", f"{bits} mantissa bits is more than float32's 23")
        return FloatFormat(exponent_bits, bits).name
    try:
        return as_format(key).name
    except (ValueError, TypeError) as err:
        _fail("policy", f"{text!r} is not 'fp32', 'predicted', a number of mantissa bits or "
                        f"a format such as 'e6m10' ({err})")


def parse_operands(text: str) -> Optional[FloatFormat]:
    key = str(text).strip().lower()
    if key in OPERANDS:
        return OPERANDS[key]
    try:
        return as_format(key)
    except (ValueError, TypeError):
        _fail("operands", f"unknown operand format {text!r}: use one of "
                          f"{', '.join(OPERANDS)} or 'e<E>m<M>'")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of one invocation, resolved and checked."""

    model: str
    dataset: str
    data_dir: str
    image_size: int
    batch_size: int
    epochs: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    lr_decay_at: Tuple[float, ...]
    lr_decay_factor: float
    warmup_epochs: float
    model_dir: str
    seed: int
    seeds: int
    experiment: str
    policy: str
    acc_exponent_bits: int
    chunk_size: int
    chunk_variants: Tuple[int, ...]
    operands: Optional[FloatFormat]
    loss_scale: str  # "none", "dynamic" or a float as text
    bits_offset: int
    offsets: Tuple[int, ...]
    keep_full_precision: Tuple[str, ...]
    rounding: str
    criterion: str
    cutoff: float
    prediction_batches: int
    strategy: str
    health_every_steps: int
    health_batch_size: int
    max_train_examples: int
    max_test_examples: int
    interrupt_after_epochs: int

    # The settings a run's result depends on; the others (where data and runs live, how
    # many devices, how often to probe) may change between a run and its resumption.
    # The run's own seed is part of its RunSpec; ``seed``/``seeds`` only choose which runs.
    _NOT_TRAINING = ("data_dir", "model_dir", "experiment", "policy", "bits_offset", "seed",
                     "seeds",
                     "offsets", "chunk_size", "chunk_variants", "strategy",
                     "health_every_steps", "health_batch_size", "interrupt_after_epochs")

    # ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, values: Mapping[str, Any]) -> "Settings":
        """From raw flag values (``None`` = unset: take the model's recipe)."""
        v = dict(values)
        model = str(v.get("model") or "digits_cnn")
        if model not in MODELS:
            _fail("model", f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
        recipe = RECIPES[model]

        def pick(name):
            value = v.get(name)
            return getattr(recipe, name) if value is None else value

        dataset = str(pick("dataset"))
        if dataset not in DATASETS:
            _fail("dataset", f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")

        def positive(name, value, kind=int, allow_zero=False):
            try:
                value = kind(value)
            except (TypeError, ValueError):
                _fail(name, f"expected a number, got {value!r}")
            if value < 0 or (value == 0 and not allow_zero) or (
                    isinstance(value, float) and not math.isfinite(value)):
                _fail(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
            return value

        batch_size = positive("batch_size", pick("batch_size"))
        epochs = positive("epochs", pick("epochs"))
        optimizer = str(pick("optimizer")).lower()
        if optimizer not in OPTIMIZERS:
            _fail("optimizer", f"unknown optimizer {optimizer!r}: choose one of "
                               f"{', '.join(OPTIMIZERS)}")
        learning_rate = positive("learning_rate", pick("learning_rate"), float)
        momentum = positive("momentum", pick("momentum"), float, allow_zero=True)
        if momentum >= 1:
            _fail("momentum", f"must be in [0, 1), got {momentum}")
        weight_decay = positive("weight_decay", pick("weight_decay"), float, allow_zero=True)
        lr_schedule = str(pick("lr_schedule")).lower()
        if lr_schedule not in LR_SCHEDULES:
            _fail("lr_schedule", f"unknown schedule {lr_schedule!r}: choose one of "
                                 f"{', '.join(LR_SCHEDULES)}")
        decay_at = v.get("lr_decay_at")
        if decay_at is None:
            lr_decay_at = tuple(recipe.lr_decay_at)
        else:
            try:
                lr_decay_at = tuple(float(x) for x in _as_list(decay_at))
            except ValueError:
                _fail("lr_decay_at", f"expected fractions of training, got {decay_at!r}")
        if any(not 0 < f < 1 for f in lr_decay_at) or list(lr_decay_at) != sorted(lr_decay_at):
            _fail("lr_decay_at", f"expected increasing fractions in (0, 1), got {decay_at!r}")
        lr_decay_factor = positive("lr_decay_factor", pick("lr_decay_factor"), float)
        warmup_epochs = positive("warmup_epochs", pick("warmup_epochs"), float, allow_zero=True)

        exponent_bits = v.get("acc_exponent_bits", 6)
        if not isinstance(exponent_bits, int) or not 2 <= exponent_bits <= 8:
            _fail("acc_exponent_bits", f"must be 2..8 (a float format's exponent field), "
                                       f"got {exponent_bits}")
        policy = parse_policy(v.get("policy", "predicted"), exponent_bits)
        experiment = str(v.get("experiment") or "single")
        if experiment not in EXPERIMENTS:
            _fail("experiment", f"unknown experiment {experiment!r}: choose one of "
                                f"{', '.join(EXPERIMENTS)}")
        if experiment != "single" and policy == "fp32":
            _fail("policy", f"--experiment={experiment} compares the fp32 baseline with a "
                            "reduced precision: use --policy=predicted or fixed bits")
        chunk_size = positive("chunk_size", v.get("chunk_size", 0), allow_zero=True)
        chunk_variants = _int_list("chunk_variants", v.get("chunk_variants"))
        for c in chunk_variants:
            if c <= 0:
                _fail("chunk_variants", f"chunk sizes must be > 0, got {c}")
        operands = parse_operands(v.get("operands") or recipe.operands)
        promote_every = positive("promote_every", v.get("promote_every", 0) or 0,
                                 allow_zero=True)
        if policy.startswith(TENSOR_CORE_PREFIX):
            # The hardware fixes the operand format and the roundings; the promotion
            # interval is the chunk size of the run (numerics.md section 7).
            tc = presets.parse_model(policy)
            given = v.get("operands")
            if given and parse_operands(given) != tc.operand_format:
                _fail("operands", f"{policy} takes {tc.operands} operands, got {given!r}: "
                                  "leave --operands unset")
            operands = tc.operand_format
            if chunk_size and promote_every and chunk_size != promote_every:
                _fail("promote_every", f"{promote_every} differs from --chunk_size="
                                       f"{chunk_size}; give one of them")
            chunk_size = promote_every or chunk_size
            if experiment == "tightness":
                _fail("experiment", "tightness shifts mantissa widths, which a tensor core "
                                    "fixes: use --experiment=convergence (with "
                                    "--chunk_variants for more promotion intervals)")
            if v.get("bits_offset"):
                _fail("bits_offset", f"a tensor core's widths are fixed, got "
                                     f"{v.get('bits_offset')}")
        elif promote_every:
            _fail("promote_every", "applies to --policy=tensor_core:<arch>:<operands> only; "
                                   "use --chunk_size for tfaccum's own formats")
        loss_scale = str(v.get("loss_scale") or "auto").lower()
        if loss_scale == "auto":
            loss_scale = "dynamic" if operands is not None else "none"
        elif loss_scale not in ("none", "dynamic"):
            loss_scale = str(positive("loss_scale", loss_scale, float))
        bits_offset = v.get("bits_offset", 0) or 0
        offsets = _int_list("offsets", v.get("offsets", "-1,-2"))
        keep = tuple(_as_list(v.get("keep_full_precision", "last")))
        if [k.lower() for k in keep] == ["none"]:
            keep = ()
        rounding = str(v.get("rounding") or "nearest_even")
        if rounding not in ROUNDINGS:
            _fail("rounding", f"unknown rounding {rounding!r}: choose one of "
                              f"{', '.join(ROUNDINGS)}")
        strategy = str(v.get("strategy") or "default")
        if strategy not in STRATEGIES:
            _fail("strategy", f"unknown strategy {strategy!r}: choose one of "
                              f"{', '.join(STRATEGIES)}")
        image_size = v.get("image_size")
        image_size = {"digits": 8, "cifar10": 32}.get(dataset, image_size or 224)
        seed = v.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            _fail("seed", f"must be a non-negative integer, got {seed!r}")
        seeds = positive("seeds", pick("seeds"))
        criterion = str(v.get("criterion") or "bounded")
        if criterion not in ("bounded", "paper"):
            _fail("criterion", f"unknown criterion {criterion!r}: choose bounded or paper")
        data_dir = os.path.expanduser(str(v.get("data_dir") or "~/tensorflow_datasets"))
        model_dir = v.get("model_dir") or os.path.join("/tmp/tfaccum", f"{model}_{dataset}")
        return cls(
            model=model, dataset=dataset, data_dir=data_dir, image_size=int(image_size),
            batch_size=batch_size, epochs=epochs, optimizer=optimizer,
            learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
            lr_schedule=lr_schedule, lr_decay_at=lr_decay_at, lr_decay_factor=lr_decay_factor,
            warmup_epochs=warmup_epochs, model_dir=os.path.abspath(os.path.expanduser(model_dir)),
            seed=seed, seeds=seeds, experiment=experiment, policy=policy,
            acc_exponent_bits=exponent_bits, chunk_size=chunk_size,
            chunk_variants=chunk_variants, operands=operands, loss_scale=loss_scale,
            bits_offset=int(bits_offset), offsets=offsets, keep_full_precision=keep,
            rounding=rounding, criterion=criterion,
            cutoff=positive("cutoff", v.get("cutoff", 50.0), float),
            prediction_batches=positive("prediction_batches", v.get("prediction_batches", 4)),
            strategy=strategy,
            health_every_steps=positive("health_every_steps", v.get("health_every_steps", 50),
                                        allow_zero=True),
            health_batch_size=positive("health_batch_size", v.get("health_batch_size", 0),
                                       allow_zero=True),
            max_train_examples=positive("max_train_examples", v.get("max_train_examples", 0),
                                        allow_zero=True),
            max_test_examples=positive("max_test_examples", v.get("max_test_examples", 0),
                                       allow_zero=True),
            interrupt_after_epochs=positive("interrupt_after_epochs",
                                            v.get("interrupt_after_epochs", 0),
                                            allow_zero=True),
        )

    # ------------------------------------------------------------------------------
    def run_specs(self) -> List[RunSpec]:
        """The runs of this invocation, seed by seed, baseline first in each.

        ``single``: the one run given by ``--policy``, ``--bits_offset``, ``--chunk_size``.
        ``convergence``: the fp32 baseline and ``--policy`` (offset ``--bits_offset``).
        ``tightness``: those, and ``--policy`` shifted by each of ``--offsets``.
        Both experiments repeat their reduced-precision runs for each ``--chunk_variants``.
        Every configuration runs once per seed ``seed .. seed + seeds - 1``; the runs of
        one seed share initial weights and batches (a paired comparison).
        """
        if self.experiment == "single":
            configs = [RunSpec(self.policy, self.bits_offset if self.policy != "fp32" else 0,
                               self.chunk_size if self.policy != "fp32" else 0)]
        else:
            shifts = [0] + ([o for o in self.offsets if o != 0]
                            if self.experiment == "tightness" else [])
            configs = [RunSpec("fp32")]
            for chunk in dict.fromkeys((self.chunk_size,) + self.chunk_variants):
                configs += [RunSpec(self.policy, self.bits_offset + s, chunk) for s in shifts]
        configs = list(dict.fromkeys(configs))
        return [dataclasses.replace(c, seed=seed)
                for seed in range(self.seed, self.seed + self.seeds) for c in configs]

    def training_config(self) -> Dict[str, Any]:
        """What every run's result depends on, as plain JSON values."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name in self._NOT_TRAINING:
                continue
            value = getattr(self, field.name)
            if isinstance(value, FloatFormat):
                value = value.name
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @property
    def product_mantissa_bits(self) -> int:
        """Mantissa bits of a product: exact products of two m-bit operands have 2m+1;
        float32 operands are treated as 23 (their products are wider than any
        accumulator the analysis considers)."""
        if self.operands is None:
            return 23
        return min(23, 2 * self.operands.mantissa_bits + 1)

