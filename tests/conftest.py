import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

# Every instruction-set path of the CPU engine, each with and without its binary32 lanes
# (tfaccum/engine.py). A test module that uses the fixture runs once per path; each path
# must give the same bits.
ENGINE_PATHS = [(isa, lanes) for isa in ("avx512", "avx2", "generic") for lanes in (True, False)]


@pytest.fixture(params=ENGINE_PATHS,
                ids=[f"{isa}-{'f32lanes' if lanes else 'f64lanes'}" for isa, lanes in ENGINE_PATHS])
def engine_path(request):
    from tfaccum import engine
    isa, lanes = request.param
    if isa not in engine.current().supported_isas:
        pytest.skip(f"this processor does not run the {isa} path")
    with engine.path(isa, lanes) as state:
        yield state
