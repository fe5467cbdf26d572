"""Build the segmentation network described by an nnU-Net v2 plans configuration.

The plans name a class (normally
``dynamic_network_architectures.architectures.unet.PlainConvUNet``) and its keyword
arguments; some arguments are dotted names of classes (``conv_op``, ``norm_op``, ...) that
must be imported first (listed in ``_kw_requires_import``).  We build exactly that class so
that parameter names, and therefore ``state_dict`` keys, are identical to the networks
nnU-Net v2 trains: checkpoints move freely between the two.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

__all__ = [
    "locate",
    "build_network",
    "build_network_from_plans",
    "set_deep_supervision",
    "load_network_weights",
    "init_weights_he",
]

# Only classes from these packages may be instantiated from a plans file: plans come from
# user storage and must not be able to name arbitrary callables.
_ALLOWED_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def locate(dotted: str) -> Any:
    """Import ``package.module.Attr`` and return ``Attr`` (like ``pydoc.locate``, allow-listed)."""
    if not dotted.startswith(_ALLOWED_PREFIXES):
        raise ValueError(f"refusing to import {dotted!r}: only {_ALLOWED_PREFIXES} are allowed in plans")
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
            return obj
        except AttributeError:
            continue
    raise ImportError(f"cannot locate {dotted!r}")


def init_weights_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He: Kaiming-normal conv weights (LeakyReLU slope 1e-2), zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


def build_network(
    network_class_name: str,
    arch_kwargs: Mapping[str, Any],
    kw_requires_import: Sequence[str],
    num_input_channels: int,
    num_output_channels: int,
    deep_supervision: bool = True,
    initialize: bool = True,
) -> nn.Module:
    """Instantiate ``network_class_name(input_channels, num_classes, **arch_kwargs)``.

    ``initialize`` applies the architecture's own ``initialize`` (He init for PlainConvUNet)
    when it has one, else nnU-Net's He init, so fresh networks start like nnU-Net's do.
    """
    kwargs = dict(arch_kwargs)
    for k in kw_requires_import:
        if kwargs.get(k) is not None:
            kwargs[k] = locate(kwargs[k])
    cls = locate(network_class_name)
    kwargs["deep_supervision"] = deep_supervision
    net = cls(input_channels=num_input_channels, num_classes=num_output_channels, **kwargs)
    if initialize:
        net.apply(net.initialize if hasattr(net, "initialize") else init_weights_he)
    return net


def build_network_from_plans(
    plans: dict,
    configuration: str,
    dataset_json: dict,
    deep_supervision: bool = True,
    initialize: bool = True,
) -> nn.Module:
    """Network for ``plans['configurations'][configuration]`` and the labels of ``dataset_json``.

    Input channels = image channels (+ one per foreground label for cascade stages, which
    get the previous stage's one-hot segmentation as extra input); output channels = number
    of labels including background.
    """
    from kubeseg.training.plans import ConfigurationView, LabelInfo, num_input_channels

    cfg = ConfigurationView.from_plans(plans, configuration)
    labels = LabelInfo.from_dataset_json(dataset_json)
    return build_network(
        cfg.network_class_name,
        cfg.arch_kwargs,
        cfg.kw_requires_import,
        num_input_channels(cfg, labels),
        labels.num_segmentation_heads,
        deep_supervision=deep_supervision,
        initialize=initialize,
    )


def _unwrap(network: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        else:
            return network


def set_deep_supervision(network: nn.Module, enabled: bool) -> None:
    """Switch the U-Net decoder between all-resolution outputs (training) and one (inference)."""
    mod = _unwrap(network)
    if not hasattr(mod, "decoder") or not hasattr(mod.decoder, "deep_supervision"):
        raise TypeError(f"{type(mod).__name__} has no switchable decoder.deep_supervision")
    mod.decoder.deep_supervision = enabled


def load_network_weights(
    network: nn.Module,
    checkpoint: Union[str, Path, Mapping[str, Any]],
    strict: bool = True,
    map_location: Union[str, torch.device] = "cpu",
) -> Mapping[str, Any]:
    """Load weights from an nnU-Net v2 / kubeseg checkpoint (path or dict) into ``network``.

    Accepts the full checkpoint dict (``network_weights`` key) or a bare state dict, and
    strips ``module.`` / ``_orig_mod.`` prefixes left by DDP and torch.compile.
    Returns the checkpoint dict (or the state dict if that is what was given).
    """
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    state = checkpoint["network_weights"] if "network_weights" in checkpoint else checkpoint
    target = _unwrap(network)
    own = target.state_dict().keys()
    clean = OrderedDict()
    for k, v in state.items():
        key = k
        for prefix in ("module.", "_orig_mod."):
            if key not in own and key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = v
    target.load_state_dict(clean, strict=strict)
    return checkpoint
