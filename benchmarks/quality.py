"""Benchmark: segmentation quality of kubeseg and nnunetv2 at equal budget, over several seeds.

One synthetic CT-like dataset (labels body=1, organ=2, lesion=3; ``--dataset-seed``), the same
plans (each tool plans it; benchmarks/train.py checks that the 3d_fullres plans are equal) and
nnU-Net's seeded 5-fold split. For each training seed (``--seeds``, default 3), both tools train
3d_fullres fold 0 with the same schedule (``--epochs`` x ``--iterations``), taking turns on the
machine (benchmarks/train.py, one run per seed, kept in ``OUT/seed_<S>``), and predict the
fold's held-out cases with their own predictor (sliding window, Gaussian, mirroring). Dice per
label is computed by one function for both, on the preprocessed grid, mean over held-out cases;
the table gives the mean +- sd over seeds, per label and for the foreground mean.

Budget: small structures must be learned for the comparison to mean anything. At 15 epochs x
25 iterations the lesion is learned in some nnunetv2 runs and not in others (a coin flip, not
a comparison), so the default is 30 epochs x 50 iterations (1,500 iterations per run); on a
2-core CPU that is several hours per seed and side -- use a GPU (``--device cuda``) or pass a
smaller budget and say so with the numbers.

    python benchmarks/quality.py [--seeds 0 1 2] [--epochs 30] [--iterations 50] [--cases 10]
                                 [--shape 40 96 96] [--device cpu] [--out DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL_NAMES = {"1": "body", "2": "organ", "3": "lesion"}


def run_seed(a, seed: int, out: Path) -> dict:
    """One benchmarks/train.py run (both tools) with training seed ``seed``; its Dice table."""
    result = out / "timings.json"
    if result.is_file() and "dice" in json.loads(result.read_text()):
        print(f"seed {seed}: reusing {result}", flush=True)
        return json.loads(result.read_text())["dice"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--seed", str(seed), "--dataset-seed",
           str(a.dataset_seed), "--cases", str(a.cases), "--shape", *map(str, a.shape), "--epochs", str(a.epochs),
           "--iterations", str(a.iterations), "--val-iterations", str(a.val_iterations), "--configuration",
           a.configuration, "--lesions", a.lesions, "--workers",
           str(a.workers), "--threads", str(a.threads), "--device", a.device, "--keep", str(out)]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    with open(out.parent / f"seed_{seed}.log", "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: benchmarks/train.py failed (exit {done.returncode}); see {log.name}")
    return json.loads(result.read_text())["dice"]


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def table(results: dict[int, dict], markdown: bool) -> str:
    labels = sorted({lab for r in results.values() for side in ("kubeseg", "nnunetv2")
                     for lab in r[side]["per_class"]}, key=int)
    lines = []
    head = ["label", "kubeseg Dice", "nnunetv2 Dice", "kubeseg - nnunetv2"]
    for lab in [*labels, "foreground"]:
        cells = []
        for side in ("kubeseg", "nnunetv2"):
            vals = [r[side]["foreground_mean"] if lab == "foreground" else r[side]["per_class"].get(lab)
                    for r in results.values()]
            m, sd, n = mean_sd(vals)
            cells.append((m, sd, n))
        diff = cells[0][0] - cells[1][0]
        name = "foreground mean" if lab == "foreground" else f"{lab} {LABEL_NAMES.get(lab, '')}".strip()
        lines.append([name, *[f"{m:.3f} ± {sd:.3f} (n={n})" for m, sd, n in cells], f"{diff:+.3f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 3)")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--configuration", default="3d_fullres", choices=("3d_fullres", "2d"))
    p.add_argument("--lesions", default="default", choices=("default", "demo"),
                   help="lesion difficulty of the synthetic CT (benchmarks/train.py --lesions)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="quality-benchmark", help="one folder per seed (kept; a finished seed is reused)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {seed: run_seed(a, seed, out / f"seed_{seed}") for seed in a.seeds}
    (out / "quality.json").write_text(json.dumps({"args": vars(a), "dice": results}, indent=1, default=str))
    print(f"\n{len(a.seeds)} seed(s), {a.epochs} epochs x {a.iterations} iterations, {a.cases} cases of "
          f"{tuple(a.shape)} ({a.lesions} lesions), {a.configuration} fold 0, Dice on the fold's held-out cases (mean ± sd over seeds):")
    print(table(results, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
