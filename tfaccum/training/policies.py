"""From a run's description to the model it trains: which layer accumulates how.

* ``fp32``: float32 accumulation. With ``--operands=fp8`` the layers are still rewritten
  so that their GEMM inputs are rounded to FP8 as in the other runs (the paper's
  baseline: same representation, float32 accumulators); otherwise the model is left as
  it is (native Keras layers, the fastest).
* ``predicted``: ``tfaccum.analysis.predict`` on the real network and real training
  batches at the real per-replica batch size gives each layer's FWD/BWD/GRAD mantissa
  widths; the plan is shifted by the run's offset and saved as ``plan.json``.
* a fixed format (``e6m10``): every emulated GEMM accumulates in it.

Layers named by ``--keep_full_precision`` (``last`` by default, the classifier, which
the paper keeps at higher precision; ``first`` is also understood) are not rewritten:
they compute native float32 GEMMs on float32 operands.

Operand rounding (``--operands``) uses IEEE overflow (to Inf) when the loss scale is
dynamic, so that a scale too large for FP8 shows up as a non-finite gradient and the
loss-scale optimizer backs off, instead of saturating silently.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Dict, List, Optional

import keras

from tfaccum.analysis import GEMMS
from tfaccum import presets
from tfaccum.config import AccumConfig, AccumPolicy, FloatFormat
from tfaccum.inventory import gemm_layers, planned_layers
from tfaccum.training.settings import DriverError, RunSpec, Settings


def kept_names(settings: Settings, model) -> List[str]:
    """The layers ``--keep_full_precision`` names (``first``/``last`` resolved)."""
    names = [layer.name for layer in gemm_layers(model)]
    kept = []
    for item in settings.keep_full_precision:
        if item.lower() == "last":
            kept.append(names[-1])
        elif item.lower() == "first":
            kept.append(names[0])
        elif item in names:
            kept.append(item)
        else:
            raise DriverError(f"--keep_full_precision: {settings.model} has no Dense/Conv2D "
                              f"layer {item!r} (it has {', '.join(names)})")
    return list(dict.fromkeys(kept))


def operand_format(settings: Settings) -> Optional[FloatFormat]:
    fmt = settings.operands
    if fmt is not None and settings.loss_scale == "dynamic":
        fmt = dataclasses.replace(fmt, overflow="inf")
    return fmt


def _finish(policy: AccumPolicy, settings: Settings, layer_index: int,
            seed: int) -> AccumPolicy:
    """Operand format and rounding of the run on top of a policy's accumulators."""
    configs = {}
    for i, gemm in enumerate(GEMMS):
        config: AccumConfig = getattr(policy, gemm)
        if config.is_exact_float32 or config.fused is not None:
            configs[gemm] = config  # float32, or a tensor core's own roundings
            continue
        changes = {"rounding": settings.rounding}
        if settings.rounding == "stochastic":  # a distinct stream per layer and GEMM
            changes["seed"] = zlib.crc32(f"{seed}/{layer_index}/{gemm}".encode())
        configs[gemm] = config.replace(**changes)
    return AccumPolicy(operands=operand_format(settings), **configs)


def layer_policies(spec: RunSpec, settings: Settings, model, plan=None
                   ) -> Dict[str, AccumPolicy]:
    """``{layer name: AccumPolicy}`` for every layer the run rewrites (maybe none)."""
    kept = set(kept_names(settings, model))
    # Attention and EinsumDense layers too (vit_tiny): every layer tfaccum emulates.
    names = [layer.name for layer in planned_layers(model) if layer.name not in kept]
    if spec.policy == "fp32":
        if settings.operands is None:
            return {}
        base = {name: AccumPolicy() for name in names}
    elif spec.policy == "predicted":
        if plan is None:
            raise ValueError("a predicted run needs its precision plan")
        planned = plan.policies()
        base = {name: planned[name] for name in names if name in planned}
    elif spec.tensor_core is not None:
        policy = presets.tensor_core(*spec.tensor_core, promote_every=spec.chunk_size)
        base = {name: policy for name in names}
    else:
        config = AccumConfig(accumulator=spec.fixed_format(), chunk_size=spec.chunk_size)
        base = {name: AccumPolicy.uniform(config) for name in names}
    return {name: _finish(policy, settings, i, spec.seed)
            for i, (name, policy) in enumerate(base.items())}


