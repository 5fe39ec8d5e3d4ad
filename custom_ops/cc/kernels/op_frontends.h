// The device-independent front end of every tfaccum op, written once for the CPU and the
// GPU kernels (the TensorFlow Addons layout): each op is ONE OpKernel class template over
// a device tag that parses the attributes, validates the operands, allocates the output
// and then calls a small per-device launch function,
//
//   accum_matmul_kernels.cc, accum_conv2d_kernels.cc  Launch*<CpuDevice>: the engine
//   accum_gpu_kernels.cc                              Launch*<GpuDevice>: a CUDA launcher
//
// so both devices accept the same attributes and raise the same errors with the same
// messages (tests/test_matmul.py and tests/test_conv.py match on them). Each .cc defines
// the launch specializations of its device before it registers the kernels.
//
// No CUDA here: the CPU build includes this header and needs no nvcc.
#ifndef TFACCUM_KERNELS_OP_FRONTENDS_H_
#define TFACCUM_KERNELS_OP_FRONTENDS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "../conv_geometry.h"
#include "accum_attrs.h"

namespace tfaccum {

// Device tags of the kernel templates (not Eigen devices: the GPU kernels need no CUDA
// headers).
struct CpuDevice {};
struct GpuDevice {};

// ---- Per-device launches --------------------------------------------------------------
// Called only with validated operands and an allocated, non-empty output; they run (CPU)
// or enqueue (GPU) the computation. Defined, per device, in the kernel .cc files.

template <typename Device>
absl::Status LaunchQuantize(tensorflow::OpKernelContext* ctx, const FormatParams& format,
                            int32_t rounding, uint64_t seed, const tensorflow::Tensor& x,
                            tensorflow::Tensor* y);

// c[M, N] = op(a) . op(b).
template <typename Device>
absl::Status LaunchMatMul(tensorflow::OpKernelContext* ctx, const AccumParams& params,
                          int64_t M, int64_t N, int64_t K, bool transpose_a, bool transpose_b,
                          const tensorflow::Tensor& a, const tensorflow::Tensor& b,
                          tensorflow::Tensor* c);

// y from x and w.
template <typename Device>
absl::Status LaunchConv2D(tensorflow::OpKernelContext* ctx, const AccumParams& params,
                          const ConvGeometry& g, const tensorflow::Tensor& x,
                          const tensorflow::Tensor& w, tensorflow::Tensor* y);

// dx from w and dy.
template <typename Device>
absl::Status LaunchConv2DBackpropInput(tensorflow::OpKernelContext* ctx,
                                       const AccumParams& params, const ConvGeometry& g,
                                       const tensorflow::Tensor& w,
                                       const tensorflow::Tensor& dy, tensorflow::Tensor* dx);

// dw from x and dy.
template <typename Device>
absl::Status LaunchConv2DBackpropFilter(tensorflow::OpKernelContext* ctx,
                                        const AccumParams& params, const ConvGeometry& g,
                                        const tensorflow::Tensor& x,
                                        const tensorflow::Tensor& dy, tensorflow::Tensor* dw);

// ---- Validation helpers ---------------------------------------------------------------

// The logical sizes of c[M, N] = op(a) . op(b), or an error when a or b is not a matrix
// or the inner dimensions differ.
inline absl::Status MatMulDimensions(const tensorflow::TensorShape& a,
                                     const tensorflow::TensorShape& b, bool transpose_a,
                                     bool transpose_b, int64_t* M, int64_t* N, int64_t* K) {
  if (a.dims() != 2)
    return absl::InvalidArgumentError("a must be a matrix (rank 2), got shape " +
                                      a.DebugString());
  if (b.dims() != 2)
    return absl::InvalidArgumentError("b must be a matrix (rank 2), got shape " +
                                      b.DebugString());
  *M = a.dim_size(transpose_a ? 1 : 0);
  *K = a.dim_size(transpose_a ? 0 : 1);
  const int64_t K_b = b.dim_size(transpose_b ? 1 : 0);
  *N = b.dim_size(transpose_b ? 0 : 1);
  if (*K != K_b)
    return absl::InvalidArgumentError(
        "inner dimensions differ: a " + a.DebugString() +
        (transpose_a ? " (transposed)" : "") + " has " + std::to_string(*K) + ", b " +
        b.DebugString() + (transpose_b ? " (transposed)" : "") + " has " +
        std::to_string(K_b));
  return absl::OkStatus();
}

// A 4-element int32 shape input (input_sizes, filter_sizes; HostMemory on the GPU).
inline absl::Status ShapeFromSizesTensor(const char* what, const tensorflow::Tensor& sizes,
                                         tensorflow::TensorShape* shape) {
  if (sizes.dims() != 1 || sizes.NumElements() != 4)
    return absl::InvalidArgumentError(std::string(what) +
                                      " must be a 4-element int32 vector, got shape " +
                                      sizes.shape().DebugString());
  auto v = sizes.vec<int32_t>();
  for (int i = 0; i < 4; ++i)
    if (v(i) < 0) return absl::InvalidArgumentError(std::string(what) + " must be non-negative");
  *shape = tensorflow::TensorShape({v(0), v(1), v(2), v(3)});
  return absl::OkStatus();
}

// ---- The kernels ----------------------------------------------------------------------

template <typename Device>
class QuantizeOp : public tensorflow::OpKernel {
 public:
  explicit QuantizeOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int64_t> format;
    std::string rounding;
    int64_t seed = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("format", &format));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rounding", &rounding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("seed", &seed));
    OP_REQUIRES_OK(ctx, ParseRounding(rounding, &rounding_));
    Format parsed;
    OP_REQUIRES_OK(ctx, ParseFormat("format", format, &parsed));
    format_ = make_format_params(parsed, rounding_);
    seed_ = static_cast<uint64_t>(seed);
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& x = ctx->input(0);
    uint64_t step = 0;
    OP_REQUIRES_OK(ctx, ReadStep(ctx, &step));
    tensorflow::Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (x.NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchQuantize<Device>(ctx, format_, rounding_,
                                               stream_seed(seed_, step), x, y));
  }

 private:
  FormatParams format_;
  int32_t rounding_ = kNearestEven;
  uint64_t seed_ = 0;
};

