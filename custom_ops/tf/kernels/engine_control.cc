// C entry points for choosing and inspecting the CPU engine's path from Python
// (tfaccum/engine.py, through ctypes on this same library). Tests use them to run the
// bit-exactness suites through every path in one process; users can read which path runs.
#include <cstdint>

#include "../../cpu/gemm_engine.h"

extern "C" {

// out[0]: ISA in use (0 generic, 1 avx2, 2 avx512); out[1]: best supported ISA;
// out[2]: binary32 lanes allowed; out[3..5]: the engine counters (EngineCounter).
__attribute__((visibility("default"))) void tfaccum_engine_get(int64_t* out) {
  const tfaccum::EnginePath path = tfaccum::GetEnginePath();
  out[0] = path.isa;
  out[1] = path.supported_isa;
  out[2] = path.float32_lanes ? 1 : 0;
  for (int i = 0; i < tfaccum::kEngineCounterCount; ++i) out[3 + i] = path.counters[i];
}

// Returns 1 when set, 0 (changing nothing) for an ISA this processor does not run.
__attribute__((visibility("default"))) int tfaccum_engine_set(int isa, int float32_lanes) {
  return tfaccum::SetEnginePath(isa, float32_lanes != 0) ? 1 : 0;
}

}  // extern "C"
