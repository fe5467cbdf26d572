"""Benchmark: kubeseg's fingerprint + plan + preprocess (3d_fullres, 2d) against nnunetv2's.

Both run on the same synthetic dataset, with the same number of worker processes, in the same
run; nnunetv2 runs in a subprocess (tests/oracle/nnunet_run.py) because it configures its
folders through environment variables. Prints each stage's wall time and CPU time (user +
system of the process and its reaped worker processes: the robust figure on a shared machine)
and the ratios nnunetv2 / kubeseg (above 1 means kubeseg is faster).

    python benchmarks/preprocess.py [--kind ct] [--cases 10] [--shape 64 160 160] [-j 2]
"""

from __future__ import annotations

import argparse
import json
import resource
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


def _cpu() -> float:
    """User + system seconds of this process and its reaped worker processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_kubeseg(raw: Path, out: Path, workers: int) -> dict[str, float]:
    t = {}
    start, cpu = time.perf_counter(), _cpu()
    fp = extract_fingerprint(raw, workers, progress=False)
    fp_path = write_fingerprint(fp, out / "fingerprint.json")
    t["fingerprint"], t["cpu_fingerprint"] = time.perf_counter() - start, _cpu() - cpu
    start, cpu = time.perf_counter(), _cpu()
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("default"))
    t["plan"], t["cpu_plan"] = time.perf_counter() - start, _cpu() - cpu
    for c in CONFIGS:
        start, cpu = time.perf_counter(), _cpu()
        preprocess_dataset(raw, plans, c, out / "preprocessed", fp_path, workers, progress=False)
        t[f"preprocess_{c}"], t[f"cpu_preprocess_{c}"] = time.perf_counter() - start, _cpu() - cpu
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
    stages = [s for s in ours if not s.startswith("cpu_")]
    print(f"{'stage':<24}{'kubeseg s':>12}{'nnunetv2 s':>12}{'ratio':>8}{'kubeseg CPU s':>15}{'nnunetv2 CPU s':>16}"
          f"{'ratio':>8}")
    for stage in [*stages, "total"]:
        row = []
        for key in (stage, f"cpu_{stage}"):
            names = [k for k in ours if (k.startswith("cpu_") == key.startswith("cpu_"))] if stage == "total" else [key]
            o, r = sum(ours[k] for k in names), sum(ref.get(k, float("nan")) for k in names)
            row += [o, r, r / o]
        print(f"{stage:<24}{row[0]:>12.2f}{row[1]:>12.2f}{row[2]:>8.2f}{row[3]:>15.2f}{row[4]:>16.2f}{row[5]:>8.2f}")
    print("ratio = nnunetv2 / kubeseg (above 1: kubeseg faster); CPU = user + system, worker processes included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
