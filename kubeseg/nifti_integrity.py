"""What ITK hides when it reads NIfTI: truncated files and non-finite voxels.

ITK's NIfTI reader (nifticlib) pads a truncated file with zeros without complaint, and it
replaces every NaN/inf float voxel with 0. Both would turn a broken scan into plausible data,
so NIfTI files get a second look through nibabel: float files are read as stored (NaN/inf
counted, truncation raises); integer files cannot hold NaN, so only their length is checked,
cheaply, from the gzip trailer or the file size.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np


def _complete_gzip(path: Path, expected: int) -> bool:
    """gzip stores the uncompressed length (mod 2^32) in its last 4 bytes; decompress only on a
    mismatch, and then never more than ``expected`` bytes (a stream that goes on is a bomb's
    business, not ours: nothing reads past what the header declares)."""
    from kubeseg.image_guard import bounded_gzip_size

    with open(path, "rb") as f:
        f.seek(-4, 2)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return True
    try:
        return bounded_gzip_size(path, max(expected - 1, 0)) >= expected
    except (OSError, EOFError, zlib.error):
        return False


def check_nifti(path: str | Path) -> tuple[str | None, int, int]:
    """``(problem or None, NaN count, inf count)`` of a NIfTI file as stored; other formats pass."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None, 0, 0
    try:
        image = nib.load(path)
        header = image.header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        if header.get_data_dtype().kind == "f":
            data = np.asarray(image.dataobj)
            return None, int(np.isnan(data).sum()), int(np.isinf(data).sum())
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        return f"file is truncated or corrupt: {e}", 0, 0
    complete = _complete_gzip(path, expected) if name.endswith(".gz") else path.stat().st_size >= expected
    return (None if complete else "file is truncated: its voxel data is incomplete"), 0, 0
