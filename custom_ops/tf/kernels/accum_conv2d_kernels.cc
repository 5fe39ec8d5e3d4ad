// CPU kernels of the three convolution ops (the CPU launches of the kernels in
// op_frontends.h). Each is the shared accumulation engine with its own row gatherer: the
// rows of A are image patches (forward, filter gradient) or output-gradient patches
// (input gradient), zero where a tap falls outside (§5).
#define EIGEN_USE_THREADS

#include <algorithm>

#include "tensorflow/core/framework/op_kernel.h"
#include "op_frontends.h"

namespace tfaccum {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// One tap of a gathered row: `channels` values from src, or exact zeros where the tap
// falls outside the tensor (src null). The engine's panels arrive uninitialized.
inline void CopyTap(float* out, const float* src, int64_t channels) {
  if (src == nullptr) {
    std::fill(out, out + channels, 0.0f);
  } else {
    std::copy(src, src + channels, out);
  }
}

// y[b, oy, ox, co] = sum over (ky, kx, ci) of x-tap * w[ky, kx, ci, co].
template <>
absl::Status LaunchConv2D<CpuDevice>(OpKernelContext* ctx, const AccumParams& params,
                                     const ConvGeometry& g, const Tensor& x, const Tensor& w,
                                     Tensor* y) {
  const int64_t M = g.batch * g.out_h * g.out_w, K = g.forward_length(), N = g.out_c;
  const float* xd = x.flat<float>().data();
  RowGather gather = [g, xd, K](int64_t row0, int64_t rows, float* panel) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = row0 + r;
      const int64_t ox = row % g.out_w, oy = (row / g.out_w) % g.out_h;
      const int64_t b = row / (g.out_w * g.out_h);
      float* out = panel + r * K;
      for (int64_t ky = 0; ky < g.k_h; ++ky) {
        const int64_t iy = g.input_row(oy, ky);
        for (int64_t kx = 0; kx < g.k_w; ++kx, out += g.in_c) {
          const int64_t ix = g.input_col(ox, kx);
          const bool inside = iy >= 0 && iy < g.in_h && ix >= 0 && ix < g.in_w;
          CopyTap(out, inside ? xd + ((b * g.in_h + iy) * g.in_w + ix) * g.in_c : nullptr,
                  g.in_c);
        }
      }
    }
  };
  // B(k = (ky, kx, ci), co) is the filter in its own layout.
  CpuEngine engine(ctx);
  if (!AccumulateGemm(params, M, N, K, gather, w.flat<float>().data(), N, 1,
                      y->flat<float>().data(), 0, engine.context(),
                      OperandValues{xd, x.NumElements()}))
    return engine.failure();
  return absl::OkStatus();
}

// dx[b, iy, ix, ci] = sum over (ky, kx, co) of dy-tap * w[ky, kx, ci, co].
template <>
absl::Status LaunchConv2DBackpropInput<CpuDevice>(OpKernelContext* ctx,
                                                  const AccumParams& params,
                                                  const ConvGeometry& g, const Tensor& w,
                                                  const Tensor& dy, Tensor* dx) {
  const int64_t M = g.batch * g.in_h * g.in_w, K = g.input_grad_length(), N = g.in_c;

  // B(k = (ky, kx, co), ci) = w[ky, kx, ci, co]: the filter with its last two axes swapped.
  // An empty filter here means Cout = 0 (dx is not empty, so Cin > 0): the sums are empty
  // and B is never read. The swap is skipped then, because its loop over the KH * KW taps
  // would run even with nothing to copy (a filter [2^30, 2^30, 1, 0] is a valid tensor).
  CpuEngine engine(ctx);
  float* w_swapped = nullptr;
  if (w.NumElements() > 0) {
    const int64_t taps = g.k_h * g.k_w;  // fits: w has taps * Cin * Cout elements
    w_swapped = static_cast<float*>(
        engine.context().scratch(w.NumElements() * 4, "the transposed filter"));
    if (w_swapped == nullptr) return engine.failure();
    const float* wd = w.flat<float>().data();
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t ci = 0; ci < g.in_c; ++ci)
        for (int64_t co = 0; co < g.out_c; ++co)
          w_swapped[(t * g.out_c + co) * g.in_c + ci] = wd[(t * g.in_c + ci) * g.out_c + co];
  }

  const float* dyd = dy.flat<float>().data();
  RowGather gather = [g, dyd, K](int64_t row0, int64_t rows, float* panel) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = row0 + r;
      const int64_t ix = row % g.in_w, iy = (row / g.in_w) % g.in_h;
      const int64_t b = row / (g.in_w * g.in_h);
      float* out = panel + r * K;
      for (int64_t ky = 0; ky < g.k_h; ++ky) {
        const int64_t oy = g.output_row(iy, ky);
        for (int64_t kx = 0; kx < g.k_w; ++kx, out += g.out_c) {
          const int64_t ox = g.output_col(ix, kx);
          const bool inside = oy >= 0 && ox >= 0;  // else an exact zero tap
          CopyTap(out, inside ? dyd + ((b * g.out_h + oy) * g.out_w + ox) * g.out_c : nullptr,
                  g.out_c);
        }
      }
    }
  };
  if (!AccumulateGemm(params, M, N, K, gather, w_swapped, N, 1, dx->flat<float>().data(), 0,
                      engine.context(), OperandValues{dyd, dy.NumElements()}))
    return engine.failure();
  return absl::OkStatus();
}

