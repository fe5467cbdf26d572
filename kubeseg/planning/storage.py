"""How much disk a configuration's preprocessed arrays take, estimated from the fingerprint.

A training pod holds its configuration's arrays (float32 images, int8 segmentations) on its node's
disk; operators size node storage (and, where their platform allows, ephemeral-storage requests)
from this. Per case: the shape after cropping (fingerprint), transposed as the plans say, scaled
from the case's spacing to the configuration's target spacing (2D configurations keep the first
axis), times ``4 * channels + 1`` bytes per voxel.
"""

from __future__ import annotations

import math
from typing import Mapping

from kubeseg.planning.plans import configuration as resolve_configuration


def preprocessed_bytes(plans: Mapping, fingerprint: Mapping, num_channels: int) -> dict[str, int]:
    """``{configuration: bytes}`` for every configuration with its own arrays (cascade stages share
    their data identifier's; they are left out)."""
    tf = list(plans.get("transpose_forward", [0, 1, 2]))
    out: dict[str, int] = {}
    seen: set[str] = set()
    for name in plans["configurations"]:
        c = resolve_configuration(dict(plans), name)
        ident = c["data_identifier"]
        if ident in seen:
            continue
        seen.add(ident)
        total = 0
        for shape, spacing in zip(fingerprint["shapes_after_crop"], fingerprint["spacings"]):
            shape_t = [shape[i] for i in tf]
            spacing_t = [spacing[i] for i in tf]
            target = list(c["spacing"])
            if len(target) < len(spacing_t):
                target = spacing_t[:len(spacing_t) - len(target)] + target
            voxels = math.prod(max(1, round(s * sp / t)) for s, sp, t in zip(shape_t, spacing_t, target))
            total += voxels * (4 * num_channels + 1)
        out[name] = int(total)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
