# In-place builds of the op library (pip install -e . does the same once).
PYTHON ?= python

.PHONY: all cuda test clean bench
all:
	$(PYTHON) -m custom_ops.build

cuda:
	TFACCUM_CUDA=1 $(PYTHON) -m custom_ops.build

test: all
	$(PYTHON) -m pytest -q tests

bench: all
	$(PYTHON) examples/benchmark.py

clean:
	rm -rf build tfaccum/_tfaccum_ops.so
