"""GPU memory proxy: the total size of a U-Net's feature maps for one patch.

The network is built on torch's ``meta`` device, so estimating costs no memory and no weight
initialization, however large the candidate network.
"""

from __future__ import annotations

import pydoc

import torch


def feature_map_size(architecture: dict, patch_size, input_channels: int, num_classes: int) -> int:
    """Voxels of all feature maps of the plain conv U-Net ``architecture`` (nnU-Net's schema) at ``patch_size``."""
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(architecture["network_class_name"])
    with torch.device("meta"):
        net = network_class(input_channels=input_channels, num_classes=num_classes, **kwargs)
    return int(net.compute_conv_feature_map_size(tuple(patch_size)))
