#!/usr/bin/env python3
"""The GPU check of tfaccum's CUDA kernels: bit-exactness against the reference, then speed.

For a machine with nvcc, an NVIDIA GPU, NumPy and CuPy or PyTorch, and no TensorFlow.
From the repository root:

    python tests/gpu/gpu_check.py                # build, check, time: the table comes last
    python tests/gpu/gpu_check.py --skip-timing  # only the bit-exactness suite
    python tests/gpu/gpu_check.py --emulate      # no GPU needed: the same suite through the
                                                 # host emulation (tests/gpu/cuda_emulation.cc)

1. Builds the standalone library (custom_ops/cuda/standalone.py, `-arch=native`).
2. Runs matmul (all four transposes), conv forward, input gradient, filter gradient and
   quantize on random and adversarial inputs (ties, subnormals, overflow, NaN/Inf, signed
   zeros, lengths that are not a multiple of the chunk size) over all rounding modes,
   several formats and chunk sizes, each under every tile shape the launcher has, and
   compares every output bit for bit with tfaccum/reference.py (exact rationals; loaded
   by path, without TensorFlow). Stochastic cases use the reference's seed and step
   (tfaccum_cuda_make_params folds the step into the stream seed as the TensorFlow
   kernels do), so they check that the GPU draws what the CPU draws; grouped-convolution
   cases run one group's op and check that it draws the whole output's elements. Any NaN matches any NaN; everything else must
   have identical bits (so the sign of zero counts). Then larger matmuls (several tiles
   in every direction) must agree across tile shapes and, at sampled outputs, with the
   reference.
3. Times matmul 4096^3 (e8m10 accumulator, nearest-even, exact products) against cuBLAS
   SGEMM and two ResNet-18 conv layers (forward and both gradients) against cuDNN, all in
   float32 with TF32 off, on the same GPU, and prints a table.

A failing case is reported and the run goes on; the exit status is 1 if anything
mismatched or failed. Designed to finish well within 8 minutes on an H200 (the suite
takes well under a minute; the kernels' own speed decides the rest).

`--emulate --smoke-timing` also runs the timing code on tiny sizes (on CPU PyTorch if it
is installed), so the script itself is tested without a GPU (tests/test_cuda_build.py).
"""

import argparse
import ctypes
import importlib
import importlib.util
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE_S = 7 * 60  # stop starting new work after this (the budget is 8 minutes)
SENTINEL_BITS = 0xFF7FFFF1  # a finite float32 no kernel output should be: unwritten outputs


# ---------------------------------------------------------------------------------------
# The pure-Python modules, without `import tfaccum` (which imports TensorFlow)
# ---------------------------------------------------------------------------------------
def load_pure_modules():
    name = "_tfaccum_pure"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(ROOT, "tfaccum")]
        sys.modules[name] = pkg
    return importlib.import_module(name + ".config"), importlib.import_module(name + ".reference")


cfgmod, ref = load_pure_modules()
FloatFormat, AccumConfig = cfgmod.FloatFormat, cfgmod.AccumConfig
FusedAdder = cfgmod.FusedAdder
ROUNDINGS = list(cfgmod.ROUNDING_MODES)  # index = the kernels' Rounding enum


def load_file_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# The library (CUDA standalone build, or the host emulation)
# ---------------------------------------------------------------------------------------
EMULATION_SOURCE = os.path.join(ROOT, "tests", "gpu", "cuda_emulation.cc")


def build_emulation(out=None, verbose=True):
    """Compiles tests/gpu/cuda_emulation.cc with g++ (C++20) if stale; returns its path."""
    out = out or os.path.join(ROOT, "build", "cuda_emulation", "libtfaccum_cuda_emu.so")
    deps = [EMULATION_SOURCE]
    for d in ("custom_ops/cuda", "custom_ops/core"):
        full = os.path.join(ROOT, d)
        deps += [os.path.join(full, f) for f in os.listdir(full)
                 if f.endswith((".h", ".cuh"))]
    if os.path.exists(out) and all(os.path.getmtime(d) <= os.path.getmtime(out) for d in deps):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-ffp-contract=off",
           "-fno-fast-math", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-Wno-psabi", "-I" + os.path.join(ROOT, "custom_ops", "core"),
           "-I" + os.path.join(ROOT, "custom_ops", "cuda"), EMULATION_SOURCE, "-o", out]
    if verbose:
        print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


class FormatParamsView(ctypes.Structure):
    """FormatParams of custom_ops/core/rounding.h, to read what the library built."""

    _fields_ = [("emin_field", ctypes.c_int64), ("magic_offset", ctypes.c_int64),
                ("ulp_offset", ctypes.c_int64), ("units_offset", ctypes.c_int64),
                ("max_value", ctypes.c_double), ("flush_below", ctypes.c_double),
                ("overflow_value", ctypes.c_double), ("overflow_probe", ctypes.c_double)]


