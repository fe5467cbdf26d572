"""kubeseg: nnU-Net-style self-configuring segmentation, trained and served the Kubernetes way."""

__version__ = "0.1.0"
