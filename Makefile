# Two commands on a fresh machine: `make demo` (the main job on the embedded defaults)
# and `make test` (ruff's lint, then the test suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saekit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	@# Keep a torch the user already has (the venv then sees it); otherwise take the CPU
	@# wheel, not the multi-GB CUDA build pip would pick by default.
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	    $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saekit demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
