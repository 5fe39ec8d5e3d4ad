"""Fuzz suite: every op and raw op over ranks, zero-size and overflowing dimensions,
dtypes, out-of-range attributes, strides, dilations, paddings, size inputs and
NaN/Inf/subnormal values (the cases and their oracle are in tests/fuzz_worker.py).

Cases run in worker processes, many per process; a worker announces each case before
running it, so a case that crashes the worker (a CHECK abort, a segfault) or hangs is a
test failure naming that case, and a fresh worker continues with the rest.

The default run has the edge cases and 48 random cases per op (under a minute on two
cores); TFACCUM_FUZZ_FULL=1 runs 1500 random cases per op. TFACCUM_FUZZ_SEED picks other
random cases, TFACCUM_FUZZ_WORKERS the number of worker processes. To rerun one case:

    python tests/fuzz_worker.py --run 'raw_conv2d/0-7'
"""

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import fuzz_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fuzz_worker.py")
FULL = os.environ.get("TFACCUM_FUZZ_FULL", "") == "1"
CASES = fuzz_worker.cases(full=FULL)
CASE_TIMEOUT = 120      # seconds one case may take before it counts as a hang
STARTUP_TIMEOUT = 300   # seconds a worker may take to import TensorFlow


def _describe_exit(returncode):
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by signal {name}"
    return f"exited with status {returncode}"


def _run_worker(todo, results, case_timeout, startup_timeout, tmpdir):
    """Runs the cases `todo` in worker processes, one after another, until each has a
    result: None (as expected) or what went wrong."""
    while todo:
        cases_path = os.path.join(tmpdir, f"cases-{threading.get_ident()}-{time.monotonic_ns()}.json")
        with open(cases_path, "w") as f:
            json.dump(todo, f)
        stderr = tempfile.TemporaryFile(mode="w+", dir=tmpdir)
        proc = subprocess.Popen([sys.executable, WORKER, "--worker", cases_path], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] +
                                  [lines.put(None)], daemon=True)
        reader.start()
        current, deadline, finished = None, time.monotonic() + startup_timeout, 0
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()  # our own worker, stuck
                proc.wait()
                if current is not None:
                    results[current] = (f"hung: no result within {case_timeout} s; the worker "
                                        "was killed")
                else:
                    for case in todo:
                        results.setdefault(case["name"], "the fuzz worker did not start within "
                                           f"{startup_timeout} s")
                break
            if line is None:  # the worker exited
                returncode = proc.wait()
                stderr.seek(0)
                tail = stderr.read()[-2000:]
                if current is not None:
                    results[current] = (f"crashed: the worker {_describe_exit(returncode)} "
                                        f"while running this case; its stderr ends:\n{tail}")
                elif finished == 0 or returncode != 0:
                    for case in todo:
                        results.setdefault(case["name"], f"the fuzz worker {_describe_exit(returncode)}"
                                           f" without running this case; stderr:\n{tail}")
                break
            if line.startswith("START "):
                current = line[len("START "):].strip()
                deadline = time.monotonic() + case_timeout
            elif line.startswith("DONE "):
                record = json.loads(line[len("DONE "):])
                results[record["name"]] = record["problem"]
                current, finished = None, finished + 1
                deadline = time.monotonic() + case_timeout
        stderr.close()
        todo = [c for c in todo if c["name"] not in results]


def run_cases(cases, workers=None, case_timeout=CASE_TIMEOUT, startup_timeout=STARTUP_TIMEOUT):
    """{case name: None or the problem}, running the cases in `workers` processes."""
    if workers is None:
        workers = int(os.environ.get("TFACCUM_FUZZ_WORKERS", min(2, os.cpu_count() or 1)))
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        chunks = [cases[i::workers] for i in range(workers)]
        threads = [threading.Thread(target=_run_worker,
                                    args=(chunk, results, case_timeout, startup_timeout, tmpdir))
                   for chunk in chunks if chunk]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


@pytest.fixture(scope="module")
def fuzz_results():
    started = time.monotonic()
    results = run_cases(CASES)
    print(f"\nfuzz: {len(CASES)} cases in {time.monotonic() - started:.0f} s "
          f"({'full' if FULL else 'default'} set)")
    return results


@pytest.mark.parametrize("op", fuzz_worker.OPS)
def test_fuzz(fuzz_results, op):
    names = [c["name"] for c in CASES if c["op"] == op]
    assert len(names) >= 10, f"too few {op} cases"
    problems = {n: fuzz_results.get(n, "no result") for n in names}
    problems = {n: p for n, p in problems.items() if p is not None}
    assert not problems, f"{len(problems)} of {len(names)} {op} cases failed " \
        "(rerun one with: python tests/fuzz_worker.py --run NAME):\n" + "\n".join(
            f"  {n}: {p}" for n, p in sorted(problems.items()))


def test_fuzz_covers_every_raw_op_of_the_library():
    import tfaccum

    lib = tfaccum.ops.load_library()
    raw = {name for name in dir(lib) if name.startswith("tfaccum_")
           and not name.endswith("_eager_fallback")}
    helpers = {"tfaccum_quantize", "tfaccum_mat_mul", "tfaccum_conv2d",
               "tfaccum_conv2d_backprop_input", "tfaccum_conv2d_backprop_filter"}
    assert raw == helpers, "a raw op without a fuzz helper (tests/fuzz_worker.py raw_*)"
    ops = {c["op"] for c in CASES}
    assert ops == set(fuzz_worker.OPS)
    names = {c["name"] for c in CASES}
    for reproducer in ("edge/matmul_output_2_66", "edge/conv_explicit_2_31",
                       "edge/backprop_filter_sizes_int32_max", "edge/backprop_input_explicit_2_31",
                       "edge/backprop_input_hang_cout_0", "edge/same_near_int64_max_stride_2",
                       "edge/valid_dilated_kernel_overflow", "edge/explicit_padding_wraps"):
        assert reproducer in names


def test_crashes_and_hangs_are_failures_naming_the_case():
    """The harness itself: a worker that aborts or hangs mid-run costs only that case."""
    def case(name, kind):
        return {"name": name, "op": "selftest_" + kind}

    cases = [case("a", "ok"), case("b", "abort"), case("c", "ok"), case("d", "fail"),
             case("e", "hang"), case("f", "ok")]
    results = run_cases(cases, workers=1, case_timeout=3, startup_timeout=60)
    assert results["a"] is None and results["c"] is None and results["f"] is None, results
    assert results["b"].startswith("crashed: the worker was killed by signal SIGABRT"), results
    assert results["d"] == "failed on purpose"
    assert results["e"].startswith("hung: no result within 3 s"), results