def emulate(model, policies: Dict[str, AccumPolicy]):
    """The model with those layers rewritten (``model`` itself when there are none)."""
    if not policies:
        return model
    import warnings

    from tfaccum.model_rewrite import rewrite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kept layers are reported by describe()
        return rewrite(model, policies)


def describe(policies: Dict[str, AccumPolicy]) -> str:
    """The accumulators of a run in a few words: ``fp32``, ``e6m10``, or per GEMM the
    range of mantissa widths over the layers, ``e6 fwd m5-8 bwd m4-7 grad m9-12``."""
    configs = [getattr(p, g) for p in policies.values() for g in GEMMS]
    reduced = [c for c in configs if not c.is_exact_float32]
    if not reduced:
        return "fp32"
    hardware = {presets.hardware_of(c) for c in reduced} - {None}
    if hardware:  # a tensor-core run: name the hardware and the promotion
        chunks = sorted({c.chunk_size for c in reduced})
        promotion = ("no promotion" if chunks == [0] else
                     "promotion every " + "/".join(map(str, chunks)))
        return f"{', '.join(sorted(hardware))}, {promotion}"
    formats = {c.accumulator.name for c in reduced}
    if len(formats) == 1 and len(reduced) == len(configs):
        return formats.pop()
    exps = sorted({c.accumulator.exponent_bits for c in reduced})
    parts = ["e" + "/".join(map(str, exps))]
    for gemm in GEMMS:
        bits = [getattr(p, gemm).accumulator.mantissa_bits for p in policies.values()
                if not getattr(p, gemm).is_exact_float32]
        if bits:
            lo, hi = min(bits), max(bits)
            parts.append(f"{gemm} m{lo}" + (f"-{hi}" if hi != lo else ""))
    return " ".join(parts)


def build_model(settings: Settings, input_shape, classes):
    """``tfaccum.models.<model>(input_shape=..., classes=...)``, ending in logits (the
    loss applies the softmax, in float32 outside any GEMM)."""
    from tfaccum import models

    try:
        return models.get(settings.model)(input_shape=tuple(input_shape), classes=classes,
                                          classifier_activation=None)
    except Exception as err:  # noqa: BLE001 - e.g. an input too small for the network
        raise DriverError(f"--model={settings.model} cannot be built for {settings.dataset} "
                          f"inputs {tuple(input_shape)}: {err}") from None


def predict_plan(settings: Settings, data, chunk_size: int, batch_size: int, seed: int):
    """The predicted precision plan of the network at initialization (seeded as the runs
    of ``seed`` are), with the statistics measured on their first training batches, for
    the run's own accumulator rounding and criterion."""
    from tfaccum import analysis

    keras.backend.clear_session()  # the layer names of the runs' models
    keras.utils.set_random_seed(seed)
    model = build_model(settings, data.input_shape, data.classes)
    batches = data.first_batches(seed, batch_size, settings.prediction_batches)
    return analysis.predict(
        model, batch_size=batch_size, product_mantissa_bits=settings.product_mantissa_bits,
        chunk_size=chunk_size, data=batches, sparsity="measure", cutoff=settings.cutoff,
        exponent_bits=settings.acc_exponent_bits, operands=operand_format(settings),
        rounding=settings.rounding, criterion=settings.criterion,
        max_batches=len(batches), seed=seed)


def load_plan(text: str):
    from tfaccum import analysis

    return analysis.PrecisionPlan.from_json(text)
