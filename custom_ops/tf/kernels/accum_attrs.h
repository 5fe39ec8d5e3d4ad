// Reads the accumulation attributes every tfaccum op shares (TFACCUM_ACCUM_ATTRS in
// ops/accum_ops.cc) into the rounding core's AccumParams, validating them.
#ifndef TFACCUM_KERNELS_ACCUM_ATTRS_H_
#define TFACCUM_KERNELS_ACCUM_ATTRS_H_

#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "../../cpu/gemm_engine.h"

namespace tfaccum {

inline absl::Status ParseRounding(const std::string& name, int32_t* rounding) {
  if (name == "nearest_even") *rounding = kNearestEven;
  else if (name == "toward_zero") *rounding = kTowardZero;
  else if (name == "stochastic") *rounding = kStochastic;
  else
    return absl::InvalidArgumentError("rounding must be nearest_even, toward_zero or "
                                      "stochastic, got '" + name + "'");
  return absl::OkStatus();
}

// `values` is [exponent_bits, mantissa_bits, subnormals, overflow_inf]. Each is checked
// as the int64 it arrives as, so that a message names the field, its value and its
// range (rather than a value that no longer fits the int32 fields).
inline absl::Status ParseFormat(const char* attr, const std::vector<int64_t>& values,
                                Format* format) {
  if (values.size() != 4) {
    return absl::InvalidArgumentError(
        std::string(attr) + " must be [exponent_bits, mantissa_bits, subnormals, "
        "overflow_inf] (4 integers), got " + std::to_string(values.size()) + " values");
  }
  static const struct {
    const char* name;
    int64_t lo, hi;
  } kFields[4] = {{"exponent_bits", 2, 8},
                  {"mantissa_bits", 0, 23},
                  {"subnormals", 0, 1},
                  {"overflow_inf (0: saturate, 1: inf)", 0, 1}};
  for (int i = 0; i < 4; ++i) {
    if (values[i] < kFields[i].lo || values[i] > kFields[i].hi)
      return absl::InvalidArgumentError(
          std::string(attr) + ": " + kFields[i].name + " must be in " +
          std::to_string(kFields[i].lo) + ".." + std::to_string(kFields[i].hi) + ", got " +
          std::to_string(values[i]));
  }
  *format = Format{static_cast<int32_t>(values[0]), static_cast<int32_t>(values[1]),
                   static_cast<int32_t>(values[2]), static_cast<int32_t>(values[3])};
  if (const char* problem = validate_format(*format)) {  // the CUDA launchers' rule too
    return absl::InvalidArgumentError(std::string(attr) + ": " + problem);
  }
  return absl::OkStatus();
}

inline absl::Status ReadAccumParams(tensorflow::OpKernelConstruction* ctx,
                                    AccumParams* params) {
  std::vector<int64_t> accumulator, product, chunk_accumulator;
  std::string rounding;
  int64_t chunk_size = 0, seed = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr("accumulator", &accumulator));
  TF_RETURN_IF_ERROR(ctx->GetAttr("product", &product));
  TF_RETURN_IF_ERROR(ctx->GetAttr("chunk_size", &chunk_size));
  TF_RETURN_IF_ERROR(ctx->GetAttr("chunk_accumulator", &chunk_accumulator));
  TF_RETURN_IF_ERROR(ctx->GetAttr("rounding", &rounding));
  TF_RETURN_IF_ERROR(ctx->GetAttr("seed", &seed));

  *params = AccumParams{};
  TF_RETURN_IF_ERROR(ParseRounding(rounding, &params->rounding));
  Format acc, prod{8, 23, 1, 0}, chunk;
  TF_RETURN_IF_ERROR(ParseFormat("accumulator", accumulator, &acc));
  TF_RETURN_IF_ERROR(ParseFormat("chunk_accumulator", chunk_accumulator, &chunk));
  params->has_product = !product.empty();
  if (params->has_product) TF_RETURN_IF_ERROR(ParseFormat("product", product, &prod));
  if (chunk_size < 0) {
    return absl::InvalidArgumentError("chunk_size must be >= 0 (0: sequential), got " +
                                      std::to_string(chunk_size));
  }
  params->accumulator = make_format_params(acc, params->rounding);
  params->product = make_format_params(prod, params->rounding);
  params->chunk_accumulator = make_format_params(chunk, params->rounding);
  params->chunk_size = chunk_size;
  params->seed = static_cast<uint64_t>(seed);
  params->flushes_subnormals =
      !acc.subnormals || !chunk.subnormals || (params->has_product && !prod.subnormals);
  return absl::OkStatus();
}

