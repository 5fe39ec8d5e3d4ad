// The geometry of a 2-D convolution (NHWC input, [KH, KW, Cin, Cout] filter): output size
// and padding exactly as TensorFlow computes them, and the tap rules of numerics.md §5.
// No TensorFlow here: the CPU kernels, the CUDA kernels and the shape functions share it.
//
// Sizes reach this file from tensor shapes, int32 size tensors and int64 attributes, so
// any of them may be anything up to 2^63 - 1 (an empty tensor can have a dimension of
// 2^40). Every size computed here is overflow-checked: a geometry that does not fit in
// int64 is an error, never a wrapped-around number.
#ifndef TFACCUM_CONV_GEOMETRY_H_
#define TFACCUM_CONV_GEOMETRY_H_

#include <stdint.h>

#include "rounding.h"  // TFACCUM_HD

namespace tfaccum {

// a + b and a * b of non-negative sizes, or -1 when the result exceeds int64.
inline int64_t CheckedAdd(int64_t a, int64_t b) { return a > INT64_MAX - b ? -1 : a + b; }
inline int64_t CheckedMul(int64_t a, int64_t b) {
  return a != 0 && b > INT64_MAX / a ? -1 : a * b;
}

enum ConvPadding : int32_t { kPaddingSame = 0, kPaddingValid = 1, kPaddingExplicit = 2 };

struct ConvGeometry {
  int64_t batch, in_h, in_w, in_c;
  int64_t k_h, k_w, out_c;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w;
  int64_t pad_top, pad_left;  // bottom/right padding only shapes out_h/out_w

