// Shape validation shared by the kernels (kernels/op_frontends.h, CPU and GPU) and the
// shape functions (ops/accum_ops.cc): one implementation, so that a graph built with
// known shapes fails at construction with exactly the message the eager kernel gives,
// or gets exactly the shape the eager kernel returns.
//
// Shapes are only ever built through BuildShape: TensorShape's initializer-list
// constructor CHECK-fails (aborts the process) on a dimension product that overflows
// int64, and every size here can be chosen by a caller.
#ifndef TFACCUM_SHAPE_CHECKS_H_
#define TFACCUM_SHAPE_CHECKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "../core/conv_geometry.h"

namespace tfaccum {

// "[1,2,3]", the format of TensorShape::DebugString and InferenceContext::DebugString.
inline std::string DimsString(const int64_t* dims, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

// The shape with these (non-negative) dimensions, or InvalidArgument naming `what` when
// TensorFlow cannot represent it: a running product of the dimensions overflows int64
// (TensorShape's own rule, which a trailing zero dimension does not rescue).
inline absl::Status BuildShape(const std::string& what, const std::vector<int64_t>& dims,
                               tensorflow::TensorShape* shape) {
  int64_t elements = 1;
  for (int64_t d : dims) {
    elements = d < 0 ? -1 : CheckedMul(elements, d);
    if (elements < 0)
      return absl::InvalidArgumentError(
          what + " " + DimsString(dims.data(), static_cast<int>(dims.size())) +
          " is too large: the product of its dimensions overflows int64");
  }
  return tensorflow::TensorShape::BuildTensorShape(dims, shape);
}

// The sizes of a (batched) matrix product c[..., M, N] = op(a[..., :, :]) . op(b[..., :, :])
// (docs/numerics.md section 5). Dimensions before the last two are batch dimensions;
// those of a and b broadcast as tf.matmul's do (NumPy's rule, aligned on the right: equal
// sizes, or a size 1, or a missing dimension, repeat one matrix). Output batch `index`
// (row-major over `batch`) reads matrix AMatrix(index) of a and BMatrix(index) of b.
struct MatMulDims {
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> batch;      // the output's batch dimensions
  int64_t batch_count = 1;         // their product (checked representable by BuildShape)
  std::vector<int64_t> a_strides;  // per output batch dimension: matrices of a to step (0:
  std::vector<int64_t> b_strides;  // broadcast); likewise for b
  bool a_broadcast = false, b_broadcast = false;  // some matrix is read by several outputs

  int64_t AMatrix(int64_t index) const { return Matrix(a_strides, index); }
  int64_t BMatrix(int64_t index) const { return Matrix(b_strides, index); }
  // The output's shape: batch, then [M, N].
  std::vector<int64_t> OutputDims() const {
    std::vector<int64_t> dims = batch;
    dims.push_back(M);
    dims.push_back(N);
    return dims;
  }

 private:
  int64_t Matrix(const std::vector<int64_t>& strides, int64_t index) const {
    int64_t matrix = 0;
    for (int d = static_cast<int>(batch.size()) - 1; d >= 0; --d) {
      matrix += (index % batch[d]) * strides[d];
      index /= batch[d];
    }
    return matrix;
  }
};

// Fills `dims`, or returns InvalidArgument when a or b has rank below 2, the inner
// dimensions differ or the batch dimensions do not broadcast.
inline absl::Status MatMulDimensions(const tensorflow::TensorShape& a,
                                     const tensorflow::TensorShape& b, bool transpose_a,
                                     bool transpose_b, MatMulDims* dims) {
  if (a.dims() < 2)
    return absl::InvalidArgumentError(
        "a must be a matrix or a batch of matrices (rank >= 2), got shape " + a.DebugString());
  if (b.dims() < 2)
    return absl::InvalidArgumentError(
        "b must be a matrix or a batch of matrices (rank >= 2), got shape " + b.DebugString());
  const int ra = a.dims(), rb = b.dims();
  dims->M = a.dim_size(transpose_a ? ra - 1 : ra - 2);
  dims->K = a.dim_size(transpose_a ? ra - 2 : ra - 1);
  const int64_t K_b = b.dim_size(transpose_b ? rb - 1 : rb - 2);
  dims->N = b.dim_size(transpose_b ? rb - 2 : rb - 1);
  if (dims->K != K_b)
    return absl::InvalidArgumentError(
        "inner dimensions differ: a " + a.DebugString() +
        (transpose_a ? " (transposed)" : "") + " has " + std::to_string(dims->K) + ", b " +
        b.DebugString() + (transpose_b ? " (transposed)" : "") + " has " +
        std::to_string(K_b));
  const int na = ra - 2, nb = rb - 2, n = na > nb ? na : nb;
  dims->batch.assign(n, 1);
  dims->a_strides.assign(n, 0);
  dims->b_strides.assign(n, 0);
  dims->a_broadcast = dims->b_broadcast = false;
  // Right-aligned: output batch dimension d is a's dimension d - (n - na), if any.
  int64_t a_step = 1, b_step = 1;  // matrices per unit of the dimension, innermost first
  for (int d = n - 1; d >= 0; --d) {
    const int da = d - (n - na), db = d - (n - nb);
    const int64_t sa = da >= 0 ? a.dim_size(da) : 1, sb = db >= 0 ? b.dim_size(db) : 1;
    if (sa != sb && sa != 1 && sb != 1)
      return absl::InvalidArgumentError(
          "batch dimensions do not broadcast: a " + a.DebugString() + " and b " +
          b.DebugString() + " differ in batch dimension " + std::to_string(d - n) + " (" +
          std::to_string(sa) + " and " + std::to_string(sb) + ")");
    const int64_t size = sa == 1 ? sb : sa;
    dims->batch[d] = size;
    if (sa == size) dims->a_strides[d] = a_step; else dims->a_broadcast = true;
    if (sb == size) dims->b_strides[d] = b_step; else dims->b_broadcast = true;
    a_step *= sa;
    b_step *= sb;
  }
  tensorflow::TensorShape out;
  TF_RETURN_IF_ERROR(BuildShape("the output shape", dims->OutputDims(), &out));
  // The running product of the output's dimensions fits int64, so that of its batch does.
  dims->batch_count = 1;
  for (int64_t s : dims->batch) dims->batch_count *= s;
  return absl::OkStatus();
}

// A 4-element shape input (input_sizes, filter_sizes: int32 or int64; HostMemory on
// the GPU).
inline absl::Status ShapeFromSizesTensor(const char* what, const tensorflow::Tensor& sizes,
                                         tensorflow::TensorShape* shape) {
  if (sizes.dims() != 1 || sizes.NumElements() != 4)
    return absl::InvalidArgumentError(std::string(what) +
                                      " must be a 4-element vector, got shape " +
                                      sizes.shape().DebugString());
  std::vector<int64_t> dims(4);
  for (int i = 0; i < 4; ++i) {
    if (sizes.dtype() == tensorflow::DT_INT64) {
      dims[i] = sizes.vec<int64_t>()(i);
    } else if (sizes.dtype() == tensorflow::DT_INT32) {
      dims[i] = sizes.vec<int32_t>()(i);
    } else {
      return absl::InvalidArgumentError(std::string(what) + " must be int32 or int64");
    }
  }
  for (int i = 0; i < 4; ++i)
    if (dims[i] < 0)
      return absl::InvalidArgumentError(std::string(what) + " must be non-negative, got " +
                                        DimsString(dims.data(), 4));
  return BuildShape(what, dims, shape);
}

// The conv attributes, validated (ValidateConvAttrs).
struct ConvAttrs {
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  ConvPadding padding = kPaddingSame;
  std::vector<int64_t> explicit_paddings = {0, 0, 0, 0};  // always 4 entries
};

inline absl::Status ParseConvAttrs(const std::vector<int32_t>& strides,
                                   const std::vector<int32_t>& dilations,
                                   const std::string& padding,
                                   const std::vector<int64_t>& explicit_paddings,
                                   ConvAttrs* attrs) {
  attrs->padding = padding == "SAME"    ? kPaddingSame
                   : padding == "VALID" ? kPaddingValid
                                        : kPaddingExplicit;
  if (const char* e = ValidateConvAttrs(
          static_cast<int64_t>(strides.size()), strides.data(),
          static_cast<int64_t>(dilations.size()), dilations.data(), attrs->padding,
          static_cast<int64_t>(explicit_paddings.size()), explicit_paddings.data())) {
    std::string message = e;
    if (!explicit_paddings.empty() && attrs->padding != kPaddingExplicit)
      message += ", got " + DimsString(explicit_paddings.data(),
                                       static_cast<int>(explicit_paddings.size())) +
                 " with padding " + padding;
    return absl::InvalidArgumentError(message);
  }
  attrs->stride_h = strides[0], attrs->stride_w = strides[1];
  attrs->dilation_h = dilations[0], attrs->dilation_w = dilations[1];
  if (attrs->padding == kPaddingExplicit) attrs->explicit_paddings = explicit_paddings;
  return absl::OkStatus();
}

// The suffix of a geometry error: which operands it is about.
inline std::string OperandsSuffix(const std::string& input, const std::string& filter) {
  return " (input " + input + ", filter " + filter + ")";
}

// Validates the input and filter shapes and computes the geometry, including that the
// output shape [B, OH, OW, Cout] is representable.
inline absl::Status ConvGeometryFromShapes(const ConvAttrs& attrs,
                                           const tensorflow::TensorShape& input,
                                           const tensorflow::TensorShape& filter,
                                           ConvGeometry* g) {
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
          filter.dim_size(0), filter.dim_size(1), filter.dim_size(3), attrs.stride_h,
          attrs.stride_w, attrs.dilation_h, attrs.dilation_w, attrs.padding,
          attrs.explicit_paddings.data(), g)) {
    return absl::InvalidArgumentError(
        std::string(e) + OperandsSuffix(input.DebugString(), filter.DebugString()));
  }
  tensorflow::TensorShape output;
  return BuildShape("the convolution's output shape", {g->batch, g->out_h, g->out_w, g->out_c},
                    &output);
}

// out_backprop must have the shape of the forward output (compared dimension by
// dimension: the expected shape need not be representable when dy's is not).
inline absl::Status CheckOutBackprop(const ConvGeometry& g,
                                     const tensorflow::TensorShape& dy) {
  const int64_t expected[4] = {g.batch, g.out_h, g.out_w, g.out_c};
  bool same = dy.dims() == 4;
  for (int i = 0; same && i < 4; ++i) same = dy.dim_size(i) == expected[i];
  if (!same)
    return absl::InvalidArgumentError("out_backprop has shape " + dy.DebugString() +
                                      ", the convolution's output has " +
                                      DimsString(expected, 4));
  return absl::OkStatus();
}

}  // namespace tfaccum

#endif  // TFACCUM_SHAPE_CHECKS_H_
