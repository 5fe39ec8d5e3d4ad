# In-place builds of the op library (pip install -e . does the same once).
PYTHON ?= python

.PHONY: all cuda cuda-standalone gpu-check test clean bench
all:
	$(PYTHON) -m custom_ops.build

cuda:
	TFACCUM_CUDA=1 $(PYTHON) -m custom_ops.build

# The framework-free CUDA library and its check script (a GPU machine without TensorFlow).
cuda-standalone:
	$(PYTHON) custom_ops/cuda/standalone.py

gpu-check:
	$(PYTHON) tests/gpu/gpu_check.py

test: all
	$(PYTHON) -m pytest -q tests

bench: all
	$(PYTHON) examples/benchmark.py

clean:
	rm -rf build tfaccum/_tfaccum_ops.so tfaccum/_tfaccum_ops.so.tf_version
