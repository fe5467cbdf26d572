"""What queueing one case for review costs: writing its input channel (int16 when integral) and label
map as NIfTI, as services.clinical.Clinical.enqueue does. ``python benchmarks/review_queue.py 128x512x512``.

The intensities are noise-like (rounded normal, sd 200 HU), which compresses worse than a real CT: an
upper bound on bytes and about the same time."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kubeseg.imageio import Geometry, write_image
from services.clinical import _compact


def main(shape_text: str = "128x512x512") -> None:
    shape = tuple(int(x) for x in shape_text.split("x"))
    image = np.random.default_rng(0).normal(0, 200, shape).round().astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2, shape[2] // 4: shape[2] // 2] = 1
    geometry = Geometry((2.5, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with tempfile.TemporaryDirectory() as d:
        wall, cpu = time.perf_counter(), time.process_time()
        write_image(_compact(image), geometry, Path(d) / "image_0000.nii.gz")
        write_image(seg, geometry, Path(d) / "segmentation.nii.gz")
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        print(f"{shape}: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU, "
              f"{size / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
