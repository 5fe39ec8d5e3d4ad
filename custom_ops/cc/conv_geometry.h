// The geometry of a 2-D convolution (NHWC input, [KH, KW, Cin, Cout] filter): output size
// and padding exactly as TensorFlow computes them, and the tap rules of numerics.md §5.
// No TensorFlow here: the CPU kernels, the CUDA kernels and the shape functions share it.
#ifndef TFACCUM_CONV_GEOMETRY_H_
#define TFACCUM_CONV_GEOMETRY_H_

#include <stdint.h>

#include "rounding.h"  // TFACCUM_HD

namespace tfaccum {

enum ConvPadding : int32_t { kPaddingSame = 0, kPaddingValid = 1, kPaddingExplicit = 2 };

struct ConvGeometry {
  int64_t batch, in_h, in_w, in_c;
  int64_t k_h, k_w, out_c;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w;
  int64_t pad_top, pad_left;  // bottom/right padding only shapes out_h/out_w

  // Length of the dot products of each pass (numerics.md §5).
  TFACCUM_HD int64_t forward_length() const { return k_h * k_w * in_c; }
  TFACCUM_HD int64_t input_grad_length() const { return k_h * k_w * out_c; }
  TFACCUM_HD int64_t filter_grad_length() const { return batch * out_h * out_w; }

  // Forward tap: input row of output row oy and kernel row ky (may be outside the image).
  TFACCUM_HD int64_t input_row(int64_t oy, int64_t ky) const {
    return oy * stride_h + ky * dilation_h - pad_top;
  }
  TFACCUM_HD int64_t input_col(int64_t ox, int64_t kx) const {
    return ox * stride_w + kx * dilation_w - pad_left;
  }
  // Input-gradient tap: the output row that input row iy meets through kernel row ky,
  // or -1 when the tap is an exact zero (not an integer, or out of range).
  TFACCUM_HD int64_t output_row(int64_t iy, int64_t ky) const {
    return output_index(iy + pad_top - ky * dilation_h, stride_h, out_h);
  }
  TFACCUM_HD int64_t output_col(int64_t ix, int64_t kx) const {
    return output_index(ix + pad_left - kx * dilation_w, stride_w, out_w);
  }

 private:
  TFACCUM_HD static int64_t output_index(int64_t t, int64_t stride, int64_t size) {
    if (t < 0 || t % stride != 0) return -1;
    const int64_t o = t / stride;
    return o < size ? o : -1;
  }
};

// Output size and leading padding of one spatial dimension, as TensorFlow computes them.
// Returns nullptr, or a message when the (dilated) kernel does not fit.
inline const char* WindowedOutputSize(int64_t in, int64_t k, int64_t stride, int64_t dilation,
                                      ConvPadding padding, int64_t explicit_before,
                                      int64_t explicit_after, int64_t* out,
                                      int64_t* pad_before) {
  const int64_t effective_k = (k - 1) * dilation + 1;
  if (padding == kPaddingSame) {
    *out = (in + stride - 1) / stride;
    const int64_t total = (*out - 1) * stride + effective_k - in;
    *pad_before = total > 0 ? total / 2 : 0;
    return nullptr;
  }
  const int64_t before = padding == kPaddingValid ? 0 : explicit_before;
  const int64_t after = padding == kPaddingValid ? 0 : explicit_after;
  const int64_t span = in + before + after - effective_k;
  if (span < 0) return "the (dilated) kernel is larger than the padded input";
  *out = span / stride + 1;
  *pad_before = before;
  return nullptr;
}

// Fills g from the operand sizes and attributes; returns nullptr or a message.
// explicit_paddings: [top, bottom, left, right] (used with kPaddingExplicit).
inline const char* MakeConvGeometry(int64_t batch, int64_t in_h, int64_t in_w, int64_t in_c,
                                    int64_t k_h, int64_t k_w, int64_t out_c,
                                    int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                                    int64_t dilation_w, ConvPadding padding,
                                    const int64_t* explicit_paddings, ConvGeometry* g) {
  if (stride_h <= 0 || stride_w <= 0) return "strides must be positive";
  if (dilation_h <= 0 || dilation_w <= 0) return "dilations must be positive";
  if (k_h <= 0 || k_w <= 0) return "the filter must have positive height and width";
  const int64_t zero[4] = {0, 0, 0, 0};
  const int64_t* pads = padding == kPaddingExplicit ? explicit_paddings : zero;
  for (int i = 0; i < 4; ++i)
    if (pads[i] < 0) return "explicit paddings must be non-negative";
  *g = ConvGeometry{batch, in_h, in_w, in_c, k_h, k_w, out_c, 0, 0,
                    stride_h, stride_w, dilation_h, dilation_w, 0, 0};
  if (const char* e = WindowedOutputSize(in_h, k_h, stride_h, dilation_h, padding, pads[0],
                                         pads[1], &g->out_h, &g->pad_top))
    return e;
  return WindowedOutputSize(in_w, k_w, stride_w, dilation_w, padding, pads[2], pads[3],
                            &g->out_w, &g->pad_left);
}

}  // namespace tfaccum

#endif  // TFACCUM_CONV_GEOMETRY_H_
