"""Reading and writing images with SimpleITK, in numpy axis order.

Every step works on arrays shaped ``(channels, z, y, x)`` and carries the image geometry
beside them, so that spacing, origin and direction survive a round trip (DESIGN.md, Formats).
SimpleITK orders spacing as (x, y, z); kubeseg stores it reversed, as nnU-Net v2 does, so
that ``spacing[i]`` belongs to array axis ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from kubeseg.atomic import atomic_path


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in the world. ``spacing`` is in numpy axis order (z, y, x)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(tuple(self.spacing[::-1]))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def to_json(self) -> dict:
        """nnU-Net v2 keeps the same three fields as ``sitk_stuff`` (spacing in SimpleITK order)."""
        return {"spacing": list(self.spacing[::-1]), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(tuple(d["spacing"][::-1]), tuple(d["origin"]), tuple(d["direction"]))


def read_sitk(path: str | Path) -> sitk.Image:
    """Read one image file (any format SimpleITK reads; a folder is read as a DICOM series).

    Files whose header points at other files (MetaImage ``ElementDataFile``, detached NRRD,
    .hdr/.img pairs ...) are refused before ITK opens them (:mod:`kubeseg.image_guard`).
    """
    from kubeseg.image_guard import check_image_file

    path = Path(path)
    check_image_file(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(path))
        if not names:
            raise RuntimeError(f"no DICOM series in folder {path}")
        reader.SetFileNames(names)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def itk_error_reason(error: Exception) -> str:
    """The reason in an ITK exception's text (its first line only names the C++ source file)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return next((ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln), lines[0] if lines else "")


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a float32 ``(C, z, y, x)`` array.

    Geometry is taken from the first channel; checking that the channels agree is the job of
    :mod:`kubeseg.dataset_check`.
    """
    images = [read_sitk(p) for p in paths]
    arrays = [sitk.GetArrayFromImage(im).astype(np.float32, copy=False) for im in images]
    return np.stack(arrays), Geometry.of(images[0])


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map into an integer ``(1, z, y, x)`` array."""
    image = read_sitk(path)
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        array = rounded.astype(np.int16) if np.array_equal(rounded, array) else array
    return array[None], Geometry.of(image)


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a ``(z, y, x)`` array with the given geometry, atomically (temp file, then rename)."""
    image = sitk.GetImageFromArray(array)
    geometry.apply_to(image)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)

