"""Compile kubeseg's training pipeline for this image and upload it to Kubeflow Pipelines.

The chart's pipeline-upload Job runs this after every install and upgrade (mounted from a
ConfigMap; the kubeseg image has kfp and the pipeline code). The first time it creates the
pipeline; afterwards it adds a version; a version name that already exists is left alone, so a
re-run of the Job is harmless.

Environment:
  KUBESEG_KFP_HOST              KFP API endpoint (required)
  KUBESEG_PIPELINE_NAME         pipeline name in the Kubeflow UI (default kubeseg-training)
  KUBESEG_PIPELINE_VERSION      version name (required)
  KUBESEG_PIPELINE_DESCRIPTION  description
  KUBESEG_PIPELINE_PARALLELISM  concurrent training tasks, 0 = no limit (default 0)
  KUBESEG_PIPELINE_RETRIES      retries per training task (default 2)
  KUBESEG_IMAGE                 image of every task (read by components.steps when imported)
  KUBESEG_KFP_TOKEN             bearer token, where the cluster wants one; in Kubeflow's
                                multi-user mode kfp.Client reads KF_PIPELINES_SA_TOKEN_PATH itself
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def compile_spec(output: Path, parallelism: int, retries: int) -> Path:
    from pipelines.training import compile_pipeline

    compile_pipeline(str(output), parallelism, retries)
    return output


def _version_exists(client: Any, pipeline_id: str, version: str) -> bool:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": version}]})
    response = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=100, filter=flt)
    return any(getattr(v, "display_name", None) == version for v in (response.pipeline_versions or []))


def upload(client: Any, spec: Path, name: str, version: str, description: str) -> str:
    """Create the pipeline, or add ``version`` to it. Returns what was done, for the log."""
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        p = client.upload_pipeline(str(spec), pipeline_name=name, description=description)
        pipeline_id = p.pipeline_id
        # KFP names the first version after the pipeline; add the named one so that every release
        # revision is found under its own name
        client.upload_pipeline_version(str(spec), pipeline_version_name=version, pipeline_id=pipeline_id,
                                       description=description)
        return f"created pipeline {name} ({pipeline_id}) with version {version}"
    if _version_exists(client, pipeline_id, version):
        return f"pipeline {name} ({pipeline_id}) already has version {version}; nothing to do"
    client.upload_pipeline_version(str(spec), pipeline_version_name=version, pipeline_id=pipeline_id,
                                   description=description)
    return f"uploaded version {version} of pipeline {name} ({pipeline_id})"


def _default_client(host: str) -> Any:
    import kfp

    return kfp.Client(host=host, existing_token=os.environ.get("KUBESEG_KFP_TOKEN") or None)


def main(env: Mapping[str, str] = os.environ, client_factory: Callable[[str], Any] = _default_client,
         compile_fn: Callable[[Path, int, int], Path] = compile_spec) -> int:
    host = env.get("KUBESEG_KFP_HOST", "")
    version = env.get("KUBESEG_PIPELINE_VERSION", "")
    if not host or not version:
        print("error: KUBESEG_KFP_HOST and KUBESEG_PIPELINE_VERSION are required", file=sys.stderr)
        return 2
    name = env.get("KUBESEG_PIPELINE_NAME", "kubeseg-training")
    description = env.get("KUBESEG_PIPELINE_DESCRIPTION", "kubeseg training pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        spec = compile_fn(Path(tmp) / "training.yaml", int(env.get("KUBESEG_PIPELINE_PARALLELISM", "0")),
                          int(env.get("KUBESEG_PIPELINE_RETRIES", "2")))
        print(f"compiled {name} for image {env.get('KUBESEG_IMAGE', '(default)')}")
        print(upload(client_factory(host), spec, name, version, description))
    return 0


if __name__ == "__main__":
    sys.exit(main())