template <typename Device>
class MatMulOp : public tensorflow::OpKernel {
 public:
  explicit MatMulOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_a", &transpose_a_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
    OP_REQUIRES_OK(ctx, ReadAccumParams(ctx, &params_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& a = ctx->input(0);
    const tensorflow::Tensor& b = ctx->input(1);
    AccumParams params;
    OP_REQUIRES_OK(ctx, WithStep(ctx, params_, &params));
    int64_t M = 0, N = 0, K = 0;
    OP_REQUIRES_OK(ctx, MatMulDimensions(a.shape(), b.shape(), transpose_a_, transpose_b_,
                                         &M, &N, &K));
    tensorflow::Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({M, N}), &c));
    if (M == 0 || N == 0) return;
    OP_REQUIRES_OK(ctx, LaunchMatMul<Device>(ctx, params, M, N, K, transpose_a_,
                                             transpose_b_, a, b, c));
  }

 private:
  bool transpose_a_ = false, transpose_b_ = false;
  AccumParams params_;
};

// Shared by the three conv kernels: attributes, validation and geometry.
class ConvOpBase : public tensorflow::OpKernel {
 public:
  explicit ConvOpBase(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int32_t> strides, dilations;
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("explicit_paddings", &explicit_paddings_));
    OP_REQUIRES(ctx, strides.size() == 2,
                absl::InvalidArgumentError("strides must have 2 entries (height, width)"));
    OP_REQUIRES(ctx, dilations.size() == 2,
                absl::InvalidArgumentError("dilations must have 2 entries (height, width)"));
    OP_REQUIRES(ctx, strides[0] > 0 && strides[1] > 0,
                absl::InvalidArgumentError("strides must be positive"));
    OP_REQUIRES(ctx, dilations[0] > 0 && dilations[1] > 0,
                absl::InvalidArgumentError("dilations must be positive"));
    stride_h_ = strides[0], stride_w_ = strides[1];
    dilation_h_ = dilations[0], dilation_w_ = dilations[1];
    padding_ = padding == "SAME" ? kPaddingSame
               : padding == "VALID" ? kPaddingValid : kPaddingExplicit;
    if (padding_ == kPaddingExplicit) {
      OP_REQUIRES(ctx, explicit_paddings_.size() == 4,
                  absl::InvalidArgumentError(
                      "explicit_paddings must be [top, bottom, left, right] with EXPLICIT padding"));
    } else {
      explicit_paddings_.assign(4, 0);
    }
    OP_REQUIRES_OK(ctx, ReadAccumParams(ctx, &params_));
    // One group of a grouped convolution: only the stochastic element indices change.
    OP_REQUIRES_OK(ctx, ctx->GetAttr("group", &params_.group));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &params_.groups));
    OP_REQUIRES(ctx, params_.groups >= 1 && params_.group >= 0 && params_.group < params_.groups,
                absl::InvalidArgumentError(
                    "group must be in [0, groups) and groups >= 1, got group " +
                    std::to_string(params_.group) + " of " + std::to_string(params_.groups)));
  }

 protected:
  // Validates the input and filter shapes and computes the geometry.
  absl::Status Geometry(const tensorflow::TensorShape& input,
                        const tensorflow::TensorShape& filter, ConvGeometry* g) const {
    if (input.dims() != 4)
      return absl::InvalidArgumentError("input must be NHWC (rank 4), got shape " +
                                        input.DebugString());
    if (filter.dims() != 4)
      return absl::InvalidArgumentError("filter must be [KH, KW, Cin, Cout] (rank 4), got "
                                        "shape " + filter.DebugString());
    if (input.dim_size(3) != filter.dim_size(2))
      return absl::InvalidArgumentError(
          "channel mismatch: input has " + std::to_string(input.dim_size(3)) +
          " channels, filter expects " + std::to_string(filter.dim_size(2)));
    if (const char* e = MakeConvGeometry(
            input.dim_size(0), input.dim_size(1), input.dim_size(2), input.dim_size(3),
            filter.dim_size(0), filter.dim_size(1), filter.dim_size(3), stride_h_, stride_w_,
            dilation_h_, dilation_w_, padding_, explicit_paddings_.data(), g)) {
      return absl::InvalidArgumentError(std::string(e) + " (input " + input.DebugString() +
                                        ", filter " + filter.DebugString() + ")");
    }
    return absl::OkStatus();
  }

  // out_backprop must have the shape of the forward output.
  static absl::Status CheckOutBackprop(const ConvGeometry& g, const tensorflow::Tensor& dy) {
    const tensorflow::TensorShape expected({g.batch, g.out_h, g.out_w, g.out_c});
    if (dy.shape() != expected)
      return absl::InvalidArgumentError("out_backprop has shape " + dy.shape().DebugString() +
                                        ", the convolution's output has " +
                                        expected.DebugString());
    return absl::OkStatus();
  }

  int64_t stride_h_ = 1, stride_w_ = 1, dilation_h_ = 1, dilation_w_ = 1;
  ConvPadding padding_ = kPaddingSame;
  std::vector<int64_t> explicit_paddings_;
  AccumParams params_;
};

