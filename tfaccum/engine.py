"""Which code the CPU kernels run: the engine's instruction-set path and lane type.

Every path computes the same bits (docs/numerics.md section 6); they differ in speed and
in the instructions they need:

- ``avx512``: round-to-odd sums from two directed-rounding adds (AVX-512 embedded
  rounding); ``avx2`` and ``generic``: the portable TwoSum code compiled for x86-64-v3 and
  for the baseline x86-64.
- ``float32_lanes``: where every product of a tile is exact in binary32 (FP8 operands,
  say), the rounding is nearest-even or toward zero and every format has m <= 21, the
  engine adds in binary32 lanes, twice as many per vector.

The library starts on the best path the processor has, or on the one that the
environment names when it loads: ``TFACCUM_ENGINE_ISA=avx2`` (or ``generic``,
``avx512``; never above what the processor runs) and ``TFACCUM_ENGINE_FLOAT32=0``.

>>> import tfaccum.engine as engine
>>> engine.current().isa in engine.ISAS
True
"""

import contextlib
import ctypes
import dataclasses
import threading
from typing import Iterator, Optional, Tuple

from tfaccum import ops

ISAS: Tuple[str, ...] = ("generic", "avx2", "avx512")  # in the library's numbering

_lock = threading.Lock()
_functions = None


def _library() -> ctypes.CDLL:
    """The op library's C entry points (the same loaded library TensorFlow uses)."""
    global _functions
    with _lock:
        if _functions is None:
            ops.load_library()  # checks the build and registers the ops first
            lib = ctypes.CDLL(ops._library_path())
            lib.tfaccum_engine_get.argtypes = [ctypes.POINTER(ctypes.c_int64)]
            lib.tfaccum_engine_get.restype = None
            lib.tfaccum_engine_set.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.tfaccum_engine_set.restype = ctypes.c_int
            _functions = lib
    return _functions


@dataclasses.dataclass(frozen=True)
class EngineState:
    """The engine's path, and how many tiles each lane type has run since loading."""

    isa: str
    supported_isa: str
    float32_lanes: bool
    tiles_binary64: int
    tiles_binary32: int
    tiles_binary32_redone: int  # binary32 tiles recomputed in binary64 (value out of range)

    @property
    def supported_isas(self) -> Tuple[str, ...]:
        return ISAS[: ISAS.index(self.supported_isa) + 1]


def current() -> EngineState:
    values = (ctypes.c_int64 * 6)()
    _library().tfaccum_engine_get(values)
    return EngineState(ISAS[values[0]], ISAS[values[1]], bool(values[2]),
                       int(values[3]), int(values[4]), int(values[5]))


def set_path(isa: Optional[str] = None, float32_lanes: Optional[bool] = None) -> EngineState:
    """Selects the path for the kernels that run from now on (process-wide); ``None``
    keeps the current setting. ValueError for an unknown ISA or one this processor lacks."""
    state = current()
    isa = state.isa if isa is None else isa
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if isa not in state.supported_isas:
        raise ValueError(f"this processor runs the {', '.join(state.supported_isas)} paths, "
                         f"not {isa!r}")
    lanes = state.float32_lanes if float32_lanes is None else bool(float32_lanes)
    if not _library().tfaccum_engine_set(ISAS.index(isa), int(lanes)):
        raise ValueError(f"the engine refused the {isa!r} path")
    return current()


@contextlib.contextmanager
def path(isa: Optional[str] = None, float32_lanes: Optional[bool] = None) -> Iterator[EngineState]:
    """``set_path`` for the duration of a ``with`` block, restoring the previous path."""
    before = current()
    try:
        yield set_path(isa, float32_lanes)
    finally:
        set_path(before.isa, before.float32_lanes)

