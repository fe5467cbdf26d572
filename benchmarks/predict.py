"""Benchmark: kubeseg's predictor against nnunetv2's, same weights, same cases, same TTA, one run.

A synthetic CT dataset is planned by nnunetv2 (CPU-sized settings, as kubeseg's ``small``
preset) and given a randomly initialised nnU-Net network in nnU-Net's checkpoint format
(tests/inference/nnunet_oracle.py). nnunetv2 predicts the test cases in a subprocess (it reads
its folders from environment variables); kubeseg predicts them here. Prints seconds per case,
the ratio kubeseg / nnunetv2 (below 1 means kubeseg is faster), the peak resident memory of the
process during each case, and how many voxels the two segmentations agree on.

    python benchmarks/predict.py [--cases 3] [--shape 40 128 128] [--configuration 3d_fullres]
                                 [--disable-tta] [--threads N] [--device cpu|cuda] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from kubeseg.inference.predictor import PredictSettings  # noqa: E402
from kubeseg.inference.run import build_predictors, predict_case_probabilities, resolve_model  # noqa: E402
from kubeseg.inference.export import probabilities_to_segmentation  # noqa: E402
from kubeseg.imageio import read_image, write_image  # noqa: E402
from kubeseg.synth import SynthSettings, synthesize  # noqa: E402
from tests.oracle import run_oracle  # noqa: E402
from tests.inference.nnunet_oracle import PeakRSS  # noqa: E402


def _oracle(*args: str) -> None:
    run_oracle("-m", "tests.inference.nnunet_oracle", *args, timeout=3600)


def run_kubeseg(model_dir: Path, images: list[Path], out: Path, tta: bool, device: str) -> list[dict]:
    settings = PredictSettings(use_mirroring=tta, device=device, progress=False)
    predictors = build_predictors(resolve_model(model_dir, folds=["0"]), settings)
    labels = predictors[0].labels.all_labels
    out.mkdir(parents=True, exist_ok=True)
    timings = []
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        with PeakRSS() as mem:
            t = time.perf_counter()
            data, geometry = read_image([image])  # the same steps nnunetv2 times: read, predict, write
            probs = predict_case_probabilities(predictors, data, geometry, case)
            write_image(probabilities_to_segmentation(probs, labels), geometry, out / f"{case}.nii.gz")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        timings.append({"case": case, "seconds": seconds, "peak_rss_mib": mem.peak})
    return timings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--configuration", default="3d_fullres", choices=("3d_fullres", "2d"))
    p.add_argument("--disable-tta", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--device", default="cpu", help="kubeseg's device (nnunetv2 runs on the CPU here)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tta = not a.disable_tta
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp)
        raw = work / "raw"
        if not (raw / "dataset.json").is_file():
            synthesize(raw, SynthSettings(kind="ct", num_cases=4, shape=tuple(a.shape), num_test_cases=a.cases,
                                          seed=0, oblique=True))
        _oracle("make-model", str(raw), str(work), "--configs", a.configuration, "--folds", "0")
        model = Path(json.loads((work / "nnunet" / "models.json").read_text())[a.configuration])
        images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
        plans = json.loads((model / "plans.json").read_text())["configurations"][a.configuration]
        print(f"{len(images)} case(s), {a.configuration}, patch {plans['patch_size']}, TTA {tta}, "
              f"{a.threads} thread(s), kubeseg on {a.device}, nnunetv2 on cpu")
        jobs = [{"model_dir": str(model), "out": str(work / "out_nnunet"), "images": [str(i) for i in images],
                 "folds": ["0"], "tta": tta, "probabilities": False}]
        (work / "jobs.json").write_text(json.dumps(jobs))
        started = time.perf_counter()
        _oracle("predict", str(work / "jobs.json"), "--threads", str(a.threads))
        print(f"nnunetv2 subprocess done in {time.perf_counter() - started:.1f} s")
        theirs = json.loads((work / "out_nnunet" / "timings.json").read_text())
        ours = run_kubeseg(model, images, work / "out_kubeseg", tta, a.device)

        print(f"\n{'case':<12}{'kubeseg s':>11}{'nnunetv2 s':>12}{'ratio':>8}{'kubeseg MiB':>13}"
              f"{'nnunetv2 MiB':>14}{'agreement':>11}")
        for o, t in zip(ours, theirs):
            seg_o = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_kubeseg" / f"{o['case']}.nii.gz")))
            seg_t = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_nnunet" / f"{t['case']}.nii.gz")))
            o["agreement"] = float((seg_o == seg_t).mean())
            print(f"{o['case']:<12}{o['seconds']:>11.2f}{t['seconds']:>12.2f}{o['seconds'] / t['seconds']:>8.2f}"
                  f"{o['peak_rss_mib']:>13.0f}{t['peak_rss_mib']:>14.0f}{o['agreement'] * 100:>10.3f}%")
        ks = float(np.mean([o["seconds"] for o in ours]))
        nn = float(np.mean([t["seconds"] for t in theirs]))
        print(f"{'mean':<12}{ks:>11.2f}{nn:>12.2f}{ks / nn:>8.2f}"
              f"{max(o['peak_rss_mib'] for o in ours):>13.0f}{max(t['peak_rss_mib'] for t in theirs):>14.0f}"
              f"{np.mean([o['agreement'] for o in ours]) * 100:>10.3f}%")
        print(f"\nseconds per case: kubeseg {ks:.2f}, nnunetv2 {nn:.2f}, ratio kubeseg/nnunetv2 {ks / nn:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
