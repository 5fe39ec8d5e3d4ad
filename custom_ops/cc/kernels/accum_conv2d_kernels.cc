// CPU kernels of the three convolution ops. Each is the shared accumulation engine with
// its own row gatherer: the rows of A are image patches (forward, filter gradient) or
// output-gradient patches (input gradient), zero where a tap falls outside (§5).
#define EIGEN_USE_THREADS

#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "../conv_geometry.h"
#include "accum_attrs.h"

namespace tfaccum {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace {

std::string ShapeString(const TensorShape& s) { return s.DebugString(); }

absl::Status ShapeFromSizesTensor(const char* what, const Tensor& sizes, TensorShape* shape) {
  if (sizes.dims() != 1 || sizes.NumElements() != 4) {
    return absl::InvalidArgumentError(std::string(what) +
                                      " must be a 4-element int32 vector, got shape " +
                                      ShapeString(sizes.shape()));
  }
  auto v = sizes.vec<int32_t>();
  for (int i = 0; i < 4; ++i) {
    if (v(i) < 0) return absl::InvalidArgumentError(std::string(what) + " must be non-negative");
  }
  *shape = TensorShape({v(0), v(1), v(2), v(3)});
  return absl::OkStatus();
}

}  // namespace

// Shared by the three conv kernels: attributes, validation and geometry.
class ConvOpBase : public OpKernel {
 public:
  explicit ConvOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
  }

 protected:
  // Validates the input and filter shapes and computes the geometry.
  absl::Status Geometry(const TensorShape& input, const TensorShape& filter,
                        ConvGeometry* g) const {
    if (input.dims() != 4)
      return absl::InvalidArgumentError("input must be NHWC (rank 4), got shape " +
                                        ShapeString(input));
    if (filter.dims() != 4)
      return absl::InvalidArgumentError("filter must be [KH, KW, Cin, Cout] (rank 4), got "
                                        "shape " + ShapeString(filter));
    if (input.dim_size(3) != filter.dim_size(2))
      return absl::InvalidArgumentError(
          "channel mismatch: input has " + std::to_string(input.dim_size(3)) +
          " channels, filter expects " + std::to_string(filter.dim_size(2)));
    if (const char* e = MakeConvGeometry(
            input.dim_size(0), input.dim_size(1), input.dim_size(2), input.dim_size(3),
            filter.dim_size(0), filter.dim_size(1), filter.dim_size(3), stride_h_, stride_w_,
            dilation_h_, dilation_w_, padding_, explicit_paddings_.data(), g)) {
      return absl::InvalidArgumentError(std::string(e) + " (input " + ShapeString(input) +
                                        ", filter " + ShapeString(filter) + ")");
    }
    return absl::OkStatus();
  }

  absl::Status CheckOutBackprop(const ConvGeometry& g, const Tensor& dy) const {
    const TensorShape expected({g.batch, g.out_h, g.out_w, g.out_c});
    if (dy.shape() != expected)
      return absl::InvalidArgumentError("out_backprop has shape " + ShapeString(dy.shape()) +
                                        ", the convolution's output has " +
                                        ShapeString(expected));
    return absl::OkStatus();
  }

  int64_t stride_h_, stride_w_, dilation_h_, dilation_w_;
  ConvPadding padding_;
  std::vector<int64_t> explicit_paddings_;
  AccumParams params_;
};

// y[b, oy, ox, co] = sum over (ky, kx, ci) of x-tap * w[ky, kx, ci, co].
class Conv2DOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), w.shape(), &g));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_h, g.out_w, g.out_c}), &y));
    const int64_t M = g.batch * g.out_h * g.out_w, K = g.forward_length(), N = g.out_c;
    if (y->NumElements() == 0) return;
    const float* xd = x.flat<float>().data();
    RowGather gather = [g, xd, K](int64_t row0, int64_t rows, double* panel) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row0 + r;
        const int64_t ox = row % g.out_w, oy = (row / g.out_w) % g.out_h;
        const int64_t b = row / (g.out_w * g.out_h);
        double* out = panel + r * K;
        for (int64_t ky = 0; ky < g.k_h; ++ky) {
          const int64_t iy = g.input_row(oy, ky);
          for (int64_t kx = 0; kx < g.k_w; ++kx, out += g.in_c) {
            const int64_t ix = g.input_col(ox, kx);
            if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;  // zeros
            const float* src = xd + ((b * g.in_h + iy) * g.in_w + ix) * g.in_c;
            for (int64_t ci = 0; ci < g.in_c; ++ci) out[ci] = src[ci];
          }
        }
      }
    };
    // B(k = (ky, kx, ci), co) is the filter in its own layout.
    AccumulateGemm(params_, M, N, K, gather, w.flat<float>().data(), N, 1,
                   y->flat<float>().data(), 0, CpuParallelFor(ctx));
  }
};

