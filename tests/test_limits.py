"""No input may crash the process (issue 14): extreme shapes, empty sums, memory.

Every check runs in a child process (tests/isolated.py), so that a regression shows up as
a failing test naming the input instead of a pytest killed by SIGABRT. Eager results are
compared with tf.function results traced with the same static shapes: the shape
functions must give the eager kernel's error, or its shape.
"""

import re

import pytest

from isolated import run_snippets

BIG = 2 ** 62

# name -> code setting `result`. Each is one input that used to abort, hang or give a
# nonsense shape.
SHAPE_SNIPPETS = {
    # Four inputs that once aborted the process (TensorShape CHECK failures).
    "matmul_output_overflows": """result = eager_and_graph(
        lambda a, b: tfaccum.accum_matmul(a, b, tfaccum.AccumConfig()),
        tf.zeros([2**33, 0]), tf.zeros([0, 2**33]))""",
    "conv_explicit_padding_2_31": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig(),
                                          padding=[(2**31, 2**31), (2**31, 2**31)]),
        tf.zeros([1, 1, 1, 1]), tf.zeros([1, 1, 1, 1]))""",
    "backprop_filter_huge_filter_sizes": """result = eager_and_graph(
        lambda x, dy: lib.tfaccum_conv2d_backprop_filter(x, tf.constant([2**31 - 1] * 4), dy, 0),
        tf.zeros([1, 5, 5, 2]), tf.zeros([1, 5, 5, 4]))""",
    "backprop_input_explicit_2_31": """result = eager_and_graph(
        lambda w, dy: lib.tfaccum_conv2d_backprop_input(
            tf.constant([1, 1, 1, 1]), w, dy, 0, padding="EXPLICIT", explicit_paddings=[2**31] * 4),
        tf.zeros([1, 1, 1, 1]), tf.zeros([1, 1, 1, 1]))""",
    # SAME with a spatial size near 2^63 and stride 2: `in + stride - 1` used to wrap.
    "same_near_int64_max_stride_2": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig(), strides=2),
        tf.zeros([0, 2**63 - 1, 1, 1]), tf.ones([1, 1, 1, 1]))""",
    "backprop_input_huge_input_sizes": """result = eager_and_graph(
        lambda w, dy: lib.tfaccum_conv2d_backprop_input(tf.constant([2**31 - 1] * 4), w, dy, 0),
        tf.zeros([1, 1, 1, 1]), tf.zeros([1, 1, 1, 1]))""",
    # A dilated kernel size (k - 1) * d + 1 that overflows int64, VALID and SAME.
    "valid_dilated_kernel_overflows": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig(), padding="VALID",
                                          dilations=(1, 4)),
        tf.zeros([1, 5, 5, 1]), tf.zeros([1, 2**62, 1, 0]))""",
    "same_dilated_kernel_overflows": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig(), dilations=4),
        tf.zeros([1, 5, 5, 1]), tf.zeros([2**62, 1, 1, 0]))""",
    # EXPLICIT padding whose sum wraps past int64.
    "explicit_padding_wraps": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig(),
                                          padding=[(0, 0), (2**62, 2**62)]),
        tf.zeros([1, 1, 1, 1]), tf.zeros([1, 1, 1, 1]))""",
    # Raw ops used to ignore explicit_paddings unless padding was EXPLICIT.
    "explicit_paddings_with_same": """result = eager_and_graph(
        lambda x, w: lib.tfaccum_conv2d(x, w, 0, padding="SAME", explicit_paddings=[1, 1, 1, 1]),
        tf.zeros([1, 3, 3, 1]), tf.zeros([1, 1, 1, 1]))""",
    "explicit_paddings_with_valid_backprop_filter": """result = eager_and_graph(
        lambda x, dy: lib.tfaccum_conv2d_backprop_filter(
            x, tf.constant([1, 1, 1, 1]), dy, 0, padding="VALID", explicit_paddings=[0, 0, 0, 0]),
        tf.zeros([1, 3, 3, 1]), tf.zeros([1, 3, 3, 1]))""",
    # A filter of height 0 is rejected by both.
    "zero_height_filter": """result = eager_and_graph(
        lambda x, w: tfaccum.accum_conv2d(x, w, tfaccum.AccumConfig()),
        tf.zeros([1, 5, 5, 1]), tf.zeros([0, 3, 1, 1]))""",
}

# name -> (error regex) or a tuple shape for a success.
EXPECTED = {
    "matmul_output_overflows": r"output shape \[8589934592,8589934592\] is too large.*overflows int64",
    "conv_explicit_padding_2_31": r"output shape \[1,4294967297,4294967297,1\] is too large",
    "backprop_filter_huge_filter_sizes": r"filter_sizes \[2147483647(,2147483647){3}\] is too large",
    "backprop_input_explicit_2_31": r"output shape \[1,4294967297,4294967297,1\] is too large",
    "same_near_int64_max_stride_2": (0, 2 ** 62, 1, 1),
    "backprop_input_huge_input_sizes": r"input_sizes \[2147483647(,2147483647){3}\] is too large",
    "valid_dilated_kernel_overflows":
        r"dilated filter width \(KW - 1\) \* dilation_w \+ 1 overflows int64: the kernel is "
        r"larger than the input",
    "same_dilated_kernel_overflows": r"dilated filter height .* overflows int64",
    "explicit_padding_wraps": r"padded input width W \+ pad_left \+ pad_right overflows int64",
    "explicit_paddings_with_same":
        r"explicit_paddings must be empty unless padding is EXPLICIT, got \[1,1,1,1\]",
    "explicit_paddings_with_valid_backprop_filter":
        r"explicit_paddings must be empty unless padding is EXPLICIT",
    "zero_height_filter": r"the filter height KH must be positive \(input \[1,5,5,1\], "
                          r"filter \[0,3,1,1\]\)",
}


@pytest.fixture(scope="module")
def shape_outcomes():
    return run_snippets(SHAPE_SNIPPETS)


@pytest.mark.parametrize("name", sorted(SHAPE_SNIPPETS))
def test_extreme_shapes_fail_cleanly_and_agree_with_the_shape_function(shape_outcomes, name):
    got = shape_outcomes[name]
    expected = EXPECTED[name]
    if isinstance(expected, tuple):
        assert got["eager"] == {"shape": list(expected)}, got
        assert got["graph"] == {"shape": list(expected)}, got
        return
    eager, graph = got["eager"], got["graph"]
    assert eager.get("error") == "InvalidArgumentError", got
    assert re.search(expected, eager["message"]), got
    # Graph construction runs the shape function, which must raise the kernel's message
    # (TensorFlow reports shape-function errors while tracing as ValueError).
    assert graph.get("error") in ("ValueError", "InvalidArgumentError"), got
    core = eager["message"].split(" [Op:")[0].split("}} ")[-1]
    assert core in graph["message"], got


# Empty sums: each output is +0 (numerics.md §3), in time proportional to the output.
# `result` is (shape, all outputs are +0, seconds).
_TIMED = """
import time
_t0 = time.perf_counter()
_y = np.asarray({call})
result = [list(_y.shape), bool(np.all(_y == 0) and not np.any(np.signbit(_y))),
          time.perf_counter() - _t0]
