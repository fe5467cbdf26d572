# kubeseg: `make demo` runs the main job end to end; `make test` runs the whole test suite.
# Both create and reuse a project venv and install what they need (torch first, pinned).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_DIR ?= demo_out

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in first, alone and pinned (see constraints.txt).
$(VENV)/.base: $(PY) pyproject.toml constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e .
	touch $@

# the demo runs the Kubeflow pipeline locally (kfp) and tracks/registers in MLflow
$(VENV)/.demo: $(VENV)/.base pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[pipelines,registry]'
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test,pipelines,registry,serving,deploy]'
	touch $@

install: $(VENV)/.base

demo: $(VENV)/.demo
	$(VENV)/bin/kubeseg demo --out-dir $(DEMO_DIR)

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