class AccumParamsView(ctypes.Structure):
    """AccumParams of custom_ops/core/rounding.h (checked against the library's size)."""

    _fields_ = [("accumulator", FormatParamsView), ("product", FormatParamsView),
                ("chunk_accumulator", FormatParamsView), ("has_product", ctypes.c_int32),
                ("rounding", ctypes.c_int32), ("chunk_size", ctypes.c_int64),
                ("seed", ctypes.c_uint64), ("flushes_subnormals", ctypes.c_int32),
                ("group", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("fused_terms", ctypes.c_int32), ("fused_fraction_bits", ctypes.c_int32),
                ("fused_toward_zero", ctypes.c_int32), ("fused_zero_scale", ctypes.c_double),
                ("fused_operand_min", ctypes.c_double), ("fused_result", FormatParamsView)]


class Library:
    """ctypes view of accum_launchers.h."""

    ABI_VERSION = 3

    def __init__(self, path):
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        vp, i32, i64, u64, cp = (ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                                 ctypes.c_uint64, ctypes.c_char_p)
        sig = {
            "tfaccum_cuda_matmul": (ctypes.c_int, [vp, vp, vp, i64, i64, i64, i32, i32, vp, vp]),
            "tfaccum_cuda_conv2d": (ctypes.c_int, [vp, vp, vp, vp, vp, vp]),
            "tfaccum_cuda_conv2d_backprop_input": (ctypes.c_int, [vp, vp, vp, vp, vp, vp]),
            "tfaccum_cuda_conv2d_backprop_filter": (ctypes.c_int, [vp, vp, vp, vp, vp, vp]),
            "tfaccum_cuda_quantize": (ctypes.c_int, [vp, vp, i64, vp, i32, u64, vp]),
            "tfaccum_cuda_error_string": (cp, [ctypes.c_int]),
            "tfaccum_cuda_set_tile_shape": (None, [i32]),
            "tfaccum_cuda_abi_version": (i32, []),
            "tfaccum_cuda_params_bytes": (i64, []),
            "tfaccum_cuda_format_bytes": (i64, []),
            "tfaccum_cuda_geometry_bytes": (i64, []),
            "tfaccum_cuda_make_params": (cp, [ctypes.POINTER(i32), i32, i32, i64, u64, i64,
                                              i64, i64, vp]),
            "tfaccum_cuda_make_format": (cp, [ctypes.POINTER(i32), i32, vp]),
            "tfaccum_cuda_set_fused": (cp, [ctypes.POINTER(i64), ctypes.POINTER(i32), vp]),
            "tfaccum_cuda_make_conv_geometry": (cp, [ctypes.POINTER(i64), vp,
                                                     ctypes.POINTER(i64)]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        version = lib.tfaccum_cuda_abi_version()
        if version != self.ABI_VERSION:
            raise RuntimeError(f"{path}: ABI version {version}, expected {self.ABI_VERSION}")

    def check(self, code, what):
        if code != 0:
            raise RuntimeError(f"{what}: CUDA error {code} "
                               f"({self.lib.tfaccum_cuda_error_string(code).decode()})")

    def params(self, config, step=0, group=0, groups=1):
        acc = config.accumulator.kernel_attr()
        prod = config.product.kernel_attr() if config.product is not None else [8, 23, 1, 0]
        chunk = config.effective_chunk_accumulator.kernel_attr()
        formats = (ctypes.c_int32 * 12)(*(acc + prod + chunk))
        buf = ctypes.create_string_buffer(int(self.lib.tfaccum_cuda_params_bytes()))
        err = self.lib.tfaccum_cuda_make_params(
            formats, int(config.product is not None), ROUNDINGS.index(config.rounding),
            config.chunk_size, config.seed % 2 ** 64, step, group, groups, buf)
        if err:
            raise ValueError(err.decode())
        if config.fused is not None:  # the fused adder (numerics §7), as the `fused` attr
            err = self.lib.tfaccum_cuda_set_fused(
                (ctypes.c_int64 * 5)(*config.fused.kernel_attr()), (ctypes.c_int32 * 4)(*acc),
                buf)
            if err:
                raise ValueError(err.decode())
        return buf

    def params_view(self, config, step=0, group=0, groups=1):
        """The AccumParams the library builds for a config, as a readable structure."""
        size = int(self.lib.tfaccum_cuda_params_bytes())
        if size != ctypes.sizeof(AccumParamsView):
            raise RuntimeError(f"AccumParams is {size} bytes in the library, "
                               f"{ctypes.sizeof(AccumParamsView)} in AccumParamsView")
        return AccumParamsView.from_buffer_copy(self.params(config, step, group, groups))

    def format(self, fmt, rounding):
        buf = ctypes.create_string_buffer(int(self.lib.tfaccum_cuda_format_bytes()))
        err = self.lib.tfaccum_cuda_make_format((ctypes.c_int32 * 4)(*fmt.kernel_attr()),
                                                ROUNDINGS.index(rounding), buf)
        if err:
            raise ValueError(err.decode())
        return buf

    def geometry(self, conv):
        """conv: dict(x_shape, k_shape=(KH, KW, Cin, Cout), strides, dilations, padding)."""
        b, h, w, cin = conv["x_shape"]
        kh, kw, _, cout = conv["k_shape"]
        padding = conv["padding"]
        if padding == "SAME":
            mode, pads = 0, [0, 0, 0, 0]
        elif padding == "VALID":
            mode, pads = 1, [0, 0, 0, 0]
        else:
            mode, pads = 2, [padding[0][0], padding[0][1], padding[1][0], padding[1][1]]
        args = (ctypes.c_int64 * 16)(b, h, w, cin, kh, kw, cout, *conv["strides"],
                                     *conv["dilations"], mode, *pads)
        buf = ctypes.create_string_buffer(int(self.lib.tfaccum_cuda_geometry_bytes()))
        dims = (ctypes.c_int64 * 4)()
        err = self.lib.tfaccum_cuda_make_conv_geometry(args, buf, dims)
        if err:
            raise ValueError(err.decode())
        return buf, tuple(dims)

    def set_tile_shape(self, shape):
        self.lib.tfaccum_cuda_set_tile_shape(shape)


# ---------------------------------------------------------------------------------------
# Device memory: PyTorch or CuPy on a GPU; plain NumPy for the emulation
# ---------------------------------------------------------------------------------------
class WallTimer:
    """Stands in for a CUDA event on the host (synchronous execution)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class HostBackend:
    name = "host emulation"
    torch = None

    def timer(self):
        return WallTimer(), WallTimer()

    def upload(self, x):
        return np.ascontiguousarray(x, dtype=np.float32)

    def empty(self, shape):
        return np.empty(shape, np.float32)

    def fill_sentinel(self, shape):
        return np.full(shape, SENTINEL_BITS, np.uint32).view(np.float32)

    def ptr(self, a):
        return a.ctypes.data

    def download(self, a):
        return np.array(a)

    def sync(self):
        pass


class TorchBackend:
    def __init__(self, device="cuda"):
        import torch

        self.torch = torch
        self.device = device
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU (emulation)"
        self.name = f"PyTorch {torch.__version__}, {where}"

    def upload(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def empty(self, shape):
        return self.torch.empty(tuple(shape), dtype=self.torch.float32, device=self.device)

    def fill_sentinel(self, shape):
        return self.upload(np.full(shape, SENTINEL_BITS, np.uint32).view(np.float32))

    def ptr(self, a):
        return a.data_ptr()

    def download(self, a):
        self.sync()
        return a.cpu().numpy()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def timer(self):
        if self.device != "cuda":
            return WallTimer(), WallTimer()
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        return start, end


class CupyBackend:
    def __init__(self):
        import cupy

        self.cupy = cupy
        os.environ.setdefault("CUPY_TF32", "0")
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"CuPy {cupy.__version__}, {props['name'].decode()}"

    def upload(self, x):
        return self.cupy.asarray(np.ascontiguousarray(x, dtype=np.float32))

    def empty(self, shape):
        return self.cupy.empty(tuple(shape), dtype=self.cupy.float32)

    def fill_sentinel(self, shape):
        return self.upload(np.full(shape, SENTINEL_BITS, np.uint32).view(np.float32))

    def ptr(self, a):
        return a.data.ptr

    def download(self, a):
        self.sync()
        return self.cupy.asnumpy(a)

    def sync(self):
        self.cupy.cuda.runtime.deviceSynchronize()

    def timer(self):
        return self.cupy.cuda.Event(), self.cupy.cuda.Event()


def gpu_backend():
    errors = []
    for make in (TorchBackend, CupyBackend):
        try:
            backend = make()
            backend.sync()
            return backend
        except Exception as e:  # noqa: BLE001 - try the next one
            errors.append(f"{make.__name__}: {e}")
    raise RuntimeError("no usable GPU array library (PyTorch or CuPy): " + "; ".join(errors))


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
F32_INF = FloatFormat(8, 23, overflow="inf")
F16_INF = FloatFormat(5, 10, overflow="inf")
BF16_INF = FloatFormat(8, 7, overflow="inf")
FORMATS = [
    F16_INF, BF16_INF, FloatFormat(5, 2), FloatFormat(4, 3), FloatFormat(6, 9), F32_INF,
    FloatFormat(3, 4, subnormals=False), FloatFormat(2, 0), FloatFormat(8, 0, overflow="inf"),
    FloatFormat(4, 1, subnormals=False, overflow="inf"), FloatFormat(8, 10),
    FloatFormat(5, 10, subnormals=False),
]
KINDS = ["normal", "ties", "subnormal", "overflow", "specials", "zeros", "mixed"]
FLUSHING = FloatFormat(5, 4, subnormals=False)  # and its twin that keeps subnormals
KEEPING = FloatFormat(5, 4)


def values(rng, kind, shape, fmt, role):
    """float32 inputs of one kind, scaled for the accumulator format `fmt`.

    role 0/1: first/second operand (products of the two land where the kind wants them).
    """
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "ties":  # small dyadic values: low-precision sums hit exact ties
        x = rng.choice([-4, -3, -2, -1.5, -1, -0.75, -0.5, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6], n)
    elif kind == "subnormal":  # products around the accumulator's smallest normal
        half = fmt.emin / 2.0
        x = rng.standard_normal(n) * 2.0 ** (half + rng.integers(-3, 3, n))
        x[rng.random(n) < 0.1] = 1e-40 * (1 if role else -1)  # float32 subnormals too
    elif kind == "overflow":  # products around the accumulator's largest value
        x = rng.standard_normal(n) * 2.0 ** (fmt.emax / 2.0 + rng.integers(-2, 3, n))
    elif kind == "specials":
        x = rng.standard_normal(n)
        pick = rng.random(n)
        x[pick < 0.04] = np.nan
        x[(pick >= 0.04) & (pick < 0.08)] = np.inf
        x[(pick >= 0.08) & (pick < 0.12)] = -np.inf
        x[(pick >= 0.12) & (pick < 0.2)] = -0.0
        x[(pick >= 0.2) & (pick < 0.28)] = 0.0
    elif kind == "zeros":  # signed zeros, and products too small for the format: -tiny -> -0
        tiny = 2.0 ** max(fmt.emin - fmt.mantissa_bits - 3, -149)
        x = rng.choice([1.0, -1.0, 0.5, -0.5], n) * (tiny if role == 0 else 1.0)
        x[rng.random(n) < 0.25] = 0.0
        x[rng.random(n) < 0.25] = -0.0
    elif kind == "padzero":  # first operand -tiny, second positive: products round to -0,
        # so partial sums are -0 and only a +0 padding product turns them back into +0
        tiny = 2.0 ** max(fmt.emin - fmt.mantissa_bits - 3, -149)
        x = -tiny * np.ones(n) if role == 0 else rng.uniform(0.5, 2.0, n)
    else:  # "mixed": wide dynamic range, with cancellations
        x = rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)
        x[1::7] = -x[::7][: len(x[1::7])]
    return np.asarray(x, dtype=np.float32).reshape(shape)


def random_config(rng, rounding, fmt, length, product=None, chunk=None):
    if chunk is None:
        chunk = int(rng.choice([0, 0, 1, 3, 8, max(1, length - 1), length + 5, 32, 33]))
    chunk_acc = None
    if chunk and rng.random() < 0.4:
        chunk_acc = FORMATS[rng.integers(len(FORMATS))]
    seed = int(rng.integers(-2 ** 63, 2 ** 63 - 1))
    return AccumConfig(accumulator=fmt, product=product, chunk_size=chunk,
                       chunk_accumulator=chunk_acc, rounding=rounding, seed=seed)


def random_conv(rng, max_out=260, padding=None):
    """A conv geometry (TensorFlow's semantics) with a modest number of outputs per pass."""
    for _ in range(1000):
        b = int(rng.integers(1, 3))
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        cin, cout = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        kh, kw = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2, 3]))
        strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dilations = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        choice = rng.integers(3)
        if padding is not None:
            conv_padding = padding
        elif choice == 0:
            conv_padding = "SAME"
        elif choice == 1:
            conv_padding = "VALID"
        else:
            conv_padding = ((int(rng.integers(0, 3)), int(rng.integers(0, 3))),
                            (int(rng.integers(0, 3)), int(rng.integers(0, 3))))
        conv = dict(x_shape=(b, h, w, cin), k_shape=(kh, kw, cin, cout), strides=strides,
                    dilations=dilations, padding=conv_padding)
        try:
            oh, ow, _, _ = ref.conv2d_geometry(conv["x_shape"], conv["k_shape"], strides,
                                               conv_padding, dilations)
        except ValueError:
            continue  # the kernel does not fit
        if oh < 1 or ow < 1:
            continue
        outs = max(b * oh * ow * cout, b * h * w * cin, kh * kw * cin * cout)
        if outs <= max_out:
            conv["out_shape"] = (b, oh, ow, cout)
            return conv
    raise RuntimeError("no conv geometry found")


def make_cases(quick=False, seed=1234):
    """Deterministic list of cases: dicts with op, inputs, config and a label."""
    rng = np.random.default_rng(seed)
    cases = []
    kinds = KINDS[:4] + ["specials"] if quick else KINDS
    fmt_i = 0

    def next_format():
        nonlocal fmt_i
        fmt_i += 1
        return FORMATS[fmt_i % len(FORMATS)]

    # matmul: every rounding x kind, transposes cycling, products on/off.
    for r_i, rounding in enumerate(ROUNDINGS):
        for k_i, kind in enumerate(kinds):
            fmt = next_format()
            m, n = int(rng.integers(1, 17)), int(rng.integers(1, 17))
            k = int(rng.choice([1, 7, 31, 32, 33, 45, 64, 70]))
            ta, tb = bool((r_i + k_i) & 1), bool((r_i + k_i) & 2)
            product = None if (k_i % 2) else FORMATS[(fmt_i * 5) % len(FORMATS)]
            a = values(rng, kind, (k, m) if ta else (m, k), fmt, 0)
            b = values(rng, kind, (n, k) if tb else (k, n), fmt, 1)
            cases.append(dict(op="matmul", a=a, b=b, ta=ta, tb=tb, kind=kind,
                              config=random_config(rng, rounding, fmt, k, product)))
    # Edge shapes: K = 0 (all +0), a single output, chunk sizes that split unevenly.
    for chunk in (0, 4, 1):
        cfg = AccumConfig(accumulator=F16_INF, chunk_size=chunk)
        cases.append(dict(op="matmul", a=np.zeros((3, 0), np.float32),
                          b=np.zeros((0, 5), np.float32), ta=False, tb=False, kind="empty",
                          config=cfg))
    cases.append(dict(op="matmul", a=values(rng, "normal", (1, 37), F16_INF, 0),
                      b=values(rng, "normal", (37, 1), F16_INF, 1), ta=False, tb=False,
                      kind="normal", config=AccumConfig(accumulator=FloatFormat(5, 3),
                                                        chunk_size=5, rounding="stochastic",
                                                        seed=-5)))
    # Subnormals off in each format a GEMM uses: products and partial sums around the
    # smallest normal flush to signed zeros exactly where the reference flushes them.
    for role in ("accumulator", "product", "chunk_accumulator"):
        for rounding in ROUNDINGS:
            cfg = AccumConfig(accumulator=FLUSHING if role == "accumulator" else KEEPING,
                              product=FLUSHING if role == "product" else None,
                              chunk_size=4 if role == "chunk_accumulator" else 0,
                              chunk_accumulator=FLUSHING if role == "chunk_accumulator"
                              else None, rounding=rounding, seed=int(rng.integers(2 ** 62)))
            cases.append(dict(op="matmul", a=values(rng, "subnormal", (6, 37), FLUSHING, 0),
                              b=values(rng, "subnormal", (37, 5), FLUSHING, 1), ta=False,
                              tb=False, kind=f"subnormals off: {role}", config=cfg))
    # The three conv passes.
    for op in ("conv_fwd", "conv_bwd_input", "conv_bwd_filter"):
        for r_i, rounding in enumerate(ROUNDINGS):
            for k_i, kind in enumerate(kinds):
                if quick and (r_i + k_i) % 2:
                    continue
                fmt = next_format()
                conv = random_conv(rng)
                product = None if (k_i % 3) else FORMATS[(fmt_i * 7) % len(FORMATS)]
                x = values(rng, kind, conv["x_shape"], fmt, 0)
                w = values(rng, kind, conv["k_shape"], fmt, 1)
                dy = values(rng, kind, conv["out_shape"], fmt, 0 if op == "conv_bwd_input" else 1)
                length = {"conv_fwd": np.prod(conv["k_shape"][:3]),
                          "conv_bwd_input": np.prod(conv["k_shape"][:2]) * conv["k_shape"][3],
                          "conv_bwd_filter": np.prod(conv["out_shape"][:3])}[op]
                cases.append(dict(op=op, conv=conv, x=x, w=w, dy=dy, kind=kind,
                                  config=random_config(rng, rounding, fmt, int(length), product)))
        # Padding taps are +0 operands: with partial sums at -0 they decide signs of zeros.
        for rounding in ROUNDINGS:
            fmt = next_format()
            conv = random_conv(rng, padding=((1, 2), (2, 1)))
            x = values(rng, "padzero", conv["x_shape"], fmt, 0)
            w = values(rng, "padzero", conv["k_shape"], fmt, 1)
            dy = values(rng, "padzero", conv["out_shape"], fmt, 0 if op == "conv_bwd_input" else 1)
            cases.append(dict(op=op, conv=conv, x=x, w=w, dy=dy, kind="padzero",
                              config=random_config(rng, rounding, fmt, 9, None, chunk=0)))
    # Wide channels: several column tiles (and row tiles) even for the 64 x 64 tile shape.
    wide = [
        ("conv_fwd", dict(x_shape=(2, 6, 5, 3), k_shape=(3, 2, 3, 70), strides=(1, 2),
                          dilations=(1, 1), padding="SAME")),
        ("conv_bwd_input", dict(x_shape=(1, 5, 4, 67), k_shape=(2, 3, 67, 3), strides=(2, 1),
                                dilations=(1, 2), padding=((1, 0), (2, 1)))),
        ("conv_bwd_filter", dict(x_shape=(2, 7, 6, 9), k_shape=(3, 3, 9, 66), strides=(1, 1),
                                 dilations=(2, 1), padding="VALID")),
    ]
    for (op, conv), rounding in zip(wide, ROUNDINGS):
        oh, ow, _, _ = ref.conv2d_geometry(conv["x_shape"], conv["k_shape"], conv["strides"],
                                           conv["padding"], conv["dilations"])
        conv["out_shape"] = (conv["x_shape"][0], oh, ow, conv["k_shape"][3])
        fmt = next_format()
        x = values(rng, "normal", conv["x_shape"], fmt, 0)
        w = values(rng, "normal", conv["k_shape"], fmt, 1)
        dy = values(rng, "normal", conv["out_shape"], fmt, 1)
        cases.append(dict(op=op, conv=conv, x=x, w=w, dy=dy, kind="wide",
                          config=random_config(rng, rounding, fmt, 40, fmt, chunk=7)))
    # Stochastic rounding at later training steps (the step selects the stream), in a
    # narrow accumulator over sums long enough that the draws decide many outputs.
    plain = dict(x_shape=(2, 5, 4, 3), k_shape=(3, 2, 3, 4), strides=(1, 1),
                 dilations=(1, 1), padding="SAME", out_shape=(2, 5, 4, 4))
    narrow = FloatFormat(5, 4)
    for op in ("matmul", "conv_fwd", "conv_bwd_input", "conv_bwd_filter"):
        for step in (1, int(rng.integers(2, 2 ** 63 - 1))):
            config = random_config(rng, "stochastic", narrow, 20, chunk=int(step % 2) * 5)
            if op == "matmul":
                a = values(rng, "normal", (5, 33), narrow, 0)
                b = values(rng, "normal", (33, 6), narrow, 1)
                cases.append(dict(op=op, a=a, b=b, ta=False, tb=False, kind="normal",
                                  step=step, config=config))
                continue
            x = values(rng, "normal", plain["x_shape"], narrow, 0)
            w = values(rng, "normal", plain["k_shape"], narrow, 1)
            dy = values(rng, "normal", plain["out_shape"], narrow, 1)
            cases.append(dict(op=op, conv=plain, x=x, w=w, dy=dy, kind="normal", step=step,
                              config=config))
    # Grouped convolutions: the op of one group of the whole (grouped) convolution.
    grouped = dict(x_shape=(2, 5, 4, 6), k_shape=(3, 2, 2, 9), strides=(1, 2),
                   dilations=(1, 1), padding="SAME", groups=3)
    oh, ow, _, _ = ref.conv2d_geometry(grouped["x_shape"], grouped["k_shape"],
                                       grouped["strides"], grouped["padding"],
                                       grouped["dilations"])
    grouped["out_shape"] = (2, oh, ow, 9)
    for op in ("conv_fwd", "conv_bwd_input", "conv_bwd_filter"):
        for group in (0, 2):
            x = values(rng, "normal", grouped["x_shape"], narrow, 0)
            w = values(rng, "normal", grouped["k_shape"], narrow, 1)
            dy = values(rng, "normal", grouped["out_shape"], narrow, 1)
            cases.append(dict(op=op, conv=grouped, x=x, w=w, dy=dy, kind="grouped",
                              group=group, step=group * 7,
                              config=random_config(rng, "stochastic", narrow, 12, chunk=0)))
    cases += fused_cases(rng, kinds, quick)
    # quantize
    for rounding in ROUNDINGS:
        for kind in kinds:
            fmt = next_format()
            x = values(rng, kind, (int(rng.integers(1, 300)),), fmt, 0)
            cases.append(dict(op="quantize", x=x, fmt=fmt, rounding=rounding, kind=kind,
                              seed=int(rng.integers(-2 ** 63, 2 ** 63 - 1)),
                              step=int(rng.integers(0, 2 ** 63 - 1)) if rounding ==
                              "stochastic" and kind == "normal" else 0))
    for i, case in enumerate(cases):
        case["label"] = f"#{i:03d} {describe(case)}"
    return cases


# Fused adders (numerics §7): Hopper-FP8-like e8m13 and float32 results, both output
# roundings, every block length class, F from 1 to 40, zero exponents that decide some
# blocks, operand_emin below and above binary32's, promotion (chunks a multiple of L and
# not, with stochastic chunk sums).
E8M13_INF = FloatFormat(8, 13, overflow="inf")
FUSED_ADDERS = [
    FusedAdder(32, 13, -133, -6, "toward_zero"),
    FusedAdder(16, 25, -127, -14, "toward_zero"),
    FusedAdder(4, 23, -20, -126, "nearest_even"),
    FusedAdder(8, 1, 3, -149, "toward_zero"),
    FusedAdder(64, 40, -512, -126, "nearest_even"),
    FusedAdder(1, 24, 0, -14, "toward_zero"),
]


def fused_cases(rng, kinds, quick):
    cases = []
    accumulators = [E8M13_INF, F32_INF, FloatFormat(8, 13), FloatFormat(8, 23, subnormals=False)]
    for i, kind in enumerate(kinds + ["padzero"]):
        adder = FUSED_ADDERS[i % len(FUSED_ADDERS)]
        fmt = accumulators[i % len(accumulators)]
        rounding = ROUNDINGS[i % len(ROUNDINGS)]
        chunk = [0, 2 * adder.terms, adder.terms + 3, 0][i % 4]
        cfg = AccumConfig(accumulator=fmt, chunk_size=chunk, rounding=rounding,
                          seed=int(rng.integers(-2 ** 63, 2 ** 63 - 1)), fused=adder)
        m, n = int(rng.integers(1, 17)), int(rng.integers(1, 17))
        k = [70, 3 * adder.terms + 1, 5, adder.terms, 1, 0, 2 * adder.terms - 1][i % 7]
        ta, tb = bool(i & 1), bool(i & 2)
        a = values(rng, kind, (k, m) if ta else (m, k), FloatFormat(8, 23), 0)
        b = values(rng, kind, (n, k) if tb else (k, n), FloatFormat(8, 23), 1)
        cases.append(dict(op="matmul", a=a, b=b, ta=ta, tb=tb, kind=f"fused {kind}",
                          config=cfg))
    for j, op in enumerate(("conv_fwd", "conv_bwd_input", "conv_bwd_filter")):
        for i, kind in enumerate(("normal", "specials", "mixed")):
            if quick and i == 2:
                continue
            adder = FUSED_ADDERS[(i + 2 * j) % len(FUSED_ADDERS)]
            conv = random_conv(rng)
            cfg = AccumConfig(accumulator=[E8M13_INF, F32_INF][(i + j) % 2],
                              chunk_size=[0, 5][i % 2], rounding=ROUNDINGS[(i + j) % 3],
                              seed=int(rng.integers(2 ** 62)), fused=adder)
            x = values(rng, kind, conv["x_shape"], F32_INF, 0)
            w = values(rng, kind, conv["k_shape"], F32_INF, 1)
            dy = values(rng, kind, conv["out_shape"], F32_INF,
                        0 if op == "conv_bwd_input" else 1)
            cases.append(dict(op=op, conv=conv, x=x, w=w, dy=dy, kind=f"fused {kind}",
                              config=cfg))
    return cases


def describe(case):
    op = case["op"]
    step = f" step {case['step']}" if case.get("step") else ""
    if op == "quantize":
        return (f"quantize n={case['x'].size} {case['fmt']!r} {case['rounding']}{step} "
                f"[{case['kind']}]")
    cfg = case["config"]
    if op == "matmul":
        m = case["a"].shape[1] if case["ta"] else case["a"].shape[0]
        k = case["a"].shape[0] if case["ta"] else case["a"].shape[1]
        n = case["b"].shape[0] if case["tb"] else case["b"].shape[1]
        shape = f"matmul {m}x{k}x{n} ta={int(case['ta'])} tb={int(case['tb'])}"
    else:
        c = case["conv"]
        shape = (f"{op} x{c['x_shape']} k{c['k_shape'][:2]} cout={c['k_shape'][3]} "
                 f"s{c['strides']} d{c['dilations']} {c['padding']}")
        if c.get("groups", 1) > 1:
            shape += f" group {case['group']} of {c['groups']}"
    return f"{shape} {cfg!r}{step} [{case['kind']}]"


def reference_output(case):
    """The reference result of a case (runs in worker processes)."""
    op = case["op"]
    cfg = case.get("config")
    step = case.get("step", 0)
    if op == "matmul":
        return ref.matmul(case["a"], case["b"], cfg, case["ta"], case["tb"], step=step)
    if op == "quantize":
        return ref.quantize(case["x"], case["fmt"], case["rounding"], case["seed"], step=step)
    c = case["conv"]
    geo = dict(strides=c["strides"], padding=c["padding"], dilations=c["dilations"], step=step)
    if op == "conv_fwd":
        out = ref.conv2d(case["x"], case["w"], cfg, **geo)
    elif op == "conv_bwd_input":
        out = ref.conv2d_backprop_input(c["x_shape"], case["w"], case["dy"], cfg, **geo)
    else:
        out = ref.conv2d_backprop_filter(case["x"], c["k_shape"], case["dy"], cfg, **geo)
    if c.get("groups", 1) > 1:  # the kernel computes one group's channels of the whole
        _, (x_c, y_c) = _group_channels(case)
        out = out[..., x_c] if op == "conv_bwd_input" else out[..., y_c]
    return out


def _group_channels(case):
    """(the conv of one group, (its input-channel slice, its output-channel slice))."""
    c = case["conv"]
    groups, group = c.get("groups", 1), case.get("group", 0)
    kh, kw, cin_g, cout = c["k_shape"]
    cout_g = cout // groups
    sub = dict(c, x_shape=tuple(c["x_shape"][:3]) + (cin_g,), k_shape=(kh, kw, cin_g, cout_g),
               out_shape=tuple(c["out_shape"][:3]) + (cout_g,))
    return sub, (slice(group * cin_g, (group + 1) * cin_g),
                 slice(group * cout_g, (group + 1) * cout_g))


def _reference_job(case):
    try:
        return np.asarray(reference_output(case), dtype=np.float32), None
    except Exception:  # noqa: BLE001 - reported with the case
        return None, traceback.format_exc()


def run_case(lib, backend, case):
    """The kernel's result of a case (host array)."""
    op = case["op"]
    if op == "quantize":
        x = backend.upload(case["x"])
        y = backend.fill_sentinel(case["x"].shape)
        fmt = lib.format(case["fmt"], case["rounding"])
        # The launcher takes the stream seed (the TensorFlow kernel folds the step in).
        seed = ref.stream_seed(case["seed"], case.get("step", 0))
        lib.check(lib.lib.tfaccum_cuda_quantize(backend.ptr(x), backend.ptr(y), case["x"].size,
                                                fmt, ROUNDINGS.index(case["rounding"]),
                                                seed, None), "quantize")
        return backend.download(y)
    c = case.get("conv", {})
    params = lib.params(case["config"], case.get("step", 0), case.get("group", 0),
                        c.get("groups", 1))
    if op == "matmul":
        a, b = case["a"], case["b"]
        m = a.shape[1] if case["ta"] else a.shape[0]
        k = a.shape[0] if case["ta"] else a.shape[1]
        n = b.shape[0] if case["tb"] else b.shape[1]
        da, db, out = backend.upload(a), backend.upload(b), backend.fill_sentinel((m, n))
        lib.check(lib.lib.tfaccum_cuda_matmul(backend.ptr(da), backend.ptr(db), backend.ptr(out),
                                              m, n, k, int(case["ta"]), int(case["tb"]),
                                              params, None), "matmul")
        return backend.download(out)
    c, (x_c, y_c) = _group_channels(case)  # the whole conv when not grouped
    case = dict(case, x=case["x"][..., x_c], w=case["w"][..., y_c], dy=case["dy"][..., y_c])
    geometry, dims = lib.geometry(c)
    want = ref.conv2d_geometry(c["x_shape"], c["k_shape"], c["strides"], c["padding"],
                               c["dilations"])
    if tuple(dims) != tuple(want):
        raise AssertionError(f"conv geometry {dims} != reference {want}")
    if op == "conv_fwd":
        x, w, out = backend.upload(case["x"]), backend.upload(case["w"]), \
            backend.fill_sentinel(c["out_shape"])
        lib.check(lib.lib.tfaccum_cuda_conv2d(backend.ptr(x), backend.ptr(w), backend.ptr(out),
                                              geometry, params, None), "conv2d")
    elif op == "conv_bwd_input":
        w, dy, out = backend.upload(case["w"]), backend.upload(case["dy"]), \
            backend.fill_sentinel(c["x_shape"])
        lib.check(lib.lib.tfaccum_cuda_conv2d_backprop_input(
            backend.ptr(w), backend.ptr(dy), backend.ptr(out), geometry, params, None),
            "conv2d_backprop_input")
    else:
        x, dy, out = backend.upload(case["x"]), backend.upload(case["dy"]), \
            backend.fill_sentinel(c["k_shape"])
        lib.check(lib.lib.tfaccum_cuda_conv2d_backprop_filter(
            backend.ptr(x), backend.ptr(dy), backend.ptr(out), geometry, params, None),
            "conv2d_backprop_filter")
    return backend.download(out)


def compare(got, want):
    """Indices where got and want differ in bits (any NaN equals any NaN)."""
    got = np.asarray(got, np.float32).reshape(-1)
    want = np.asarray(want, np.float32).reshape(-1)
    if got.shape != want.shape:
        return None
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    return np.nonzero(~same)[0]


def mismatch_text(got, want, bad, limit=4):
    got, want = np.asarray(got, np.float32).reshape(-1), np.asarray(want, np.float32).reshape(-1)
    parts = []
    for i in bad[:limit]:
        parts.append(f"[{i}] got {got[i]!r} (0x{got.view(np.uint32)[i]:08x}) "
                     f"want {want[i]!r} (0x{want.view(np.uint32)[i]:08x})")
    return "; ".join(parts)


def run_suite(lib, backend, cases, shapes, workers=None, verbose=True):
    """Runs every case under every tile shape; returns (passed, failed) counts."""
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    workers = workers or max(1, min(16, (os.cpu_count() or 2)))
    passed = failed = 0
    with ctx.Pool(workers) as pool:
        pending = pool.imap(_reference_job, cases)
        for case in cases:
            outputs = {}
            for shape in shapes:
                try:
                    lib.set_tile_shape(shape)
                    outputs[shape] = run_case(lib, backend, case)
                except Exception:  # noqa: BLE001
                    outputs[shape] = traceback.format_exc()
            lib.set_tile_shape(-1)
            want, error = next(pending)
            problems = []
            if error is not None:
                problems.append("reference failed: " + error.strip().splitlines()[-1])
            for shape, got in outputs.items():
                if isinstance(got, str):
                    problems.append(f"shape {shape}: kernel failed: "
                                    + got.strip().splitlines()[-1])
                    continue
                if want is None:
                    continue
                bad = compare(got, want)
                if bad is None:
                    problems.append(f"shape {shape}: output shape {np.shape(got)} != "
                                    f"{np.shape(want)}")
                elif bad.size:
                    problems.append(f"shape {shape}: {bad.size}/{want.size} outputs differ: "
                                    + mismatch_text(got, want, bad))
            if problems:
                failed += 1
                print(f"FAIL {case['label']}", flush=True)
                for p in problems:
                    print("     " + p, flush=True)
            else:
                passed += 1
                if verbose:
                    print(f"ok   {case['label']}", flush=True)
    print(f"bit-exactness: {passed} cases passed, {failed} failed "
          f"({len(shapes)} tile shapes each, {time.time() - start:.1f} s)", flush=True)
    return passed, failed


# ---------------------------------------------------------------------------------------
# The AccumParams the library builds (custom_ops/core/accum_params.h, as the TensorFlow
# kernels build theirs)
# ---------------------------------------------------------------------------------------
def params_checks(lib, verbose=True):
    """Every field of tfaccum_cuda_make_params' AccumParams against the config it was
    built from, flushes_subnormals included (set when any format used has subnormals
    off; the CPU engine skips the range checks when it is not); returns the failures."""
    exact = FloatFormat(8, 23)  # the product format stored for exact products
    configs = [
        AccumConfig(accumulator=KEEPING),
        AccumConfig(accumulator=FLUSHING),
        AccumConfig(accumulator=KEEPING, product=FLUSHING),
        AccumConfig(accumulator=KEEPING, chunk_size=8, chunk_accumulator=FLUSHING),
        AccumConfig(accumulator=F16_INF, product=FloatFormat(5, 2), chunk_size=3,
                    chunk_accumulator=BF16_INF, rounding="stochastic", seed=-3),
        AccumConfig(accumulator=FloatFormat(4, 1, subnormals=False, overflow="inf"),
                    rounding="toward_zero"),
        AccumConfig(accumulator=E8M13_INF, chunk_size=128, rounding="toward_zero",
                    fused=FusedAdder(32, 13, -133, -6, "toward_zero")),
        AccumConfig(accumulator=FloatFormat(8, 23), fused=FusedAdder(4, 25, 7, -149,
                                                                      "nearest_even")),
    ]
    failures = 0
    for cfg in configs:
        for step, group, groups in ((0, 0, 1), (5, 2, 3)):
            p = lib.params_view(cfg, step, group, groups)
            formats = (cfg.accumulator, cfg.product or exact, cfg.effective_chunk_accumulator)
            want = dict(has_product=int(cfg.product is not None),
                        rounding=ROUNDINGS.index(cfg.rounding), chunk_size=cfg.chunk_size,
                        seed=ref.stream_seed(cfg.seed, step), group=group, groups=groups,
                        flushes_subnormals=int(not all(
                            f.subnormals for f in formats if f is not exact)))
            adder = cfg.fused
            want.update(
                fused_terms=adder.terms if adder else 0,
                fused_fraction_bits=adder.fraction_bits if adder else 0,
                fused_toward_zero=int(adder.output_rounding == "toward_zero") if adder else 0,
                fused_zero_scale=2.0 ** adder.zero_exponent if adder else 0.0,
                fused_operand_min=2.0 ** adder.operand_emin if adder else 0.0)
            got = {name: getattr(p, name) for name in want}
            if adder:  # the block's rounding overflows to Inf whenever the format does
                acc = cfg.accumulator
                want["fused_result"] = (acc.max_value, float("inf") if acc.overflow == "inf"
                                        else acc.max_value)
                got["fused_result"] = (p.fused_result.max_value, p.fused_result.overflow_value)
            for name, fmt in zip(("accumulator", "product", "chunk_accumulator"), formats):
                view = getattr(p, name)
                want[name] = (fmt.max_value, 0.0 if fmt.subnormals else fmt.smallest_normal)
                got[name] = (view.max_value, view.flush_below)
            bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            label = f"params {cfg!r} step {step} group {group} of {groups}"
            if bad:
                failures += 1
                print(f"FAIL {label}: " + ", ".join(f"{k} = {g!r}, expected {w!r}"
                                                   for k, (g, w) in bad.items()), flush=True)
            elif verbose:
                print(f"ok   {label}", flush=True)
    return failures


# ---------------------------------------------------------------------------------------
# Large checks on the GPU: tiling at scale (shapes agree; sampled outputs vs reference)
# ---------------------------------------------------------------------------------------
def large_checks(lib, backend, rng):
    failures = 0
    cases = [
        ("matmul 200x300x130 e6m9 stochastic chunk 32", (200, 130, 300), False, True,
         AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=32, rounding="stochastic",
                     seed=77)),
        ("matmul 257x65x97 ta e5m10 toward_zero products e5m2", (257, 97, 65), True, False,
         AccumConfig(accumulator=F16_INF, product=FloatFormat(5, 2), rounding="toward_zero")),
    ]
    for label, (m, k, n), ta, tb, cfg in cases:
        a = values(rng, "normal", (k, m) if ta else (m, k), cfg.accumulator, 0)
        b = values(rng, "normal", (n, k) if tb else (k, n), cfg.accumulator, 1)
        results = []
        for shape in (0, 1, 2):
            lib.set_tile_shape(shape)
            case = dict(op="matmul", a=a, b=b, ta=ta, tb=tb, config=cfg)
            results.append(run_case(lib, backend, case))
        lib.set_tile_shape(-1)
        problems = []
        for s in (1, 2):
            bad = compare(results[s], results[0])
            if bad.size:
                problems.append(f"shape {s} differs from shape 0 at {bad.size} outputs")
        a_log = a.T if ta else a
        b_log = b.T if tb else b
        for _ in range(24):
            i, j = int(rng.integers(m)), int(rng.integers(n))
            want = ref.dot(a_log[i], b_log[:, j], cfg, element=i * n + j)
            got = results[0][i, j]
            if compare(np.array([got]), np.array([want])).size:
                problems.append(f"y[{i},{j}] = {got!r}, reference {want!r}")
        print(("FAIL " if problems else "ok   ") + label, flush=True)
        for p in problems[:6]:
            print("     " + p)
        failures += bool(problems)
    return failures


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def time_ms(backend, fn, repeats):
    fn()  # warm-up (and cuDNN autotuning)
    backend.sync()
    times = []
    for _ in range(repeats):
        start, end = backend.timer()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) if hasattr(start, "elapsed_time")
                     else backend.cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


