"""Synthetic segmentation datasets in nnU-Net v2 raw format.

The demo and the test suite need data that exercise the same code paths real
scans do, without shipping patient images. Each choice below mirrors a property
that nnU-Net's self-configuration reacts to:

* **CT** ("ct"): one channel named ``CT`` (so the CT normalisation, which clips
  to foreground percentiles, is chosen), int16 Hounsfield-like values with air
  at -1000 (nonzero, so cropping to nonzero removes nothing), and *anisotropic*
  spacing (thick slices of 2-5 mm, fine 0.6-0.95 mm pixels) that differs from
  case to case, so the planner has to pick a target spacing and treat the slow
  axis separately. The anatomy is an elliptical-cylinder body with a fat rim and
  a spine, one deformed organ and zero to three small lesions of weak contrast
  (20-40 HU from the organ), blurred and noisy, so a model has to learn rather
  than threshold. Labels: body=1, organ=2, lesion=3.
* **MRI** ("mri"): two channels ``T1`` and ``T2`` (z-score normalisation),
  near-isotropic 0.9-1.2 mm spacing, an arbitrary intensity scale and a smooth
  bias field per case and channel (as scanners produce), and an object that
  does not fill the field of view, with background exactly zero. Cropping to
  nonzero therefore shrinks the volume substantially, which is what makes
  nnU-Net normalise inside the nonzero mask only. The lesion ("edema", label 1)
  with a "core" (label 2) inside it has a different contrast in each channel,
  so both channels carry information.

Every case is drawn from its own generator seeded by ``(seed, case index,
split)``, so a case does not depend on how many cases are generated, and the
same settings give byte-identical arrays. All shapes are built from vectorised
numpy/scipy operations on physical (mm) coordinates, so objects look the same
in millimetres whatever the spacing, and a 200^3 case takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = [
    "CT_LABELS",
    "MRI_LABELS",
    "FILE_ENDING",
    "SynthCase",
    "SynthSettings",
    "generate_case",
    "synthesize",
]

FILE_ENDING = ".nii.gz"
CT_LABELS: dict[str, int] = {"background": 0, "body": 1, "organ": 2, "lesion": 3}
MRI_LABELS: dict[str, int] = {"background": 0, "edema": 1, "core": 2}
_CHANNELS: dict[str, tuple[str, ...]] = {"ct": ("CT",), "mri": ("T1", "T2")}
_DEFAULT_NAMES: dict[str, str] = {"ct": "Dataset001_SynthCT", "mri": "Dataset002_SynthMRI"}
_MIN_AXIS = 8  # smaller volumes cannot hold the anatomy below

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class SynthSettings:
    """What dataset to generate.

    ``shape`` is the median case shape in numpy order (z, y, x); each case's
    shape is jittered by up to +-15 % per axis so that the planner sees a
    realistic spread. ``dataset_name`` defaults to a kind-specific nnU-Net name
    (see :attr:`name`). ``oblique`` gives every case a rotated direction matrix,
    which is useful to check that geometry is carried through untouched.
    """

    kind: str = "ct"
    num_cases: int = 8
    shape: tuple[int, int, int] = (40, 96, 96)
    num_test_cases: int = 0
    seed: int = 0
    dataset_name: str | None = None
    oblique: bool = False
    # CT lesions (defaults: weak contrast, small, 15 % of cases without one). The demo asks for
    # a dataset whose every label a few CPU minutes of training can learn (see pipelines/demo.py).
    lesion_contrast_hu: tuple[float, float] = (20.0, 40.0)
    lesion_size: tuple[float, float] = (0.15, 0.35)
    min_lesions: int = 0
    # also write the test cases' references to labelsTs (for a held-out check of a model)
    test_labels: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _CHANNELS:
            raise ValueError(f"kind must be one of {sorted(_CHANNELS)}, got {self.kind!r}")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < _MIN_AXIS:
            raise ValueError(f"shape must be 3 axes of at least {_MIN_AXIS} voxels, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.num_cases < 1 or self.num_test_cases < 0:
            raise ValueError("need num_cases >= 1 and num_test_cases >= 0")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")

    @property
    def name(self) -> str:
        """The dataset name written to dataset.json (``DatasetXXX_Name``)."""
        return self.dataset_name or _DEFAULT_NAMES[self.kind]

    @property
    def channel_names(self) -> dict[str, str]:
        """nnU-Net ``channel_names``: channel index (as a string) -> modality."""
        return {str(i): c for i, c in enumerate(_CHANNELS[self.kind])}

    @property
    def labels(self) -> dict[str, int]:
        """nnU-Net ``labels``: label name -> integer value."""
        return dict(CT_LABELS if self.kind == "ct" else MRI_LABELS)

    def case_id(self, index: int) -> str:
        """Case identifier; test cases continue the numbering after training cases."""
        width = max(3, len(str(self.num_cases + self.num_test_cases - 1)))
        return f"synth_{index:0{width}d}"


@dataclass(frozen=True)
class SynthCase:
    """One generated case, in numpy order, with its SimpleITK geometry.

    ``spacing`` is (z, y, x) in mm to match the arrays; ``origin`` and
    ``direction`` are in SimpleITK (x, y, z) order, ``direction`` row-major 3x3.
    ``label`` is None for test cases.
    """

    case_id: str
    images: tuple[np.ndarray, ...]
    label: np.ndarray | None
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


# --------------------------------------------------------------------------- random fields and shapes


class _Grid:
    """Physical (mm) coordinates of voxel centres, centred on the volume, as broadcastable axes."""

    def __init__(self, shape: tuple[int, int, int], spacing: Vec3) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.extent = self.spacing * np.asarray(shape)  # field of view in mm per axis
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]

    def index_of(self, axis: int, coord: float) -> float:
        """Fractional voxel index of a physical coordinate along one axis."""
        return coord / self.spacing[axis] + (self.shape[axis] - 1) / 2.0


_KERNEL_SIGMA = 0.75  # Gaussian interpolation kernel width, in coarse cells


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """Weights (n x cells+4) that smoothly interpolate a coarse lattice onto n fine points.

    Two padding cells on each side keep the field stationary up to the borders.
    """
    positions = np.linspace(2.0, cells + 1.0, n) if cells > 1 else np.full(n, 2.0)
    offsets = positions[:, None] - np.arange(cells + 4)[None, :]
    return np.exp(-0.5 * (offsets / _KERNEL_SIGMA) ** 2).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, feature_mm: float | Vec3
) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field with blobs of about ``feature_mm``.

    White noise on a coarse lattice is interpolated separably (three small matrix
    products), which is far cheaper than smoothing full-resolution noise or a
    spline zoom on large volumes.
    """
    features = np.broadcast_to(np.asarray(feature_mm, dtype=np.float64), (3,))
    cells = []
    for n, s, f in zip(shape, spacing, features):
        wanted = math.ceil(n * s / f) + 1
        cells.append(int(min(wanted, max(2, n // 3))))  # never finer than about 3 voxels
    result = rng.standard_normal([c + 4 for c in cells], dtype=np.float32)
    for n, c in zip(shape, cells):
        # contracting the leading axis and appending the fine one cycles the axes back to (z, y, x)
        result = np.tensordot(result, _interp_matrix(n, c), axes=([0], [1]))
    norm = (math.sqrt(math.pi) * _KERNEL_SIGMA) ** 1.5
    return result / np.float32(norm)


def _rotation(axis_pair: tuple[int, int], angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` (radians) in the plane of the two given axes."""
    i, j = axis_pair
    r = np.eye(3)
    c, s = math.cos(angle), math.sin(angle)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _random_orientation(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """Rotation (z, y, x) with a free in-plane angle and tilts out of the axial plane.

    Anatomy is mostly aligned with the scanner axis, so tilts are kept small.
    """
    tilt = math.radians(max_tilt_deg)
    yaw = _rotation((1, 2), rng.uniform(-math.pi, math.pi))
    pitch = _rotation((0, 1), rng.uniform(-tilt, tilt))
    roll = _rotation((0, 2), rng.uniform(-tilt, tilt))
    return yaw @ pitch @ roll


def _blob(
    grid: _Grid,
    rng: np.random.Generator,
    center: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    wobble: float,
) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid whose surface is deformed by smooth noise.

    ``center`` and ``radii`` are in mm (z, y, x); ``rotation`` maps the
    ellipsoid's own axes to the grid axes. The surface sits at normalised
    radius^2 = 1 + wobble * noise, so ``wobble`` of 0.3 makes a lumpy, organ-like
    shape. Work is confined to the blob's bounding box.
    """
    radii = np.asarray(radii, dtype=np.float64)
    half = np.sqrt(((rotation * radii[None, :]) ** 2).sum(axis=1)) * math.sqrt(1.0 + wobble)
    slices = []
    for axis in range(3):
        lo = math.floor(grid.index_of(axis, center[axis] - half[axis]))
        hi = math.ceil(grid.index_of(axis, center[axis] + half[axis])) + 1
        lo, hi = max(lo, 0), min(hi, grid.shape[axis])
        if lo >= hi:
            return np.zeros(grid.shape, dtype=bool)
        slices.append(slice(lo, hi))
    box = tuple(slices)
    deltas = [
        (grid.axes[a][box[a]] - center[a]).reshape([-1 if b == a else 1 for b in range(3)]) for a in range(3)
    ]
    rho2 = np.zeros([s.stop - s.start for s in box], dtype=np.float32)
    for k in range(3):  # coordinate along the ellipsoid's k-th own axis
        q = deltas[0] * rotation[0, k] + deltas[1] * rotation[1, k] + deltas[2] * rotation[2, k]
        rho2 += ((q / radii[k]) ** 2).astype(np.float32)
    bumps = np.clip(_smooth_field(rng, rho2.shape, grid.spacing, 0.7 * radii.min()), -1.5, 1.5) / 1.5
    mask = np.zeros(grid.shape, dtype=bool)
    mask[box] = rho2 <= 1.0 + wobble * bumps
    return mask


def _point_inside(rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
                  max_fraction: float) -> np.ndarray:
    """Random point within ``max_fraction`` of an ellipsoid's normalised radius."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return center + rotation @ (direction * radii * rng.uniform(0.0, max_fraction))


def _jitter_shape(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per-case shape within about +-15 % of the median shape."""
    return tuple(max(_MIN_AXIS, int(round(n * rng.uniform(0.85, 1.15)))) for n in shape)  # type: ignore[return-value]


def _partial_volume_blur(image: np.ndarray, spacing: np.ndarray, fwhm_mm: float) -> np.ndarray:
    """Blur by a physical point-spread function (thin along thick-slice axes, as in reality)."""
    sigma = (fwhm_mm / 2.355) / spacing
    return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)


# --------------------------------------------------------------------------- CT


def _ct_case(rng: np.random.Generator, settings: SynthSettings) -> tuple[np.ndarray, np.ndarray, Vec3]:
    """One abdomen-like CT volume (int16 HU) with its label map and (z, y, x) spacing."""
    shape = _jitter_shape(rng, settings.shape)
    in_plane = round(rng.uniform(0.6, 0.95), 3)
    spacing = (round(rng.uniform(2.0, 5.0), 3), in_plane, in_plane)
    grid = _Grid(shape, spacing)
    _, fov_y, fov_x = grid.extent
    z, y, x = grid.axes[0][:, None, None], grid.axes[1][None, :, None], grid.axes[2][None, None, :]

    # body: elliptical cylinder through all slices, contour varying smoothly along z, fat rim inside
    b, a = rng.uniform(0.34, 0.44) * fov_y, rng.uniform(0.38, 0.46) * fov_x
    cy, cx = rng.uniform(-0.03, 0.03) * fov_y, rng.uniform(-0.03, 0.03) * fov_x
    contour = 1.0 + 0.08 * np.clip(_smooth_field(rng, shape, grid.spacing, (60.0, 25.0, 25.0)), -1.5, 1.5)
    rho2 = (((y - cy) / b) ** 2 + ((x - cx) / a) ** 2).astype(np.float32) / contour
    body = rho2 <= 1.0
    fat = body & (rho2 > rng.uniform(0.65, 0.8))

    # spine: posterior cylinder of vertebrae (bright) separated by discs; unlabelled part of the body
    spine_r = rng.uniform(0.1, 0.14) * min(a, b)
    spine = (((y - (cy + 0.62 * b)) ** 2 + (x - cx) ** 2) <= spine_r**2) & np.ones_like(z, dtype=bool)
    period = rng.uniform(25.0, 35.0)
    disc = np.cos(2 * math.pi * (z - rng.uniform(0, period)) / period) < -0.7
    bone_hu = rng.uniform(400.0, 1000.0)

    # organ: deformed ellipsoid in the anterior / lateral part of the body
    inner = min(a, b)
    organ_c = np.array([rng.uniform(-0.2, 0.2) * grid.extent[0],
                        cy + rng.uniform(-0.35, 0.1) * b, cx + rng.uniform(-0.35, 0.35) * a])
    r_plane = rng.uniform(0.3, 0.5, size=2) * inner
    r_z = np.clip(rng.uniform(0.15, 0.3) * grid.extent[0], 0.8 * r_plane.mean(), 3.0 * r_plane.mean())
    organ_r = np.maximum(np.array([r_z, *r_plane]), 1.5 * grid.spacing)
    organ_rot = _random_orientation(rng, 15.0)
    organ = _blob(grid, rng, organ_c, organ_r, organ_rot, wobble=0.25) & body & ~spine
    organ_hu = rng.uniform(60.0, 120.0)

    # lesions: 0-3 small blobs inside the organ, darker (mostly) or brighter by 20-40 HU
    num_lesions = max(int(rng.choice(4, p=[0.15, 0.4, 0.3, 0.15])), settings.min_lesions)
    lesions = []
    for _ in range(num_lesions):
        center = _point_inside(rng, organ_c, organ_r, organ_rot, 0.6)
        radii = np.maximum(rng.uniform(*settings.lesion_size, size=3) * organ_r.min(), grid.spacing)
        mask = _blob(grid, rng, center, radii, _random_orientation(rng, 90.0), wobble=0.3) & organ
        sign = -1.0 if rng.uniform() < 0.7 else 1.0
        lesions.append((mask, organ_hu + sign * rng.uniform(*settings.lesion_contrast_hu)))

    # intensities: piecewise tissue values plus texture, then point-spread blur and noise
    texture = 0.75 * _smooth_field(rng, shape, grid.spacing, 12.0) + 0.35 * _smooth_field(rng, shape, grid.spacing, 4.0)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = (rng.uniform(25.0, 50.0) + 12.0 * texture)[body]
    image[fat] = (-100.0 + 15.0 * texture)[fat]
    image[spine & ~disc] = bone_hu + 60.0 * texture[spine & ~disc]
    image[spine & disc] = 80.0
    image[organ] = (organ_hu + 6.0 * texture)[organ]
    for mask, hu in lesions:
        image[mask] = (hu + 6.0 * texture)[mask]
    image = _partial_volume_blur(image, grid.spacing, fwhm_mm=rng.uniform(1.0, 1.8))
    image += rng.uniform(10.0, 25.0) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    label = np.zeros(shape, dtype=np.uint8)
    label[body] = CT_LABELS["body"]
    label[organ] = CT_LABELS["organ"]
    for mask, _ in lesions:
        label[mask] = CT_LABELS["lesion"]
    return image, label, spacing


# --------------------------------------------------------------------------- MRI

# tissue contrasts (T1, T2) relative to brain-like parenchyma; jittered per case
_MRI_CONTRAST = {
    "tissue": (0.85, 0.55),
    "shell": (1.10, 0.75),
    "fluid": (0.20, 1.50),
    "edema": (0.62, 1.15),
    "core": (1.35, 0.70),
}


def _mri_case(
    rng: np.random.Generator, median_shape: tuple[int, int, int]
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, Vec3]:
    """One head-like two-channel MRI (float32, zero background) with label map and spacing."""
    shape = _jitter_shape(rng, median_shape)
    spacing = tuple(round(float(s), 3) for s in rng.uniform(0.9, 1.2, size=3))
    grid = _Grid(shape, spacing)

    # head: ellipsoid covering ~72-88 % of each axis, shifted off-centre but never touching the border
    wobble = 0.08
    head_r = rng.uniform(0.36, 0.44, size=3) * grid.extent
    reach = head_r * math.sqrt(1.0 + wobble)
    slack = np.maximum(0.5 * grid.extent - reach - 1.5 * grid.spacing, 0.0)
    head_c = rng.uniform(-slack, slack)
    head_rot = np.eye(3)  # axis-aligned, so the margins above keep the head inside the field of view
    head = _blob(grid, rng, head_c, head_r, head_rot, wobble=wobble)
    parenchyma = _blob(grid, rng, head_c, head_r * rng.uniform(0.82, 0.9), head_rot, wobble=0.04) & head
    shell = head & ~parenchyma

    # fluid-filled cavity near the centre (unlabelled), for realistic contrast variety
    fluid_r = np.maximum(head_r * rng.uniform(0.08, 0.16, size=3), grid.spacing)
    fluid = _blob(grid, rng, _point_inside(rng, head_c, head_r, head_rot, 0.2), fluid_r,
                  _random_orientation(rng, 20.0), wobble=0.3) & parenchyma

    # lesion: edema blob with a core inside it
    edema_c = _point_inside(rng, head_c, head_r, head_rot, 0.5)
    edema_r = np.maximum(rng.uniform(0.2, 0.35, size=3) * np.exp(np.log(head_r).mean()), 2.0 * grid.spacing)
    edema = _blob(grid, rng, edema_c, edema_r, _random_orientation(rng, 90.0), wobble=0.35) & parenchyma
    core_c = _point_inside(rng, edema_c, edema_r, np.eye(3), 0.25)
    core_r = np.maximum(rng.uniform(0.35, 0.6, size=3) * edema_r, grid.spacing)
    core = _blob(grid, rng, core_c, core_r, _random_orientation(rng, 90.0), wobble=0.3) & edema

    regions = [("tissue", parenchyma), ("shell", shell), ("fluid", fluid), ("edema", edema), ("core", core)]
    texture = 0.8 * _smooth_field(rng, shape, grid.spacing, 10.0) + 0.3 * _smooth_field(rng, shape, grid.spacing, 3.0)
    channels = []
    for channel in range(2):
        image = np.zeros(shape, dtype=np.float32)
        for name, mask in regions:
            image[mask] = _MRI_CONTRAST[name][channel] * rng.uniform(0.9, 1.1)
        image[head] += rng.uniform(0.04, 0.08) * texture[head]
        image = _partial_volume_blur(image, grid.spacing, fwhm_mm=rng.uniform(1.0, 1.6))
        noise = rng.uniform(0.02, 0.05) * rng.standard_normal(shape, dtype=np.float32)
        image = np.maximum(np.abs(image + noise), 1e-3)  # magnitude image: positive inside the object
        bias = np.exp(0.25 * _smooth_field(rng, shape, grid.spacing, 80.0))
        image *= bias * np.float32(math.exp(rng.uniform(math.log(50.0), math.log(3000.0))))
        image[~head] = 0.0  # no signal, no noise outside the object
        channels.append(image.astype(np.float32))

    label = np.zeros(shape, dtype=np.uint8)
    label[edema] = MRI_LABELS["edema"]
    label[core] = MRI_LABELS["core"]
    return (channels[0], channels[1]), label, spacing


# --------------------------------------------------------------------------- cases and files


def _case_rng(seed: int, index: int, test: bool) -> np.random.Generator:
    """Independent generator per case, so case i does not depend on how many cases exist."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, int(test)]))


def _world_geometry(rng: np.random.Generator, shape: tuple[int, int, int], spacing: Vec3,
                    oblique: bool) -> tuple[Vec3, tuple[float, ...]]:
    """Origin (x, y, z) in mm, never zero, and a row-major direction matrix (x, y, z)."""
    fov_xyz = np.asarray(spacing[::-1]) * np.asarray(shape[::-1])
    origin = (-0.5 * fov_xyz[0] + rng.uniform(-20.0, 20.0),
              -0.5 * fov_xyz[1] + rng.uniform(-20.0, 20.0),
              rng.uniform(-400.0, -50.0))
    direction = np.eye(3)
    if oblique:
        signs = rng.choice([-1.0, 1.0], size=3)
        angles = np.radians(rng.uniform(5.0, 20.0, size=3)) * signs
        direction = _rotation((0, 1), angles[0]) @ _rotation((1, 2), angles[1]) @ _rotation((0, 2), angles[2])
    return tuple(float(round(o, 3)) for o in origin), tuple(float(d) for d in direction.ravel())


def generate_case(settings: SynthSettings, index: int, *, test: bool = False) -> SynthCase:
    """Generate case ``index`` in memory (deterministic for the settings' seed).

    Test cases (``test=True``) come from a separate random stream and have no label unless
    ``settings.test_labels``.
    """
    rng = _case_rng(settings.seed, index, test)
    if settings.kind == "ct":
        image, label, spacing = _ct_case(rng, settings)
        images: tuple[np.ndarray, ...] = (image,)
    else:
        images, label, spacing = _mri_case(rng, settings.shape)
    origin, direction = _world_geometry(rng, label.shape, spacing, settings.oblique)
    keep_label = not test or settings.test_labels
    return SynthCase(settings.case_id(index), images, label if keep_label else None, spacing, origin, direction)


def _to_sitk(array: np.ndarray, case: SynthCase) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in case.spacing[::-1]])
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    return image


def _write_atomic(image: sitk.Image, target: Path, staging: Path) -> None:
    """Write next to ``target`` (same file system) and rename, so no half-written file is ever visible."""
    temp = staging / f"{uuid.uuid4().hex}{FILE_ENDING}"
    try:
        sitk.WriteImage(image, str(temp), useCompression=True)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _write_json_atomic(payload: dict, target: Path, staging: Path) -> None:
    temp = staging / f"{uuid.uuid4().hex}.json"
    try:
        temp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _dataset_json(settings: SynthSettings) -> dict:
    provenance = asdict(settings)
    provenance["shape"] = list(settings.shape)
    return {
        "name": settings.name,
        "description": f"Synthetic {settings.kind.upper()} dataset generated by kubeseg.synth",
        "channel_names": settings.channel_names,
        "labels": settings.labels,
        "numTraining": settings.num_cases,
        "numTest": settings.num_test_cases,
        "file_ending": FILE_ENDING,
        "licence": "synthetic data, no restrictions",
        "kubeseg_synth": provenance,
    }


def _write_dataset(root: Path, settings: SynthSettings, staging: Path) -> set[Path]:
    """Write every case and dataset.json under ``root``; returns the image/label files written."""
    written: set[Path] = set()
    folders = {name: root / name for name in ("imagesTr", "labelsTr", "imagesTs")
               + (("labelsTs",) if settings.test_labels else ())}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, False) for i in range(settings.num_cases)]
    jobs += [(settings.num_cases + i, True) for i in range(settings.num_test_cases)]
    for index, test in jobs:
        case = generate_case(settings, index, test=test)
        image_folder = folders["imagesTs" if test else "imagesTr"]
        for channel, array in enumerate(case.images):
            target = image_folder / f"{case.case_id}_{channel:04d}{FILE_ENDING}"
            _write_atomic(_to_sitk(array, case), target, staging)
            written.add(target)
        if case.label is not None:
            target = folders["labelsTs" if test else "labelsTr"] / f"{case.case_id}{FILE_ENDING}"
            _write_atomic(_to_sitk(case.label, case), target, staging)
            written.add(target)
    _write_json_atomic(_dataset_json(settings), root / "dataset.json", staging)
    return written


def _remove_stale_cases(root: Path, keep: set[Path]) -> None:
    """Drop synth_* files left by an earlier, larger run, so the folder matches dataset.json."""
    for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for path in (root / name).glob(f"synth_*{FILE_ENDING}"):
            if path not in keep:
                path.unlink()


def synthesize(out_dir: str | Path, settings: SynthSettings) -> Path:
    """Write a synthetic nnU-Net v2 raw dataset to ``out_dir`` and return it.

    If ``out_dir`` does not exist, the dataset is built in a hidden sibling
    folder and renamed into place at the end, so ``out_dir`` appears complete or
    not at all. If it exists, each file is replaced atomically and synth_* case
    files not belonging to these settings are removed; other files are left alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(out_dir)
    fresh = not out_dir.exists()
    if fresh:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        root = out_dir.parent / f".{out_dir.name}.synth-{uuid.uuid4().hex[:8]}"
    else:
        root = out_dir
    staging = root / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        written = _write_dataset(root, settings, staging)
        shutil.rmtree(staging)
        if fresh:
            os.rename(root, out_dir)
        else:
            _remove_stale_cases(root, written)
    except BaseException:
        shutil.rmtree(root if fresh else staging, ignore_errors=True)
        raise
    return out_dir
