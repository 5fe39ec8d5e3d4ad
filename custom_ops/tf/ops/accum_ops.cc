// Op registrations (interfaces and shape functions) of the tfaccum ops. The kernels live
// in ../kernels; the arithmetic in ../../core/rounding.h; the meaning in docs/numerics.md.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "../../core/conv_geometry.h"
#include "../shape_checks.h"

namespace tfaccum {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// The shape behind a handle when every dimension is known and TensorFlow can represent
// it; then the shape function runs the kernel's own checks (shape_checks.h) on it.
bool KnownShape(InferenceContext* c, ShapeHandle s, tensorflow::TensorShape* out) {
  if (!c->FullyDefined(s)) return false;
  std::vector<int64_t> dims(c->Rank(s));
  for (int i = 0; i < c->Rank(s); ++i) dims[i] = c->Value(c->Dim(s, i));
  return tensorflow::TensorShape::BuildTensorShape(dims, out).ok();
}

}  // namespace

// Every accumulating op takes the same configuration attributes (tfaccum.AccumConfig):
// a format is [exponent_bits, mantissa_bits, subnormals, overflow_inf]; an empty
// `product` means exact products. `policy` is the JSON of the layer's AccumPolicy, read
// only by the Python gradient functions (it carries the bwd/grad configurations).
// `fused`, when not empty, is a fused multi-term adder (numerics.md section 7):
// [terms, fraction_bits, zero_exponent, operand_emin, output_rounding (1: toward zero)].
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
      .Attr("policy: string = ''")                                           \
      .Attr("fused: list(int) = []")

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
      bool transpose_a, transpose_b;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_a", &transpose_a));
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));
      tensorflow::TensorShape a_known, b_known;
      if (KnownShape(c, c->input(0), &a_known) && KnownShape(c, c->input(1), &b_known)) {
        int64_t M, N, K;  // the kernel's checks and messages
        TF_RETURN_IF_ERROR(
            MatMulDimensions(a_known, b_known, transpose_a, transpose_b, &M, &N, &K));
        tensorflow::TensorShape out;
        TF_RETURN_IF_ERROR(BuildShape("the output shape", {M, N}, &out));
        c->set_output(0, c->Matrix(M, N));
        return absl::OkStatus();
      }
      ShapeHandle a, b;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &b));
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

absl::Status ReadConvAttrs(InferenceContext* c, ConvAttrs* attrs) {
  std::vector<int32_t> strides, dilations;
  std::string padding;
  std::vector<int64_t> explicit_paddings;
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(c->GetAttr("dilations", &dilations));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
  TF_RETURN_IF_ERROR(c->GetAttr("explicit_paddings", &explicit_paddings));
  return ParseConvAttrs(strides, dilations, padding, explicit_paddings, attrs);
}

// One output spatial size when the input size and kernel size are known, else unknown.
// The messages are the kernel's (conv_geometry.h), with the same operand suffix.
absl::Status OutputDim(InferenceContext* c, int axis, ShapeHandle x, ShapeHandle w,
                       const ConvAttrs& attrs, DimensionHandle* out) {
  DimensionHandle in = c->Dim(x, 1 + axis), k = c->Dim(w, axis);
  if (!c->ValueKnown(in) || !c->ValueKnown(k)) {
    *out = c->UnknownDim();
    return absl::OkStatus();
  }
  int64_t size = 0, pad = 0;
  const int64_t* pads = attrs.explicit_paddings.data() + 2 * axis;
  if (const char* e = WindowedOutputSize(
          axis, c->Value(in), c->Value(k), axis ? attrs.stride_w : attrs.stride_h,
          axis ? attrs.dilation_w : attrs.dilation_h, attrs.padding, pads[0], pads[1], &size,
          &pad))
    return absl::InvalidArgumentError(e + OperandsSuffix(c->DebugString(x), c->DebugString(w)));
  *out = c->MakeDim(size);
  return absl::OkStatus();
}

