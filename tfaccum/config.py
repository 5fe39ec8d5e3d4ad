"""Configuration objects: number formats, accumulation configs and per-GEMM policies.

All three classes are frozen dataclasses that validate themselves on construction, print
readably, and round-trip through plain dicts (and hence JSON)::

    >>> from tfaccum.config import AccumConfig, FloatFormat
    >>> acc = FloatFormat(6, 9)
    >>> cfg = AccumConfig(accumulator=acc, chunk_size=64)
    >>> cfg
    AccumConfig(e6m9, exact products, chunk 64, nearest-even)
    >>> AccumConfig.from_dict(cfg.to_dict()) == cfg
    True

The arithmetic these objects describe is defined in ``docs/numerics.md``.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any, Mapping, Optional, Union

import numpy as np

ROUNDING_MODES = ("nearest_even", "toward_zero", "stochastic")
OVERFLOW_POLICIES = ("saturate", "inf")

_ROUNDING_PRETTY = {
    "nearest_even": "nearest-even",
    "toward_zero": "toward-zero",
    "stochastic": "stochastic",
}

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    """``value`` as a Python int: any integer type (numpy's too, as seeds drawn from a
    numpy generator are), never a bool or a float."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {allowed}, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``.

    Args:
      exponent_bits: 2..8. Bias is ``2**(exponent_bits-1) - 1``; the top exponent code
        is reserved for Inf/NaN as in IEEE 754.
      mantissa_bits: 0..23 stored fraction bits (precision is ``mantissa_bits + 1``).
      subnormals: keep gradual underflow. When False a value is rounded as if subnormals
        existed and a non-zero result below the smallest normal becomes a signed zero.
      overflow: ``"saturate"`` (clamp to the largest finite value) or ``"inf"`` (IEEE).
      finite: the OCP "FN" layout (FP8 E4M3FN, NVIDIA's and the OCP standard's E4M3): no
        infinities; the top exponent code holds finite values and only its all-ones
        significand is NaN, so the largest value is ``(2 - 2^(1-m)) * 2^(bias+1)`` (448
        for e4m3). An infinite input saturates to the largest value (as a ``satfinite``
        conversion does) unless ``overflow="inf"``. A format for operands
        (``AccumPolicy.operands``, ``tfaccum.quantize``); accumulators cannot be finite.
    """

    exponent_bits: int
    mantissa_bits: int
    subnormals: bool = True
    overflow: str = "saturate"
    finite: bool = False

    def __post_init__(self):
        # Stored back as plain Python values, so that configs compare, hash and serialize
        # alike whatever integer type they were given.
        object.__setattr__(self, "exponent_bits",
                           _check_int("exponent_bits", self.exponent_bits, 2, 8))
        object.__setattr__(self, "mantissa_bits",
                           _check_int("mantissa_bits", self.mantissa_bits, 0, 23))
        object.__setattr__(self, "subnormals", _check_bool("subnormals", self.subnormals))
        _check_choice("overflow", self.overflow, OVERFLOW_POLICIES)
        object.__setattr__(self, "finite", _check_bool("finite", self.finite))
        if self.finite and not (1 <= self.mantissa_bits <= 22 and self.exponent_bits <= 7):
            # The all-ones significand is NaN, so m >= 1; the top binade must stay inside
            # float32's range (and a float32 value of it exactly representable).
            raise ValueError("a finite (FN) format needs mantissa_bits 1..22 and "
                             f"exponent_bits 2..7, got e{self.exponent_bits}m"
                             f"{self.mantissa_bits}")

    # Derived quantities -------------------------------------------------------------
    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        return self.bias + 1 if self.finite else self.bias

    @property
    def max_value(self) -> float:
        top = 2.0 ** (1 - self.mantissa_bits) if self.finite else 2.0 ** -self.mantissa_bits
        return (2.0 - top) * 2.0 ** self.emax

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mantissa_bits)

    @property
    def name(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}" + ("fn" if self.finite else "")

    def with_mantissa_bits(self, mantissa_bits: int) -> "FloatFormat":
        return dataclasses.replace(self, mantissa_bits=mantissa_bits)

    def __repr__(self) -> str:
        extras = []
        if not self.subnormals:
            extras.append("no subnormals")
        if self.overflow != "saturate":
            extras.append(f"overflow={self.overflow}")
        return self.name + (f" ({', '.join(extras)})" if extras else "")

    # Serialization -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FloatFormat":
        if isinstance(d, FloatFormat):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"FloatFormat.from_dict expects a mapping, got {type(d).__name__}")
        return cls(**dict(d))

    def kernel_attr(self) -> list:
        """The op attribute encoding: [exponent_bits, mantissa_bits, subnormals, overflow_inf]."""
        if self.finite:
            raise ValueError(f"{self.name} is a finite (FN) format, which the kernels do not "
                             "take: tfaccum.quantize rounds to it from two IEEE-style formats")
        return [self.exponent_bits, self.mantissa_bits, int(self.subnormals),
                int(self.overflow == "inf")]


# Named presets. The IEEE formats overflow to Inf like their namesakes, so that the
# default configuration is exactly float32 arithmetic; FP8 presets saturate.
BINARY32 = FloatFormat(8, 23, overflow="inf")
BINARY16 = FloatFormat(5, 10, overflow="inf")
BFLOAT16 = FloatFormat(8, 7, overflow="inf")
FP8_E5M2 = FloatFormat(5, 2)
FP8_E4M3 = FloatFormat(4, 3)
FP8_E4M3FN = FloatFormat(4, 3, finite=True)  # OCP / NVIDIA E4M3: max 448, no Inf
PRESETS = {
    "binary32": BINARY32,
    "float32": BINARY32,
    "binary16": BINARY16,
    "float16": BINARY16,
    "bfloat16": BFLOAT16,
    "fp8_e5m2": FP8_E5M2,
    "fp8_e4m3": FP8_E4M3,
    "fp8_e4m3fn": FP8_E4M3FN,
}


def as_format(value: Union[FloatFormat, str, Mapping, tuple]) -> FloatFormat:
    """Accepts a FloatFormat, a preset name, ``"e6m9"``, a dict or ``(e, m)``."""
    if isinstance(value, FloatFormat):
        return value
    if isinstance(value, str):
        key = value.lower()
        if key in PRESETS:
            return PRESETS[key]
        if key.startswith("e") and "m" in key:
            e, _, m = key[1:].partition("m")
            finite = m.endswith("fn")
            m = m[:-2] if finite else m
            if e.isdigit() and m.isdigit():
                return FloatFormat(int(e), int(m), finite=finite)
        raise ValueError(f"unknown format {value!r}: use a preset "
                         f"({', '.join(sorted(PRESETS))}) or 'e<E>m<M>' such as 'e6m9'")
    if isinstance(value, Mapping):
        return FloatFormat.from_dict(value)
    if isinstance(value, tuple) and len(value) == 2:
        return FloatFormat(*value)
    raise TypeError(f"expected a FloatFormat, got {type(value).__name__} {value!r}")


FUSED_OUTPUT_ROUNDINGS = ("toward_zero", "nearest_even")


@dataclasses.dataclass(frozen=True)
class FusedAdder:
    """A multi-term fused adder, the accumulation order of tensor cores (numerics.md §7).

    The GEMM's running sum ``D`` (in the config's ``accumulator`` format) and the next
    ``terms`` exact products are added by one adder: every term is aligned to the largest
    term exponent, truncated toward zero ``fraction_bits`` bits below it, the truncated
    terms are added exactly, and the sum is rounded once to the accumulator format with
    ``output_rounding``.

    Args:
      terms: ``L``, products per block, 1..64.
      fraction_bits: ``F``, bits kept below the largest exponent, 1..40.
      zero_exponent: the exponent a zero term (zero product or zero ``D``) takes in the
        maximum, -512..512.
      operand_emin: the operands' smallest normal exponent; an operand below ``2**operand_emin``
        counts with exponent ``operand_emin`` (a subnormal of its format), -149..0.
      output_rounding: ``"toward_zero"`` or ``"nearest_even"``.
      hardware: a label naming the hardware this adder models (shown by ``summary()`` and
        TensorBoard); it does not change the arithmetic.
    """

    terms: int
    fraction_bits: int
    zero_exponent: int
    operand_emin: int = -126
    output_rounding: str = "toward_zero"
    hardware: str = ""

    def __post_init__(self):
        object.__setattr__(self, "terms", _check_int("terms", self.terms, 1, 64))
        object.__setattr__(self, "fraction_bits",
                           _check_int("fraction_bits", self.fraction_bits, 1, 40))
        object.__setattr__(self, "zero_exponent",
                           _check_int("zero_exponent", self.zero_exponent, -512, 512))
        object.__setattr__(self, "operand_emin",
                           _check_int("operand_emin", self.operand_emin, -149, 0))
        _check_choice("output_rounding", self.output_rounding, FUSED_OUTPUT_ROUNDINGS)
        if not isinstance(self.hardware, str):
            raise TypeError(f"hardware must be a str, got {type(self.hardware).__name__}")

    def __repr__(self) -> str:
        label = f"{self.hardware}: " if self.hardware else ""
        return (f"{label}fused {self.terms}-term adder F={self.fraction_bits}, "
                f"{_ROUNDING_PRETTY[self.output_rounding]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FusedAdder":
        if isinstance(d, FusedAdder):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"FusedAdder.from_dict expects a mapping, got {type(d).__name__}")
        return cls(**dict(d))

    def kernel_attr(self) -> list:
        """The ``fused`` op attribute: [terms, fraction_bits, zero_exponent, operand_emin,
        output_rounding (0: nearest-even, 1: toward zero)]."""
        return [self.terms, self.fraction_bits, self.zero_exponent, self.operand_emin,
                int(self.output_rounding == "toward_zero")]


@dataclasses.dataclass(frozen=True)
class AccumConfig:
    """How one GEMM accumulates its dot products (numerics.md section 3).

    Args:
      accumulator: format of every partial sum ``s <- Q_A(s + p)``.
      product: format the products are rounded to first; ``None`` means exact products
        (the adder sees the exact product, as in a fused multiply-add).
      chunk_size: 0 for sequential accumulation; ``c > 0`` sums chunks of ``c`` products
        in ``accumulator`` and adds each chunk sum to the total in ``chunk_accumulator``.
      chunk_accumulator: format of the chunk-sum total; ``None`` means ``accumulator``.
      rounding: ``"nearest_even"``, ``"toward_zero"`` or ``"stochastic"``; applies to
        every rounding of this GEMM (products, partial sums, chunk sums).
      seed: key of the counter-based generator used by stochastic rounding.
      fused: a FusedAdder: sum each chunk (or the whole dot product) in blocks of
        ``fused.terms`` products with that adder instead of one rounding per addition
        (numerics.md §7). ``rounding`` then applies to the chunk sums only. Requires
        exact products.
    """

    accumulator: FloatFormat = BINARY32
    product: Optional[FloatFormat] = None
    chunk_size: int = 0
    chunk_accumulator: Optional[FloatFormat] = None
    rounding: str = "nearest_even"
    seed: int = 0
    fused: Optional[FusedAdder] = None

    def __post_init__(self):
        object.__setattr__(self, "accumulator", as_format(self.accumulator))
        if self.product is not None:
            object.__setattr__(self, "product", as_format(self.product))
        if self.chunk_accumulator is not None:
            object.__setattr__(self, "chunk_accumulator", as_format(self.chunk_accumulator))
        for field in ("accumulator", "product", "chunk_accumulator"):
            value = getattr(self, field)
            if isinstance(value, FloatFormat) and value.finite:
                raise ValueError(f"{field} cannot be the finite (FN) format {value.name}: "
                                 "FN formats are operand formats only")
        object.__setattr__(self, "chunk_size",
                           _check_int("chunk_size", self.chunk_size, 0, 2 ** 31 - 1))
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        object.__setattr__(self, "seed", _check_int("seed", self.seed, _INT64_MIN, _INT64_MAX))
        if isinstance(self.fused, Mapping):
            object.__setattr__(self, "fused", FusedAdder.from_dict(self.fused))
        if self.fused is not None:
            if not isinstance(self.fused, FusedAdder):
                raise TypeError(f"fused must be a FusedAdder, got {type(self.fused).__name__}")
            if self.product is not None:
                raise ValueError("a fused adder takes exact products: product must be None, "
                                 f"got {self.product!r}")

    @property
    def effective_chunk_accumulator(self) -> FloatFormat:
        return self.chunk_accumulator if self.chunk_accumulator is not None else self.accumulator

    @property
    def is_exact_float32(self) -> bool:
        """True when this config computes the fused (fmaf) float32 dot product."""
        return (self.accumulator == BINARY32 and self.product is None and self.chunk_size == 0
                and self.rounding == "nearest_even" and self.fused is None)

    def replace(self, **changes) -> "AccumConfig":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        parts = [repr(self.accumulator)]
        parts.append("exact products" if self.product is None else f"products {self.product!r}")
        if self.fused is not None:
            parts.append(repr(self.fused))
        if self.chunk_size:
            chunk = f"chunk {self.chunk_size}"
            if self.chunk_accumulator is not None and self.chunk_accumulator != self.accumulator:
                chunk += f" into {self.chunk_accumulator!r}"
            parts.append(chunk)
        else:
            parts.append("sequential" if self.fused is None else "no promotion")
        if self.fused is None or self.chunk_size:
            parts.append(_ROUNDING_PRETTY[self.rounding])
        if self.rounding == "stochastic":
            parts.append(f"seed {self.seed}")
        return f"AccumConfig({', '.join(parts)})"

    def to_dict(self) -> dict:
        return {
            "accumulator": self.accumulator.to_dict(),
            "product": None if self.product is None else self.product.to_dict(),
            "chunk_size": self.chunk_size,
            "chunk_accumulator": (None if self.chunk_accumulator is None
                                  else self.chunk_accumulator.to_dict()),
            "rounding": self.rounding,
            "seed": self.seed,
            "fused": None if self.fused is None else self.fused.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AccumConfig":
        if isinstance(d, AccumConfig):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"AccumConfig.from_dict expects a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown AccumConfig fields: {sorted(unknown)}")
        return cls(**dict(d))

    def kernel_attrs(self) -> dict:
        """The attributes every accumulation op takes (see custom_ops/tf/ops/accum_ops.cc)."""
        attrs = {
            "accumulator": self.accumulator.kernel_attr(),
            "product": [] if self.product is None else self.product.kernel_attr(),
            "chunk_size": self.chunk_size,
            "chunk_accumulator": self.effective_chunk_accumulator.kernel_attr(),
            "rounding": self.rounding,
            "seed": self.seed,
        }
        if self.fused is not None:  # absent means sequential, so graphs without it still load
            attrs["fused"] = self.fused.kernel_attr()
        return attrs


# Three float32 defaults, one per kind of object:
#   BINARY32        a FloatFormat, the binary32 number format (a preset like BINARY16);
#   FLOAT32_CONFIG  an AccumConfig, one GEMM summed in binary32 with exact products;
#   FLOAT32_POLICY  an AccumPolicy, all three GEMMs of a layer as FLOAT32_CONFIG.
FLOAT32_CONFIG = AccumConfig()  # exact products, binary32 partial sums: the fmaf loop.
FLOAT32 = FLOAT32_CONFIG  # the earlier name, kept


@dataclasses.dataclass(frozen=True)
class AccumPolicy:
    """One AccumConfig per training GEMM of a layer (numerics.md section 4).

    Args:
      fwd: the forward product (``y = x.w``).
      bwd: the gradient with respect to the layer input (``dx = dy.w^T``).
      grad: the gradient with respect to the weights (``dw = x^T.dy``).
      operands: optional format each GEMM's two inputs are rounded to first
        (nearest-even, straight-through gradient), e.g. FP8 E5M2 as in the paper.
    """

    fwd: AccumConfig = FLOAT32_CONFIG
    bwd: AccumConfig = FLOAT32_CONFIG
    grad: AccumConfig = FLOAT32_CONFIG
    operands: Optional[FloatFormat] = None

    def __post_init__(self):
        for name in ("fwd", "bwd", "grad"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = AccumConfig.from_dict(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, AccumConfig):
                raise TypeError(f"AccumPolicy.{name} must be an AccumConfig, "
                                f"got {type(value).__name__}")
        if self.operands is not None:
            object.__setattr__(self, "operands", as_format(self.operands))

    @classmethod
    def uniform(cls, config: AccumConfig, operands: Optional[FloatFormat] = None) -> "AccumPolicy":
        """The same config for all three GEMMs."""
        return cls(fwd=config, bwd=config, grad=config, operands=operands)

    def replace(self, **changes) -> "AccumPolicy":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        ops = "" if self.operands is None else f", operands={self.operands!r}"
        return f"AccumPolicy(fwd={self.fwd!r}, bwd={self.bwd!r}, grad={self.grad!r}{ops})"

    def to_dict(self) -> dict:
        return {
            "fwd": self.fwd.to_dict(),
            "bwd": self.bwd.to_dict(),
            "grad": self.grad.to_dict(),
            "operands": None if self.operands is None else self.operands.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AccumPolicy":
        if isinstance(d, AccumPolicy):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"AccumPolicy.from_dict expects a mapping, got {type(d).__name__}")
        unknown = set(d) - {"fwd", "bwd", "grad", "operands"}
        if unknown:
            raise ValueError(f"unknown AccumPolicy fields: {sorted(unknown)}")
        return cls(
            fwd=AccumConfig.from_dict(d.get("fwd", FLOAT32_CONFIG.to_dict())),
            bwd=AccumConfig.from_dict(d.get("bwd", FLOAT32_CONFIG.to_dict())),
            grad=AccumConfig.from_dict(d.get("grad", FLOAT32_CONFIG.to_dict())),
            operands=None if d.get("operands") is None else FloatFormat.from_dict(d["operands"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AccumPolicy":
        return cls.from_dict(json.loads(text))


FLOAT32_POLICY = AccumPolicy()  # what a tfaccum layer computes outside any scope
FULL_PRECISION = FLOAT32_POLICY  # the earlier name, kept


def as_policy(value: Union[AccumPolicy, AccumConfig]) -> AccumPolicy:
    """An AccumConfig applies to all three GEMMs; an AccumPolicy is returned as is."""
    if isinstance(value, AccumPolicy):
        return value
    if isinstance(value, AccumConfig):
        return AccumPolicy.uniform(value)
    raise TypeError("expected a tfaccum.AccumConfig or tfaccum.AccumPolicy, "
                    f"got {type(value).__name__}")
