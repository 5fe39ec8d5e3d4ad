"""The CUDA sources never rot: they compile with nvcc (no GPU needed), without register
spills, and their logic matches the reference when run through the host emulation.

* test_nvcc_compiles_without_spills: custom_ops/cuda/*.cu compiled to an object for one
  architecture (sm_90, or $TFACCUM_TEST_CUDA_ARCH) with the flags every build uses
  (--fmad=false), checking ptxas's resource report. Skipped without nvcc.
* test_emulated_kernels_match_reference: the device code (accum_kernels.cuh) compiled as
  plain C++ by tests/gpu/cuda_emulation.cc and run by tests/gpu/gpu_check.py --emulate
  --quick: every case under every tile shape, bit for bit against tfaccum/reference.py
  (subnormals off in each format a GEMM uses among them), every field of the AccumParams
  the launchers' helper builds (flushes_subnormals included), and the script's timing
  code on tiny sizes. Skipped without g++.

The real GPU check is tests/gpu/gpu_check.py on a GPU machine (see the README).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "custom_ops", "cuda")


def _standalone():
    spec = importlib.util.spec_from_file_location(
        "_tfaccum_standalone", os.path.join(CUDA_DIR, "standalone.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standalone = _standalone()


def _includes(path):
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', open(path).read(), re.M)


def test_cuda_sources_are_framework_free():
    for name in os.listdir(CUDA_DIR):
        if name.endswith((".cu", ".cuh", ".h")):
            includes = _includes(os.path.join(CUDA_DIR, name))
            assert not [i for i in includes if "tensorflow" in i or "Eigen" in i], name


def test_core_is_free_of_tensorflow_and_cuda():
    # custom_ops/core is shared by the CPU engine, the TensorFlow kernels and the CUDA
    # kernels (docs/architecture.md): it may include only the C/C++ library and itself.
    core = os.path.join(ROOT, "custom_ops", "core")
    for name in os.listdir(core):
        for include in _includes(os.path.join(core, name)):
            assert "/" not in include and not include.startswith(("cuda", "cu")) \
                and "tensorflow" not in include and "Eigen" not in include, (name, include)


def test_nvcc_compiles_without_spills(tmp_path):
    nvcc = standalone.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA sources are not compiled")
    arch = os.environ.get("TFACCUM_TEST_CUDA_ARCH", "90")
    for source in standalone.sources():
        obj = tmp_path / (os.path.basename(source) + ".o")
        cmd = [nvcc, "-c", source, "-o", str(obj), "-Xptxas", "-v"] + \
            standalone.NVCC_FLAGS + standalone.arch_flags(arch)
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        report = result.stdout + result.stderr
        kernels = re.findall(r"Compiling entry function '([^']+)'", report)
        assert kernels, report
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert len(spills) >= len(kernels), report
        assert all(s == "0" and l == "0" for s, l in spills), \
            "register spills:\n" + "\n".join(l for l in report.splitlines() if "spill" in l)
        warnings = [l for l in report.splitlines() if "warning" in l.lower()]
        assert not warnings, "\n".join(warnings)


def test_emulated_kernels_match_reference():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler for the host emulation")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "gpu", "gpu_check.py"), "--emulate", "--quick",
         "--quiet", "--smoke-timing", "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "ALL BIT-EXACT" in output, output[-6000:]
