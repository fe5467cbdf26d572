"""The work an input implies, judged from its header before any voxel is read.

Prediction resamples the input to each configuration's target spacing (the cascade's first
stage, ``3d_lowres``, on its own grid). The input's size alone does not bound that: a 16³ image
that claims 400 mm voxels becomes 6400³ voxels at 1 mm (10¹¹ voxels, hundreds of GB). So the
resampled grid is computed here from the header's shape and spacing, per configuration of the
model, the way preprocessing will compute it (transpose, the configuration's target spacing,
:func:`~kubeseg.preprocessing.resampling.compute_new_shape`), and refused above a limit.

The crop to the nonzero region cannot be known from a header, so no crop is assumed: the bound
is an upper bound of the real grid.

Default limit: :data:`DEFAULT_MAX_RESAMPLED_VOXELS` = 2²⁹ (536,870,912) voxels, a fixed number
rather than one derived from the training data: it is twice the service's largest accepted input
(512×512×1024), enough for a whole-body CT at fine spacing, and it keeps the memory one request
can claim predictable (about 2 GiB per float32 channel and per class on that grid, see
:attr:`ResampledGrid.bytes_estimate`). A deployment that knows its data sets
``KUBESEG_MAX_RESAMPLED_VOXELS`` (service) or ``--max-resampled-voxels`` (``kubeseg predict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from kubeseg.errors import KubesegError
from kubeseg.image_guard import check_image_file

# SimpleITK and the preprocessing code are imported where they are used: services.settings imports
# this module for its default, and the trigger (which reads the same settings module) needs neither.

DEFAULT_MAX_RESAMPLED_VOXELS = 2 ** 29
BYTES_PER_VOXEL_CHANNEL = 4  # float32 network input
BYTES_PER_VOXEL_CLASS = 8  # logits accumulator (float16/32) + log-probabilities (float32), roughly


class InputRefused(KubesegError):
    """An input refused from its header. ``too_large``: the work it implies is over a limit
    (HTTP 413); otherwise its geometry is unusable (HTTP 422)."""

    def __init__(self, message: str, too_large: bool):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class GridStage:
    """What one configuration does to an input's grid, and how wide its network input and output are."""

    configuration: str
    transpose: tuple[int, ...]
    spacing: tuple[float, ...]  # the configuration's target spacing, in transposed order
    channels: int  # network input channels (a cascade stage adds one per foreground label)
    classes: int  # segmentation heads

    @classmethod
    def from_plans(cls, plans: dict, configuration: str, channels: int, classes: int) -> "GridStage":
        from kubeseg.planning.plans import configuration as resolve_configuration

        config = resolve_configuration(plans, configuration)
        return cls(configuration, tuple(int(a) for a in plans["transpose_forward"]),
                   tuple(float(s) for s in config["spacing"]), int(channels), int(classes))


def stages_of(predictors: Iterable) -> list[GridStage]:
    """Every configuration a list of :class:`~kubeseg.inference.predictor.Predictor` runs, cascade
    first stages included (each once)."""
    out: dict[str, GridStage] = {}
    todo = list(predictors)
    while todo:
        p = todo.pop()
        model = p.model
        n_in = len(model.dataset_json.get("channel_names", model.dataset_json.get("modality", {})))
        if p.previous is not None:
            n_in += len(p.labels.foreground_labels)
            todo.append(p.previous)
        stage = GridStage.from_plans(model.plans, model.configuration, n_in, p.labels.num_segmentation_heads)
        out.setdefault(f"{model.folder}:{model.configuration}", stage)
    return list(out.values())


@dataclass(frozen=True)
class ResampledGrid:
    """The grid one configuration would predict on (no crop assumed)."""

    configuration: str
    shape: tuple[int, ...]
    voxels: int
    bytes_estimate: int  # network input + logits on this grid


def resampled_grid(shape: Sequence[int], spacing: Sequence[float], stage: GridStage) -> ResampledGrid:
    """The grid of ``stage`` for an input of ``shape``/``spacing`` (numpy order z, y, x).

    Computed in floating point first, so absurd spacings (10³⁰ mm) give an honest huge number
    instead of an overflow; each axis is rounded as preprocessing rounds it.
    """
    from kubeseg.preprocessing.preprocess import target_spacing

    shape_t = [int(shape[a]) for a in stage.transpose]
    spacing_t = [float(spacing[a]) for a in stage.transpose]
    new_spacing = target_spacing({"spacing": list(stage.spacing)}, spacing_t)
    extent = [s * o / n for s, o, n in zip(shape_t, spacing_t, new_spacing)]
    if not all(math.isfinite(e) for e in extent) or max(extent) > 2 ** 62:
        huge = 2 ** 63 - 1
        return ResampledGrid(stage.configuration, tuple(huge for _ in extent), huge, huge)
    new_shape = tuple(int(round(e)) for e in extent)
    voxels = math.prod(new_shape)
    per_voxel = stage.channels * BYTES_PER_VOXEL_CHANNEL + stage.classes * BYTES_PER_VOXEL_CLASS
    return ResampledGrid(stage.configuration, new_shape, voxels, voxels * per_voxel)


