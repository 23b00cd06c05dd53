# make test: a fresh machine to a green test run. make demo: see README.
# The virtual environment sees an existing system torch (a user's CUDA build is kept);
# otherwise TORCH_SPEC is installed (this project's CPU machines have that wheel on disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

# Tests marked slow (N·V > 2^31 elements: ~9 GB of RAM, minutes on 2 cores) stay out of
# `make test` (CI's 15-minute budget); `make test-slow` runs them, as does every GPU check.
.PHONY: test test-slow install clean

$(PY):
	if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

$(VENV)/.installed: $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) "setuptools>=64" wheel "ninja>=1.11" "pybind11>=2.12"
	$(PIP) --no-build-isolation -e ".[test]"
	$(PY) -c "import unlearn_ext as ue; print(ue.backends())"
	touch $@

install: $(VENV)/.installed

# The second run executes the Triton kernels in Triton's CPU interpreter (only the tests
# parametrised on backend triton-cpu; 2-3 minutes of CPU on 2 cores).
test: install
	$(PY) -m pytest -q -m "not slow"
	if $(PY) -c "import triton" 2>/dev/null; then TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" -k triton-cpu; \
	else echo "triton is not installed (no wheel for this platform): Triton interpreter tests not run"; fi

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf build $(VENV) unlearn_ext/*.so