FULL_SIZES = dict(n=4096, layers=[(32, 56, 56, 64, 64), (32, 14, 14, 256, 256)])
SMOKE_SIZES = dict(n=64, layers=[(2, 6, 5, 8, 8), (1, 3, 3, 16, 16)])  # --smoke-timing


def timing(lib, backend, deadline, sizes=FULL_SIZES):
    """Returns (table rows, number of failed spot checks)."""
    rows, failures = [], 0
    rng = np.random.default_rng(7)
    cfg = AccumConfig(accumulator=FloatFormat(8, 10))  # e8m10, exact products, nearest-even
    params = lib.params(cfg)
    torch = getattr(backend, "torch", None)

    n = sizes["n"]
    a_host = rng.standard_normal((n, n), dtype=np.float32)
    b_host = rng.standard_normal((n, n), dtype=np.float32)
    a, b, c = backend.upload(a_host), backend.upload(b_host), backend.empty((n, n))

    def ours_mm():
        lib.check(lib.lib.tfaccum_cuda_matmul(backend.ptr(a), backend.ptr(b), backend.ptr(c),
                                              n, n, n, 0, 0, params, None), "matmul")

    t_ours = time_ms(backend, ours_mm, 3)
    if torch is not None:
        t_base = time_ms(backend, lambda: torch.matmul(a, b), 10)
    elif hasattr(backend, "cupy"):
        t_base = time_ms(backend, lambda: backend.cupy.matmul(a, b), 10)
    else:  # host emulation without PyTorch
        t_base = time_ms(backend, lambda: np.matmul(a, b), 10)
    rows.append((f"matmul {n}^3 e8m10 nearest-even exact products", t_ours, "cuBLAS SGEMM",
                 t_base))
    # The timed result itself, spot-checked against the reference (4096-long sums).
    got = backend.download(c)
    for i, j in ((0, 0), (n - 1, n - 1), (n // 3, n // 7)):
        want = ref.dot(a_host[i], b_host[:, j], cfg, element=i * n + j)
        if compare(np.array([got[i, j]]), np.array([want])).size:
            print(f"FAIL matmul {n}^3 y[{i},{j}] = {got[i, j]!r}, reference {want!r}")
            failures += 1
    a = b = c = None  # free the device memory

    for batch, h, w, cin, cout in sizes["layers"]:
        if time.time() > deadline:
            print("timing: deadline reached, skipping the remaining layers")
            break
        name = f"conv {batch}x{h}x{w}x{cin}->{cout} 3x3"
        conv = dict(x_shape=(batch, h, w, cin), k_shape=(3, 3, cin, cout), strides=(1, 1),
                    dilations=(1, 1), padding="SAME")
        geometry, (oh, ow, _, _) = lib.geometry(conv)
        x = backend.upload(rng.standard_normal((batch, h, w, cin), dtype=np.float32))
        wt = backend.upload(rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * 0.05)
        dy = backend.upload(rng.standard_normal((batch, oh, ow, cout), dtype=np.float32))
        y, dx, dw = backend.empty((batch, oh, ow, cout)), backend.empty((batch, h, w, cin)), \
            backend.empty((3, 3, cin, cout))
        P = backend.ptr
        passes = [
            ("fwd", lambda: lib.check(lib.lib.tfaccum_cuda_conv2d(
                P(x), P(wt), P(y), geometry, params, None), "conv2d")),
            ("input grad", lambda: lib.check(lib.lib.tfaccum_cuda_conv2d_backprop_input(
                P(wt), P(dy), P(dx), geometry, params, None), "conv2d_backprop_input")),
            ("filter grad", lambda: lib.check(lib.lib.tfaccum_cuda_conv2d_backprop_filter(
                P(x), P(dy), P(dw), geometry, params, None), "conv2d_backprop_filter")),
        ]
        base = {}
        if torch is not None:
            F = torch.nn.functional
            x_n = x.permute(0, 3, 1, 2).contiguous()      # NCHW
            w_n = wt.permute(3, 2, 0, 1).contiguous()     # OIHW
            dy_n = dy.permute(0, 3, 1, 2).contiguous()
            base = {
                "fwd": lambda: F.conv2d(x_n, w_n, padding=1),
                "input grad": lambda: torch.nn.grad.conv2d_input(x_n.shape, w_n, dy_n,
                                                                 padding=1),
                "filter grad": lambda: torch.nn.grad.conv2d_weight(x_n, w_n.shape, dy_n,
                                                                   padding=1),
            }
        for pass_name, fn in passes:
            if time.time() > deadline:
                break
            t_ours = time_ms(backend, fn, 2)
            t_base = time_ms(backend, base[pass_name], 10) if pass_name in base \
                else float("nan")
            rows.append((f"{name} {pass_name}", t_ours, "cuDNN" if base else "n/a (no torch)",
                         t_base))
    return rows, failures


def print_table(rows, device):
    print()
    print(f"tfaccum CUDA kernels vs float32 libraries (TF32 off) on {device}")
    header = f"{'pass':<52} {'tfaccum ms':>11} {'baseline':>14} {'base ms':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, ours, base_name, base in rows:
        if base == base and base > 0:  # not NaN
            print(f"{name:<52} {ours:>11.3f} {base_name:>14} {base:>9.3f} {ours / base:>6.1f}x")
        else:
            print(f"{name:<52} {ours:>11.3f} {base_name:>14} {'n/a':>9} {'n/a':>7}")
    print("goal: every ratio <= 20x")


# ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulate", action="store_true",
                        help="no GPU: run the suite through the host emulation")
    parser.add_argument("--quick", action="store_true", help="a smaller suite")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--arch", default=os.environ.get("TFACCUM_CUDA_ARCHS", "native"))
    parser.add_argument("--lib", help="use this already built library")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes computing the reference")
    parser.add_argument("--quiet", action="store_true", help="print failures only")
    parser.add_argument("--smoke-timing", action="store_true",
                        help="with --emulate: run the timing code on tiny sizes (tests the "
                             "script; uses CPU PyTorch if installed)")
    args = parser.parse_args(argv)
    t0 = time.time()
    deadline = t0 + DEADLINE_S
    failures = 0

    cases = make_cases(quick=args.quick)
    if args.emulate:
        lib = Library(args.lib or build_emulation())
        backend = HostBackend()
    else:
        standalone = load_file_module("_tfaccum_standalone",
                                      os.path.join(ROOT, "custom_ops", "cuda", "standalone.py"))
        if args.lib:
            path = args.lib
        else:
            try:
                path = standalone.build(arch=args.arch)
            except subprocess.CalledProcessError:
                if args.arch != "native":
                    raise
                print("nvcc -arch=native failed; building for sm_90", flush=True)
                path = standalone.build(arch="90")
        lib = Library(path)
        backend = gpu_backend()
    print(f"library {lib.path}; {backend.name}; {len(cases)} cases "
          f"(build {time.time() - t0:.1f} s)", flush=True)

    passed, failed = run_suite(lib, backend, cases, shapes=(-1, 0, 1, 2),
                               workers=args.workers, verbose=not args.quiet)
    failures += failed
    failures += params_checks(lib, verbose=not args.quiet)
    if not args.quick:
        try:
            failures += large_checks(lib, backend, np.random.default_rng(99))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failures += 1
    rows = []
    if args.emulate and args.smoke_timing:
        try:
            try:
                timing_backend = TorchBackend("cpu")
            except ImportError:
                timing_backend = backend
            rows, bad = timing(lib, timing_backend, deadline, SMOKE_SIZES)
            failures += bad
            backend = timing_backend
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failures += 1
    elif not args.emulate and not args.skip_timing:
        try:
            rows, bad = timing(lib, backend, deadline)
            failures += bad
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failures += 1
    print(f"total {time.time() - t0:.1f} s; "
          + ("ALL BIT-EXACT" if failures == 0 else f"{failures} FAILURES"), flush=True)
    if rows:
        print_table(rows, backend.name)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