"""
EMPTY_SUM_SNIPPETS = {
    # An input that once hung: Cout = 0 with a filter of 2^60 taps.
    "backprop_input_cout_0_huge_filter": _TIMED.format(call="""lib.tfaccum_conv2d_backprop_input(
        tf.constant([1, 1, 1, 1]), tf.zeros([2**30, 2**30, 1, 0]), tf.zeros([1, 1, 1, 0]), 0)"""),
    "conv2d_cin_0_huge_filter": _TIMED.format(call="""tfaccum.accum_conv2d(
        tf.zeros([1, 2, 3, 0]), tf.zeros([2**30, 2**30, 0, 2]),
        tfaccum.AccumConfig(accumulator="e5m2", chunk_size=3, rounding="stochastic"))"""),
    "backprop_filter_batch_0": _TIMED.format(call="""lib.tfaccum_conv2d_backprop_filter(
        tf.zeros([0, 5, 5, 2]), tf.constant([3, 3, 2, 4]), tf.zeros([0, 5, 5, 4]), 0,
        accumulator=[4, 3, 0, 1], chunk_size=2)"""),
    "matmul_k_0": _TIMED.format(call="""tfaccum.accum_matmul(
        tf.zeros([300, 0]), tf.zeros([0, 200]),
        tfaccum.AccumConfig(product="e4m3", rounding="toward_zero"))"""),
}
EMPTY_SUM_SHAPES = {
    "backprop_input_cout_0_huge_filter": [1, 1, 1, 1],
    "conv2d_cin_0_huge_filter": [1, 2, 3, 2],
    "backprop_filter_batch_0": [3, 3, 2, 4],
    "matmul_k_0": [300, 200],
}


@pytest.fixture(scope="module")
def empty_sum_outcomes():
    return run_snippets(EMPTY_SUM_SNIPPETS, timeout=120)


@pytest.mark.parametrize("name", sorted(EMPTY_SUM_SNIPPETS))
def test_empty_sums_are_positive_zero_and_fast(empty_sum_outcomes, name):
    shape, all_positive_zero, seconds = empty_sum_outcomes[name]
    assert shape == EMPTY_SUM_SHAPES[name]
    assert all_positive_zero
    assert seconds < 10, f"{name} took {seconds:.1f} s"


# Memory: scratch comes from TensorFlow's allocator, so running out of it is a
# ResourceExhausted error, never a std::bad_alloc that kills the process; and an N = 1
# GEMM needs scratch of about its operands' size, not 12 times it.
_MEMORY_PRELUDE = """
import resource

