"""Small DICOM studies for the clinical tests (written with pydicom through kubeseg.clinical.synth_dicom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kubeseg.imageio import Geometry
from kubeseg.clinical.synth_dicom import SeriesInfo, ct_phantom, write_series

# a right-handed, non-axis-aligned direction (rows along x, columns along -z ...) and anisotropic spacing
OBLIQUE = Geometry(spacing=(2.5, 0.8, 0.7), origin=(10.0, -20.0, 30.0),
                   direction=tuple(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float).ravel()))


def study(folder: Path, multiframe: bool = False, geometry: Geometry = OBLIQUE, shape=(12, 32, 32), **info):
    """A CT-like series in ``folder``: (image, label map, files)."""
    image, label = ct_phantom(shape)
    files = write_series(image, geometry, folder, SeriesInfo(**info), multiframe=multiframe)
    return image, label, files
