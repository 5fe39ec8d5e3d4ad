"""The fuzz suite's cases, its oracle, and the worker process that runs them.

tests/test_fuzz.py generates the cases (``cases()``), hands them to worker processes
(``python tests/fuzz_worker.py --worker CASES.json``) and turns every case that fails,
crashes or hangs into a test failure naming it. A case is a JSON dict: the op, the
operand shapes and attributes, and a seed for the operand values, so that any case can be
rerun alone::

    python tests/fuzz_worker.py --list [--full]          # the case names
    python tests/fuzz_worker.py --run NAME [NAME ...]    # run cases here, verbosely

For every case the worker calls the op eagerly and inside a tf.function traced with the
operands' static shapes (so the shape functions run), and checks both against
``expect()``, an independent model of the rules: docs/numerics.md's output shapes and
TensorFlow's padding arithmetic done in Python integers, with the int64 limits the
kernels enforce. A case expected to succeed must equal ``tfaccum.reference`` bit for bit
(any NaN equals any NaN); a case expected to fail must raise the expected exception with
the expected message, and the graph must fail with the eager kernel's message.

Raw ops are called only through the ``raw_*`` helpers below (one per op).
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np

INT32_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1
ROUNDINGS = ("nearest_even", "toward_zero", "stochastic")
F32 = [8, 23, 1, 0]
# Products a case may cost the exact reference (each is a few exact rational operations).
REFERENCE_BUDGET = 6000


# --- The raw ops: ONE call site each -----------------------------------------------------
# Every raw-op call of the suite goes through these helpers, so that a change of an op's
# signature is a one-line change here.

# Every raw op takes the stochastic-rounding step as its last input (docs/numerics.md §4);
# the fuzz cases use step 0, whose reference is the step-free one (steps are checked
# against the reference in test_stochastic_steps).
STEP = 0


def raw_quantize(lib, x, fmt, rounding, seed):
    return lib.tfaccum_quantize(x, STEP, format=fmt, rounding=rounding, seed=seed)


def raw_matmul(lib, a, b, transpose_a, transpose_b, accum):
    return lib.tfaccum_mat_mul(a, b, STEP, transpose_a=transpose_a, transpose_b=transpose_b, **accum)


def raw_conv2d(lib, x, w, conv, accum):
    return lib.tfaccum_conv2d(x, w, STEP, **conv, **accum)


def raw_backprop_input(lib, input_sizes, w, dy, conv, accum):
    return lib.tfaccum_conv2d_backprop_input(input_sizes, w, dy, STEP, **conv, **accum)


def raw_backprop_filter(lib, x, filter_sizes, dy, conv, accum):
    return lib.tfaccum_conv2d_backprop_filter(x, filter_sizes, dy, STEP, **conv, **accum)


# --- Case generation (no TensorFlow) ---------------------------------------------------

RAW_OPS = ("raw_quantize", "raw_matmul", "raw_conv2d", "raw_backprop_input",
           "raw_backprop_filter")
PUBLIC_OPS = ("quantize", "matmul", "conv2d", "matmul_grad", "conv2d_grad")
OPS = RAW_OPS + PUBLIC_OPS
HUGE = (2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, INT64_MAX)


def _prefix_fits(dims):
    """TensorFlow's rule for a shape: every running product of its dims fits int64."""
    n = 1
    for d in dims:
        if d < 0 or d > INT64_MAX:
            return False
        n *= d
        if n > INT64_MAX:
            return False
    return True


def _prod(dims):
    n = 1
    for d in dims:
        n *= d
    return n


def _small(rng, lo=0):
    return int(rng.choice([v for v in (0, 1, 1, 2, 2, 3, 3, 4, 5, 7, 8, 9, 16, 17) if v >= lo]))


def _format(rng):
    return [int(rng.integers(2, 9)), int(rng.integers(0, 24)), int(rng.random() < 0.8),
            int(rng.random() < 0.3)]


def _accum(rng):
    """Raw-op accumulation attributes, every field valid."""
    return {
        "accumulator": _format(rng) if rng.random() < 0.85 else list(F32),
        "product": _format(rng) if rng.random() < 0.3 else [],
        "chunk_size": int(rng.choice([0, 0, 1, 2, 3, 5, 64])),
        "chunk_accumulator": _format(rng) if rng.random() < 0.5 else list(F32),
        "rounding": str(rng.choice(ROUNDINGS)),
        "seed": int(rng.choice([0, 1, -1, 12345, INT64_MAX, -2 ** 63,
                                int(rng.integers(-2 ** 62, 2 ** 62))])),
    }


def _break_accum(rng, accum):
    """One out-of-range accumulation attribute."""
    field = str(rng.choice(["accumulator", "chunk_accumulator", "product", "chunk_size",
                            "rounding", "length"]))
    if field == "chunk_size":
        accum["chunk_size"] = int(rng.choice([-1, -2 ** 40]))
    elif field == "rounding":
        accum["rounding"] = "up"
    elif field == "length":
        accum["accumulator"] = accum["accumulator"][:3]
    else:
        fmt = list(accum[field]) if accum[field] else list(F32)
        i = int(rng.integers(0, 4))
        bad = ([1, 9, -1, 2 ** 32 + 8], [-1, 24, 2 ** 32 + 5, -2 ** 40], [2, -1, 2 ** 33],
               [2, -1, 2 ** 33])[i]
        fmt[i] = int(rng.choice(bad))
        accum[field] = fmt


def _config_dict(accum):
    """The AccumConfig arguments equal to valid raw accumulation attributes."""
    def fmt(v):
        return {"exponent_bits": v[0], "mantissa_bits": v[1], "subnormals": bool(v[2]),
                "overflow": "inf" if v[3] else "saturate"}

    return {"accumulator": fmt(accum["accumulator"]),
            "product": fmt(accum["product"]) if accum["product"] else None,
            "chunk_size": accum["chunk_size"],
            "chunk_accumulator": fmt(accum["chunk_accumulator"]),
            "rounding": accum["rounding"], "seed": accum["seed"]}


def _conv_attrs(rng):
    padding = str(rng.choice(["SAME", "VALID", "EXPLICIT"]))
    return {"strides": [int(rng.choice([1, 1, 2, 3])), int(rng.choice([1, 1, 2, 3]))],
            "dilations": [int(rng.choice([1, 1, 2, 3])), int(rng.choice([1, 1, 2]))],
            "padding": padding,
            "explicit_paddings": ([int(v) for v in rng.integers(0, 4, 4)]
                                  if padding == "EXPLICIT" else [])}


def _break_conv(rng, conv):
    kind = str(rng.choice(["stride0", "dilation_neg", "strides3", "explicit_len",
                           "explicit_neg", "explicit_not_explicit", "stride_int32",
                           "explicit_wrap", "dilation_huge"]))
    if kind == "stride0":
        conv["strides"][int(rng.integers(0, 2))] = 0
    elif kind == "dilation_neg":
        conv["dilations"][int(rng.integers(0, 2))] = -2
    elif kind == "strides3":
        conv["strides"] = conv["strides"] + [1]
    elif kind == "explicit_len":
        conv["padding"], conv["explicit_paddings"] = "EXPLICIT", [1, 1]
    elif kind == "explicit_neg":
        conv["padding"], conv["explicit_paddings"] = "EXPLICIT", [0, 1, -1, 0]
    elif kind == "explicit_not_explicit":
        conv["padding"] = str(rng.choice(["SAME", "VALID"]))
        conv["explicit_paddings"] = [0, 0, 1, 1]
    elif kind == "stride_int32":
        conv["strides"][0] = 2 ** 31
    elif kind == "explicit_wrap":
        conv["padding"], conv["explicit_paddings"] = "EXPLICIT", [2 ** 62, 2 ** 62, 0, 0]
    else:
        conv["dilations"][int(rng.integers(0, 2))] = INT32_MAX


