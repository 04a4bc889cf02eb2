# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No pip cache: the CUDA build of torch is ~4 GB of wheels, and a cached copy beside the
# installed one has filled a CI machine's disk before.
PIP := $(PY) -m pip install --quiet --no-cache-dir
# torch and torchaudio must come as a matching pair; 2.11.0 is the newest torchaudio on PyPI.
TORCH_PAIR ?= torch==2.11.0 torchaudio==2.11.0

.PHONY: install demo test test-slow clean

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
