# The one kubeseg image: every Kubeflow pipeline task (components/steps.py: base_image), the
# segmentation service (`bentoml serve services.service:Segmentation`, port 3000), the retraining
# trigger (`python -m services.trigger`, port 8090), the pipeline upload Job and the MLflow
# tracking server (`mlflow server`, port 5000) of the Helm chart all run from it.
# CUDA-enabled torch from the official PyTorch runtime image; kubeseg, kfp, MLflow and BentoML
# preinstalled, so that pods install nothing at start (the components are compiled with
# install_kfp_package=False).
#
#   make image                      # this image and the Bento (bentofile.yaml); needs docker or podman
#   docker build -t ghcr.io/kubeseg/kubeseg:0.1.0 .
#   KUBESEG_IMAGE=ghcr.io/kubeseg/kubeseg:0.1.0 kubeseg pipeline compile -o training.yaml
#
# CPU variant without an image registry (`make image-cpu`, podman): BASE is a Debian bookworm made
# by docker/debian-base.sh (debootstrap, Python 3.11 venv on PATH) and TORCH a CPU wheel mounted
# into the build:
#   podman build -v /opt/wheels:/wheels:ro --build-arg BASE=localhost/kubeseg-base:bookworm \
#     --build-arg TORCH=/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl -t kubeseg:cpu .
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE}
# How torch comes in: empty keeps the base image's (CUDA) torch; otherwise pip arguments installed
# first and alone (a wheel file, or e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
ARG TORCH=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONUTF8=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    BENTOML_DO_NOT_TRACK=true

WORKDIR /opt/kubeseg
# Dependencies first, in their own layer, from pyproject.toml alone (an empty kubeseg distribution
# carries them in and is removed): editing the code does not reinstall them.
# Keep the base image's torch (or TORCH's): pin it so that no dependency replaces it.
# pipelines: kfp; registry: MLflow; serving: BentoML and prometheus-client. psycopg2, boto3 and
# prometheus-flask-exporter are for the chart's `mlflow server`: PostgreSQL, an S3-compatible
# artifact store, and its /metrics (--expose-prometheus).
COPY pyproject.toml ./
RUN if [ -n "$TORCH" ]; then pip install $TORCH; fi \
 && echo "torch==$(python -c 'import torch; print(torch.__version__)')" > /opt/kubeseg/torch-pin.txt \
 && touch README.md \
 && pip install -c torch-pin.txt '.[pipelines,registry,serving]' 'psycopg2-binary>=2.9,<3' 'boto3>=1.34,<2' \
      'prometheus-flask-exporter>=0.23,<1' \
 && pip uninstall -y -q kubeseg && rm -rf README.md build *.egg-info

COPY README.md ./
COPY kubeseg ./kubeseg
COPY components ./components
COPY pipelines ./pipelines
COPY services ./services
# the review page (services/review_ui/, served at /review/ui/) is bundled from viewer/ by `make viewer`
# before the build (`make image` and `make image-cpu` do it; the image needs no node)
RUN test -f services/review_ui/index.html -a -f services/review_ui/review.js \
 || { echo "services/review_ui/ is missing: run 'make viewer' before building the image" >&2; exit 1; }
# the import check: the build fails where a declared dependency is missing
RUN pip install --no-deps -c torch-pin.txt . && rm -rf build *.egg-info \
 && python -c "import torch, kfp, mlflow, bentoml, prometheus_client, psycopg2, boto3, prometheus_flask_exporter, \
kubeseg.training.trainer, kubeseg.training.augmentation, \
kubeseg.registry, components, pipelines.training, services.settings, services.metrics, services.trigger; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'kfp', kfp.__version__, 'mlflow', mlflow.__version__, \
'bentoml', bentoml.__version__)"

# non-root (uid 1000, as the chart's securityContext expects); the home folder takes matplotlib
# and torch caches, /work is a scratch place for pipeline tasks. In the chart the root filesystem
# is read-only and /tmp, the model cache and the trigger's state are mounted volumes.
RUN useradd --create-home --uid 1000 --shell /bin/bash kubeseg && mkdir -p /work && chown kubeseg /work
USER 1000
WORKDIR /work
EXPOSE 3000 5000 8090
ENTRYPOINT []
CMD ["kubeseg", "--help"]
