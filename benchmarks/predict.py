"""Benchmark: kubeseg's predictor (each backend) against nnunetv2's, same weights, cases and TTA.

The model: ``--model DIR``, a trained model folder in nnU-Net's layout (``plans.json``,
``dataset.json``, ``fold_0/checkpoint_final.pth``; kubeseg's training writes it, and nnunetv2
predicts from the same folder), with test cases synthesized like its training data (the
``kubeseg_synth`` entry of its dataset.json, another seed: cases it has not seen). Without
``--model``, a synthetic CT dataset is planned by nnunetv2 (CPU-sized settings, as kubeseg's
``small`` preset) and given a randomly initialised nnU-Net network in nnU-Net's checkpoint
format (tests/inference/nnunet_oracle.py): its classes compete everywhere (near-tie logits), a
harsher agreement test than a trained model, whose answer the issue's bar is about.
nnunetv2 predicts the test cases in its own venv (through
tests/oracle's run_oracle; it reads its folders from environment variables); kubeseg predicts
them here with each backend (torch, onnxruntime, openvino; the ONNX export happens once, at
model load, as nnunetv2's model loading, outside the timed part; each backend runs in its own
process, as nnunetv2, so that peak memory is each one's own). Each side predicts every case
``--repeats`` times, one side after the other per repetition, so that a shared machine's load
falls on both.

Per case and repetition: wall seconds (read, predict, write), CPU seconds (user + system, all
threads) and the peak resident memory of the process. Reported: the median over repetitions
of the mean per case, the spread (min-max), and

    ratio = kubeseg / nnunetv2   (below 1: kubeseg faster; the goal is <= 0.5)

and how many voxels kubeseg's segmentation shares with nnunetv2's.

    python benchmarks/predict.py [--model TRAINED_MODEL_FOLDER] [--cases 2] [--shape 40 128 128]
                                 [--configuration 3d_fullres]
                                 [--disable-tta] [--threads N] [--repeats 3]
                                 [--backends torch onnxruntime openvino] [--device cpu|cuda] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPE = (40, 128, 128)
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


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_kubeseg(model_dir: Path, tta: bool, device: str, backend: str, threads: int, autocast: str = "float16"):
    settings = PredictSettings(use_mirroring=tta, device=device, progress=False, backend=backend,
                               num_threads=threads, autocast=autocast)
    return build_predictors(resolve_model(model_dir, folds=["0"]), settings)


def run_kubeseg(predictors, images: list[Path], out: Path, device: str, repeat: int) -> list[dict]:
    labels = predictors[0].labels.all_labels
    out.mkdir(parents=True, exist_ok=True)
    timings = []
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        with PeakRSS() as mem:
            t, cpu = time.perf_counter(), _cpu_seconds()
            data, geometry = read_image([image])  # the same steps nnunetv2 times: read, predict, write
            probs = predict_case_probabilities(predictors, data, geometry, case)
            write_image(probabilities_to_segmentation(probs, labels), geometry, out / f"{case}.nii.gz")
            del probs
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
        timings.append({"case": case, "repeat": repeat, "seconds": seconds, "cpu_seconds": cpu,
                        "peak_rss_mib": mem.peak})
    return timings


def run_side(a, tta: bool) -> int:
    """One kubeseg backend predicting every case once, in this process; timings to ``--side-out``."""
    work = Path(a.keep)
    model = Path(json.loads((work / "nnunet" / "models.json").read_text())[a.configuration])
    images = sorted((work / "raw" / "imagesTs").glob("*_0000.nii.gz"))[: a.cases]
    predictors = load_kubeseg(model, tta, a.device, a.side, a.threads, a.autocast)
    timings = run_kubeseg(predictors, images, work / f"out_kubeseg_{a.side}", a.device, 0)
    Path(a.side_out).write_text(json.dumps(timings))
    return 0


def prepare_trained(model: Path, a, raw: Path, models_json: Path) -> None:
    """Use a trained model folder: record it in ``models_json`` and synthesize unseen test cases like
    its training data (kind, shape, obliqueness from its dataset.json; seed ``--test-seed``)."""
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        sys.exit(f"{model}: no fold_0/checkpoint_final.pth (a trained model folder in nnU-Net's layout is needed)")
    synth = json.loads((model / "dataset.json").read_text()).get("kubeseg_synth") or {}
    if not (raw / "dataset.json").is_file():
        shape = tuple(a.shape or synth.get("shape") or DEFAULT_SHAPE)
        synthesize(raw, SynthSettings(kind=synth.get("kind", "ct"), num_cases=1, shape=shape, num_test_cases=a.cases,
                                      seed=a.test_seed, oblique=bool(synth.get("oblique", False))))
    models_json.parent.mkdir(parents=True, exist_ok=True)
    made = json.loads(models_json.read_text()) if models_json.is_file() else {}
    models_json.write_text(json.dumps({**made, a.configuration: str(model)}, indent=1))


def summary(timings: list[dict], key: str) -> tuple[float, float, float]:
    """(median, min, max) over repetitions of the per-case mean of ``key``."""
    per_repeat = {}
    for t in timings:
        per_repeat.setdefault(t.get("repeat", 0), []).append(t[key])
    means = [float(np.mean(v)) for v in per_repeat.values()]
    return statistics.median(means), min(means), max(means)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="test case shape (default: 40 128 128; with --model, the shape of its training data)")
    p.add_argument("--configuration", default="3d_fullres", choices=("3d_fullres", "2d"))
    p.add_argument("--disable-tta", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--repeats", type=int, default=3, help="predictions of every case, per side")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "openvino"],
                   choices=("torch", "onnxruntime", "openvino"))
    p.add_argument("--device", default="cpu", help="both sides' device (cuda: nnunetv2 with everything on the "
                   "device, kubeseg with autocast and accumulation on the device)")
    p.add_argument("--autocast", default="float16", choices=("float16", "bfloat16"),
                   help="kubeseg's CUDA autocast dtype (nnunetv2 always float16)")
    p.add_argument("--model", help="trained model folder (nnU-Net layout, fold 0) that both sides predict with; "
                   "default: a random-weight model made by nnunetv2")
    p.add_argument("--test-seed", type=int, default=1000, help="synthesis seed of the test cases with --model")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one kubeseg backend in this process
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tta = not a.disable_tta
    if a.side:
        return run_side(a, tta)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp).resolve()
        raw = work / "raw"
        models_json = work / "nnunet" / "models.json"
        if a.model:
            prepare_trained(Path(a.model).resolve(), a, raw, models_json)
        if not (raw / "dataset.json").is_file():
            synthesize(raw, SynthSettings(kind="ct", num_cases=4, shape=tuple(a.shape or DEFAULT_SHAPE),
                                          num_test_cases=a.cases,
                                          seed=0, oblique=True))
        if not models_json.is_file() or a.configuration not in json.loads(models_json.read_text()):
            _oracle("make-model", str(raw), str(work), "--configs", a.configuration, "--folds", "0")
        model = Path(json.loads(models_json.read_text())[a.configuration])
        images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[: a.cases]
        plans = json.loads((model / "plans.json").read_text())["configurations"][a.configuration]
        shape = read_image([images[0]])[0].shape[1:]
        print(f"{len(images)} case(s) of {shape}, {a.configuration}, patch {plans['patch_size']}, TTA {tta}, "
              f"{a.threads} thread(s), {a.repeats} repetition(s), both on {a.device}", flush=True)
        theirs, ours = [], {b: [] for b in a.backends}
        for r in range(a.repeats):  # alternate the sides, so that the machine's load falls on both
            jobs = [{"model_dir": str(model), "out": str(work / "out_nnunet"), "images": [str(i) for i in images],
                     "folds": ["0"], "tta": tta, "probabilities": False, "device": a.device}]
            (work / "jobs.json").write_text(json.dumps(jobs))
            _oracle("predict", str(work / "jobs.json"), "--threads", str(a.threads))
            for t in json.loads((work / "out_nnunet" / "timings.json").read_text()):
                theirs.append({**t, "repeat": r})
            for b in a.backends:  # each backend in its own process, as nnunetv2: its own peak memory
                side = work / f"kubeseg_{b}_{r}.json"
                side_cmd = [sys.executable, __file__, "--side", b, "--side-out", str(side), "--keep", str(work),
                            "--cases", str(a.cases), "--configuration", a.configuration, "--threads", str(a.threads),
                            "--device", a.device, "--autocast", a.autocast, *(["--disable-tta"] if a.disable_tta else [])]
                done = subprocess.run(side_cmd, cwd=REPO, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"kubeseg {b} failed:\n{done.stderr[-4000:]}")
                ours[b] += [{**t, "repeat": r} for t in json.loads(side.read_text())]
            print(f"repetition {r + 1}/{a.repeats} done", flush=True)

        nn_wall, nn_cpu, nn_rss = summary(theirs, "seconds"), summary(theirs, "cpu_seconds"), \
            max(t["peak_rss_mib"] for t in theirs)
        print(f"\nper case, median over {a.repeats} repetition(s) [min-max]; ratio = kubeseg / nnunetv2 "
              f"(below 1: kubeseg faster)")
        print(f"{'side':<22}{'wall s':>22}{'ratio':>7}{'CPU s':>22}{'ratio':>7}{'peak MiB':>10}{'agreement':>11}")
        print(f"{'nnunetv2':<22}{nn_wall[0]:>8.2f} [{nn_wall[1]:.2f}-{nn_wall[2]:.2f}]{'':>7}"
              f"{nn_cpu[0]:>8.2f} [{nn_cpu[1]:.2f}-{nn_cpu[2]:.2f}]{'':>7}{nn_rss:>10.0f}")
        for b in a.backends:
            agree = []
            for image in images:
                case = image.name[: -len("_0000.nii.gz")]
                seg_o = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"out_kubeseg_{b}" / f"{case}.nii.gz")))
                seg_t = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_nnunet" / f"{case}.nii.gz")))
                agree.append(float((seg_o == seg_t).mean()))
            wall, cpu = summary(ours[b], "seconds"), summary(ours[b], "cpu_seconds")
            rss = max(t["peak_rss_mib"] for t in ours[b])
            print(f"{'kubeseg ' + b:<22}{wall[0]:>8.2f} [{wall[1]:.2f}-{wall[2]:.2f}]{wall[0] / nn_wall[0]:>7.2f}"
                  f"{cpu[0]:>8.2f} [{cpu[1]:.2f}-{cpu[2]:.2f}]{cpu[0] / nn_cpu[0]:>7.2f}{rss:>10.0f}"
                  f"{min(agree) * 100:>10.3f}%")
        if a.keep:
            (work / "timings.json").write_text(json.dumps({"nnunetv2": theirs, **ours}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