// y[b, oy, ox, co] = sum over (ky, kx, ci) of x-tap * w[ky, kx, ci, co].
template <typename Device>
class Conv2DOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& x = ctx->input(0);
    const tensorflow::Tensor& w = ctx->input(1);
    AccumParams params;
    OP_REQUIRES_OK(ctx, WithStep(ctx, params_, &params));
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), w.shape(), &g));
    tensorflow::Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, tensorflow::TensorShape({g.batch, g.out_h, g.out_w, g.out_c}),
                            &y));
    if (y->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchConv2D<Device>(ctx, params, g, x, w, y));
  }
};

// dx[b, iy, ix, ci] = sum over (ky, kx, co) of dy-tap * w[ky, kx, ci, co].
template <typename Device>
class Conv2DBackpropInputOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    tensorflow::TensorShape input_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizesTensor("input_sizes", ctx->input(0), &input_shape));
    const tensorflow::Tensor& w = ctx->input(1);
    const tensorflow::Tensor& dy = ctx->input(2);
    AccumParams params;
    OP_REQUIRES_OK(ctx, WithStep(ctx, params_, &params));
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(input_shape, w.shape(), &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    tensorflow::Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input_shape, &dx));
    if (dx->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchConv2DBackpropInput<Device>(ctx, params, g, w, dy, dx));
  }
};

// dw[ky, kx, ci, co] = sum over (b, oy, ox) of x-tap * dy[b, oy, ox, co].
template <typename Device>
class Conv2DBackpropFilterOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& x = ctx->input(0);
    tensorflow::TensorShape filter_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizesTensor("filter_sizes", ctx->input(1), &filter_shape));
    const tensorflow::Tensor& dy = ctx->input(2);
    AccumParams params;
    OP_REQUIRES_OK(ctx, WithStep(ctx, params_, &params));
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), filter_shape, &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    tensorflow::Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, filter_shape, &dw));
    if (dw->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchConv2DBackpropFilter<Device>(ctx, params, g, x, dy, dw));
  }
};

}  // namespace tfaccum

#endif  // TFACCUM_KERNELS_OP_FRONTENDS_H_