def _geometry_shapes(rng, cost_cap):
    """(x_shape, w_shape) of a small conv, within the reference budget."""
    for _ in range(200):
        b, h, w_, cin = _small(rng), _small(rng), _small(rng), _small(rng)
        kh, kw, cout = int(rng.integers(1, 4)), int(rng.integers(1, 4)), _small(rng)
        if b * h * w_ * max(cin, 1) * max(cout, 1) * kh * kw <= cost_cap:
            return [b, h, w_, cin], [kh, kw, cin, cout]
    return [1, 3, 3, 1], [2, 2, 1, 1]


def _hugify(rng, shape):
    """Makes one dimension of `shape` huge and another zero (a valid, empty tensor)."""
    shape = list(shape)
    shape[int(rng.integers(0, len(shape)))] = 0
    shape[int(rng.integers(0, len(shape)))] = int(rng.choice(HUGE))
    if not _prefix_fits(shape) or _prod(shape) != 0:
        shape[0] = 0  # a leading zero makes every running product 0
    return shape


def _values(rng, special):
    return {"seed": int(rng.integers(0, 2 ** 31)), "special": special}


def _random_case(op, rng):
    """One random case of `op`; about one in four has one deliberate fault. Drawn again
    until its operands are valid tensors and, if it should succeed, its output is empty or
    small and within the reference budget."""
    for _ in range(200):
        case = _draw_case(op, rng)
        if _reasonable(case):
            return case
    raise RuntimeError(f"no reasonable {op} case drawn")


def _input_shapes(case):
    keys = ("shape", "a_shape", "b_shape", "x_shape", "w_shape", "dy_shape")
    return [case[k] for k in keys if k in case and not (
        k == "x_shape" and case["op"] == "raw_backprop_input") and not (
        k == "w_shape" and case["op"] == "raw_backprop_filter")]


def _reasonable(case):
    if any(not -2 ** 63 <= v <= INT64_MAX for v in case.get("sizes", [])):
        return False  # not an int64 tensor
    for shape in _input_shapes(case):
        if not _prefix_fits(shape) or _prod(shape) > 10 ** 5:
            return False
    want = expect(case)
    if want.error is not None:
        return True
    shapes = want.shape if isinstance(want.shape, tuple) else (want.shape,)
    if all(_prod(s) == 0 for s in shapes):
        return True
    cost = reference_cost(case)
    return all(_prod(s) <= 10 ** 5 for s in shapes) and cost is not None and \
        cost <= REFERENCE_BUDGET


