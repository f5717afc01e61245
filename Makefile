# Quick start targets. VENV and DATA_DIR can be overridden: make test VENV=.venv-ci
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(or $(TOOLKIT_DATA_DIR),data)
RUN ?= lenet-quickstart

.PHONY: install demo test test-fast lint

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e ".[dev]"

# Train LeNet -> export every format (verified) -> launch the sketchpad demo.
demo: install
	$(VENV)/bin/toolkit train lenet --data-dir $(DATA_DIR) --name $(RUN) --runs-dir runs || test -f runs/$(RUN)/best.pt
	$(VENV)/bin/toolkit export runs/$(RUN)/best.pt --format all --quantize int8 --data-dir $(DATA_DIR)
	$(VENV)/bin/toolkit demo exports/$(RUN)

lint: install
	$(VENV)/bin/ruff check .

# The whole suite: what CI runs.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2

# The inner loop: no slow, browser or fault tests.
test-fast: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow and not browser and not faults"
