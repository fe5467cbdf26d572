"""Kubeflow pipelines built from kubeseg's components."""
