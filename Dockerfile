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
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    BENTOML_DO_NOT_TRACK=true

WORKDIR /opt/kubeseg
COPY pyproject.toml README.md ./
COPY kubeseg ./kubeseg
COPY components ./components
COPY pipelines ./pipelines
COPY services ./services
# keep the base image's CUDA torch: pin it so that no dependency replaces it.
# pipelines: kfp; registry: MLflow; serving: BentoML and prometheus-client. psycopg2, boto3 and
# prometheus-flask-exporter are for the chart's `mlflow server`: PostgreSQL, an S3-compatible
# artifact store, and its /metrics (--expose-prometheus).
RUN echo "torch==$(python -c 'import torch; print(torch.__version__)')" > /tmp/torch-pin.txt \
 && pip install -c /tmp/torch-pin.txt '.[pipelines,registry,serving]' 'psycopg2-binary>=2.9,<3' 'boto3>=1.34,<2' \
      'prometheus-flask-exporter>=0.23,<1' \
 && rm /tmp/torch-pin.txt \
 && python -c "import torch, kfp, mlflow, bentoml, prometheus_client, psycopg2, boto3, prometheus_flask_exporter, \
kubeseg.training.trainer, \
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
