# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No pip cache: the CUDA build of torch is ~4 GB of wheels, and a cached copy beside the
# installed one has filled a CI machine's disk before.
PIP := $(PY) -m pip install --quiet --no-cache-dir
# torch and torchaudio must come as a matching pair; 2.11.0 is the newest torchaudio on PyPI.
TORCH_PAIR ?= torch==2.11.0 torchaudio==2.11.0

# benchmarks/gpu_check.sh's wheelhouse (benchmarks/gpu_wheels.txt): cp312 manylinux x86_64, for the lent GPU image
GPU_WHEELS ?= gpu-wheels
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64

.PHONY: install demo test test-slow clean gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_PAIR)
	$(PIP) -e '.[test,app,deepspeed]'
	$(PIP) --no-deps facenet-pytorch==2.6.0
	touch $@

demo: install
	$(VENV)/bin/letstalk demo --out runs/demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	grep -v -e '^#' -e '# sdist' benchmarks/gpu_wheels.txt | sed 's/ *#.*//' | grep . | xargs $(PYTHON) -m pip download \
		--quiet --no-cache-dir --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d $(GPU_WHEELS)
	sed -n 's/ *# sdist.*//p' benchmarks/gpu_wheels.txt | xargs $(PYTHON) -m pip wheel --quiet --no-cache-dir \
		--no-deps -w $(GPU_WHEELS)
	du -sh $(GPU_WHEELS)
