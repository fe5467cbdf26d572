# kubeseg image: every Kubeflow pipeline task runs from it (components/steps.py: base_image).
# CUDA-enabled torch from the official PyTorch runtime image; kubeseg and kfp preinstalled, so
# that pods install nothing at start (the components are compiled with install_kfp_package=False).
#
#   docker build -t ghcr.io/kubeseg/kubeseg:0.1.0 .
#   KUBESEG_IMAGE=ghcr.io/kubeseg/kubeseg:0.1.0 kubeseg pipeline compile -o training.yaml
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg

WORKDIR /opt/kubeseg
COPY pyproject.toml README.md ./
COPY kubeseg ./kubeseg
COPY components ./components
COPY pipelines ./pipelines
# keep the base image's CUDA torch: pin it so that no dependency replaces it
RUN echo "torch==$(python -c 'import torch; print(torch.__version__)')" > /tmp/torch-pin.txt \
 && pip install -c /tmp/torch-pin.txt '.[pipelines,registry]' \
 && python -c "import torch, kfp, mlflow, kubeseg.training.trainer, kubeseg.registry, components, pipelines.training; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'kfp', kfp.__version__)"

# non-root; the home folder takes matplotlib/torch caches, /work is a scratch place for tasks
RUN useradd --create-home --uid 1000 --shell /bin/bash kubeseg && mkdir -p /work && chown kubeseg /work
USER 1000
WORKDIR /work
ENTRYPOINT []
CMD ["kubeseg", "--help"]
