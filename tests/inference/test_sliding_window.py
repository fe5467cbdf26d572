"""Sliding window: nnU-Net's tile layout and weights, batching invariance, padding, 2D on 3D."""
from __future__ import annotations

import numpy as np
import torch

from kubeseg.inference.sliding_window import (SlidingWindowSettings, gaussian_importance_map, mirror_combinations,
                                              padding_for, predict_logits, sliding_window_steps, tile_slicers,
                                              tile_weights)


def test_steps_follow_nnunet():
    # nnU-Net's own example: image 110, patch 64, step 0.5 -> starts 0, 23, 46
    assert sliding_window_steps([110], [64], 0.5) == [[0, 23, 46]]
    assert sliding_window_steps([64, 65], [64, 64], 0.5) == [[0], [0, 1]]
    assert len(tile_slicers((5, 40, 40), (32, 32), 0.5)) == 5 * 2 * 2  # 2D patch on a 3D image


def test_gaussian_and_weights():
    g = gaussian_importance_map((16, 32, 32))
    assert g.max() == 1 and g.min() > 0 and g[8, 16, 16] == 1
    w16 = tile_weights((16, 32, 32), torch.float16)
    assert w16.dtype == torch.float16 and float(w16.max()) == 10 and float(w16.min()) > 0


def test_padding_and_mirror_combinations():
    assert padding_for((10, 40, 40), (16, 32, 32)) == [(3, 3), (0, 0), (0, 0)]
    assert padding_for((10, 20, 40), (32, 32)) == [(0, 0), (6, 6), (0, 0)]
    assert mirror_combinations((0, 1, 2)) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_combinations(None) == [()]


class _Conv(torch.nn.Module):
    """A small translation-equivariant stand-in for the U-Net (2 classes)."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(0)
        conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
        self.conv = conv(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_batching_does_not_change_the_result():
    data = np.random.RandomState(0).normal(size=(1, 20, 40, 36)).astype(np.float32)
    net = _Conv(3).eval()
    base = dict(mirror_axes=(0, 1, 2), accumulator="float32")
    one = predict_logits(net, data, (16, 32, 32), 2, settings=SlidingWindowSettings(batch_size=1, **base))
    many = predict_logits(net, data, (16, 32, 32), 2, settings=SlidingWindowSettings(batch_size=32, **base))
    assert one.shape == (2, 20, 40, 36)
    assert torch.allclose(one, many, atol=1e-5)


def test_small_image_and_2d_patch():
    net3, net2 = _Conv(3).eval(), _Conv(2).eval()
    small = np.random.RandomState(1).normal(size=(1, 8, 20, 24)).astype(np.float32)
    out = predict_logits(net3, small, (16, 32, 32), 2)
    assert out.shape == (2, 8, 20, 24) and torch.isfinite(out).all()
    # a conv network tiled with overlapping Gaussian-weighted windows equals the whole-image pass
    # away from tile borders; slice by slice with a 2D patch
    vol = np.random.RandomState(2).normal(size=(1, 3, 40, 40)).astype(np.float32)
    out2 = predict_logits(net2, vol, (32, 32), 2, settings=SlidingWindowSettings(accumulator="float32"))
    with torch.no_grad():
        whole = net2(torch.from_numpy(vol[:, 1])[None])[0]
    assert out2.shape == (2, 3, 40, 40)
    assert torch.allclose(out2[:, 1, 10:30, 10:30], whole[:, 10:30, 10:30], atol=1e-5)
