"""A Grad-CAM++ heat map of one label over the network's input, aligned with the input image.

Which label: the most uncertain predicted foreground label (lowest mean top-class probability,
:func:`kubeseg.clinical.qa.most_uncertain_label`). How: the case is preprocessed as for
prediction; one patch (the configuration's patch size) centred on that label's predicted region
is run through the first fold's network with gradients; the target is the sum of the label's
logits over the voxels the network assigns to it in that patch; Grad-CAM++ weights (Chattopadhay
et al. 2018: ``alpha = g² / (2g² + ΣA·g³)``, weights ``Σ alpha·relu(g)``) are taken on the output
of the network's last decoder stage (``decoder.stages[-1]``, else its last convolution). The map
is ReLU'd, scaled to [0, 1], and brought back to the input's grid exactly as probabilities are
(undo resampling, undo the crop, undo the transpose). Off by default: it costs one forward and
one backward pass of a patch, and the resampling back.

Our own small implementation: pytorch-grad-cam targets 2D classification-style outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kubeseg.imageio import Geometry, write_image
from kubeseg.inference.export import preprocessed_spacing
from kubeseg.inference.predictor import Predictor
from kubeseg.preprocessing.preprocess import preprocess_arrays
from kubeseg.preprocessing.resampling import resample_image


@dataclass
class Saliency:
    label: str
    heatmap: np.ndarray  # (z, y, x) in [0, 1], the input's grid
    peak_slice: int  # array index along z where the map peaks
    seconds: float


def target_layer(network: torch.nn.Module) -> torch.nn.Module:
    """The last decoder stage of a U-Net (dynamic-network-architectures), else the last conv layer."""
    decoder = getattr(network, "decoder", None)
    stages = getattr(decoder, "stages", None)
    if stages is not None and len(stages):
        return stages[-1]
    convs = [m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))]
    if not convs:
        raise ValueError("the network has no convolution to explain")
    return convs[-2] if len(convs) > 1 else convs[-1]


def gradcam_pp(network: torch.nn.Module, patch: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM++ of ``class_index`` for one network input ``(1, C, *patch)``; a map of the patch's size."""
    layer = target_layer(network)
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            patch = patch.detach().requires_grad_(False)
            logits = network(patch)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            mask = (logits.argmax(1) == class_index).float()
            if mask.sum() == 0:
                mask = torch.ones_like(mask)
            score = (logits[:, class_index] * mask).sum()
            acts = store["a"]
            grads = torch.autograd.grad(score, acts)[0]
    finally:
        handle.remove()
    acts, grads = acts.detach()[0].float(), grads.detach()[0].float()  # (F, *s)
    spatial = tuple(range(1, acts.ndim))
    g2, g3 = grads ** 2, grads ** 3
    denom = 2 * g2 + acts.sum(dim=spatial, keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * torch.relu(grads)).sum(dim=spatial)
    cam = torch.relu((weights.view(-1, *[1] * (acts.ndim - 1)) * acts).sum(0))
    size = patch.shape[2:]
    if tuple(cam.shape) != tuple(size):
        mode = "trilinear" if cam.ndim == 3 else "bilinear"
        cam = torch.nn.functional.interpolate(cam[None, None], size=size, mode=mode, align_corners=False)[0, 0]
    return cam.cpu().numpy()


def _centre_on_grid(mask: np.ndarray, properties: dict, plans: dict, grid_shape) -> list[int]:
    """The mask's centroid (input array order) on the preprocessed grid (transposed, cropped, resampled)."""
    forward = plans["transpose_forward"]
    c = np.argwhere(mask).mean(0)[forward]
    box = properties["bbox_used_for_cropping"]
    cropped = properties["shape_after_cropping_and_before_resampling"]
    return [int(round((c[i] - box[i][0] + 0.5) * grid_shape[i] / cropped[i] - 0.5)) for i in range(len(c))]


def saliency_map(predictor: Predictor, data: np.ndarray, geometry: Geometry, segmentation: np.ndarray,
                 label: str, label_value: int) -> Saliency:
    """The Grad-CAM++ map of ``label`` for one case (raw ``data`` (C, z, y, x); ``segmentation`` predicted)."""
    started = time.perf_counter()
    model, config, plans = predictor.model, predictor.config, predictor.model.plans
    if predictor.previous is not None:
        raise ValueError("saliency of a cascade stage is not supported (explain its first stage instead)")
    pre = preprocess_arrays(data, None, geometry, plans, config, [])
    grid = np.asarray(pre.data, dtype=np.float32)
    shape = grid.shape[1:]
    patch = predictor.patch_size
    centre = _centre_on_grid(segmentation == label_value, pre.properties, plans, shape)
    pad = [(max(0, p - s), ) for s, p in zip(shape, patch)]
    padded = np.pad(grid, [(0, 0)] + [(0, p[0]) for p in pad])
    starts = [int(min(max(0, c - p // 2), max(0, s + q[0] - p))) for c, p, s, q in zip(centre, patch, shape, pad)]
    window = tuple(slice(st, st + p) for st, p in zip(starts, patch))
    tensor = torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *window)]))[None].to(predictor.device)
    class_index = list(predictor.labels.all_labels).index(label_value)
    # a torch network of its own with the first fold's weights: the predictor's may be an ONNX
    # runner (no gradients) or hold another fold, and other requests may be using it
    network = model.build_network(predictor.device)
    network.load_state_dict(model.fold_weights[0])
    network.eval()
    cam_grid = np.zeros([s + q[0] for s, q in zip(shape, pad)], dtype=np.float32)
    cam_grid[window] = gradcam_pp(network, tensor, class_index)
    cam_grid = cam_grid[tuple(slice(0, s) for s in shape)]
    heat = to_input_grid(cam_grid, pre.properties, plans, config)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    z = int(np.unravel_index(int(np.argmax(heat)), heat.shape)[0])
    return Saliency(label, heat.astype(np.float32), z, time.perf_counter() - started)


def to_input_grid(volume: np.ndarray, properties: dict, plans: dict, config: dict) -> np.ndarray:
    """A map on the preprocessed grid back on the input's grid (linear resampling, zero outside the crop)."""
    grid, original = preprocessed_spacing(properties, plans, config)
    target = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    resampled = resample_image(volume[None].astype(np.float32), target, grid, original, 1, 0)[0]
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full[tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])] = np.maximum(resampled, 0)
    return np.ascontiguousarray(full.transpose(plans["transpose_backward"]))


def write_saliency(s: Saliency, image: np.ndarray, geometry: Geometry, nifti: Path, png: Optional[Path]) -> None:
    """The heat map as NIfTI in the input's geometry, and an overlay PNG of its peak slice."""
    write_image(s.heatmap, geometry, nifti)
    if png is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kubeseg.atomic import atomic_path

    base = image[s.peak_slice]
    lo, hi = np.percentile(base, [1, 99])
    fig, ax = plt.subplots(figsize=(4, 4 * base.shape[0] / max(base.shape[1], 1)), dpi=100)
    ax.imshow(base, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.imshow(np.ma.masked_less(s.heatmap[s.peak_slice], 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(f"Grad-CAM++: {s.label}, slice {s.peak_slice}", fontsize=8)
    ax.axis("off")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