  // Length of the dot products of each pass (numerics.md §5). They fit in int64 whenever
  // the pass's output is non-empty, because the operands they are read from are real
  // tensors (see the kernels); callers check the output first.
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

// The error messages of one spatial axis (index 0: height, 1: width). Static strings, so
// that the CUDA launchers' C interface can return them too.
struct ConvAxisMessages {
  const char* filter_empty;
  const char* dilated_overflow;
  const char* padded_overflow;
};

inline const ConvAxisMessages& ConvAxis(int axis) {
  static const ConvAxisMessages kMessages[2] = {
      {"the filter height KH must be positive",
       "the dilated filter height (KH - 1) * dilation_h + 1 overflows int64: the kernel is "
       "larger than the input",
       "the padded input height H + pad_top + pad_bottom overflows int64"},
      {"the filter width KW must be positive",
       "the dilated filter width (KW - 1) * dilation_w + 1 overflows int64: the kernel is "
       "larger than the input",
       "the padded input width W + pad_left + pad_right overflows int64"},
  };
  return kMessages[axis];
}

// Output size and leading padding of one spatial dimension (axis 0: height, 1: width), as
// TensorFlow computes them. Requires in >= 0, stride >= 1, dilation >= 1 and paddings
// >= 0 (MakeConvGeometry checks them). Returns nullptr, or a message when the (dilated)
// kernel does not fit or a size overflows int64.
inline const char* WindowedOutputSize(int axis, int64_t in, int64_t k, int64_t stride,
                                      int64_t dilation, ConvPadding padding,
                                      int64_t explicit_before, int64_t explicit_after,
                                      int64_t* out, int64_t* pad_before) {
  const ConvAxisMessages& messages = ConvAxis(axis);
  if (k <= 0) return messages.filter_empty;
  // (k - 1) * dilation + 1, checked: k comes from a shape and may be near 2^63.
  const int64_t span_k = CheckedMul(k - 1, dilation);
  if (span_k < 0 || span_k == INT64_MAX) return messages.dilated_overflow;
  const int64_t effective_k = span_k + 1;
  if (padding == kPaddingSame) {
    // ceil(in / stride) without forming in + stride - 1, which overflows near 2^63.
    *out = in / stride + (in % stride != 0 ? 1 : 0);
    // total = (out - 1) * stride + effective_k - in, rearranged so that no intermediate
    // overflows: in - (out - 1) * stride lies in [1, stride] (in >= 1), or is stride (in 0).
    const int64_t covered = in > 0 ? in - (*out - 1) * stride : stride;
    const int64_t total = effective_k - covered;
    *pad_before = total > 0 ? total / 2 : 0;
    return nullptr;
  }
  const int64_t before = padding == kPaddingValid ? 0 : explicit_before;
  const int64_t after = padding == kPaddingValid ? 0 : explicit_after;
  const int64_t pads = CheckedAdd(before, after);
  const int64_t padded = pads < 0 ? -1 : CheckedAdd(in, pads);
  if (padded < 0) return messages.padded_overflow;
  if (padded < effective_k) return "the (dilated) kernel is larger than the padded input";
  // padded - effective_k <= 2^63 - 2, so the quotient plus one fits.
  *out = (padded - effective_k) / stride + 1;
  *pad_before = before;
  return nullptr;
}

// The attribute rules every conv op shares (kernels and shape functions alike); returns
// nullptr or a message. explicit_paddings: [top, bottom, left, right] with EXPLICIT,
// otherwise it must be empty (TensorFlow's Conv2D rule: a padding that is silently
// ignored would hide a mistake).
inline const char* ValidateConvAttrs(int64_t n_strides, const int32_t* strides,
                                     int64_t n_dilations, const int32_t* dilations,
                                     ConvPadding padding, int64_t n_pads, const int64_t* pads) {
  if (n_strides != 2) return "strides must have 2 entries (height, width)";
  if (n_dilations != 2) return "dilations must have 2 entries (height, width)";
  if (strides[0] <= 0 || strides[1] <= 0) return "strides must be positive";
  if (dilations[0] <= 0 || dilations[1] <= 0) return "dilations must be positive";
  if (padding == kPaddingExplicit) {
    if (n_pads != 4)
      return "explicit_paddings must be [top, bottom, left, right] with EXPLICIT padding";
    for (int i = 0; i < 4; ++i)
      if (pads[i] < 0) return "explicit_paddings must be non-negative";
  } else if (n_pads != 0) {
    return "explicit_paddings must be empty unless padding is EXPLICIT";
  }
  return nullptr;
}

// Fills g from the operand sizes (all >= 0) and attributes; returns nullptr or a message.
// explicit_paddings: [top, bottom, left, right] (used with kPaddingExplicit).
inline const char* MakeConvGeometry(int64_t batch, int64_t in_h, int64_t in_w, int64_t in_c,
                                    int64_t k_h, int64_t k_w, int64_t out_c,
                                    int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                                    int64_t dilation_w, ConvPadding padding,
                                    const int64_t* explicit_paddings, ConvGeometry* g) {
  if (stride_h <= 0 || stride_w <= 0) return "strides must be positive";
  if (dilation_h <= 0 || dilation_w <= 0) return "dilations must be positive";
  const int64_t zero[4] = {0, 0, 0, 0};
  const int64_t* pads = padding == kPaddingExplicit ? explicit_paddings : zero;
  for (int i = 0; i < 4; ++i)
    if (pads[i] < 0) return "explicit_paddings must be non-negative";
  *g = ConvGeometry{batch, in_h, in_w, in_c, k_h, k_w, out_c, 0, 0,
                    stride_h, stride_w, dilation_h, dilation_w, 0, 0};
  if (const char* e = WindowedOutputSize(0, in_h, k_h, stride_h, dilation_h, padding, pads[0],
                                         pads[1], &g->out_h, &g->pad_top))
    return e;
  return WindowedOutputSize(1, in_w, k_w, stride_w, dilation_w, padding, pads[2], pads[3],
                            &g->out_w, &g->pad_left);
}

}  // namespace tfaccum

#endif  // TFACCUM_CONV_GEOMETRY_H_