def check_spacing(spacing: Sequence[float], name: str) -> None:
    """A spacing preprocessing can divide by: finite and positive on every axis."""
    bad = [s for s in spacing if not (math.isfinite(float(s)) and float(s) > 0)]
    if bad:
        raise InputRefused(f"{name}: voxel spacing {tuple(float(s) for s in spacing)} (z, y, x) is not positive "
                           "and finite on every axis", too_large=False)


def check_resampled_grid(name: str, shape: Sequence[int], spacing: Sequence[float], stages: Sequence[GridStage],
                         max_voxels: int = DEFAULT_MAX_RESAMPLED_VOXELS) -> list[ResampledGrid]:
    """Refuse an input whose resampled grid, in any configuration, exceeds ``max_voxels`` or has
    no voxels along an axis. ``shape``/``spacing`` in numpy order (z, y, x), from the header.

    Raises :class:`InputRefused` naming the file (``name``), the configuration and the numbers.
    """
    check_spacing(spacing, name)
    grids = []
    for stage in stages:
        grid = resampled_grid(shape, spacing, stage)
        if grid.voxels > max_voxels:
            raise InputRefused(
                f"{name}: size {tuple(int(s) for s in shape)} at spacing {tuple(float(s) for s in spacing)} mm "
                f"resamples to {_grid_text(grid)} voxels for {stage.configuration} (target spacing "
                f"{stage.spacing} mm), over the limit of {max_voxels} resampled voxels "
                f"(~{_gib(grid.bytes_estimate)} GiB of input and logits)", too_large=True)
        if min(grid.shape) < 1:
            raise InputRefused(
                f"{name}: size {tuple(int(s) for s in shape)} at spacing {tuple(float(s) for s in spacing)} mm "
                f"resamples to {grid.shape} for {stage.configuration} (target spacing {stage.spacing} mm): no "
                "voxels along an axis; the spacing is implausibly small", too_large=False)
        grids.append(grid)
    return grids


def _grid_text(grid: ResampledGrid) -> str:
    if grid.voxels >= 2 ** 63 - 1:
        return "an unbounded number of"
    return f"{'x'.join(map(str, grid.shape))} = {grid.voxels}"


def _gib(n: int) -> str:
    return "inf" if n >= 2 ** 63 - 1 else f"{n / 2 ** 30:.1f}"


@dataclass(frozen=True)
class HeaderInfo:
    """Shape and spacing in numpy order (z, y, x), from the header alone."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    dimension: int
    components: int


def read_header(path: str | Path, name: Optional[str] = None) -> HeaderInfo:
    """The header of one image file, after :func:`~kubeseg.image_guard.check_image_file`."""
    import SimpleITK as sitk

    from kubeseg.imageio import itk_error_reason

    name = name or str(path)
    check_image_file(path, name)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputRefused(f"{name}: the header cannot be read ({itk_error_reason(e) or 'corrupt file'})",
                           too_large=False) from None
    return HeaderInfo(tuple(int(s) for s in reader.GetSize()[::-1]), tuple(float(s) for s in reader.GetSpacing()[::-1]),
                      reader.GetDimension(), reader.GetNumberOfComponents())


def check_file_grid(path: str | Path, stages: Sequence[GridStage], max_voxels: int = DEFAULT_MAX_RESAMPLED_VOXELS,
                    name: Optional[str] = None) -> list[ResampledGrid]:
    """:func:`check_resampled_grid` for an image file, from its header. A folder (a DICOM series)
    is left to the DICOM reader, which calls :func:`check_resampled_grid` with its own header facts."""
    path = Path(path)
    if path.is_dir():
        return []
    name = name or str(path)
    info = read_header(path, name)
    if info.dimension != 3:
        return []  # the image checks refuse other dimensions with their own message
    return check_resampled_grid(name, info.shape, info.spacing, stages, max_voxels)