def _address_space():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

cfg = tfaccum.AccumConfig(accumulator="e8m10")
tfaccum.accum_matmul(tf.ones([1, 4]), tf.ones([4, 1]), cfg)  # thread pools, library: warm
"""
MEMORY_SNIPPETS = {
    # Once a crash: 1 GiB above current use, operands created under the limit.
    "matmul_n1_one_gib_headroom": _MEMORY_PRELUDE + """
resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 2**30, resource.RLIM_INFINITY))
result = outcome(lambda: tfaccum.accum_matmul(tf.ones([1, 2**25]), tf.ones([2**25, 1]), cfg))
if "shape" in result:
    result["value"] = float(tfaccum.accum_matmul(tf.ones([1, 2**25]), tf.ones([2**25, 1]),
                                                 cfg).numpy()[0, 0])
""",
    # Headroom for the operands' scratch copy but not for the A panel: must be an error.
    "matmul_scratch_does_not_fit": _MEMORY_PRELUDE + """
a, b = tf.ones([1, 2**25]), tf.ones([2**25, 1])
resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 200 * 2**20, resource.RLIM_INFINITY))
result = outcome(lambda: tfaccum.accum_matmul(a, b, cfg))
""",
}


@pytest.fixture(scope="module")
def memory_outcomes():
    # One child each: memory freed by the first would be reused by the second without
    # growing the address space.
    return {name: run_snippets({name: code}, timeout=300)[name]
            for name, code in MEMORY_SNIPPETS.items()}


def test_n1_matmul_fits_in_one_gib_above_current_use(memory_outcomes):
    got = memory_outcomes["matmul_n1_one_gib_headroom"]
    # Success is expected (about 3/2 the operands in scratch); an out-of-memory error
    # would be acceptable, a crash is not (run_snippets fails on it).
    if "error" in got:
        assert got["error"] == "ResourceExhaustedError", got
    else:
        assert got["shape"] == [1, 1]
        # 2^25 ones summed in e8m10 stall at 2^11, where 2^11 + 1 is a tie to even.
        assert got["value"] == 2048.0, got


def test_out_of_scratch_memory_is_resource_exhausted_naming_op_and_size(memory_outcomes):
    got = memory_outcomes["matmul_scratch_does_not_fit"]
    assert got.get("error") == "ResourceExhaustedError", got
    assert re.search(r"TfaccumMatMul .*out of memory for \d+ bytes of scratch "
                     r"\((the B operand|the A panels)\)", got["message"]), got
