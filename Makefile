# kubeseg: `make demo` runs the main job end to end; `make test` runs the whole test suite.
# Both create and reuse a project venv and install what they need (torch first, pinned).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_DIR ?= demo_out
# nnunetv2, the parity oracle, in a venv of its own: it must not hide a dependency that kubeseg
# forgot to declare (it brings acvl-utils, scikit-image, ... along). Tests run it in a subprocess.
ORACLE_VENV ?= .venv-oracle
ORACLE_PY := $(ORACLE_VENV)/bin/python

.PHONY: demo test bench install oracle clean

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

$(ORACLE_VENV)/.oracle: oracle-requirements.txt constraints.txt
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(ORACLE_PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r oracle-requirements.txt
	touch $@

install: $(VENV)/.base

oracle: $(ORACLE_VENV)/.oracle

demo: $(VENV)/.demo
	$(VENV)/bin/kubeseg demo --out-dir $(DEMO_DIR)

test: $(VENV)/.test $(ORACLE_VENV)/.oracle
	KUBESEG_ORACLE_PYTHON=$(abspath $(ORACLE_PY)) $(PY) -m pytest -q

bench: $(VENV)/.test $(ORACLE_VENV)/.oracle
	KUBESEG_ORACLE_PYTHON=$(abspath $(ORACLE_PY)) $(PY) benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# `make image`: the kubeseg image (Dockerfile: components, pipeline tasks, service, trigger, MLflow
# server) and the BentoML Bento of the service (bentofile.yaml), containerized. Needs docker or
# podman with a running engine; says so and stops where there is none.
KUBESEG_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/kubeseg/kubeseg:$(KUBESEG_VERSION)
BENTO_IMAGE ?= ghcr.io/kubeseg/kubeseg-bento:$(KUBESEG_VERSION)
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)

.PHONY: image
image:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "make image: no container engine found: install docker or podman, or name one with CONTAINER_ENGINE=..." >&2; \
	  exit 1; fi
	@if ! $(CONTAINER_ENGINE) info >/dev/null 2>&1; then \
	  echo "make image: '$(CONTAINER_ENGINE) info' fails: the container engine is not running or not reachable (start the docker daemon or the podman machine)" >&2; \
	  exit 1; fi
	$(CONTAINER_ENGINE) build -t $(IMAGE) .
	$(MAKE) $(VENV)/.base
	$(PIP) install -q -c constraints.txt -e '.[serving,registry]'
	rm -rf build/wheels && $(PIP) wheel -q --no-deps -w build/wheels .
	# the service reads its settings at import; bentoml build imports it without loading a model
	KUBESEG_MODEL_NAME=bentoml-build $(VENV)/bin/bentoml build -f bentofile.yaml --version $(KUBESEG_VERSION)
	$(VENV)/bin/bentoml containerize kubeseg:$(KUBESEG_VERSION) --backend $(notdir $(CONTAINER_ENGINE)) -t $(BENTO_IMAGE)
	@echo "built $(IMAGE) (chart, pipelines) and $(BENTO_IMAGE) (Bento of the service)"
