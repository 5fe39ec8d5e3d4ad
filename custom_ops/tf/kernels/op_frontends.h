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
#include "../../core/conv_geometry.h"
#include "../shape_checks.h"
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

// c[..., M, N] = op(a) . op(b), one GEMM per output batch index `i` (dims.batch_count of
// them, reading matrices dims.AMatrix(i) of a and dims.BMatrix(i) of b), each with the
// stochastic element offset i * M * N: every output's element index is its flat index in
// the whole batched c (numerics.md section 4).
template <typename Device>
absl::Status LaunchMatMul(tensorflow::OpKernelContext* ctx, const AccumParams& params,
                          const MatMulDims& dims, bool transpose_a, bool transpose_b,
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

// ---- Validation ------------------------------------------------------------------
// MatMulDimensions, ShapeFromSizesTensor, ConvGeometryFromShapes, CheckOutBackprop and
// BuildShape live in ../shape_checks.h, shared with the shape functions.

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
    MatMulDims dims;
    OP_REQUIRES_OK(ctx, MatMulDimensions(a.shape(), b.shape(), transpose_a_, transpose_b_,
                                         &dims));
    tensorflow::TensorShape c_shape;
    OP_REQUIRES_OK(ctx, BuildShape("the output shape", dims.OutputDims(), &c_shape));
    tensorflow::Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c_shape, &c));
    if (c->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchMatMul<Device>(ctx, params, dims, transpose_a_, transpose_b_,
                                             a, b, c));
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
    std::vector<int64_t> explicit_paddings;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("explicit_paddings", &explicit_paddings));
    OP_REQUIRES_OK(ctx, ParseConvAttrs(strides, dilations, padding, explicit_paddings,
                                       &attrs_));
    OP_REQUIRES_OK(ctx, ReadAccumParams(ctx, &params_));
    // One group of a grouped convolution: only the stochastic element indices change.
    int64_t group = 0, groups = 1;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("group", &group));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups));
    const char* problem = set_group(group, groups, &params_);
    OP_REQUIRES(ctx, problem == nullptr,
                absl::InvalidArgumentError(std::string(problem) + ", got group " +
                                           std::to_string(group) + " of " +
                                           std::to_string(groups)));
  }

 protected:
  // Validates the input and filter shapes and computes the geometry.
  absl::Status Geometry(const tensorflow::TensorShape& input,
                        const tensorflow::TensorShape& filter, ConvGeometry* g) const {
    return ConvGeometryFromShapes(attrs_, input, filter, g);
  }

  ConvAttrs attrs_;
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
    tensorflow::TensorShape y_shape;  // checked representable by Geometry
    OP_REQUIRES_OK(ctx, BuildShape("the convolution's output shape",
                                   {g.batch, g.out_h, g.out_w, g.out_c}, &y_shape));
    tensorflow::Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
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
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy.shape()));
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
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy.shape()));
    tensorflow::Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, filter_shape, &dw));
    if (dw->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LaunchConv2DBackpropFilter<Device>(ctx, params, g, x, dy, dw));
  }
};

}  // namespace tfaccum

#endif  // TFACCUM_KERNELS_OP_FRONTENDS_H_
