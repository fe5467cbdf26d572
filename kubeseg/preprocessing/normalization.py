"""Intensity normalization per channel, by the scheme the plans name.

CT intensities are physical (Hounsfield units), so CT is clipped to the dataset's foreground
0.5-99.5 percentiles and scaled with the dataset's foreground mean and std. Other modalities have
an arbitrary scale per scan, so each image is z-scored on its own — inside the nonzero mask when
cropping showed that the background is large (MRI with zeroed background).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8


def _ct(image: np.ndarray, mask: np.ndarray | None, props: dict) -> np.ndarray:
    np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
    image -= props["mean"]
    image /= max(props["std"], EPS)
    return image


def _zscore(image: np.ndarray, mask: np.ndarray | None, props: dict) -> np.ndarray:
    if mask is None:
        mean, std = image.mean(), image.std()
        image -= mean
        image /= max(std, EPS)
        return image
    inside = image[mask]
    image[mask] = (inside - inside.mean()) / max(inside.std(), EPS)
    return image


def _none(image: np.ndarray, mask: np.ndarray | None, props: dict) -> np.ndarray:
    return image


def _rescale01(image: np.ndarray, mask: np.ndarray | None, props: dict) -> np.ndarray:
    image -= image.min()
    image /= max(image.max(), EPS)
    return image


def _rgb01(image: np.ndarray, mask: np.ndarray | None, props: dict) -> np.ndarray:
    if image.min() < 0 or image.max() > 255:
        raise ValueError(f"RGB channel has values outside 0..255 ({image.min()}..{image.max()})")
    image /= 255.0
    return image


SCHEMES = {
    "CTNormalization": _ct,
    "ZScoreNormalization": _zscore,
    "NoNormalization": _none,
    "RescaleTo01Normalization": _rescale01,
    "RGBTo01Normalization": _rgb01,
}


def normalize(data: np.ndarray, seg: np.ndarray, schemes: list[str], use_mask: list[bool],
              intensity_properties: dict[str, dict]) -> np.ndarray:
    """Normalize ``data`` (C, ...) float32 in place, channel by channel.

    ``seg`` marks the outside of the nonzero mask with negative values; it is the mask for
    schemes that normalize inside it only.
    """
    if len(schemes) != data.shape[0]:
        raise ValueError(f"plans name {len(schemes)} normalization scheme(s) but the image has {data.shape[0]} channel(s)")
    data = data.astype(np.float32, copy=False)
    for c, (scheme, masked) in enumerate(zip(schemes, use_mask)):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown normalization scheme {scheme!r}; known: {sorted(SCHEMES)}")
        data[c] = SCHEMES[scheme](data[c], seg[0] >= 0 if masked else None, intensity_properties.get(str(c), {}))
    return data
