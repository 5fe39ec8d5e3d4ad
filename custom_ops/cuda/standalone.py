"""Builds tfaccum's CUDA kernels as a standalone shared library (no TensorFlow).

For testing on a machine that has nvcc and a GPU but no TensorFlow (tests/gpu/gpu_check.py
loads the result with ctypes; the C interface is custom_ops/cuda/accum_launchers.h):

    python custom_ops/cuda/standalone.py [--arch native|sm_90|...] [--out PATH]

The CUDA runtime is linked statically (nvcc's default), so the library needs only the
driver. Always compiled with --fmad=false: the rounding core's TwoSum must not be
contracted into fused multiply-adds. Runs without importing the tfaccum package.
"""

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys

CUDA_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(CUDA_DIR))
CORE_DIR = os.path.join(ROOT, "custom_ops", "core")
DEFAULT_OUT = os.path.join(ROOT, "build", "cuda_standalone", "libtfaccum_cuda.so")

# Flags every compile of the .cu files must use (also used by tests/test_cuda_build.py).
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-Xcompiler", "-fPIC", "-I" + CORE_DIR]


def nvcc_path():
    """nvcc under CUDA_HOME (never derived from `which`: /usr/local/bin/nvcc may be a
    wrapper script), else the one on PATH, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("nvcc")


def sources():
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def dependencies():
    deps = sources()
    for pattern in ("*.h", "*.cuh"):
        deps += glob.glob(os.path.join(CUDA_DIR, pattern))
    deps += glob.glob(os.path.join(CORE_DIR, "*.h"))
    return deps


def arch_flags(arch):
    """`native`, `sm_90`, `90` or a `;`-separated list of them."""
    if arch == "native":
        return ["-arch=native"]
    flags = []
    for a in str(arch).replace(",", ";").split(";"):
        a = a.strip()
        a = a[3:] if a.startswith("sm_") else a
        if a:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def build(out=DEFAULT_OUT, arch="native", verbose=True, force=False):
    """Compiles and links the library if it is missing or stale; returns its path."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME")
    stamp = out + ".arch"
    up_to_date = (not force and os.path.exists(out) and os.path.exists(stamp)
                  and open(stamp).read() == arch
                  and all(os.path.getmtime(d) <= os.path.getmtime(out) for d in dependencies()))
    if up_to_date:
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cmd = [nvcc, "-shared", "-o", out] + NVCC_FLAGS + arch_flags(arch) + sources()
    if verbose:
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(stamp, "w") as f:
        f.write(arch)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=os.environ.get("TFACCUM_CUDA_ARCHS", "native"),
                        help="native (the GPU present), sm_90, or a ;-separated list")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        print(build(args.out, args.arch, force=args.force))
    except (RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"standalone CUDA build failed: {e}")


if __name__ == "__main__":
    main()
