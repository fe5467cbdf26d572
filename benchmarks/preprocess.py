"""Benchmark: kubeseg's fingerprint + plan + preprocess (3d_fullres, 2d) against nnunetv2's.

Both run on the same synthetic dataset, with the same number of worker processes, in the same
run; nnunetv2 runs in a subprocess (tests/oracle/nnunet_run.py) because it configures its
folders through environment variables. Prints each stage's time and the ratio
nnunetv2 / kubeseg (above 1 means kubeseg is faster).

    python benchmarks/preprocess.py [--kind ct] [--cases 10] [--shape 64 160 160] [-j 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubeseg.dataset import load_dataset_json  # noqa: E402
from kubeseg.fingerprint import extract_fingerprint, write_fingerprint  # noqa: E402
from kubeseg.planning.planner import plan_experiment, planner_settings  # noqa: E402
from kubeseg.preprocessing.preprocess import preprocess_dataset  # noqa: E402
from kubeseg.synth import SynthSettings, synthesize  # noqa: E402
from tests.oracle import run_oracle  # noqa: E402

CONFIGS = ("3d_fullres", "2d")


def run_kubeseg(raw: Path, out: Path, workers: int) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    fp = extract_fingerprint(raw, workers, progress=False)
    fp_path = write_fingerprint(fp, out / "fingerprint.json")
    t["fingerprint"] = time.perf_counter() - start
    start = time.perf_counter()
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("default"))
    t["plan"] = time.perf_counter() - start
    for c in CONFIGS:
        start = time.perf_counter()
        preprocess_dataset(raw, plans, c, out / "preprocessed", fp_path, workers, progress=False)
        t[f"preprocess_{c}"] = time.perf_counter() - start
    return t


def run_nnunet(raw: Path, work: Path, workers: int) -> dict[str, float]:
    run_oracle("tests/oracle/nnunet_run.py", str(raw), str(work), "--configs", *CONFIGS,
               "--all-cases", "-j", str(workers), timeout=3600)
    return json.loads((work / "nnunet" / "timings.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="ct", choices=("ct", "mri"))
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 160, 160))
    p.add_argument("-j", "--num-workers", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubeseg-bench-") as tmp:
        tmp = Path(tmp)
        raw = synthesize(tmp / "raw", SynthSettings(kind=a.kind, num_cases=a.cases, shape=tuple(a.shape), seed=0))
        ours = run_kubeseg(raw, tmp / "kubeseg", a.num_workers)
        ref = run_nnunet(raw, tmp, a.num_workers)
    print(f"dataset: {a.cases} {a.kind} cases, median shape {tuple(a.shape)}, {a.num_workers} worker(s)")
    print(f"{'stage':<24}{'kubeseg s':>12}{'nnunetv2 s':>12}{'ratio':>8}")
    for stage in ours:
        print(f"{stage:<24}{ours[stage]:>12.2f}{ref[stage]:>12.2f}{ref[stage] / ours[stage]:>8.2f}")
    total_ours, total_ref = sum(ours.values()), sum(ref[s] for s in ours)
    print(f"{'total':<24}{total_ours:>12.2f}{total_ref:>12.2f}{total_ref / total_ours:>8.2f}")
    print(f"ratio nnunetv2/kubeseg = {total_ref / total_ours:.2f} (above 1: kubeseg faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
