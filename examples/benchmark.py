"""Speed of the tfaccum kernels relative to native TensorFlow, measured in one run.

    python examples/benchmark.py                 # matmul, conv and training-step tables
    python examples/benchmark.py --only=matmul   # or --only=conv, --only=step, --only=fused
    python examples/benchmark.py --repeats=5
    TFACCUM_ENGINE_ISA=avx2 python examples/benchmark.py   # another engine path

Every figure is a median wall time over --repeats runs after a warm-up, on this machine,
in this process; ratios are tfaccum / native for the same shapes and pass. The NumPy
column is a straightforward NumPy emulation that loops over k and rounds the whole output
after each addition (what one writes without tfaccum). "FP8" rows round both operands to
E5M2 first, inside the timed call (the paper's setting; the engine then adds in binary32
lanes, tfaccum/engine.py); "float32" rows take the operands as they are. The fused table
compares the fused multi-term adder (numerics.md §7, tensor-core accumulation) with the
sequential path on the same operands and accumulator.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaccum  # noqa: E402
from tfaccum import AccumConfig, AccumPolicy, FloatFormat, engine, reference  # noqa: E402
from tfaccum.config import FusedAdder  # noqa: E402

FP8 = FloatFormat(5, 2)  # E5M2 operands, as in the paper


def median_time(fn, repeats):
    fn()  # warm-up (and graph tracing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def numpy_emulation(a, b, mantissa_bits):
    """Loop over k; round the whole [M, N] partial-sum matrix to m bits after each add."""
    s = np.zeros((a.shape[0], b.shape[1]), np.float64)
    for k in range(a.shape[1]):
        s += np.outer(a[:, k], b[k]).astype(np.float64)
        mant, exp = np.frexp(s)
        s = np.ldexp(np.round(mant * 2.0 ** (mantissa_bits + 1)), exp - mantissa_bits - 1)
    return s.astype(np.float32)


def bench_matmul(repeats, numpy_limit):
    shapes = [(256, 256, 256), (512, 512, 512), (1024, 4096, 256)]
    rng = np.random.default_rng(0)
    print("\n## matmul (time in ms; ratio = tfaccum / tf.matmul float32)\n")
    print("| M x K x N | operands | accumulator | chunk | tf.matmul | tfaccum | ratio | NumPy loop "
          "| vs NumPy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for M, K, N in shapes:
        a = tf.constant(rng.standard_normal((M, K)), tf.float32)
        b = tf.constant(rng.standard_normal((K, N)), tf.float32)
        native = median_time(lambda: tf.matmul(a, b).numpy(), repeats)
        np_a, np_b = a.numpy(), b.numpy()
        for m in (7, 10, 16, 23):
            numpy_time = None
            if M * K * N <= numpy_limit:
                numpy_time = median_time(lambda: numpy_emulation(np_a, np_b, m), 1)
            for operands in (None, FP8) if m <= 21 else (None,):
                for chunk in (0, 64):
                    cfg = AccumConfig(accumulator=FloatFormat(8, m), chunk_size=chunk)
                    policy = AccumPolicy.uniform(cfg, operands=operands)
                    t = median_time(lambda: tfaccum.accum_matmul(a, b, policy).numpy(), repeats)
                    np_cols = ("-", "-") if numpy_time is None or operands else (
                        f"{numpy_time * 1e3:.0f}", f"{numpy_time / t:.0f}x faster")
                    print(f"| {M}x{K}x{N} | {'FP8' if operands else 'float32'} | e8m{m} | "
                          f"{chunk or 'seq'} | {native * 1e3:.2f} | {t * 1e3:.1f} | "
                          f"{t / native:.1f} | {np_cols[0]} | {np_cols[1]} |", flush=True)


def bench_fused(repeats):
    """The fused adder (numerics.md §7) against the sequential path with the same
    operands (already in the operand format, outside the timed call), accumulator and
    output rounding, and against native tf.matmul."""
    rng = np.random.default_rng(3)
    e4m3 = FloatFormat(4, 3, overflow="saturate")
    fp16 = FloatFormat(5, 10, overflow="inf")
    rows = [  # label, operands, accumulator, its rounding, adder
        ("FP8 E4M3 -> e8m13 RZ", "e4m3", e4m3, FloatFormat(8, 13, overflow="inf"),
         FusedAdder(32, 13, -133, -6, "toward_zero")),
        ("fp16 -> e8m23 RZ", "fp16", fp16, FloatFormat(8, 23, overflow="inf"),
         FusedAdder(16, 25, -127, -14, "toward_zero")),
    ]
    print("\n## fused adder vs sequential (time in ms; ratios fused / sequential and fused / "
          "tf.matmul float32)\n")
    print("| M x K x N | operands -> accumulator | adder | chunk | tf.matmul | sequential | "
          "fused | fused / sequential | fused / native |")
    print("|---|---|---|---|---|---|---|---|---|")
    for M, K, N in [(512, 512, 512)]:
        for label, name, operands, acc, adder in rows:
            def operand(shape):
                values = rng.standard_normal(shape).astype(np.float32)
                return tf.constant(np.asarray(reference.quantize(values, operands), np.float32))

            a, b = operand((M, K)), operand((K, N))
            native = median_time(lambda: tf.matmul(a, b).numpy(), repeats)
            for chunk in (0, 128):
                sequential = AccumConfig(accumulator=acc, rounding="toward_zero",
                                         chunk_size=chunk)
                fused = sequential.replace(fused=adder)
                t_seq = median_time(lambda: tfaccum.accum_matmul(a, b, sequential).numpy(),
                                    repeats)
                t_fused = median_time(lambda: tfaccum.accum_matmul(a, b, fused).numpy(), repeats)
                print(f"| {M}x{K}x{N} | {label} | L={adder.terms} F={adder.fraction_bits} | "
                      f"{chunk or 'none'} | {native * 1e3:.2f} | {t_seq * 1e3:.1f} | "
                      f"{t_fused * 1e3:.1f} | {t_fused / t_seq:.2f} | {t_fused / native:.1f} |",
                      flush=True)


CONV_LAYERS = [
    ("ResNet-32 stage 1", 128, 32, 16, 16),
    ("ResNet-32 stage 2", 128, 16, 32, 32),
    ("ResNet-32 stage 3", 128, 8, 64, 64),
    ("ResNet-18 conv2_x", 32, 56, 64, 64),
]


def bench_conv(repeats):
    rng = np.random.default_rng(1)
    cfg = AccumConfig(accumulator=FloatFormat(8, 10))
    lib = tfaccum.ops.load_library()
    attrs = dict(strides=[1, 1], dilations=[1, 1], padding="SAME", explicit_paddings=[])
    attrs.update(cfg.kernel_attrs())
    print("\n## conv2d 3x3, SAME, e8m10 accumulator (time in ms; ratio = tfaccum / native TF)\n")
    print("| layer | batch, HxW, Cin->Cout | pass | native | float32 operands | ratio "
          "| FP8 operands | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, hw, cin, cout in CONV_LAYERS:
        x = tf.constant(rng.standard_normal((batch, hw, hw, cin)), tf.float32)
        w = tf.constant(rng.standard_normal((3, 3, cin, cout)) * 0.1, tf.float32)
        dy = tf.constant(rng.standard_normal((batch, hw, hw, cout)), tf.float32)
        x_shape, w_shape = tf.constant(x.shape, tf.int32), tf.constant(w.shape, tf.int32)

        def ours(pass_name, operands):
            # The operands are rounded inside the timed call, as the layers do.
            q = (lambda t: t) if operands is None else (lambda t: tfaccum.quantize(t, operands))
            policy = AccumPolicy.uniform(cfg, operands=operands)
            return {
                "forward": lambda: tfaccum.accum_conv2d(x, w, policy).numpy(),
                "input grad": lambda: lib.tfaccum_conv2d_backprop_input(
                    x_shape, q(w), q(dy), 0, **attrs).numpy(),
                "filter grad": lambda: lib.tfaccum_conv2d_backprop_filter(
                    q(x), w_shape, q(dy), 0, **attrs).numpy(),
            }[pass_name]

        natives = {
            "forward": lambda: tf.nn.conv2d(x, w, 1, "SAME").numpy(),
            "input grad": lambda: tf.compat.v1.nn.conv2d_backprop_input(
                x_shape, w, dy, [1, 1, 1, 1], "SAME").numpy(),
            "filter grad": lambda: tf.compat.v1.nn.conv2d_backprop_filter(
                x, w_shape, dy, [1, 1, 1, 1], "SAME").numpy(),
        }
        for pass_name, native_fn in natives.items():
            native = median_time(native_fn, repeats)
            t32 = median_time(ours(pass_name, None), max(1, repeats // 2))
            t8 = median_time(ours(pass_name, FP8), max(1, repeats // 2))
            print(f"| {name} | {batch}, {hw}x{hw}, {cin}->{cout} | {pass_name} | "
                  f"{native * 1e3:.1f} | {t32 * 1e3:.0f} | {t32 / native:.1f} | "
                  f"{t8 * 1e3:.0f} | {t8 / native:.1f} |", flush=True)


def bench_training_step(repeats, batch=128):
    """One SGD step of ResNet-32 on a CIFAR-shaped batch: native float32 against the
    paper's policy (FP8 E5M2 operands, e6 accumulators at the widths tfaccum.analysis
    predicts for chunk 64, chunk size 64; exact products, nearest-even)."""
    from tfaccum import analysis, models
    import keras
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((batch, 32, 32, 3)), tf.float32)
    y = tf.constant(rng.integers(0, 10, batch))
    native_model = models.resnet32()
    plan = analysis.predict(native_model, batch, chunk_size=64, sparsity=None,
                            operands=FP8, exponent_bits=6)
    emulated_model = tfaccum.rewrite(native_model, plan)
    print("\n## training step: ResNet-32, batch %d, SGD (time in ms; ratio = tfaccum / native)"
          "\n" % batch)
    print("| model | policy | native | tfaccum | ratio |")
    print("|---|---|---|---|---|")
    times = []
    for model in (native_model, emulated_model):
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy")
        before = engine.current()
        times.append(median_time(lambda: model.train_on_batch(x, y), repeats))
        after = engine.current()
    tiles32 = after.tiles_binary32 - before.tiles_binary32
    tiles64 = after.tiles_binary64 - before.tiles_binary64
    bits = sorted({layer.gemm(g).mantissa_bits for layer in plan.layers
                   for g in ("fwd", "bwd", "grad")})
    print(f"| ResNet-32 | FP8 E5M2 operands, e6 accumulators m in {bits[0]}..{bits[-1]}, "
          f"chunk 64 | {times[0] * 1e3:.0f} | {times[1] * 1e3:.0f} | "
          f"{times[1] / times[0]:.1f} |", flush=True)
    print(f"\nEngine tiles of the emulated steps: {tiles32} in binary32 lanes, {tiles64} in "
          f"binary64 ({after.tiles_binary32_redone - before.tiles_binary32_redone} binary32 "
          f"tiles redone in binary64).")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["matmul", "conv", "step", "fused"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy_limit", type=int, default=512 ** 3,
                        help="largest M*K*N for which the NumPy loop is timed")
    args = parser.parse_args()
    print(f"tfaccum benchmark: TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"inter/intra threads {tf.config.threading.get_inter_op_parallelism_threads()}/"
          f"{tf.config.threading.get_intra_op_parallelism_threads()} (0 = all)")
    state = engine.current()
    print(f"engine path: {state.isa} (best supported: {state.supported_isa}), binary32 lanes "
          f"{'on' if state.float32_lanes else 'off'}")
    if args.only in (None, "matmul"):
        bench_matmul(args.repeats, args.numpy_limit)
    if args.only in (None, "conv"):
        bench_conv(args.repeats)
    if args.only in (None, "fused"):
        bench_fused(args.repeats)
    if args.only in (None, "step"):
        bench_training_step(args.repeats)


if __name__ == "__main__":
    main()
