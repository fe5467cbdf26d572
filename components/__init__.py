"""Kubeflow Pipelines components wrapping kubeseg's engine steps (see :mod:`components.steps`)."""

from components.steps import (IMAGE, bundle, cascade_inputs, close_run, fingerprint, gather, gather_group,
                              merge_cases, open_run, plan, plan_retraining, preprocess, promote, register, select,
                              train, training_groups)

__all__ = ["IMAGE", "bundle", "cascade_inputs", "close_run", "fingerprint", "gather", "gather_group", "merge_cases",
           "open_run", "plan", "plan_retraining", "preprocess", "promote", "register", "select", "train",
           "training_groups"]
