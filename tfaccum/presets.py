"""Hardware presets: accumulate as a given GPU's tensor cores do.

``tensor_core(arch, operands)`` returns an :class:`~tfaccum.AccumPolicy` whose three GEMMs
use the fused multi-term adder of ``docs/numerics.md`` §7 with that hardware's parameters,
and whose operands are rounded to ``operands`` first::

    >>> from tfaccum import presets
    >>> policy = presets.tensor_core("hopper", "e4m3")
    >>> policy.fwd.fused
    hopper e4m3 (wgmma): fused 32-term adder F=13, toward-zero
    >>> policy.fwd.accumulator, policy.operands
    (e8m13 (overflow=inf), e4m3fn)
    >>> presets.tensor_core("hopper", "e4m3", promote_every=128).fwd.chunk_size
    128

Where the parameters come from
------------------------------
Every number below is the model of Xie et al., "MMA-Sim: Bit-Accurate Reference Model of
Tensor Cores and Matrix Cores" (arXiv 2511.10909; open source as microsoft/MMA-Sim),
whose per-instruction models were checked bit for bit against the GPUs themselves.
Earlier, Fasi, Higham, Mikaitis and Pranesh ("Numerical behavior of NVIDIA tensor
cores", PeerJ Computer Science 7:e330, 2021) established the same structure on Volta,
Turing and Ampere: exact products, alignment to the largest exponent with truncation,
and normalisation toward zero. From MMA-Sim's NVIDIA models (``mmasim/nv_ptx/sim.py`` and
``mmasim/arithmetic/fdpa.py``, ``MMA_T_FDPA(F, rho, L_max, e_zero)``):

* **L** (terms per fused block) is the instruction's bytes of A per block divided by the
  operand size: 8 bytes on Volta, 16 on Turing, Ampere and Ada, 32 on Hopper and
  Blackwell. So fp16/bf16 have L = 4 / 8 / 8 / 8 / 16 / 16, tf32 half that, FP8 twice.
  (Ampere and Ada split their k16 fp16 and k8 tf32 instructions into two blocks; that is
  the same L.)
* **F** (fraction bits kept below the largest exponent): 23 on Volta, 24 on Turing,
  Ampere and Ada, 25 on Hopper and Blackwell; **13** for FP8 inputs on Ada and on
  Hopper (``wgmma``), whose result is then normalised to **e8m13** (``RZ-E8M13``). Blackwell
  (``tcgen05.mma``) keeps F = 25 and a binary32 result for FP8.
* **Output rounding**: toward zero (``RZ-FP32`` / ``RZ-E8M13``) for a float32 result.
* **e_zero** (the exponent of a zero term): -131 on Volta, -132 on Turing, Ampere and Ada,
  -133 on Hopper and Blackwell, as MMA-Sim's current model instantiates it (read from a
  third-party benchmark that builds MMA-Sim's ``MMA_T_FDPA`` per architecture; earlier
  MMA-Sim versions used -126, and before that ignored zeros). It changes a result only
  when every non-zero term of a block lies below ``2^e_zero``, i.e. bf16/tf32 products
  of magnitude below about 2^-131 and a zero running sum.
* **Operand exponents**: an operand below its format's smallest normal enters with that
  exponent (fp16 -14, bf16 and tf32 -126, e4m3 -6, e5m2 -14).

What is not modelled
--------------------
* The operands are rounded to their format by the policy (nearest-even, saturating for
  FP8, as a ``satfinite`` conversion; ``e4m3`` is the OCP "E4M3FN" format NVIDIA GPUs use,
  largest value 448, ``tfaccum.FP8_E4M3FN``). The hardware's own conversion can differ
  elsewhere: TF32 instructions *truncate* float32 inputs. The accumulation is bit-exact
  for operands already in the format, as ``accum_matmul`` with this policy's configs
  shows against the reference.
* The order of the instructions over K: the chain of numerics §7 walks K in order with
  one accumulator per output, as a plain tiled GEMM does. Split-K or stream-K kernels
  add partial results in float32 in another order.
* Half-precision (fp16) results and the block-scaled (MX) formats.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from tfaccum.config import (
    BFLOAT16,
    BINARY16,
    BINARY32,
    FP8_E4M3FN,
    FP8_E5M2,
    AccumConfig,
    AccumPolicy,
    FloatFormat,
    FusedAdder,
    _check_int,
)

ARCHITECTURES = ("volta", "turing", "ampere", "ada", "hopper", "blackwell")

# The input formats, their rounding targets and their smallest normal exponents.
TF32 = FloatFormat(8, 10, overflow="inf")
OPERAND_FORMATS: Dict[str, FloatFormat] = {
    "fp16": BINARY16,
    "bf16": BFLOAT16,
    "tf32": TF32,
    "e4m3": FP8_E4M3FN,  # NVIDIA's E4M3 is OCP E4M3FN: up to 448, no Inf
    "e5m2": FP8_E5M2,
}
_OPERAND_BYTES = {"fp16": 2, "bf16": 2, "tf32": 4, "e4m3": 1, "e5m2": 1}

# Which inputs each architecture's tensor cores take (MMA-Sim's instruction lists).
SUPPORTED_OPERANDS: Dict[str, Tuple[str, ...]] = {
    "volta": ("fp16",),
    "turing": ("fp16",),
    "ampere": ("fp16", "bf16", "tf32"),
    "ada": ("fp16", "bf16", "tf32", "e4m3", "e5m2"),
    "hopper": ("fp16", "bf16", "tf32", "e4m3", "e5m2"),
    "blackwell": ("fp16", "bf16", "tf32", "e4m3", "e5m2"),
}

# Bytes of A per fused block, F, e_zero and the instruction family, per architecture.
_BLOCK_BYTES = {"volta": 8, "turing": 16, "ampere": 16, "ada": 16, "hopper": 32, "blackwell": 32}
_FRACTION_BITS = {"volta": 23, "turing": 24, "ampere": 24, "ada": 24, "hopper": 25,
                  "blackwell": 25}
_ZERO_EXPONENT = {"volta": -131, "turing": -132, "ampere": -132, "ada": -132, "hopper": -133,
                  "blackwell": -133}
_INSTRUCTION = {"volta": "mma", "turing": "mma", "ampere": "mma", "ada": "mma",
                "hopper": "wgmma", "blackwell": "tcgen05.mma"}

# Ada's mma and Hopper's wgmma on FP8 inputs keep 13 fraction bits and an e8m13 result.
_FP8_NARROW = ("ada", "hopper")
E8M13 = FloatFormat(8, 13, overflow="inf")


@dataclasses.dataclass(frozen=True)
class TensorCoreModel:
    """The accumulation of one architecture on one input format."""

    arch: str
    operands: str
    adder: FusedAdder
    accumulator: FloatFormat

    @property
    def operand_format(self) -> FloatFormat:
        return OPERAND_FORMATS[self.operands]

    def config(self, promote_every: int = 0) -> AccumConfig:
        """One GEMM as this hardware sums it (see :func:`fused_config`)."""
        return fused_config(self.adder, self.accumulator, promote_every)


def fused_config(adder: FusedAdder, accumulator: FloatFormat, promote_every: int = 0,
                 promoted_into: FloatFormat = BINARY32) -> AccumConfig:
    """One GEMM summed by ``adder`` into ``accumulator``; ``promote_every > 0`` adds the
    partial sum to a ``promoted_into`` total (nearest-even) every that many products and
    restarts it (numerics.md §7)."""
    promote_every = _check_int("promote_every", promote_every, 0, 2 ** 31 - 1)
    return AccumConfig(accumulator=accumulator, fused=adder, chunk_size=promote_every,
                       chunk_accumulator=promoted_into if promote_every else None,
                       rounding="nearest_even")


def _supported_pairs() -> str:
    return "; ".join(f"{arch}: {', '.join(ops)}" for arch, ops in SUPPORTED_OPERANDS.items())


def model(arch: str, operands: str) -> TensorCoreModel:
    """The :class:`TensorCoreModel` of ``arch`` on ``operands`` (see the module docstring)."""
    if not isinstance(arch, str) or not isinstance(operands, str):
        raise TypeError(f"arch and operands must be strings, got {arch!r} and {operands!r}")
    arch_key, op_key = arch.lower(), operands.lower()
    if arch_key not in SUPPORTED_OPERANDS:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if op_key not in SUPPORTED_OPERANDS[arch_key]:
        raise ValueError(f"{arch_key} tensor cores do not take {operands!r} inputs; "
                         f"supported pairs: {_supported_pairs()}")
    fp8 = op_key in ("e4m3", "e5m2")
    narrow = fp8 and arch_key in _FP8_NARROW
    fraction_bits = 13 if narrow else _FRACTION_BITS[arch_key]
    accumulator = E8M13 if narrow else BINARY32
    adder = FusedAdder(
        terms=_BLOCK_BYTES[arch_key] // _OPERAND_BYTES[op_key],
        fraction_bits=fraction_bits,
        zero_exponent=_ZERO_EXPONENT[arch_key],
        operand_emin=OPERAND_FORMATS[op_key].emin,
        output_rounding="toward_zero",
        hardware=f"{arch_key} {op_key} ({_INSTRUCTION[arch_key]})",
    )
    return TensorCoreModel(arch_key, op_key, adder, accumulator)


def tensor_core(arch: str, operands: str, promote_every: int = 0) -> AccumPolicy:
    """An AccumPolicy: all three GEMMs accumulate as ``arch``'s tensor cores do on
    ``operands`` inputs (one of ``fp16``, ``bf16``, ``tf32``, ``e4m3``, ``e5m2``), with a
    float32 result; the operands are rounded to that format first.

    ``promote_every > 0`` promotes the partial sums to a float32 total every that many
    products (DeepSeek-V3 uses 128 on Hopper FP8). Raises ValueError for an unknown
    architecture or an input format the architecture does not take, listing the
    supported pairs.
    """
    tc = model(arch, operands)
    config = tc.config(promote_every)
    return AccumPolicy(fwd=config, bwd=config, grad=config, operands=tc.operand_format)


def supported() -> Tuple[Tuple[str, str], ...]:
    """Every (arch, operands) pair :func:`tensor_core` accepts."""
    return tuple((arch, op) for arch, ops in SUPPORTED_OPERANDS.items() for op in ops)


def parse_model(spec: str) -> TensorCoreModel:
    """The :class:`TensorCoreModel` of ``"hopper:e4m3"`` (optionally prefixed
    ``"tensor_core:"``), or ValueError naming the form and the supported pairs."""
    if not isinstance(spec, str):
        raise TypeError(f"a tensor-core spec must be a string, got {type(spec).__name__}")
    parts = spec.split(":")
    if parts and parts[0] == "tensor_core":
        parts = parts[1:]
    if len(parts) != 2:
        raise ValueError(f"a tensor-core spec is 'arch:operands' such as 'hopper:e4m3', "
                         f"got {spec!r}; supported pairs: {_supported_pairs()}")
    return model(parts[0], parts[1])


def parse(spec: str, promote_every: int = 0) -> AccumPolicy:
    """``"hopper:e4m3"`` (or ``"tensor_core:hopper:e4m3"``) as :func:`tensor_core` does."""
    tc = parse_model(spec)
    return tensor_core(tc.arch, tc.operands, promote_every)


def hardware_of(config: AccumConfig) -> Optional[str]:
    """The hardware a config models, or None for tfaccum's own arithmetic."""
    if config.fused is None:
        return None
    return config.fused.hardware or "fused adder"