// The step input, the last input of every tfaccum op: a non-negative int64 scalar (on the
// host for the GPU kernels) that selects the stochastic-rounding stream of a training step.
// Read, and validated, whatever the rounding mode, so that a bad step fails the same way
// under every configuration.
inline absl::Status ReadStep(tensorflow::OpKernelContext* ctx, uint64_t* step) {
  const tensorflow::Tensor& t = ctx->input(ctx->num_inputs() - 1);
  if (t.dtype() != tensorflow::DT_INT64)
    return absl::InvalidArgumentError("step must be an int64 scalar, got dtype " +
                                      tensorflow::DataTypeString(t.dtype()));
  if (t.dims() != 0)
    return absl::InvalidArgumentError("step must be a scalar (the training step), got shape " +
                                      t.shape().DebugString());
  const int64_t value = t.scalar<int64_t>()();
  if (value < 0)
    return absl::InvalidArgumentError("step must be >= 0, got " + std::to_string(value));
  *step = static_cast<uint64_t>(value);
  return absl::OkStatus();
}

// `params` with its seed replaced by the stream seed of this call's step.
inline absl::Status WithStep(tensorflow::OpKernelContext* ctx, AccumParams params,
                             AccumParams* out) {
  uint64_t step = 0;
  TF_RETURN_IF_ERROR(ReadStep(ctx, &step));
  params.seed = stream_seed(params.seed, step);
  *out = params;
  return absl::OkStatus();
}

// The engine's context for one CPU kernel call: TensorFlow's intra-op threads, and
// scratch memory from allocate_temp (TensorFlow's allocator, accounted like any
// temporary and released when the kernel returns). A failed allocation becomes
// ResourceExhausted naming the op and the size, where a std::vector would throw
// std::bad_alloc and kill the process.
class CpuEngine {
 public:
  explicit CpuEngine(tensorflow::OpKernelContext* ctx) : ctx_(ctx) {
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // ParallelForWithWorkerId numbers workers 0 .. NumThreads() (the caller included).
    context_.workers = pool->NumThreads() + 1;
    context_.parallel_for = [pool](int64_t total, int64_t cost_per_unit,
                                   const std::function<void(int64_t, int64_t, int)>& body) {
      if (total <= 0) return;
      pool->ParallelForWithWorkerId(
          total, tensorflow::thread::ThreadPool::SchedulingParams::Adaptive(cost_per_unit),
          body);
    };
    context_.scratch = [this](int64_t bytes, const char* what) -> void* {
      return Allocate(bytes, what);
    };
  }
  CpuEngine(const CpuEngine&) = delete;
  CpuEngine& operator=(const CpuEngine&) = delete;

  const EngineContext& context() const { return context_; }

  // Why the engine returned false (or a scratch() call gave nullptr).
  const absl::Status& failure() const { return failure_; }

 private:
  void* Allocate(int64_t bytes, const char* what) {
    tensorflow::TensorShape shape;
    absl::Status status = tensorflow::TensorShape::BuildTensorShape({bytes}, &shape);
    scratch_.emplace_back();
    if (status.ok()) status = ctx_->allocate_temp(tensorflow::DT_INT8, shape, &scratch_.back());
    if (!status.ok()) {
      failure_ = absl::ResourceExhaustedError(
          ctx_->op_kernel().type_string() + " '" + ctx_->op_kernel().name() +
          "': out of memory for " + std::to_string(bytes) + " bytes of scratch (" + what +
          "): " + std::string(status.message()));
      scratch_.pop_back();
      return nullptr;
    }
    return scratch_.back().flat<int8_t>().data();
  }

  tensorflow::OpKernelContext* ctx_;
  std::vector<tensorflow::Tensor> scratch_;
  absl::Status failure_;
  EngineContext context_;
};

}  // namespace tfaccum

#endif  // TFACCUM_KERNELS_ACCUM_ATTRS_H_
