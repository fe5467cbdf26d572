"""Which intensity normalization each channel gets, by the channel's name in dataset.json."""

from __future__ import annotations

# channel name (case-insensitive) -> nnU-Net v2 scheme name; anything else is z-scored.
SCHEME_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
DEFAULT_SCHEME = "ZScoreNormalization"
# Schemes that leave voxels outside the nonzero mask at zero when asked to normalize inside it only.
MASKABLE_SCHEMES = {"ZScoreNormalization"}
# Cropping must have removed at least a quarter of the voxels before z-scoring uses the mask.
MASK_WHEN_RELATIVE_SIZE_BELOW = 3 / 4


def normalization_schemes(channel_names: dict[int, str], median_relative_size_after_cropping: float) -> tuple[list[str], list[bool]]:
    """Scheme per channel and whether it normalizes inside the nonzero mask only."""
    schemes = [SCHEME_BY_CHANNEL_NAME.get(channel_names[c].casefold(), DEFAULT_SCHEME) for c in sorted(channel_names)]
    cropped_a_lot = median_relative_size_after_cropping < MASK_WHEN_RELATIVE_SIZE_BELOW
    return schemes, [cropped_a_lot and s in MASKABLE_SCHEMES for s in schemes]
