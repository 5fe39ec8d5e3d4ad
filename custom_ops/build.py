"""Compiles the tfaccum op library with the installed TensorFlow's flags.

Used by setup.py (pip install) and the Makefile (`make`, `make cuda`). Objects are
rebuilt only when a source or header is newer, and compiled in parallel.

    python -m custom_ops.build [--cuda] [--out tfaccum/_tfaccum_ops.so]
"""

import argparse
import concurrent.futures
import glob
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS_DIR = os.path.join(ROOT, "custom_ops")
CUDA_DIR = os.path.join(OPS_DIR, "cuda")
BUILD_DIR = os.path.join(ROOT, "build", "ops")

# The TF-free engine; the op registrations; the CPU kernels.
CPU_SOURCES = ["cpu/gemm_engine.cc", "tf/ops/accum_ops.cc"] + sorted(
    os.path.relpath(p, OPS_DIR) for p in glob.glob(os.path.join(OPS_DIR, "tf", "kernels", "*.cc")))
# IEEE arithmetic exactly as written: no FMA contraction, no fast-math.
COMMON_FLAGS = ["-O3", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-Wall",
                "-Wno-psabi", "-Wno-sign-compare", "-Wno-unknown-pragmas",
                "-Wno-deprecated-declarations"]


def cuda_requested():
    return os.environ.get("TFACCUM_CUDA", "0") not in ("", "0", "false", "no")


def cuda_home():
    # /usr/local/bin/nvcc may be a wrapper script: never derive CUDA_HOME from `which`.
    return os.environ.get("CUDA_HOME", "/usr/local/cuda")


def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: WPS433 (deliberately late: only the build needs TF)

    return tf


def tf_flags():
    tf = _tensorflow()
    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


# The op library only loads into the TensorFlow it was compiled against (its C++ ABI
# changes between releases; a mismatch fails with undefined symbols, or worse). The build
# writes that version next to the library, and tfaccum/ops.py refuses to load the library
# under another version.
VERSION_RECORD_SUFFIX = ".tf_version"


def version_record_path(library_path):
    return library_path + VERSION_RECORD_SUFFIX


def write_version_record(library_path, version=None):
    """Writes the TensorFlow version (default: the installed one) next to the library."""
    version = version or _tensorflow().__version__
    with open(version_record_path(library_path), "w") as f:
        f.write(version + "\n")


def _headers():
    found = []
    for pattern in ("**/*.h", "**/*.cuh", "**/*.inc"):
        found += glob.glob(os.path.join(ROOT, "custom_ops", pattern), recursive=True)
    return found


def _stale(target, deps):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(d) > t for d in deps)


def _run(cmd, verbose):
    if verbose:
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_library(out_path, cuda=False, verbose=False, jobs=None):
    cxx = os.environ.get("CXX", "g++")
    compile_flags, link_flags = tf_flags()
    headers = _headers()
    defines = ["-DTFACCUM_WITH_CUDA=1"] if cuda else []
    os.makedirs(BUILD_DIR, exist_ok=True)

    jobs_list = []
    objects = []
    for src in CPU_SOURCES:
        path = os.path.join(OPS_DIR, src)
        obj = os.path.join(BUILD_DIR, src.replace("/", "_") + (".cuda" if cuda else "") + ".o")
        objects.append(obj)
        if _stale(obj, [path] + headers):
            jobs_list.append([cxx, "-c", path, "-o", obj] + COMMON_FLAGS + compile_flags +
                             defines + ["-I" + OPS_DIR])
    cuda_libs = []
    if cuda:
        nvcc = os.path.join(cuda_home(), "bin", "nvcc")
        for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
            obj = os.path.join(BUILD_DIR, os.path.basename(path) + ".o")
            objects.append(obj)
            if _stale(obj, [path] + headers):
                # --fmad=false: TwoSum must not be contracted; -ftz=false: keep subnormals.
                jobs_list.append([nvcc, "-c", path, "-o", obj, "-O3", "--fmad=false",
                                  "-ftz=false", "--threads", "0", "-std=c++17", "-Xcompiler",
                                  "-fPIC", "-I" + OPS_DIR] + cuda_arch_flags())
        # The CUDA runtime linked statically with its symbols hidden, ahead of TensorFlow's
        # link flags: the library needs no particular libcudart.so, and its runtime
        # neither clashes with nor binds to the one TensorFlow loads.
        cuda_libs = ["-L" + os.path.join(cuda_home(), "lib64"), "-l:libcudart_static.a",
                     "-Wl,--exclude-libs,ALL", "-ldl", "-lrt", "-lpthread"]

    workers = jobs or os.cpu_count() or 2
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_run, cmd, verbose) for cmd in jobs_list]:
            future.result()

    if jobs_list or _stale(out_path, objects):
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        _run([cxx, "-shared", "-o", out_path] + objects + cuda_libs + link_flags + ["-O3"],
             verbose)
    # Every build writes it, so that an older library without one gets one from `make`.
    write_version_record(out_path)
    return out_path


def cuda_arch_flags():
    archs = os.environ.get("TFACCUM_CUDA_ARCHS", "75;80;90").split(";")
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest architecture, so that newer GPUs can JIT-compile it.
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", default=cuda_requested())
    parser.add_argument("--out", default=os.path.join(ROOT, "tfaccum", "_tfaccum_ops.so"))
    args = parser.parse_args(argv)
    try:
        build_library(args.out, cuda=args.cuda, verbose=True)
    except subprocess.CalledProcessError as e:
        sys.exit(f"build failed: {e}")


if __name__ == "__main__":
    main()
