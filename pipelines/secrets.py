"""Credentials of the pipeline pods on a cluster, from Kubernetes Secrets (never parameters).

The chart's MLflow runs with authentication (basic-auth) and the service serves only versions
signed by the registration key, so on a cluster:

- every task that talks to MLflow gets the pipelines' account as ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` from the Secret ``mlflow_secret`` (keys ``username``, ``password``;
  the chart's ``security.mlflow.writer.existingSecret``, default ``mlflow-pipeline``);
- the register task, and only it, mounts the Secret ``signing_secret`` (key ``signing-key.pem``,
  the Ed25519 private key; default ``kubeseg-model-signing-key``) and signs with it
  (``KUBESEG_SIGNING_KEY``). Without that Secret the pod does not start: a version registered
  unsigned would be refused by the service anyway.

Both names are chosen when the pipeline is compiled (``KUBESEG_MLFLOW_SECRET``,
``KUBESEG_SIGNING_SECRET``; empty: not applied). ``kfp.local`` runs ignore them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MLFLOW_SECRET_DEFAULT = "mlflow-pipeline"
SIGNING_SECRET_DEFAULT = "kubeseg-model-signing-key"
SIGNING_KEY_FILE = "signing-key.pem"
SIGNING_MOUNT = "/var/run/secrets/kubeseg-signing"


@dataclass(frozen=True)
class PodSecrets:
    mlflow_secret: str = MLFLOW_SECRET_DEFAULT
    signing_secret: str = SIGNING_SECRET_DEFAULT

    @classmethod
    def from_env(cls) -> "PodSecrets":
        return cls(os.environ.get("KUBESEG_MLFLOW_SECRET", MLFLOW_SECRET_DEFAULT),
                   os.environ.get("KUBESEG_SIGNING_SECRET", SIGNING_SECRET_DEFAULT))


def with_mlflow_credentials(task, secrets: PodSecrets | None):
    """``task`` with the pipelines' MLflow account in its environment (no-op without a Secret name)."""
    if secrets is not None and secrets.mlflow_secret:
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, secrets.mlflow_secret, {"username": "MLFLOW_TRACKING_USERNAME",
                                                                   "password": "MLFLOW_TRACKING_PASSWORD"})
    return task


def with_signing_key(task, secrets: PodSecrets | None):
    """The register ``task`` with the registration key mounted and named in ``KUBESEG_SIGNING_KEY``."""
    if secrets is not None and secrets.signing_secret:
        from kfp import kubernetes

        kubernetes.use_secret_as_volume(task, secrets.signing_secret, SIGNING_MOUNT)
        task.set_env_variable("KUBESEG_SIGNING_KEY", f"{SIGNING_MOUNT}/{SIGNING_KEY_FILE}")
    return task
