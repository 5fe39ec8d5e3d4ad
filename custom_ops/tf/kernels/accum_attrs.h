// Reads the accumulation attributes every tfaccum op shares (TFACCUM_ACCUM_ATTRS in
// ops/accum_ops.cc) into the rounding core's AccumParams, built and validated by the
// core's builder (core/accum_params.h) that the CUDA launchers use too.
#ifndef TFACCUM_KERNELS_ACCUM_ATTRS_H_
#define TFACCUM_KERNELS_ACCUM_ATTRS_H_

#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "../../core/accum_params.h"
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
// range (rather than a value that no longer fits the int32 fields). The ranges are the
// core's (core/accum_params.h), which the CUDA launchers check too.
inline absl::Status ParseFormat(const char* attr, const std::vector<int64_t>& values,
                                Format* format) {
  if (values.size() != 4) {
    return absl::InvalidArgumentError(
        std::string(attr) + " must be [exponent_bits, mantissa_bits, subnormals, "
        "overflow_inf] (4 integers), got " + std::to_string(values.size()) + " values");
  }
  const int bad = invalid_format_field(values.data());
  if (bad >= 0) {
    const FormatField& field = kFormatFields[bad];
    return absl::InvalidArgumentError(
        std::string(attr) + ": " + field.name + " must be in " + std::to_string(field.lo) +
        ".." + std::to_string(field.hi) + ", got " + std::to_string(values[bad]));
  }
  *format = format_from(values.data());
  return absl::OkStatus();
}

// The optional `fused` attribute (numerics.md section 7): empty for one rounding per
// addition, else [terms, fraction_bits, zero_exponent, operand_emin, output_rounding],
// each checked as the int64 it arrives as, the message naming the field and its value.
inline absl::Status ReadFused(tensorflow::OpKernelConstruction* ctx, const Format& accumulator,
                              AccumParams* params) {
  std::vector<int64_t> fused;
  if (ctx->HasAttr("fused")) TF_RETURN_IF_ERROR(ctx->GetAttr("fused", &fused));
  if (fused.empty()) return absl::OkStatus();
  if (fused.size() != 5) {
    return absl::InvalidArgumentError(
        "fused must be [terms, fraction_bits, zero_exponent, operand_emin, output_rounding] "
        "(5 integers) or empty, got " + std::to_string(fused.size()) + " values");
  }
  const int bad = invalid_fused_field(fused.data());
  if (bad >= 0) {
    const FormatField& field = kFusedFields[bad];
    return absl::InvalidArgumentError(
        std::string("fused: ") + field.name + " must be in " + std::to_string(field.lo) +
        ".." + std::to_string(field.hi) + ", got " + std::to_string(fused[bad]));
  }
  // What set_fused can still refuse is a product format next to the adder.
  if (const char* problem = set_fused(fused.data(), accumulator, params))
    return absl::InvalidArgumentError(problem);
  return absl::OkStatus();
}

// The op's configuration (numerics.md section 3) as the core's builder makes it, with the
// configured seed: WithStep folds in each call's step.
inline absl::Status ReadAccumParams(tensorflow::OpKernelConstruction* ctx,
                                    AccumParams* params) {
  std::vector<int64_t> accumulator, product, chunk_accumulator;
  std::string rounding_name;
  int64_t chunk_size = 0, seed = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr("accumulator", &accumulator));
  TF_RETURN_IF_ERROR(ctx->GetAttr("product", &product));
  TF_RETURN_IF_ERROR(ctx->GetAttr("chunk_size", &chunk_size));
  TF_RETURN_IF_ERROR(ctx->GetAttr("chunk_accumulator", &chunk_accumulator));
  TF_RETURN_IF_ERROR(ctx->GetAttr("rounding", &rounding_name));
  TF_RETURN_IF_ERROR(ctx->GetAttr("seed", &seed));

  int32_t rounding = kNearestEven;
  TF_RETURN_IF_ERROR(ParseRounding(rounding_name, &rounding));
  Format acc, prod, chunk;
  TF_RETURN_IF_ERROR(ParseFormat("accumulator", accumulator, &acc));
  TF_RETURN_IF_ERROR(ParseFormat("chunk_accumulator", chunk_accumulator, &chunk));
  const bool has_product = !product.empty();
  if (has_product) TF_RETURN_IF_ERROR(ParseFormat("product", product, &prod));
  // The rounding and the formats passed the checks above, which name the attribute and
  // the value; what the builder can still refuse is the chunk size.
  if (const char* problem = make_accum_params(acc, has_product ? &prod : nullptr, chunk,
                                              rounding, chunk_size,
                                              static_cast<uint64_t>(seed), params)) {
    return absl::InvalidArgumentError(std::string(problem) + ", got " +
                                      std::to_string(chunk_size));
  }
  return ReadFused(ctx, acc, params);
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
  if (const char* problem = validate_step(value))
    return absl::InvalidArgumentError(std::string(problem) + ", got " + std::to_string(value));
  *step = static_cast<uint64_t>(value);
  return absl::OkStatus();
}

// `params` with its seed replaced by the stream seed of this call's step.
inline absl::Status WithStep(tensorflow::OpKernelContext* ctx, AccumParams params,
                             AccumParams* out) {
  uint64_t step = 0;
  TF_RETURN_IF_ERROR(ReadStep(ctx, &step));
  *out = at_step(params, step);
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
