// Op registrations (interfaces and shape functions) of the tfaccum ops. The kernels live
// in ../kernels; the arithmetic in ../rounding.h; the meaning in docs/numerics.md.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfaccum {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Every accumulating op takes the same configuration attributes (tfaccum.AccumConfig):
// a format is [exponent_bits, mantissa_bits, subnormals, overflow_inf]; an empty
// `product` means exact products. `policy` is the JSON of the layer's AccumPolicy, read
// only by the Python gradient functions (it carries the bwd/grad configurations).
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
    .Output("y: float")
    .Attr("format: list(int)")
    .Attr("rounding: {'nearest_even', 'toward_zero', 'stochastic'} = 'nearest_even'")
    .Attr("seed: int = 0")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc("Rounds each element once to `format`; element index = flat index (counter 0).");

REGISTER_OP("TfaccumMatMul")
    .Input("a: float")
    .Input("b: float")
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

}  // namespace tfaccum