def _draw_case(op, rng):
    faulty = rng.random() < 0.25
    huge = rng.random() < 0.1
    special = float(rng.choice([0.0, 0.0, 0.05, 0.3]))
    case = {"op": op, "values": _values(rng, special)}
    if op in ("raw_quantize", "quantize"):
        rank = int(rng.integers(0, 5))
        shape = [_small(rng) for _ in range(rank)]
        while _prod(shape) > 300:
            shape = [max(1, d // 2) for d in shape]
        if huge and rank:
            shape = _hugify(rng, shape)
        fmt = _format(rng)
        if faulty and op == "quantize" and rng.random() < 0.3:
            case["dtype"] = "float64"
        elif faulty:
            fmt[int(rng.integers(0, 4))] = int(rng.choice([-1, 30, 2 ** 32]))
        case.update(shape=shape, format=fmt, rounding=str(rng.choice(ROUNDINGS)),
                    seed=int(rng.integers(-2 ** 63, 2 ** 63 - 1)))
        return case

    accum = _accum(rng)
    if op in ("raw_matmul", "matmul", "matmul_grad"):
        for _ in range(100):
            m, n, k = _small(rng), _small(rng), _small(rng)
            cost = m * n * max(k, 1) * (3 if op == "matmul_grad" else 1)
            if cost <= REFERENCE_BUDGET // 4:
                break
        ta, tb = bool(rng.random() < 0.3), bool(rng.random() < 0.3)
        a_shape = [k, m] if ta else [m, k]
        b_shape = [n, k] if tb else [k, n]
        if huge and op != "matmul_grad":
            # A huge M with N = 0 or K = 0 ... (an empty or all-zero output), or both
            # huge: an output shape that overflows int64.
            big = int(rng.choice(HUGE))
            m2, n2, k2 = [(big, 0, 0), (0, big, 0), (big, 0, k), (0, big, k),
                          (2 ** 32 + 1, int(rng.choice(HUGE[2:])), 0)][int(rng.integers(0, 5))]
            a_shape = [k2, m2] if ta else [m2, k2]
            b_shape = [n2, k2] if tb else [k2, n2]
        if faulty and op != "matmul_grad":
            fault = str(rng.choice(["k_mismatch", "rank", "accum"]))
            if fault == "k_mismatch":
                (b_shape if rng.random() < 0.5 else a_shape)[1 if tb else 0] += 1
            elif fault == "rank":  # rank >= 3 is a batched matmul, so only fewer dims
                a_shape = a_shape[:1] if rng.random() < 0.5 else []
            elif op == "raw_matmul":
                _break_accum(rng, accum)
        case.update(a_shape=a_shape, b_shape=b_shape, transpose_a=ta, transpose_b=tb)
    else:
        per_output = 3 if op == "conv2d_grad" else 1
        x_shape, w_shape = _geometry_shapes(rng, REFERENCE_BUDGET // (2 * per_output))
        conv = _conv_attrs(rng)
        if huge and op != "conv2d_grad":
            if rng.random() < 0.5:
                x_shape = _hugify(rng, x_shape)
                w_shape[2] = x_shape[3]
            else:
                w_shape = _hugify(rng, w_shape)
                x_shape[3] = w_shape[2]
        fault = None
        if faulty and op != "conv2d_grad":
            fault = str(rng.choice(["conv", "accum", "channels", "kernel_large", "zero_k",
                                    "rank", "dy", "sizes"]))
            if fault == "conv":
                _break_conv(rng, conv)
            elif fault == "accum" and op.startswith("raw"):
                _break_accum(rng, accum)
            elif fault == "channels":
                w_shape[2] = x_shape[3] + 1
            elif fault == "kernel_large":
                conv.update(padding="VALID", explicit_paddings=[])
                w_shape[0] = x_shape[1] + 1 + int(rng.integers(0, 3))
            elif fault == "zero_k":
                w_shape[int(rng.integers(0, 2))] = 0
            elif fault == "rank":
                x_shape = x_shape[:3]
        case.update(x_shape=x_shape, w_shape=w_shape, conv=conv, fault=fault)
        if op in ("raw_backprop_input", "raw_backprop_filter"):
            geometry = None if conv_attr_error(conv) else conv_geometry(x_shape, w_shape, conv)
            dy_shape = ([x_shape[0], geometry[0], geometry[1], w_shape[3]]
                        if isinstance(geometry, tuple) else [1, 1, 1, 1])
            if fault == "dy":
                dy_shape[int(rng.integers(0, 4))] += 1
            sizes = list(x_shape if op == "raw_backprop_input" else w_shape)
            sizes_dtype = str(rng.choice(["int32", "int64"]))
            if max(sizes + [0]) > INT32_MAX:
                sizes_dtype = "int64"
            if fault == "sizes":
                kind = str(rng.choice(["negative", "length", "huge", "float"]))
                if kind == "negative":
                    sizes[int(rng.integers(0, 4))] = -int(rng.choice([1, 2, 7]))
                elif kind == "length":
                    sizes = sizes[:3]
                elif kind == "huge":
                    sizes, sizes_dtype = [INT32_MAX] * 4, "int32"
                else:
                    sizes_dtype = "float32"
            if fault == "rank" and op == "raw_backprop_input":
                case["w_shape"] = w_shape[:3]
            case.update(dy_shape=dy_shape, sizes=sizes, sizes_dtype=sizes_dtype)
        if op in ("conv2d", "conv2d_grad"):
            case["padding_arg"] = _public_padding(conv)
    if op.startswith("raw"):
        case["accum"] = accum
    else:
        case["config"] = _config_dict(accum)
        if op.endswith("_grad") or rng.random() < 0.3:
            case["policy"] = {"fwd": _config_dict(_accum(rng)), "bwd": _config_dict(_accum(rng)),
                              "grad": _config_dict(accum),
                              "operands": (None if rng.random() < 0.6 else
                                           _config_dict(_accum(rng))["accumulator"])}
    return case


def _public_padding(conv):
    if conv["padding"] != "EXPLICIT":
        return conv["padding"]
    p = conv["explicit_paddings"]
    return [p[0:2], p[2:4]] if len(p) == 4 else [p[0:2]]


def edge_cases():
    """Hand-picked inputs: those of tests/test_limits.py that once crashed the process, and
    every boundary the rules have."""
    v = _values(np.random.default_rng(0), 0.0)
    acc = {"accumulator": list(F32), "product": [], "chunk_size": 0,
           "chunk_accumulator": list(F32), "rounding": "nearest_even", "seed": 0}
    same = {"strides": [1, 1], "dilations": [1, 1], "padding": "SAME", "explicit_paddings": []}

    def conv(**kw):
        return json.loads(json.dumps(dict(same, **kw)))  # a deep copy: cases get mutated

    def case(name, op, **kw):
        c = {"name": "edge/" + name, "op": op, "values": dict(v, **kw.pop("values", {}))}
        if op.startswith("raw"):
            c["accum"] = dict(acc, **kw.pop("accum", {}))
        c.update(kw)
        return c

    cases = [
        # The reproducers of issue 14.
        case("matmul_output_2_66", "matmul", a_shape=[2 ** 33, 0], b_shape=[0, 2 ** 33],
             transpose_a=False, transpose_b=False, config={}),
        case("conv_explicit_2_31", "conv2d", x_shape=[1, 1, 1, 1], w_shape=[1, 1, 1, 1],
             conv=conv(padding="EXPLICIT", explicit_paddings=[2 ** 31] * 4),
             padding_arg=[[2 ** 31, 2 ** 31], [2 ** 31, 2 ** 31]], config={}),
        case("backprop_filter_sizes_int32_max", "raw_backprop_filter", x_shape=[1, 5, 5, 2],
             sizes=[INT32_MAX] * 4, sizes_dtype="int32", dy_shape=[1, 5, 5, 4], conv=conv()),
        case("backprop_input_explicit_2_31", "raw_backprop_input", sizes=[1, 1, 1, 1],
             sizes_dtype="int32", w_shape=[1, 1, 1, 1], dy_shape=[1, 1, 1, 1],
             conv=conv(padding="EXPLICIT", explicit_paddings=[2 ** 31] * 4)),
        case("backprop_input_hang_cout_0", "raw_backprop_input", sizes=[1, 1, 1, 1],
             sizes_dtype="int32", w_shape=[2 ** 30, 2 ** 30, 1, 0], dy_shape=[1, 1, 1, 0],
             conv=conv()),
        case("same_near_int64_max_stride_2", "raw_conv2d", x_shape=[0, INT64_MAX, 1, 1],
             w_shape=[1, 1, 1, 1], conv=conv(strides=[2, 2])),
        case("same_int64_max_wide", "raw_conv2d", x_shape=[0, 3, INT64_MAX, 1],
             w_shape=[3, 3, 1, 2], conv=conv(strides=[1, 3])),
        case("valid_dilated_kernel_overflow", "raw_conv2d", x_shape=[1, 5, 5, 1],
             w_shape=[2 ** 62, 1, 1, 0], conv=conv(padding="VALID", dilations=[4, 1])),
        case("same_dilated_kernel_overflow", "raw_conv2d", x_shape=[1, 5, 5, 1],
             w_shape=[1, 2 ** 62, 1, 0], conv=conv(dilations=[1, 2])),
        case("dilated_kernel_int64_max", "raw_conv2d", x_shape=[0, 5, 5, 1],
             w_shape=[2, 1, 1, 0], conv=conv(padding="VALID", dilations=[INT32_MAX, 1])),
        case("explicit_padding_wraps", "raw_conv2d", x_shape=[1, 1, 1, 1], w_shape=[1, 1, 1, 1],
             conv=conv(padding="EXPLICIT", explicit_paddings=[0, 0, 2 ** 62, 2 ** 62])),
        case("explicit_padding_plus_input_wraps", "raw_conv2d", x_shape=[0, 2, 2, 1],
             w_shape=[1, 1, 1, 1],
             conv=conv(padding="EXPLICIT", explicit_paddings=[INT64_MAX - 1, 0, 0, 0])),
        case("explicit_padding_int64_max_fits", "raw_conv2d", x_shape=[0, 0, 2, 1],
             w_shape=[1, 1, 1, 1],
             conv=conv(padding="EXPLICIT", explicit_paddings=[INT64_MAX, 0, 0, 0])),
        case("explicit_paddings_with_same", "raw_conv2d", x_shape=[1, 3, 3, 1],
             w_shape=[1, 1, 1, 1], conv=conv(explicit_paddings=[1, 1, 1, 1])),
        case("explicit_paddings_with_valid_input_grad", "raw_backprop_input", sizes=[1, 3, 3, 1],
             sizes_dtype="int64", w_shape=[1, 1, 1, 1], dy_shape=[1, 3, 3, 1],
             conv=conv(padding="VALID", explicit_paddings=[0, 0, 0, 0])),
        case("backprop_input_sizes_int32_max", "raw_backprop_input", sizes=[INT32_MAX] * 4,
             sizes_dtype="int32", w_shape=[1, 1, 1, 1], dy_shape=[1, 1, 1, 1], conv=conv()),
        case("backprop_input_sizes_int64_huge", "raw_backprop_input",
             sizes=[0, 2 ** 40, 2 ** 40, 3], sizes_dtype="int64", w_shape=[3, 3, 3, 2],
             dy_shape=[0, 2 ** 40, 2 ** 40, 2], conv=conv()),
        case("backprop_filter_sizes_negative", "raw_backprop_filter", x_shape=[1, 5, 5, 2],
             sizes=[3, -3, 2, 4], sizes_dtype="int32", dy_shape=[1, 5, 5, 4], conv=conv()),
        case("backprop_filter_sizes_minus_one", "raw_backprop_filter", x_shape=[1, 5, 5, 2],
             sizes=[3, 3, -1, 4], sizes_dtype="int64", dy_shape=[1, 5, 5, 4], conv=conv()),
        case("backprop_filter_batch_0", "raw_backprop_filter", x_shape=[0, 5, 5, 2],
             sizes=[3, 3, 2, 4], sizes_dtype="int32", dy_shape=[0, 5, 5, 4], conv=conv(),
             accum={"accumulator": [4, 3, 0, 1], "chunk_size": 2, "rounding": "stochastic"}),
        case("conv_cin_0_huge_kernel", "raw_conv2d", x_shape=[1, 2, 3, 0],
             w_shape=[2 ** 30, 2 ** 30, 0, 2], conv=conv(),
             accum={"accumulator": [5, 2, 1, 0], "chunk_size": 3}),
        case("stride_int32_max", "raw_conv2d", x_shape=[1, 5, 5, 1], w_shape=[2, 2, 1, 1],
             conv=conv(strides=[INT32_MAX, INT32_MAX])),
        case("dilation_int32_max_same", "raw_conv2d", x_shape=[1, 5, 5, 1], w_shape=[2, 2, 1, 1],
             conv=conv(dilations=[INT32_MAX, 1])),
        case("dilation_int32_max_valid", "raw_conv2d", x_shape=[1, 5, 5, 1], w_shape=[2, 2, 1, 1],
             conv=conv(padding="VALID", dilations=[INT32_MAX, 1])),
        case("zero_width_filter", "raw_conv2d", x_shape=[1, 5, 5, 1], w_shape=[3, 0, 1, 1],
             conv=conv()),
        case("matmul_huge_empty_rows", "raw_matmul", a_shape=[2 ** 40, 0], b_shape=[0, 0],
             transpose_a=False, transpose_b=False),
        case("matmul_int64_max_rows", "raw_matmul", a_shape=[0, INT64_MAX], b_shape=[0, 0],
             transpose_a=True, transpose_b=False),
        # An output shape that TensorFlow can represent but no machine can hold: out of
        # memory is an error like any other.
        case("matmul_output_exhausts_memory", "raw_matmul", a_shape=[2 ** 31, 0],
             b_shape=[0, 2 ** 32 - 1], transpose_a=False, transpose_b=False,
             accum={"accumulator": [5, 2, 1, 0]},
             expect_error=["OOM when allocating", ["ResourceExhaustedError"]]),
        case("matmul_k_0", "raw_matmul", a_shape=[5, 0], b_shape=[0, 7], transpose_a=False,
             transpose_b=False, accum={"accumulator": [3, 1, 0, 1], "chunk_size": 2,
                                       "product": [2, 0, 1, 0], "rounding": "stochastic"}),
        case("matmul_n_1_long", "raw_matmul", a_shape=[2, 700], b_shape=[700, 1],
             transpose_a=False, transpose_b=False,
             accum={"accumulator": [5, 6, 1, 0], "chunk_size": 64}),
        case("quantize_huge_empty", "raw_quantize", shape=[2 ** 62, 0, 3], format=[5, 2, 1, 0],
             rounding="stochastic", seed=-1),
        case("quantize_scalar", "raw_quantize", shape=[], format=[2, 0, 0, 1],
             rounding="toward_zero", seed=0, values={"special": 0.5}),
        case("format_value_beyond_int32", "raw_matmul", a_shape=[2, 2], b_shape=[2, 2],
             transpose_a=False, transpose_b=False,
             accum={"accumulator": [8, 2 ** 32 + 10, 1, 0]}),
        case("chunk_size_2_62", "raw_matmul", a_shape=[3, 9], b_shape=[9, 2],
             transpose_a=False, transpose_b=False,
             accum={"chunk_size": 2 ** 62, "accumulator": [4, 5, 1, 0]}),
        case("seed_extremes", "raw_matmul", a_shape=[4, 6], b_shape=[6, 17],
             transpose_a=False, transpose_b=True,
             accum={"rounding": "stochastic", "seed": -2 ** 63, "accumulator": [6, 4, 1, 0]}),
        case("specials_everywhere", "raw_conv2d", x_shape=[2, 4, 4, 3], w_shape=[2, 2, 3, 3],
             conv=conv(padding="EXPLICIT", explicit_paddings=[1, 0, 2, 1], strides=[2, 1]),
             values={"special": 0.5}, accum={"accumulator": [5, 3, 0, 1], "chunk_size": 2,
                                             "product": [4, 3, 1, 0]}),
        case("subnormal_operands", "raw_matmul", a_shape=[3, 8], b_shape=[8, 3],
             transpose_a=False, transpose_b=False,
             values={"special": 1.0}, accum={"accumulator": [8, 10, 1, 0]}),
        case("public_explicit_padding_beyond_int64", "conv2d", x_shape=[1, 1, 1, 1],
             w_shape=[1, 1, 1, 1], conv=conv(padding="EXPLICIT", explicit_paddings=[0] * 4),
             padding_arg=[[2 ** 63, 0], [0, 0]], config={}),
        case("grad_dims_2_31", "conv2d_grad", x_shape=[0, 2 ** 31, 3, 2], w_shape=[3, 1, 2, 4],
             conv=conv(padding="VALID"), padding_arg="VALID", config={}),
        case("grad_empty_cin", "conv2d_grad", x_shape=[2, 3, 3, 0], w_shape=[2, 2, 0, 3],
             conv=conv(), padding_arg="SAME", config={"chunk_size": 2}),
        case("matmul_grad_k_0", "matmul_grad", a_shape=[3, 0], b_shape=[0, 4],
             transpose_a=False, transpose_b=False, config={"rounding": "toward_zero"}),
    ]
    for fault in ("stride0", "dilation_neg", "strides3", "explicit_len", "explicit_neg",
                  "explicit_not_explicit", "stride_int32", "explicit_wrap", "dilation_huge"):
        c = case("conv_attr_" + fault, "raw_conv2d", x_shape=[1, 5, 5, 2], w_shape=[3, 3, 2, 2],
                 conv=conv())
        _break_conv(_FixedChoice(fault), c["conv"])
        cases.append(c)
    for field, value in (("accumulator", [9, 3, 1, 0]), ("product", [5, 24, 1, 0]),
                         ("chunk_accumulator", [5, 3, 2, 0]), ("accumulator", [5, 3, 1, -1]),
                         ("product", [5, 3, 1]), ("chunk_size", -1), ("rounding", "up")):
        cases.append(case(f"accum_{field}_{len(cases)}", "raw_matmul", a_shape=[2, 3],
                          b_shape=[3, 2], transpose_a=False, transpose_b=False,
                          accum={field: value}))
    cases.append(case("raw_dtype_float64", "raw_matmul", a_shape=[2, 3], b_shape=[3, 2],
                      transpose_a=False, transpose_b=False, dtype="float64"))
    cases.append(case("sizes_float32", "raw_backprop_input", sizes=[1, 3, 3, 1],
                      sizes_dtype="float32", w_shape=[1, 1, 1, 1], dy_shape=[1, 3, 3, 1],
                      conv=conv()))
    return cases


class _FixedChoice:
    """A stand-in for the random generator that makes _break_conv pick `kind`."""

    def __init__(self, kind):
        self.kind = kind

    def choice(self, options):
        return self.kind if self.kind in list(options) else options[0]

    def integers(self, lo, hi):
        return lo


def cases(full=False, seed=None):
    """The case list: the edge cases, then random cases of every op (many more when
    ``full``). ``seed`` (default: $TFACCUM_FUZZ_SEED or 0) selects the random cases."""
    if seed is None:
        seed = int(os.environ.get("TFACCUM_FUZZ_SEED", "0"))
    out = edge_cases()
    per_op = 1500 if full else 48
    for op in OPS:
        rng = np.random.default_rng([seed, OPS.index(op)])
        for i in range(per_op):
            c = _random_case(op, rng)
            c["name"] = f"{op}/{seed}-{i}"
            out.append(c)
    return out


# --- The oracle: expected outcome of a case -------------------------------------------
# Mirrors the rules (docs/numerics.md §5, TensorFlow's padding arithmetic) in Python
# integers, with the kernels' int64 limits; written independently of the C++ code.

class Expect:
    def __init__(self, shape=None, error=None, types=("InvalidArgumentError",), kernel=True):
        self.shape = shape      # the output shape (or shapes) of a success
        self.error = error      # a regex of the message of a failure
        self.types = types      # accepted exception class names (eager and graph)
        self.kernel = kernel    # a tfaccum kernel message: the graph must repeat it


def _error(regex, types=("InvalidArgumentError", "ValueError"), kernel=True):
    return Expect(error=regex, types=types, kernel=kernel)


def _dims(dims):
    return re.escape("[" + ",".join(str(d) for d in dims) + "]")


def _too_large(what, dims):
    return _error(re.escape(what) + " " + _dims(dims) + " is too large: the product of its "
                  "dimensions overflows int64")


FIELDS = (("exponent_bits", 2, 8), ("mantissa_bits", 0, 23), ("subnormals", 0, 1),
          ("overflow_inf (0: saturate, 1: inf)", 0, 1))


def format_error(attr, value):
    if len(value) != 4:
        return _error(re.escape(f"{attr} must be [exponent_bits, mantissa_bits, subnormals, "
                                f"overflow_inf] (4 integers), got {len(value)} values"))
    for (name, lo, hi), x in zip(FIELDS, value):
        if not lo <= x <= hi:
            return _error(re.escape(f"{attr}: {name} must be in {lo}..{hi}, got {x}"))
    return None


def accum_errors(accum):
    """(an error TensorFlow raises when it creates the op, an error the kernel raises
    when it is constructed): the rounding enum, then the formats and the chunk size."""
    if accum["rounding"] not in ROUNDINGS:
        return _error(r"rounding", kernel=False), None
    for attr in ("accumulator", "chunk_accumulator"):
        e = format_error(attr, accum[attr])
        if e:
            return None, e
    if accum["product"]:
        e = format_error("product", accum["product"])
        if e:
            return None, e
    if accum["chunk_size"] < 0:
        return None, _error(re.escape(f"chunk_size must be >= 0 (0: sequential), got "
                                      f"{accum['chunk_size']}"))
    return None, None


def conv_attr_range_error(conv):
    """TensorFlow's own check that the list(int) attributes read as int32 fit."""
    for name in ("strides", "dilations"):
        for x in conv[name]:
            if not -2 ** 31 <= x <= INT32_MAX:
                return _error(f"Attr {name} has value {x} out of range for an int32",
                              kernel=False)
    return None


def conv_attr_error(conv):
    s, d, pads = conv["strides"], conv["dilations"], conv["explicit_paddings"]
    if len(s) != 2:
        return _error(r"strides must have 2 entries \(height, width\)")
    if len(d) != 2:
        return _error(r"dilations must have 2 entries \(height, width\)")
    if min(s) <= 0:
        return _error("strides must be positive")
    if min(d) <= 0:
        return _error("dilations must be positive")
    if conv["padding"] == "EXPLICIT":
        if len(pads) != 4:
            return _error(r"explicit_paddings must be \[top, bottom, left, right\] with "
                          "EXPLICIT padding")
        if min(pads) < 0:
            return _error("explicit_paddings must be non-negative")
    elif pads:
        return _error("explicit_paddings must be empty unless padding is EXPLICIT, got "
                      + _dims(pads) + " with padding " + conv["padding"])
    return None


def _axis(axis, size, k, stride, dilation, padding, before, after):
    """(out, pad_before) of one spatial axis, or an Expect error."""
    names = ("height", "H", "KH", "dilation_h", "pad_top + pad_bottom") if axis == 0 else \
        ("width", "W", "KW", "dilation_w", "pad_left + pad_right")
    if k <= 0:
        return _error(f"the filter {names[0]} {names[2]} must be positive")
    effective = (k - 1) * dilation + 1
    if effective > INT64_MAX:
        return _error(re.escape(f"the dilated filter {names[0]} ({names[2]} - 1) * {names[3]} "
                                "+ 1 overflows int64: the kernel is larger than the input"))
    if padding == "SAME":
        out = -(-size // stride)
        return out, max((out - 1) * stride + effective - size, 0) // 2
    if padding == "VALID":
        before = after = 0
    if size + before + after > INT64_MAX:
        return _error(re.escape(f"the padded input {names[0]} {names[1]} + {names[4]} "
                                "overflows int64"))
    if size + before + after < effective:
        return _error(r"the \(dilated\) kernel is larger than the padded input")
    return (size + before + after - effective) // stride + 1, before


def conv_geometry(x_shape, w_shape, conv):
    """(OH, OW, pad_top, pad_left) of valid operands and attributes, else an Expect."""
    if len(x_shape) != 4:
        return _error(r"input must be NHWC \(rank 4\), got shape " + _dims(x_shape))
    if len(w_shape) != 4:
        return _error(r"filter must be \[KH, KW, Cin, Cout\] \(rank 4\), got shape "
                      + _dims(w_shape))
    if x_shape[3] != w_shape[2]:
        return _error(f"channel mismatch: input has {x_shape[3]} channels, filter expects "
                      f"{w_shape[2]}")
    pads = conv["explicit_paddings"] if conv["padding"] == "EXPLICIT" else [0, 0, 0, 0]
    results = []
    for axis in (0, 1):
        r = _axis(axis, x_shape[1 + axis], w_shape[axis], conv["strides"][axis],
                  conv["dilations"][axis], conv["padding"], pads[2 * axis], pads[2 * axis + 1])
        if isinstance(r, Expect):
            return r
        results.append(r)
    (oh, pt), (ow, pl) = results
    out = [x_shape[0], oh, ow, w_shape[3]]
    if not _prefix_fits(out):
        return _too_large("the convolution's output shape", out)
    return oh, ow, pt, pl


def _sizes_error(what, sizes, dtype):
    if dtype not in ("int32", "int64"):
        return _error(r"input_sizes|filter_sizes|Tsizes|int32", types=(
            "InvalidArgumentError", "TypeError"), kernel=False)
    if len(sizes) != 4:
        return _error(re.escape(f"{what} must be a 4-element vector, got shape [{len(sizes)}]"))
    if min(sizes) < 0:
        # In a graph, TensorFlow's own shape conversion rejects a constant below -1 first.
        return _error(re.escape(f"{what} must be non-negative, got ") + _dims(sizes) +
                      "|Invalid value in tensor used for shape")
    if not _prefix_fits(sizes):
        return _too_large(what, sizes)
    return None


def _python_error(regex, types=("ValueError",)):
    return Expect(error=regex, types=types, kernel=False)


def expect(case, graph=False):
    """The outcome `case` must have, eagerly or (graph=True) in a tf.function.

    With several faults the first check that fails decides, and the order differs: an
    eager call constructs the kernel (attributes) before it runs it (shapes); a graph
    runs the shape function (attributes of the convolution, shapes) when it is built and
    constructs the kernel (accumulation attributes) when it runs.
    """
    if "expect_error" in case:  # what the rules cannot know (the machine's memory)
        regex, types = case["expect_error"]
        return Expect(error=regex, types=tuple(types), kernel=False)
    op = case["op"]
    dtype = case.get("dtype", "float32")
    wrong_dtype = _error("float", types=("InvalidArgumentError", "TypeError"), kernel=False)
    if op in ("raw_quantize", "quantize"):
        fmt = case["format"]
        if op == "quantize":
            for (name, lo, hi), x in zip(FIELDS[:2], fmt[:2]):
                if not lo <= x <= hi:
                    return _python_error(re.escape(f"{name} must be in {lo}..{hi}, got {x}"))
            if dtype != "float32":
                return _python_error("must be float32", ("TypeError",))
            return Expect(shape=case["shape"])  # the public op takes (e, m) only
        if dtype != "float32":
            return wrong_dtype
        return format_error("format", fmt) or Expect(shape=case["shape"])

    if op.startswith("raw"):
        enum_error, attr_error = accum_errors(case["accum"])
    else:
        enum_error = attr_error = None

    def first(*checks):
        """The first error of the checks, in the order of this mode."""
        for check in checks:
            e = check()
            if e is not None:
                return e
        return None

    if op in ("raw_matmul", "matmul", "matmul_grad"):
        a, b = case["a_shape"], case["b_shape"]
        if op != "raw_matmul":
            if dtype != "float32":
                return _python_error("must be float32", ("TypeError",))
            for label, s in (("a", a), ("b", b)):
                if len(s) < 2:
                    return _python_error(re.escape(
                        f"{label} must be a matrix or a batch of matrices (rank >= 2)"))

        def shapes():
            for label, s in (("a", a), ("b", b)):
                if len(s) < 2:
                    return _error(re.escape(f"{label} must be a matrix or a batch of matrices "
                                            "(rank >= 2), got shape ") + _dims(s))
            m, k = (a[1], a[0]) if case["transpose_a"] else (a[0], a[1])
            k_b, n = (b[1], b[0]) if case["transpose_b"] else (b[0], b[1])
            if k != k_b:
                return _error(r"inner dimensions differ")
            if not _prefix_fits([m, n]):
                return _too_large("the output shape", [m, n])
            return None

        e = first(lambda: wrong_dtype if dtype != "float32" else None, lambda: enum_error,
                  *((shapes, lambda: attr_error) if graph else (lambda: attr_error, shapes)))
        if e:
            return e
        m = a[1] if case["transpose_a"] else a[0]
        n = b[0] if case["transpose_b"] else b[1]
        return Expect(shape=(a, b)) if op == "matmul_grad" else Expect(shape=[m, n])

    # Convolutions.
    conv = case["conv"]
    if op in ("conv2d", "conv2d_grad"):
        e = _public_conv_error(case)
        if e:
            return e
    if op == "raw_backprop_input":
        x_shape, w_shape = case["sizes"], case["w_shape"]
    elif op == "raw_backprop_filter":
        x_shape, w_shape = case["x_shape"], case["sizes"]
    else:
        x_shape, w_shape = case["x_shape"], case["w_shape"]
    geometry = {}

    def sizes():
        if op == "raw_backprop_input":
            return _sizes_error("input_sizes", case["sizes"], case["sizes_dtype"])
        if op == "raw_backprop_filter":
            return _sizes_error("filter_sizes", case["sizes"], case["sizes_dtype"])
        return None

    def shapes():
        g = conv_geometry(x_shape, w_shape, conv)
        if isinstance(g, Expect):
            return g
        geometry["g"] = g
        out = [x_shape[0], g[0], g[1], w_shape[3]]
        if op.startswith("raw_backprop") and case["dy_shape"] != out:
            return _error(re.escape("out_backprop has shape ") + _dims(case["dy_shape"]) +
                          re.escape(", the convolution's output has ") + _dims(out))
        return None

    sizes_dtype = (lambda: _sizes_error("", [], case["sizes_dtype"])
                   if case.get("sizes_dtype") == "float32" else None)
    tf_level = (lambda: enum_error, sizes_dtype)

    def conv_attrs():  # read by the kernel's constructor and by the shape function
        if op in ("conv2d", "conv2d_grad"):  # the public op checked the rest itself
            return conv_attr_range_error(conv)
        return conv_attr_range_error(conv) or conv_attr_error(conv)

    if not graph:
        order = tf_level + (conv_attrs, lambda: attr_error, sizes, shapes)
    elif op.startswith("raw_backprop"):
        order = tf_level + (sizes, conv_attrs, shapes, lambda: attr_error)
    else:
        order = tf_level + (conv_attrs, shapes, lambda: attr_error)
    e = first(*order)
    if e:
        return e
    g = geometry["g"]
    if op.startswith("raw_backprop"):
        return Expect(shape=case["sizes"])
    if op == "conv2d_grad":
        return Expect(shape=(x_shape, w_shape))
    return Expect(shape=[x_shape[0], g[0], g[1], w_shape[3]])


def _public_conv_error(case):
    """accum_conv2d's own (Python) checks, then the kernel's attribute checks."""
    x, w, conv = case["x_shape"], case["w_shape"], case["conv"]
    if len(x) != 4:
        return _python_error(re.escape("x must be NHWC (rank 4)"))
    if len(w) != 4:
        return _python_error(re.escape("w must be [KH, KW, Cin, Cout] (rank 4)"))
    if x[3] != w[2]:
        if not w[2] or not x[3] or x[3] % w[2]:
            return _python_error("channel mismatch")
        if w[3] % (x[3] // w[2]):
            return _python_error("grouped convolution")
        # else a grouped convolution: x[3] // w[2] groups (numerics.md §4)
    pads = conv["explicit_paddings"]
    arg = case["padding_arg"]
    if not isinstance(arg, str):
        flat = [p for pair in arg for p in pair]
        if len(arg) != 2:
            return _python_error("explicit padding must be")
        if min(flat) < 0:
            return _python_error("explicit padding must be non-negative")
        if max(flat) > INT64_MAX:
            return _python_error("explicit padding must be below 2\\*\\*63")
    elif pads:  # the public op never passes explicit_paddings with SAME/VALID
        pass
    for name in ("strides", "dilations"):
        values = conv[name]
        if len(values) != 2:
            return _python_error(f"{name} must have 2 entries")
        if min(values) <= 0:
            return _python_error(f"{name} must be positive")
    return None


# --- Running a case (TensorFlow) ------------------------------------------------------

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0 ** -149, -3 * 2.0 ** -149,
                      2.0 ** -126, 1.5 * 2.0 ** -127, 3.4028235e38, -3.4028235e38, 2.0 ** 100,
                      65504.0, 1.0, -1.0], np.float64)


def make_array(shape, rng, special):
    """float32 operand values: wide-ranging normals, with a fraction `special` of zeros,
    infinities, NaNs, subnormals and extremes."""
    n = _prod(shape)
    x = rng.standard_normal(n) * np.exp2(rng.integers(-12, 13, n))
    if special:
        pick = rng.random(n) < special
        x[pick] = rng.choice(_SPECIALS, int(pick.sum()))
    return x.astype(np.float32).reshape(shape)


class _Result:
    """An op's output: its shape, and its values unless it is empty (numpy cannot make
    an array of shape [0, 2^62], which TensorFlow can)."""

    def __init__(self, tensor):
        self.shape = [int(d) for d in tensor.shape]
        self.size = _prod(self.shape)
        self.array = tensor.numpy() if self.size else None


class Outcome:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    @property
    def message(self):
        return " ".join((getattr(self.error, "message", None) or str(self.error)).split())

    def describe(self):
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.message[:400]}"
        return f"result of shape {[v.shape for v in self.value]}"


def _numpy_can_hold(shape):
    """numpy refuses even empty arrays whose nominal size overflows (shape [0, 2^63-1])."""
    try:
        np.empty(shape, np.float32)
        return True
    except (ValueError, MemoryError):
        return False


def _bits_equal(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        return False
    both_nan = np.isnan(got) & np.isnan(want)
    return bool(np.all((got.view(np.uint32) == want.view(np.uint32)) | both_nan))


def _first_difference(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = np.flatnonzero((got.view(np.uint32) != want.view(np.uint32)) & ~both_nan)
    i = bad[0]
    return f"{bad.size} of {got.size} differ; first at flat {i}: got {got.flat[i]!r}, want {want.flat[i]!r}"


class Runner:
    """Runs cases in this process (the worker)."""

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf  # noqa: WPS433 (only the worker needs TensorFlow)

        import tfaccum
        from tfaccum import reference

        self.tf, self.tfaccum, self.reference = tf, tfaccum, reference
        self.lib = tfaccum.ops.load_library()

    # Operands ---------------------------------------------------------------------------
    def _tensor(self, shape, rng, special, dtype="float32"):
        tf = self.tf
        if not _prefix_fits(shape) or _prod(shape) == 0:
            return tf.zeros(shape, dtype)
        return tf.constant(make_array(shape, rng, special).astype(dtype))

    def _sizes(self, case):
        dtype = case["sizes_dtype"]
        if dtype == "float32":
            return self.tf.constant([float(s) for s in case["sizes"]], self.tf.float32)
        return self.tf.constant(case["sizes"], getattr(self.tf, dtype))

    def _config(self, case):
        tfaccum = self.tfaccum
        if "policy" in case:
            p = case["policy"]
            return tfaccum.AccumPolicy(
                fwd=tfaccum.AccumConfig(**_config_kwargs(p["fwd"])),
                bwd=tfaccum.AccumConfig(**_config_kwargs(p["bwd"])),
                grad=tfaccum.AccumConfig(**_config_kwargs(p["grad"])),
                operands=None if p["operands"] is None else tfaccum.FloatFormat(**p["operands"]))
        return tfaccum.AccumConfig(**_config_kwargs(case["config"]))

    def _reference_config(self, accum):
        config = _config_dict(accum)
        # AccumConfig caps chunk_size at 2^31 - 1; any chunk at least as long as the sum
        # is one chunk, so a larger attribute means the same as the cap for the sums a
        # reference can afford.
        config["chunk_size"] = min(config["chunk_size"], INT32_MAX)
        return self.tfaccum.AccumConfig(**_config_kwargs(config))

    # The call ---------------------------------------------------------------------------
    def build(self, case):
        """(fn, tensor args, reference thunk or None): fn(*args) computes the case."""
        tf, tfaccum, ref, lib = self.tf, self.tfaccum, self.reference, self.lib
        op = case["op"]
        rng = np.random.default_rng(case["values"]["seed"])
        special = case["values"]["special"]
        dtype = case.get("dtype", "float32")

        if op in ("raw_quantize", "quantize"):
            x = self._tensor(case["shape"], rng, special, dtype)
            fmt, rounding, seed = case["format"], case["rounding"], case["seed"]
            if op == "raw_quantize":
                fn = lambda x: raw_quantize(lib, x, fmt, rounding, seed)  # noqa: E731
            else:
                fn = lambda x: tfaccum.quantize(x, tuple(fmt[:2]), rounding, seed)  # noqa: E731
            fmt_obj = lambda: tfaccum.FloatFormat(  # noqa: E731
                fmt[0], fmt[1], subnormals=bool(fmt[2]) if op == "raw_quantize" else True,
                overflow=("inf" if fmt[3] else "saturate") if op == "raw_quantize" else "saturate")
            return fn, [x], lambda: [ref.quantize(x.numpy(), fmt_obj(), rounding, seed)]

        if op in ("raw_matmul", "matmul", "matmul_grad"):
            ta, tb = case["transpose_a"], case["transpose_b"]
            a = self._tensor(case["a_shape"], rng, special, dtype)
            b = self._tensor(case["b_shape"], rng, special)
            if op == "raw_matmul":
                accum = case["accum"]
                fn = lambda a, b: raw_matmul(lib, a, b, ta, tb, accum)  # noqa: E731
                return fn, [a, b], lambda: [ref.matmul(a.numpy(), b.numpy(),
                                                       self._reference_config(accum), ta, tb)]
            config = self._config(case)
            if op == "matmul":
                fn = lambda a, b: tfaccum.accum_matmul(a, b, config, ta, tb)  # noqa: E731
                return fn, [a, b], lambda: [ref.matmul(a.numpy(), b.numpy(), config, ta, tb)]
            m = a.shape[1] if ta else a.shape[0]
            n = b.shape[0] if tb else b.shape[1]
            dy = self._tensor([m, n], rng, special)

            def grads(a, b, dy):
                with tf.GradientTape() as tape:
                    tape.watch([a, b])
                    y = tfaccum.accum_matmul(a, b, config, ta, tb)
                return tape.gradient(y, [a, b], output_gradients=dy)

            return grads, [a, b, dy], lambda: list(ref.matmul_grads(
                a.numpy(), b.numpy(), dy.numpy(), config, ta, tb))

        conv = case["conv"]
        strides, dilations = conv["strides"], conv["dilations"]
        padding = conv["padding"]
        ref_padding = (padding if padding != "EXPLICIT" else
                       [conv["explicit_paddings"][0:2], conv["explicit_paddings"][2:4]])
        if op == "raw_conv2d":
            x = self._tensor(case["x_shape"], rng, special)
            w = self._tensor(case["w_shape"], rng, special)
            accum = case["accum"]
            fn = lambda x, w: raw_conv2d(lib, x, w, conv, accum)  # noqa: E731
            return fn, [x, w], lambda: [ref.conv2d(
                x.numpy(), w.numpy(), self._reference_config(accum), strides, ref_padding,
                dilations)]
        if op == "raw_backprop_input":
            w = self._tensor(case["w_shape"], rng, special)
            dy = self._tensor(case["dy_shape"], rng, special)
            sizes, accum = case["sizes"], case["accum"]
            sizes_dtype = case["sizes_dtype"]
            # The sizes are a constant of the function (as tf.shape(x) would be when x's
            # shape is static), so that the shape function sees their values.
            fn = lambda w, dy: raw_backprop_input(  # noqa: E731
                lib, self._sizes(dict(sizes=sizes, sizes_dtype=sizes_dtype)), w, dy, conv, accum)
            return fn, [w, dy], lambda: [ref.conv2d_backprop_input(
                sizes, w.numpy(), dy.numpy(), self._reference_config(accum), strides,
                ref_padding, dilations)]
        if op == "raw_backprop_filter":
            x = self._tensor(case["x_shape"], rng, special)
            dy = self._tensor(case["dy_shape"], rng, special)
            sizes, accum = case["sizes"], case["accum"]
            sizes_dtype = case["sizes_dtype"]
            fn = lambda x, dy: raw_backprop_filter(  # noqa: E731
                lib, x, self._sizes(dict(sizes=sizes, sizes_dtype=sizes_dtype)), dy, conv, accum)
            return fn, [x, dy], lambda: [ref.conv2d_backprop_filter(
                x.numpy(), sizes, dy.numpy(), self._reference_config(accum), strides,
                ref_padding, dilations)]

        # The public conv and its gradients.
        x = self._tensor(case["x_shape"], rng, special)
        w = self._tensor(case["w_shape"], rng, special)
        config = self._config(case)
        pad_arg = case["padding_arg"]
        if op == "conv2d":
            fn = lambda x, w: tfaccum.accum_conv2d(  # noqa: E731
                x, w, config, strides=strides, padding=pad_arg, dilations=dilations)
            return fn, [x, w], lambda: [ref.conv2d(x.numpy(), w.numpy(), config, strides,
                                                   ref_padding, dilations)]
        g = conv_geometry(case["x_shape"], case["w_shape"], conv)
        dy_shape = ([case["x_shape"][0], g[0], g[1], case["w_shape"][3]]
                    if isinstance(g, tuple) else [1, 1, 1, 1])  # the forward op fails first
        dy = self._tensor(dy_shape, rng, special)

        def grads(x, w, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tfaccum.accum_conv2d(x, w, config, strides=strides, padding=pad_arg,
                                         dilations=dilations)
            return tape.gradient(y, [x, w], output_gradients=dy)

        return grads, [x, w, dy], lambda: list(ref.conv2d_grads(
            x.numpy(), w.numpy(), dy.numpy(), config, strides, ref_padding, dilations))

    def _call(self, fn, args, graph):
        tf = self.tf
        try:
            if graph:
                fn = tf.function(fn, input_signature=[tf.TensorSpec(a.shape, a.dtype)
                                                      for a in args])
            value = fn(*args)
            values = value if isinstance(value, (list, tuple)) else [value]
            return Outcome(value=[_Result(v) for v in values])
        except Exception as err:  # noqa: BLE001 - checked against the expectation
            return Outcome(error=err)

    def run(self, case):
        """None when the case behaves as expected, else what went wrong."""
        try:
            want, want_graph = expect(case), expect(case, graph=True)
            setup_error = None
            try:
                fn, args, reference = self.build(case)
            except Exception as err:  # noqa: BLE001 - config or padding errors in Python
                setup_error = err
            if setup_error is not None:
                eager = graph = Outcome(error=setup_error)
            else:
                eager = self._call(fn, args, graph=False)
                graph = self._call(fn, args, graph=True)
            problem = self._check(want, eager, "eager")
            if problem:
                return problem
            problem = self._check(want_graph, graph, "graph")
            if problem:
                return problem
            if want.error is not None:
                if (want.kernel and want_graph.error == want.error and
                        type(eager.error).__name__ == "InvalidArgumentError"):
                    core = eager.message.split(" [Op:")[0].split("}} ")[-1]
                    if core not in graph.message and not re.search(want.error, graph.message):
                        return (f"graph error differs from eager: eager {core!r}, graph "
                                f"{graph.message[:400]!r}")
                return None
            for got_eager, got_graph in zip(eager.value, graph.value):
                if got_eager.size and not _bits_equal(got_graph.array, got_eager.array):
                    return "graph result differs from eager: " + _first_difference(
                        got_graph.array, got_eager.array)
            return self._check_reference(case, eager.value, reference)
        except Exception as err:  # noqa: BLE001 - a bug of the harness is a failure too
            import traceback

            return "harness error: " + "".join(traceback.format_exception(err))[-2000:]

    @staticmethod
    def _check(want, got, mode):
        if want.error is not None:
            if got.error is None:
                return f"{mode}: expected an error matching {want.error!r}, got {got.describe()}"
            if type(got.error).__name__ not in want.types:
                return f"{mode}: expected {'/'.join(want.types)}, got {got.describe()}"
            if not re.search(want.error, got.message):
                return f"{mode}: expected a message matching {want.error!r}, got {got.describe()}"
            return None
        if got.error is not None:
            return f"{mode}: expected success, got {got.describe()}"
        shapes = want.shape if isinstance(want.shape, tuple) else (want.shape,)
        got_shapes = tuple(v.shape for v in got.value)
        if tuple(list(s) for s in shapes) != got_shapes:
            return f"{mode}: expected shapes {shapes}, got {got_shapes}"
        return None

    def _check_reference(self, case, values, reference):
        cost = reference_cost(case)
        if all(v.size == 0 for v in values):
            return None  # shapes checked; nothing to compare
        if cost is not None and cost <= REFERENCE_BUDGET * 4 and all(
                _numpy_can_hold(shape) for shape in _input_shapes(case)):
            wants = reference()
        elif all(n == 0 for n, v in zip(sum_lengths(case), values) if v.size):
            # Empty sums over a huge kernel, which the reference would walk tap by tap:
            # numerics.md §3 says every one is +0.
            wants = [np.zeros(v.shape, np.float32) if v.size else None for v in values]
        else:
            return f"case too large for the reference (cost {cost}): fix the generator"
        for i, (got, want) in enumerate(zip(values, wants)):
            if got.size and not _bits_equal(got.array, want):
                return f"output {i} differs from tfaccum.reference: " + _first_difference(
                    got.array, want)
        return None


def _config_kwargs(d):
    """AccumConfig keyword arguments from a JSON config dict (formats as dicts)."""
    import tfaccum

    out = dict(d)
    for key in ("accumulator", "product", "chunk_accumulator"):
        if isinstance(out.get(key), dict):
            out[key] = tfaccum.FloatFormat(**out[key])
    return out


def sum_lengths(case):
    """The length of the sums of each output of a valid case (numerics.md §5)."""
    op = case["op"]
    if op in ("raw_quantize", "quantize"):
        return [1]
    if op in ("raw_matmul", "matmul", "matmul_grad"):
        a, b = case["a_shape"], case["b_shape"]
        m, k = (a[1], a[0]) if case["transpose_a"] else (a[0], a[1])
        n = b[0] if case["transpose_b"] else b[1]
        return [n, m] if op == "matmul_grad" else [k]  # da sums over N, db over M
    x = case["sizes"] if op == "raw_backprop_input" else case["x_shape"]
    w = case["sizes"] if op == "raw_backprop_filter" else case["w_shape"]
    oh, ow, _, _ = conv_geometry(x, w, case["conv"])
    forward, input_grad = w[0] * w[1] * w[2], w[0] * w[1] * w[3]
    filter_grad = x[0] * oh * ow
    return {"raw_conv2d": [forward], "conv2d": [forward], "raw_backprop_input": [input_grad],
            "raw_backprop_filter": [filter_grad], "conv2d_grad": [input_grad, filter_grad]}[op]


def reference_cost(case):
    """Loop iterations (outputs times taps or products) of the reference on a valid case:
    it walks every tap of a sum even when the sum is empty."""
    op = case["op"]
    if op in ("raw_quantize", "quantize"):
        return _prod(case["shape"])
    if op in ("raw_matmul", "matmul", "matmul_grad"):
        a, b = case["a_shape"], case["b_shape"]
        m, k = (a[1], a[0]) if case["transpose_a"] else (a[0], a[1])
        n = b[0] if case["transpose_b"] else b[1]
        return (m * n * max(k, 1)) * (3 if op == "matmul_grad" else 1)
    x = case["sizes"] if op == "raw_backprop_input" else case["x_shape"]
    w = case["sizes"] if op == "raw_backprop_filter" else case["w_shape"]
    g = conv_geometry(x, w, case["conv"])
    if isinstance(g, Expect):
        return None
    # Each output runs a loop nest over its taps: count every level's iterations.
    forward = x[0] * g[0] * g[1] * w[3] * (1 + w[0] + w[0] * w[1] + w[0] * w[1] * w[2])
    input_grad = x[0] * x[1] * x[2] * x[3] * (1 + w[0] + w[0] * w[1] + w[0] * w[1] * w[3])
    filter_grad = w[0] * w[1] * w[2] * w[3] * (1 + x[0] + x[0] * g[0] + x[0] * g[0] * g[1])
    return {"raw_conv2d": forward, "conv2d": forward, "raw_backprop_input": input_grad,
            "raw_backprop_filter": filter_grad,
            "conv2d_grad": input_grad + filter_grad}[op]


# --- The worker protocol --------------------------------------------------------------
# stdout gets "START <name>" before a case and "DONE <json>" after it, flushed, so that the
# parent knows which case was running when the process died or stopped answering.

def _selftest(kind):
    """Cases that behave or misbehave on purpose, to test the parent (no TensorFlow)."""
    if kind == "abort":
        os.abort()
    if kind == "hang":
        time.sleep(3600)
    if kind == "fail":
        return "failed on purpose"
    return None


def worker(path):
    with open(path) as f:
        todo = json.load(f)
    # TensorFlow is imported before the first case, so that its start-up time is not
    # charged to a case's time limit.
    runner = Runner() if any(not c["op"].startswith("selftest_") for c in todo) else None
    for case in todo:
        print("START " + case["name"], flush=True)
        started = time.perf_counter()
        if case["op"].startswith("selftest_"):
            problem = _selftest(case["op"][len("selftest_"):])
        else:
            problem = runner.run(case)
        print("DONE " + json.dumps({"name": case["name"], "problem": problem,
                                    "seconds": time.perf_counter() - started}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="CASES.json", help="run the cases of this file")
    parser.add_argument("--list", action="store_true", help="print the case names")
    parser.add_argument("--run", nargs="+", metavar="NAME", help="run these cases here")
    parser.add_argument("--full", action="store_true", help="the full case set")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    all_cases = cases(full=args.full or os.environ.get("TFACCUM_FUZZ_FULL") == "1")
    if args.list:
        for c in all_cases:
            print(c["name"])
        return 0
    if args.run:
        by_name = {c["name"]: c for c in all_cases}
        runner = Runner()
        status = 0
        for name in args.run:
            case = by_name[name]
            print(json.dumps(case))
            problem = runner.run(case)
            print(name, "OK" if problem is None else "FAILED: " + problem)
            status |= problem is not None
        return status
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
