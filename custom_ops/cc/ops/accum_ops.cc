// Op registrations (interfaces and shape functions) of the tfaccum ops. The kernels live
// in ../kernels; the arithmetic in ../rounding.h; the meaning in docs/numerics.md.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "../conv_geometry.h"

namespace tfaccum {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Every accumulating op takes the same configuration attributes (tfaccum.AccumConfig):
// a format is [exponent_bits, mantissa_bits, subnormals, overflow_inf]; an empty
// `product` means exact products. `policy` is the JSON of the layer's AccumPolicy, read
// only by the Python gradient functions (it carries the bwd/grad configurations).
//
// Every op's LAST input is `step`, an int64 scalar >= 0: the training step whose
// stochastic-rounding stream the op draws from (the seed of the draws is
// stream_seed(seed, step), docs/numerics.md section 4). Other rounding modes ignore it.
#define TFACCUM_ACCUM_ATTRS                                                  \
  Attr("accumulator: list(int) = [8, 23, 1, 0]")                             \
      .Attr("product: list(int) = []")                                       \
      .Attr("chunk_size: int = 0")                                           \
      .Attr("chunk_accumulator: list(int) = [8, 23, 1, 0]")                  \
      .Attr("rounding: {'nearest_even', 'toward_zero', 'stochastic'} = 'nearest_even'") \
      .Attr("seed: int = 0")                                                 \
      .Attr("policy: string = ''")

REGISTER_OP("TfaccumQuantize")
    .Input("x: float")
    .Input("step: int64")
    .Output("y: float")
    .Attr("format: list(int)")
    .Attr("rounding: {'nearest_even', 'toward_zero', 'stochastic'} = 'nearest_even'")
    .Attr("seed: int = 0")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc("Rounds each element once to `format`; element index = flat index (counter 0).");

REGISTER_OP("TfaccumMatMul")
    .Input("a: float")
    .Input("b: float")
    .Input("step: int64")
    .Output("y: float")
    .Attr("transpose_a: bool = false")
    .Attr("transpose_b: bool = false")
    .TFACCUM_ACCUM_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle a, b;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &b));
      bool transpose_a, transpose_b;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_a", &transpose_a));
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));
      DimensionHandle m = c->Dim(a, transpose_a ? 1 : 0);
      DimensionHandle k_a = c->Dim(a, transpose_a ? 0 : 1);
      DimensionHandle k_b = c->Dim(b, transpose_b ? 1 : 0);
      DimensionHandle n = c->Dim(b, transpose_b ? 0 : 1);
      DimensionHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(k_a, k_b, &unused));
      c->set_output(0, c->Matrix(m, n));
      return absl::OkStatus();
    })
    .Doc("Matrix product whose dot products accumulate as docs/numerics.md defines.");

// The convolution attributes; strides and dilations are (height, width). `group` of
// `groups`: the op computes that channel group of a grouped convolution (its output is
// channels [group * C, (group + 1) * C) of the whole output), which changes only the
// stochastic element indices: those of the whole output.
#define TFACCUM_CONV_ATTRS                                   \
  Attr("strides: list(int) = [1, 1]")                        \
      .Attr("dilations: list(int) = [1, 1]")                 \
      .Attr("padding: {'SAME', 'VALID', 'EXPLICIT'} = 'SAME'") \
      .Attr("explicit_paddings: list(int) = []")             \
      .Attr("group: int = 0")                                \
      .Attr("groups: int = 1")

namespace {

absl::Status ReadConvAttrs(InferenceContext* c, int64_t* sh, int64_t* sw, int64_t* dh,
                           int64_t* dw, ConvPadding* padding, std::vector<int64_t>* pads) {
  std::vector<int32_t> strides, dilations;
  std::string mode;
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(c->GetAttr("dilations", &dilations));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &mode));
  TF_RETURN_IF_ERROR(c->GetAttr("explicit_paddings", pads));
  if (strides.size() != 2 || dilations.size() != 2)
    return absl::InvalidArgumentError("strides and dilations must have 2 entries (h, w)");
  *sh = strides[0], *sw = strides[1], *dh = dilations[0], *dw = dilations[1];
  *padding = mode == "SAME" ? kPaddingSame : mode == "VALID" ? kPaddingValid : kPaddingExplicit;
  if (*padding == kPaddingExplicit && pads->size() != 4)
    return absl::InvalidArgumentError("explicit_paddings must be [top, bottom, left, right]");
  if (*padding != kPaddingExplicit) pads->assign(4, 0);
  return absl::OkStatus();
}