// dx[b, iy, ix, ci] = sum over (ky, kx, co) of dy-tap * w[ky, kx, ci, co].
class Conv2DBackpropInputOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    TensorShape input_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizesTensor("input_sizes", ctx->input(0), &input_shape));
    const Tensor& w = ctx->input(1);
    const Tensor& dy = ctx->input(2);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(input_shape, w.shape(), &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input_shape, &dx));
    if (dx->NumElements() == 0) return;
    const int64_t M = g.batch * g.in_h * g.in_w, K = g.input_grad_length(), N = g.in_c;

    // B(k = (ky, kx, co), ci) = w[ky, kx, ci, co]: the filter with its last two axes swapped.
    const int64_t taps = g.k_h * g.k_w;
    std::vector<float> w_swapped(static_cast<size_t>(taps * g.in_c * g.out_c));
    const float* wd = w.flat<float>().data();
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t ci = 0; ci < g.in_c; ++ci)
        for (int64_t co = 0; co < g.out_c; ++co)
          w_swapped[(t * g.out_c + co) * g.in_c + ci] = wd[(t * g.in_c + ci) * g.out_c + co];

    const float* dyd = dy.flat<float>().data();
    RowGather gather = [g, dyd, K](int64_t row0, int64_t rows, double* panel) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row0 + r;
        const int64_t ix = row % g.in_w, iy = (row / g.in_w) % g.in_h;
        const int64_t b = row / (g.in_w * g.in_h);
        double* out = panel + r * K;
        for (int64_t ky = 0; ky < g.k_h; ++ky) {
          const int64_t oy = g.output_row(iy, ky);
          for (int64_t kx = 0; kx < g.k_w; ++kx, out += g.out_c) {
            const int64_t ox = g.output_col(ix, kx);
            if (oy < 0 || ox < 0) continue;  // exact zeros
            const float* src = dyd + ((b * g.out_h + oy) * g.out_w + ox) * g.out_c;
            for (int64_t co = 0; co < g.out_c; ++co) out[co] = src[co];
          }
        }
      }
    };
    AccumulateGemm(params_, M, N, K, gather, w_swapped.data(), N, 1,
                   dx->flat<float>().data(), 0, CpuParallelFor(ctx));
  }
};

// dw[ky, kx, ci, co] = sum over (b, oy, ox) of x-tap * dy[b, oy, ox, co].
class Conv2DBackpropFilterOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    TensorShape filter_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizesTensor("filter_sizes", ctx->input(1), &filter_shape));
    const Tensor& dy = ctx->input(2);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), filter_shape, &g));
    OP_REQUIRES_OK(ctx, CheckOutBackprop(g, dy));
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, filter_shape, &dw));
    if (dw->NumElements() == 0) return;
    const int64_t M = g.k_h * g.k_w * g.in_c, K = g.filter_grad_length(), N = g.out_c;
    const float* xd = x.flat<float>().data();
    RowGather gather = [g, xd, K](int64_t row0, int64_t rows, double* panel) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row0 + r;
        const int64_t ci = row % g.in_c, kx = (row / g.in_c) % g.k_w;
        const int64_t ky = row / (g.in_c * g.k_w);
        double* out = panel + r * K;
        for (int64_t b = 0; b < g.batch; ++b)
          for (int64_t oy = 0; oy < g.out_h; ++oy) {
            const int64_t iy = g.input_row(oy, ky);
            for (int64_t ox = 0; ox < g.out_w; ++ox, ++out) {
              const int64_t ix = g.input_col(ox, kx);
              if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;  // zero
              *out = xd[((b * g.in_h + iy) * g.in_w + ix) * g.in_c + ci];
            }
          }
      }
    };
    // B(k = (b, oy, ox), co) is out_backprop in its own layout.
    AccumulateGemm(params_, M, N, K, gather, dy.flat<float>().data(), N, 1,
                   dw->flat<float>().data(), 0, CpuParallelFor(ctx));
  }
};

REGISTER_KERNEL_BUILDER(Name("TfaccumConv2D").Device(DEVICE_CPU), Conv2DOp);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropInput").Device(DEVICE_CPU),
                        Conv2DBackpropInputOp);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropFilter").Device(DEVICE_CPU),
                        Conv2DBackpropFilterOp);

}  // namespace tfaccum
