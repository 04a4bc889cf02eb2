# `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchaudio must come as a matching pair; 2.11.0 is the newest torchaudio on PyPI.
TORCH_PAIR ?= torch==2.11.0 torchaudio==2.11.0

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[test,app,deepspeed]'
	$(PY) -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	touch $@

demo: install
	$(VENV)/bin/letstalk demo --out runs/demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
