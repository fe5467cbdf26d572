"""Kubeflow Pipelines components wrapping kubeseg's engine steps (see :mod:`components.steps`)."""

from components.steps import (IMAGE, bundle, cascade_inputs, close_run, fingerprint, gather, merge_cases, open_run,
                              plan, plan_retraining, preprocess, promote, register, select, train)

__all__ = ["IMAGE", "bundle", "cascade_inputs", "close_run", "fingerprint", "gather", "merge_cases", "open_run",
           "plan", "plan_retraining", "preprocess", "promote", "register", "select", "train"]
