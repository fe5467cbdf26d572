"""Kubeflow Pipelines components wrapping kubeseg's engine steps (see :mod:`components.steps`)."""

from components.steps import IMAGE, bundle, close_run, fingerprint, open_run, plan, preprocess, register, select, train

__all__ = ["IMAGE", "bundle", "close_run", "fingerprint", "open_run", "plan", "preprocess", "register", "select", "train"]