// One output spatial size, or unknown when the input size is unknown.
absl::Status OutputDim(InferenceContext* c, DimensionHandle in, int64_t k, int64_t stride,
                       int64_t dilation, ConvPadding padding, int64_t before, int64_t after,
                       DimensionHandle* out) {
  if (!c->ValueKnown(in) || k < 0) {
    *out = c->UnknownDim();
    return absl::OkStatus();
  }
  int64_t size = 0, pad = 0;
  if (stride <= 0 || dilation <= 0)
    return absl::InvalidArgumentError("strides and dilations must be positive");
  if (const char* e = WindowedOutputSize(c->Value(in), k, stride, dilation, padding, before,
                                         after, &size, &pad))
    return absl::InvalidArgumentError(e);
  *out = c->MakeDim(size);
  return absl::OkStatus();
}

absl::Status Conv2DShape(InferenceContext* c) {
  ShapeHandle x, w;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &w));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 3), c->Dim(w, 2), &unused));
  int64_t sh = 1, sw = 1, dh = 1, dw = 1;
  ConvPadding padding = kPaddingSame;
  std::vector<int64_t> pads;
  TF_RETURN_IF_ERROR(ReadConvAttrs(c, &sh, &sw, &dh, &dw, &padding, &pads));
  const int64_t kh = c->ValueKnown(c->Dim(w, 0)) ? c->Value(c->Dim(w, 0)) : -1;
  const int64_t kw = c->ValueKnown(c->Dim(w, 1)) ? c->Value(c->Dim(w, 1)) : -1;
  DimensionHandle oh, ow;
  TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 1), kh, sh, dh, padding, pads[0], pads[1], &oh));
  TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 2), kw, sw, dw, padding, pads[2], pads[3], &ow));
  c->set_output(0, c->MakeShape({c->Dim(x, 0), oh, ow, c->Dim(w, 3)}));
  return absl::OkStatus();
}

// The backprop ops output a tensor of the shape given by their int32 size input.
absl::Status ShapeFromSizes(InferenceContext* c, int sizes_input) {
  ShapeHandle s;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(sizes_input, &s));
  TF_RETURN_IF_ERROR(c->WithRank(s, 4, &s));
  c->set_output(0, s);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfaccumConv2D")
    .Input("input: float")
    .Input("filter: float")
    .Input("step: int64")
    .Output("output: float")
    .TFACCUM_CONV_ATTRS
    .TFACCUM_ACCUM_ATTRS
    .SetShapeFn(Conv2DShape)
    .Doc("NHWC convolution; y[b,oy,ox,co] sums (ky, kx, ci) in row-major order.");

REGISTER_OP("TfaccumConv2DBackpropInput")
    .Input("input_sizes: int32")
    .Input("filter: float")
    .Input("out_backprop: float")
    .Input("step: int64")
    .Output("output: float")
    .TFACCUM_CONV_ATTRS
    .TFACCUM_ACCUM_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ShapeFromSizes(c, 0); })
    .Doc("Input gradient; dx[b,iy,ix,ci] sums (ky, kx, co) in row-major order.");

REGISTER_OP("TfaccumConv2DBackpropFilter")
    .Input("input: float")
    .Input("filter_sizes: int32")
    .Input("out_backprop: float")
    .Input("step: int64")
    .Output("output: float")
    .TFACCUM_CONV_ATTRS
    .TFACCUM_ACCUM_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ShapeFromSizes(c, 1); })
    .Doc("Filter gradient; dw[ky,kx,ci,co] sums (b, oy, ox) in row-major order.");

}  // namespace tfaccum