absl::Status Conv2DShape(InferenceContext* c) {
  ConvAttrs attrs;
  TF_RETURN_IF_ERROR(ReadConvAttrs(c, &attrs));
  tensorflow::TensorShape x_known, w_known;
  if (KnownShape(c, c->input(0), &x_known) && KnownShape(c, c->input(1), &w_known)) {
    ConvGeometry g;  // exactly the kernel's validation
    TF_RETURN_IF_ERROR(ConvGeometryFromShapes(attrs, x_known, w_known, &g));
    c->set_output(0, c->MakeShape({g.batch, g.out_h, g.out_w, g.out_c}));
    return absl::OkStatus();
  }
  ShapeHandle x, w;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &w));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 3), c->Dim(w, 2), &unused));
  DimensionHandle oh, ow;
  TF_RETURN_IF_ERROR(OutputDim(c, 0, x, w, attrs, &oh));
  TF_RETURN_IF_ERROR(OutputDim(c, 1, x, w, attrs, &ow));
  c->set_output(0, c->MakeShape({c->Dim(x, 0), oh, ow, c->Dim(w, 3)}));
  return absl::OkStatus();
}

// The backprop ops output a tensor of the shape given by their size input (int32, or
// int64 for dimensions of 2^31 and more: the gradient functions pass int64). When that
// input is a constant and the other operands' shapes are known, the shape function
// runs the kernel's checks, so a graph fails where the eager op would.
absl::Status BackpropShape(InferenceContext* c, int sizes_input, const char* sizes_name) {
  const tensorflow::Tensor* sizes = c->input_tensor(sizes_input);
  if (sizes == nullptr) {
    // Not a constant (or not evaluated yet: TensorFlow reruns the function once it has
    // evaluated a requested constant input). What is known of it becomes the shape; a
    // value it cannot take as a shape is left to the run above or to the kernel, so that
    // it is reported with the kernel's message rather than a generic one. (One exception:
    // for a constant with a value below -1, TensorFlow's own conversion of the requested
    // partial shape fails first, with "Invalid value in tensor used for shape".)
    ShapeHandle s;
    if (!c->MakeShapeFromShapeTensor(sizes_input, &s).ok() || !c->WithRank(s, 4, &s).ok())
      s = c->UnknownShapeOfRank(4);
    c->set_output(0, s);
    return absl::OkStatus();
  }
  tensorflow::TensorShape shape;
  TF_RETURN_IF_ERROR(ShapeFromSizesTensor(sizes_name, *sizes, &shape));
  ConvAttrs attrs;
  TF_RETURN_IF_ERROR(ReadConvAttrs(c, &attrs));
  const int other = sizes_input == 0 ? 1 : 0;  // the filter (input grad) or input (filter grad)
  tensorflow::TensorShape other_known, dy_known;
  if (KnownShape(c, c->input(other), &other_known)) {
    ConvGeometry g;
    TF_RETURN_IF_ERROR(sizes_input == 0 ? ConvGeometryFromShapes(attrs, shape, other_known, &g)
                                        : ConvGeometryFromShapes(attrs, other_known, shape, &g));
    if (KnownShape(c, c->input(2), &dy_known))
      TF_RETURN_IF_ERROR(CheckOutBackprop(g, dy_known));
  }
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromTensorShape(shape, &out));
  c->set_output(0, out);
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
    .Input("input_sizes: Tsizes")
    .Input("filter: float")
    .Input("out_backprop: float")
    .Input("step: int64")
    .Output("output: float")
    .TFACCUM_CONV_ATTRS
    .TFACCUM_ACCUM_ATTRS
    .Attr("Tsizes: {int32, int64} = DT_INT32")
    .SetShapeFn([](InferenceContext* c) { return BackpropShape(c, 0, "input_sizes"); })
    .Doc("Input gradient; dx[b,iy,ix,ci] sums (ky, kx, co) in row-major order.");

REGISTER_OP("TfaccumConv2DBackpropFilter")
    .Input("input: float")
    .Input("filter_sizes: Tsizes")
    .Input("out_backprop: float")
    .Input("step: int64")
    .Output("output: float")
    .TFACCUM_CONV_ATTRS
    .TFACCUM_ACCUM_ATTRS
    .Attr("Tsizes: {int32, int64} = DT_INT32")
    .SetShapeFn([](InferenceContext* c) { return BackpropShape(c, 1, "filter_sizes"); })
    .Doc("Filter gradient; dw[ky,kx,ci,co] sums (b, oy, ox) in row-major order.");

}  // namespace tfaccum