// dw[ky, kx, ci, co] = sum over (b, oy, ox) of x-tap * dy[b, oy, ox, co].
template <>
absl::Status LaunchConv2DBackpropFilter<CpuDevice>(OpKernelContext* ctx,
                                                   const AccumParams& params,
                                                   const ConvGeometry& g, const Tensor& x,
                                                   const Tensor& dy, Tensor* dw) {
  const int64_t M = g.k_h * g.k_w * g.in_c, K = g.filter_grad_length(), N = g.out_c;
  const float* xd = x.flat<float>().data();
  // A row is one (ky, kx, ci) over all (b, oy, ox). The panel is filled one output row
  // (b, oy) at a time, all its rows together, so that their taps (neighbouring channels
  // of one image row, as a rule) are read from the same cache lines; within it each row
  // is a strided copy over the range of ox whose taps fall inside the image, and exact
  // zeros outside it.
  RowGather gather = [g, xd, K](int64_t row0, int64_t rows, float* panel) {
    int64_t ci[kMaxPanelRows], kx[kMaxPanelRows], ky[kMaxPanelRows];
    int64_t ox_begin[kMaxPanelRows], ox_end[kMaxPanelRows];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = row0 + r;
      ci[r] = row % g.in_c, kx[r] = (row / g.in_c) % g.k_w, ky[r] = row / (g.in_c * g.k_w);
      // 0 <= input_col(ox, kx) < in_w  <=>  ox_begin <= ox < ox_end.
      ox_begin[r] = g.out_w, ox_end[r] = 0;
      for (int64_t ox = 0; ox < g.out_w; ++ox) {
        const int64_t ix = g.input_col(ox, kx[r]);
        if (ix < 0 || ix >= g.in_w) continue;
        ox_begin[r] = std::min(ox_begin[r], ox);
        ox_end[r] = ox + 1;
      }
    }
    const int64_t x_step = g.stride_w * g.in_c;  // from one ox to the next
    for (int64_t b = 0; b < g.batch; ++b)
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        const int64_t k0 = (b * g.out_h + oy) * g.out_w;
        for (int64_t r = 0; r < rows; ++r) {
          float* out = panel + r * K + k0;
          const int64_t iy = g.input_row(oy, ky[r]);
          if (iy < 0 || iy >= g.in_h || ox_begin[r] >= ox_end[r]) {
            std::fill(out, out + g.out_w, 0.0f);
            continue;
          }
          std::fill(out, out + ox_begin[r], 0.0f);
          const float* src = xd + ((b * g.in_h + iy) * g.in_w +
                                   g.input_col(ox_begin[r], kx[r])) * g.in_c + ci[r];
          for (int64_t ox = ox_begin[r]; ox < ox_end[r]; ++ox, src += x_step) out[ox] = *src;
          std::fill(out + ox_end[r], out + g.out_w, 0.0f);
        }
      }
  };
  // B(k = (b, oy, ox), co) is out_backprop in its own layout.
  CpuEngine engine(ctx);
  if (!AccumulateGemm(params, M, N, K, gather, dy.flat<float>().data(), N, 1,
                      dw->flat<float>().data(), 0, engine.context(),
                      OperandValues{xd, x.NumElements()}))
    return engine.failure();
  return absl::OkStatus();
}

REGISTER_KERNEL_BUILDER(Name("TfaccumConv2D").Device(DEVICE_CPU), Conv2DOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropInput").Device(DEVICE_CPU),
                        Conv2DBackpropInputOp<CpuDevice>);
REGISTER_KERNEL_BUILDER(Name("TfaccumConv2DBackpropFilter").Device(DEVICE_CPU),
                        Conv2DBackpropFilterOp<CpuDevice>);

}  // namespace tfaccum
