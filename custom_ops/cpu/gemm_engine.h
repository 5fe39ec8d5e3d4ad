// The CPU accumulation engine: C = A.B with every dot product accumulated as
// docs/numerics.md section 3 defines. Matmul and all three conv ops reduce to it: they
// differ only in how a row of A is gathered (a matrix row, an image patch, ...).
//
// No TensorFlow here: the kernels pass a row gatherer and a parallel-for.
#ifndef TFACCUM_GEMM_ENGINE_H_
#define TFACCUM_GEMM_ENGINE_H_

#include <cstdint>
#include <functional>

#include "../core/rounding.h"

namespace tfaccum {

// The engine asks a RowGather for at most this many rows at a time.
constexpr int kMaxPanelRows = 16;

// Fills `panel` (rows x K, row-major, float32) with rows row0 .. row0+rows-1 of A, every
// element of it (taps outside the input are exact zeros): the panel arrives uninitialized,
// because zeroing it first costs a pass over memory that long sums are bound by.
using RowGather = std::function<void(int64_t row0, int64_t rows, float* panel)>;

// The engine's access to the framework's threads and memory.
struct EngineContext {
  // Runs body(begin, end, worker) over [0, total) in parallel; cost_per_unit is a hint in
  // cycles. `worker` is in [0, workers), and no two calls running at the same time get
  // the same one, so per-worker scratch needs no lock.
  std::function<void(int64_t total, int64_t cost_per_unit,
                     const std::function<void(int64_t, int64_t, int)>& body)>
      parallel_for;
  int workers = 1;
  // Returns `bytes` bytes of scratch aligned to 64 that stay valid until the kernel
  // returns, or nullptr when they cannot be had (`what` names them for the error).
  // Called only on the calling thread, before any parallel work: the kernels use the
  // framework's allocator, and an allocation failure must become an error status, never
  // a std::bad_alloc thrown on a worker thread (which would terminate the process).
  std::function<void*(int64_t bytes, const char* what)> scratch;
};

// c[i * N + j] = dot(A row i, B column j) for i < M, j < N, where B(k, j) is
// b[k * b_stride_k + j * b_stride_n]. The stochastic generator's
// element index of c[i * N + j] is element_offset + i * N + j, or with params.groups > 1
// element_offset + i * N * groups + group * N + j (see AccumParams::group).
// Returns false, having written nothing, when scratch memory could not be allocated.
//
// Scratch: B as float32 (K * N values, none when b is already float32 rows of a whole
// number of tiles) and one A panel of min(M, kMaxPanelRows) x K float32 values per
// worker that runs; with a fused adder (AccumParams::fused_terms) also the operand scales
// of B (K * N values) and of each panel (as many again).
//
// `a_values`, when given, holds every value the gatherer can write besides zeros (the
// tensor it gathers from): the binary32 lanes' operand check then reads it once instead
// of every panel, which for convolutions repeats each value KH * KW times.
struct OperandValues {
  const float* data = nullptr;
  int64_t count = 0;
};
bool AccumulateGemm(const AccumParams& params, int64_t M, int64_t N, int64_t K,
                    const RowGather& gather_a, const float* b, int64_t b_stride_k,
                    int64_t b_stride_n, float* c, uint64_t element_offset,
                    const EngineContext& context, const OperandValues& a_values = {});

// Which code the engine runs (gemm_engine.cc): an instruction-set path, and whether the
// binary32 lanes may be used where their preconditions hold (rounding_f32.h). Every
// choice computes the same bits; they differ in speed and in the instructions they need.
enum EngineIsa : int { kEngineGeneric = 0, kEngineAvx2 = 1, kEngineAvx512 = 2 };
enum EngineCounter : int {
  kEngineTiles64 = 0,        // binary64 tiles run
  kEngineTiles32 = 1,        // binary32 tiles kept
  kEngineTiles32Redone = 2,  // binary32 tiles recomputed in binary64 (a value out of range)
  kEngineCounterCount = 3,
};
struct EnginePath {
  int isa;            // in use
  int supported_isa;  // the best this processor runs
  bool float32_lanes;
  int64_t counters[kEngineCounterCount];  // since the library loaded
};
EnginePath GetEnginePath();
// Returns false, changing nothing, for an ISA the processor lacks.
bool SetEnginePath(int isa, bool float32_lanes);

// Elementwise quantization (tfaccum.quantize): element index is the flat index.
void QuantizeArray(const float* x, float* y, int64_t n, const FormatParams& format,
                   int32_t rounding, uint64_t seed, const EngineContext& context);

}  // namespace tfaccum

#endif  // TFACCUM_GEMM_ENGINE_H_
