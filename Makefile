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

.PHONY: demo test bench install oracle clean viewer

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
	$(PIP) install -q -c constraints.txt -e '.[test,pipelines,registry,serving,deploy,onnx]'
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

test: $(VENV)/.test $(ORACLE_VENV)/.oracle viewer
	KUBESEG_ORACLE_PYTHON=$(abspath $(ORACLE_PY)) PYTHONUTF8=1 $(PY) -m pytest -q --durations=30

bench: $(VENV)/.test $(ORACLE_VENV)/.oracle
	KUBESEG_ORACLE_PYTHON=$(abspath $(ORACLE_PY)) $(PY) benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# `make viewer`: the review page (viewer/: NiiVue and esbuild from npm, versions locked in
# viewer/package-lock.json) bundled into services/review_ui/, which the service serves at
# /review/ui/ (services/review_page.py). Built, not committed; needs node >= 18 and npm
# (Debian: nodejs npm). `npm ci` runs again only when the package files change.
VIEWER_BUNDLE := services/review_ui/review.js
viewer: $(VIEWER_BUNDLE)

viewer/node_modules/.installed: viewer/package.json viewer/package-lock.json
	cd viewer && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(VIEWER_BUNDLE): viewer/node_modules/.installed viewer/build.mjs $(wildcard viewer/src/*)
	cd viewer && npm run --silent build

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
	$(MAKE) viewer
	$(CONTAINER_ENGINE) build -t $(IMAGE) .
	$(MAKE) $(VENV)/.base
	$(PIP) install -q -c constraints.txt -e '.[serving,registry]'
	rm -rf build/wheels && $(PIP) wheel -q --no-deps -w build/wheels .
	# the service reads its settings at import; bentoml build imports it without loading a model
	KUBESEG_MODEL_NAME=bentoml-build KUBESEG_AUTH=disabled KUBESEG_MODEL_SIGNATURES=disabled $(VENV)/bin/bentoml build -f bentofile.yaml --version $(KUBESEG_VERSION)
	$(VENV)/bin/bentoml containerize kubeseg:$(KUBESEG_VERSION) --backend $(notdir $(CONTAINER_ENGINE)) -t $(BENTO_IMAGE)
	@echo "built $(IMAGE) (chart, pipelines) and $(BENTO_IMAGE) (Bento of the service)"

# `make image-cpu`: the same Dockerfile built here, without an image registry or a Docker engine:
# rootful podman (runc, lowered ulimits), the base a Debian bookworm made by debootstrap
# (docker/debian-base.sh, once) and torch the CPU wheel (TORCH_WHEEL when that file exists, else
# PyTorch's CPU index). The host's CA bundle is mounted into the build only, for pip behind a
# TLS-inspecting proxy. The image is what tests/test_image.py runs (KUBESEG_TEST_IMAGE); its
# label org.kubeseg.source (docker/source_hash.py) tells the tests whether it is this checkout's.
CPU_BASE ?= localhost/kubeseg-base:bookworm
CPU_IMAGE ?= localhost/kubeseg:$(KUBESEG_VERSION)-cpu
TORCH_WHEEL ?= /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
PODMAN ?= podman
PODMAN_FLAGS ?= --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
TORCH_SPEC = $(if $(wildcard $(TORCH_WHEEL)),/wheels/$(notdir $(TORCH_WHEEL)),torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)

.PHONY: image-cpu
image-cpu:
	@command -v $(PODMAN) >/dev/null || { echo "make image-cpu: podman not found (apt-get install podman debootstrap runc)" >&2; exit 1; }
	$(MAKE) viewer
	CONTAINER_ENGINE=$(PODMAN) docker/debian-base.sh $(CPU_BASE)
	$(PODMAN) build $(PODMAN_FLAGS) --network host \
	  $(if $(wildcard $(TORCH_WHEEL)),-v $(dir $(abspath $(TORCH_WHEEL))):/wheels:ro) \
	  $(if $(wildcard $(CA_BUNDLE)),-v $(abspath $(CA_BUNDLE)):/etc/ssl/certs/ca-certificates.crt:ro) \
	  --label org.kubeseg.source=$$($(PYTHON) docker/source_hash.py) \
	  --build-arg BASE=$(CPU_BASE) --build-arg TORCH="$(TORCH_SPEC)" -t $(CPU_IMAGE) .
	@$(PODMAN) image inspect $(CPU_IMAGE) --format 'built $(CPU_IMAGE): {{.Size}} bytes'

print-%:  # a variable's value, for scripts and tests (make -s print-CPU_IMAGE)
	@echo '$($*)'

# `make test-image`: build the CPU image, then prove it (tests/test_image.py). Not part of
# `make test`/CI: the build alone takes about 11 minutes here.
.PHONY: test-image
test-image: $(VENV)/.test image-cpu
	KUBESEG_TEST_IMAGE=$(CPU_IMAGE) $(PY) -m pytest -q -m integration tests/test_image.py
