"""Benchmark: kubeseg's training against nnunetv2's, at equal budget, on one synthetic dataset.

What it does
    1. synthesizes a CT-like dataset (kubeseg.synth; labels body=1, organ=2, lesion=3);
    2. kubeseg: fingerprint, plan with the "small" CPU preset (plans named nnUNetPlans),
       preprocess the configuration (``--configuration``, 3d_fullres by default; 2d too);
       nnunetv2 (in a subprocess, benchmarks/_nnunet_train_oracle.py): its own fingerprint,
       planner with the same small settings, preprocessing. The two configurations are
       compared (they must be equal) and so are the fold-0 validation cases of the two
       (nnU-Net's seeded 5-fold split);
    3. trains that configuration's fold 0 with each tool with the same schedule (epochs x training
       iterations + validation iterations), device (CPU), number of augmentation worker
       processes and torch threads. The two take turns, one epoch each (kubeseg's epoch 0,
       nnunetv2's epoch 0, kubeseg's epoch 1, ...; the waiting side is idle, its workers
       having filled their queues), so that other jobs on a shared machine slow both sides
       alike. Then each tool's final validation runs (sliding window, Gaussian weighting,
       step 0.5, mirroring), kubeseg's first.

How to read the output
    Accuracy: Dice per foreground class on the fold-0 validation cases, mean over cases
    (a case where a class is absent in both reference and prediction does not count), and
    the foreground mean (mean of the class means). Both tools are scored here, by the same
    code, on the same grid: the preprocessed geometry, each against its own preprocessed
    reference (the script checks that the two references are identical). "diff" is
    kubeseg - nnunetv2: the goal is diff >= -0.02. The last column is nnunetv2's own
    summary.json, computed after resampling to the original images: close to, but not the
    same number as, the preprocessed-grid Dice.
    Short schedules give noisy Dice (nnU-Net's augmentation is not seeded, so two nnunetv2
    runs differ too). With the default budget (about 100 iterations) both tools learn only
    the body: organ and lesion stay at or near 0 for both (the organ was still at 0 after
    225 iterations in a kubeseg trial), so the default run compares body Dice. Comparing the
    organ needs a much longer run (e.g. --epochs 20 --iterations 50: over an hour per side).

    Speed: training iterations per second = iterations / time from the start of an epoch to
    the end of its last training step (augmentation waits + forward + backward + optimiser;
    not the validation iterations, checkpoints or plots). The first epoch is left out as
    warm-up (worker start-up, first-call allocation), unless there is only one epoch. Also
    shown: the same from the median iteration time (less sensitive to stalls), whole epochs,
    the final validation, the CPU time per epoch of all of a side's processes (training
    process + augmentation workers; barely affected by other jobs, unlike wall time), and
    the ratio per pair of back-to-back epochs. ratio: above 1 means kubeseg is faster (or
    uses less CPU); the goal for iterations/s is >= 1.0 on CPU. The script also reports how
    much CPU other jobs used while each side ran: on a shared machine wall-clock timings are
    noisy even with alternating epochs, so compare several runs.
    Default workers/threads are 1/1: one core runs the network, the other the augmentation
    worker. With 2 torch threads plus workers on 2 cores, OpenMP threads compete with the
    workers (and with any other job) and iteration times swing several-fold; pass
    --workers 2 --threads 2 to time the tools' own CPU defaults anyway.

    python benchmarks/train.py [--cases 10] [--shape 40 96 96] [--configuration 3d_fullres|2d]
        [--lesions default|demo] [--epochs 5] [--iterations 20]
        [--val-iterations 2] [--workers 1] [--threads 1] [--seed 0] [--keep DIR]

Defaults take about 10-15 minutes on a 2-core CPU. --keep DIR keeps the data, both
training folders and timings.json (every iteration's timestamp for both tools, CPU time
per turn).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kubeseg.dataset import load_dataset_json  # noqa: E402
from kubeseg.fingerprint import extract_fingerprint, write_fingerprint  # noqa: E402
from kubeseg.planning.planner import plan_experiment, planner_settings  # noqa: E402
from kubeseg.preprocessing.preprocess import preprocess_dataset  # noqa: E402
from kubeseg.synth import CT_LABELS, SynthSettings, synthesize  # noqa: E402
from kubeseg.training.data import list_case_identifiers  # noqa: E402
from kubeseg.training.schedule import Schedule  # noqa: E402
from kubeseg.training.splits import generate_crossval_split  # noqa: E402
from kubeseg.training.trainer import TrainSettings, train_fold  # noqa: E402
from pipelines.demo import DEMO_SYNTH  # noqa: E402

CONFIGURATIONS = ("3d_fullres", "2d")
FOLD = 0
LESIONS = {"default": {}, "demo": DEMO_SYNTH}  # SynthSettings overrides per --lesions
ORACLE = REPO / "benchmarks" / "_nnunet_train_oracle.py"


def oracle_python() -> str:
    """nnunetv2's interpreter: KUBESEG_ORACLE_PYTHON, else the repository's .venv-oracle (make oracle)."""
    path = os.environ.get("KUBESEG_ORACLE_PYTHON") or str(REPO / ".venv-oracle" / "bin" / "python")
    if not Path(path).exists():
        raise SystemExit(f"nnunetv2 oracle interpreter {path} is missing: run `make oracle` "
                         "(or set KUBESEG_ORACLE_PYTHON)")
    return path
LABEL_NAMES = {v: k for k, v in CT_LABELS.items()}
_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:6.0f} s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- preparation
def prepare_kubeseg(raw: Path, work: Path, workers: int, config: str) -> tuple[Path, Path]:
    """Fingerprint, plan (small preset, plans named like nnU-Net's) and preprocess ``config``."""
    work.mkdir(parents=True, exist_ok=True)
    fp = extract_fingerprint(raw, max(1, workers), progress=False)
    fp_path = write_fingerprint(fp, work / "dataset_fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small", plans_name="nnUNetPlans"))
    pre = work / "preprocessed"
    preprocess_dataset(raw, plans, config, pre, fp_path, max(1, workers), progress=False)
    return pre, pre / "plans.json"


def compare_plans(ours: dict, theirs: dict, config: str) -> list[str]:
    """Differences that matter for training: the trained configuration and the intensity
    statistics that CT normalisation uses."""
    problems = []
    a, b = ours["configurations"][config], theirs["configurations"][config]
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            problems.append(f"{config} {key}: kubeseg {a.get(key)} / nnunetv2 {b.get(key)}")
    for key in ("transpose_forward", "original_median_spacing_after_transp"):
        if ours.get(key) != theirs.get(key):
            problems.append(f"{key}: kubeseg {ours.get(key)} / nnunetv2 {theirs.get(key)}")
    # nnU-Net accumulates these in float32: allow differences far below what normalisation notices
    ia = ours["foreground_intensity_properties_per_channel"]
    ib = theirs["foreground_intensity_properties_per_channel"]
    for ch in sorted(set(ia) | set(ib)):
        tol = 1e-3 * max(1.0, float(ib.get(ch, {}).get("std", 1.0)))
        for stat in sorted(set(ia.get(ch, {})) | set(ib.get(ch, {}))):
            x, y = ia.get(ch, {}).get(stat), ib.get(ch, {}).get(stat)
            if x is None or y is None or abs(x - y) > tol:
                problems.append(f"intensity channel {ch} {stat}: kubeseg {x} / nnunetv2 {y}")
    return problems


def _echo_oracle_line(line: str) -> None:
    line = line.rstrip()
    if line.strip() and not line.startswith(("#####", "Please cite", "Isensee, F.")):
        if len(line) > 240:  # the plans nnU-Net prints at the start
            line = line[:240] + " ..."
        print(f"    [nnunetv2] {line}", flush=True)


def run_oracle(args: list[str]) -> None:
    """Run one step of the nnunetv2 side to its end, echoing its output with a prefix."""
    cmd = [oracle_python(), "-u", str(ORACLE), *args]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), bufsize=1) as proc:
        for line in proc.stdout:
            _echo_oracle_line(line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"nnunetv2 step {args[0]!r} failed with exit code {rc}")


# the oracle's turn-taking messages (benchmarks/_nnunet_train_oracle.py, --turns)
TURN_WAIT = "@@kubeseg-benchmark: waiting for turn"
TURN_DONE = "@@kubeseg-benchmark: epoch done"


class OracleTrainer:
    """nnunetv2's training in a subprocess that runs an epoch only when told to (--turns).

    Alternating epochs of the two tools spreads the load of other jobs on a shared machine
    over both sides instead of over whichever side happened to run at the time."""

    def __init__(self, args: list[str]):
        cmd = [oracle_python(), "-u", str(ORACLE), "train", *args, "--turns"]
        # own process group, so that its augmentation workers can be stopped with it
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.events: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.rstrip() == TURN_WAIT:
                self.events.put("wait")
            elif line.rstrip() == TURN_DONE:
                self.events.put("done")
            else:
                _echo_oracle_line(line)
        self.events.put("end")

    def expect(self, event: str) -> None:
        got = self.events.get()
        if got != event:
            rc = self.proc.wait()
            raise SystemExit(f"nnunetv2 training stopped unexpectedly (exit code {rc})")

    def _go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def epoch(self) -> None:
        """Let it run one epoch; returns when it waits again (next epoch or final validation)."""
        self._go()
        self.expect("done")
        self.expect("wait")

    def validate(self) -> None:
        """Let it run its final validation; returns when its output ends (it is exiting)."""
        self._go()
        self.proc.stdin.close()
        self.expect("end")

    def wait(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            raise SystemExit(f"nnunetv2 training failed with exit code {rc}")

    def stop(self) -> None:
        """On errors: end the subprocess and its workers (its process group)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)


class LoadMeter:
    """CPU time, sampled whenever the turn passes: that of each side's processes (kubeseg:
    this process and its descendants outside nnunetv2's; nnunetv2: its subprocess and its
    descendants; from /proc/<pid>/stat, reaped children included) and that of other jobs
    (busy time of all CPUs from /proc/stat, steal included, minus both sides). Linux only."""

    def __init__(self):
        self.oracle_pid: int | None = None
        self.current: tuple[str, str] | None = None
        self.last = None
        self.windows: list[dict] = []  # whose turn, label, seconds, CPU s per side and of other jobs

    def switch(self, side: str | None, label: str = "") -> None:
        """From now on it is ``side``'s turn, doing ``label`` (None: nobody's)."""
        now = self._sample()
        if self.current is not None and self.last is not None and now is not None:
            cpu = {k: now[2][k] - self.last[2][k] for k in now[2]}
            self.windows.append({"side": self.current[0], "label": self.current[1], "seconds": now[0] - self.last[0],
                                 "cpu_s": cpu, "other_cpu_s": (now[1] - self.last[1]) - sum(cpu.values())})
        self.current, self.last = (None if side is None else (side, label)), now

    def other_cores(self, side: str) -> float | None:
        """Other jobs' CPU use during ``side``'s turns, in cores on average."""
        w = [x for x in self.windows if x["side"] == side]
        seconds = sum(x["seconds"] for x in w)
        return max(0.0, sum(x["other_cpu_s"] for x in w) / seconds) if seconds > 0 else None

    def cpu_per_epoch(self, epochs: list[int]) -> dict[str, float] | None:
        """Each side's CPU seconds per epoch, over the turns from kubeseg's first of ``epochs``
        to nnunetv2's last (a waiting side's workers may still fill their queues, so its CPU
        is summed over the whole stretch, not only over its own turns)."""
        keys = [(x["side"], x["label"]) for x in self.windows]
        try:
            i0 = keys.index(("kubeseg", f"epoch {epochs[0]}"))
            i1 = keys.index(("nnunetv2", f"epoch {epochs[-1]}"))
        except ValueError:
            return None
        stretch = self.windows[i0:i1 + 1]
        return {side: sum(x["cpu_s"][side] for x in stretch) / len(epochs) for side in ("kubeseg", "nnunetv2")}

    def _sample(self):
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat", encoding="ascii") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
            parent, cpu = {}, {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # gone meanwhile
                    continue
                parent[int(entry)] = int(fields[1])
                cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / ticks  # utime stime cutime cstime
        except (OSError, ValueError):
            return None
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int | None, skip: int | None = None) -> float:
            total, todo = 0.0, [root] if root is not None else []
            while todo:
                pid = todo.pop()
                if pid != skip:
                    total += cpu.get(pid, 0.0)
                    todo += children.get(pid, [])
            return total

        sides = {"kubeseg": tree(os.getpid(), skip=self.oracle_pid), "nnunetv2": tree(self.oracle_pid)}
        return time.time(), (user + nice + system + irq + softirq + steal) / ticks, sides


# ---------------------------------------------------------------------------------------- kubeseg training
class IterationClock:
    """Training callback: wall-clock time at the end of every training iteration."""

    def __init__(self):
        self.ends: list[list[float]] = []

    def on_iteration_end(self, epoch: int, iteration: int, loss: float) -> None:
        if iteration == 0:
            self.ends.append([])
        self.ends[-1].append(time.time())


class _Prefixed(logging.Handler):
    """kubeseg's training log lines on the console, marked like nnunetv2's."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"    [kubeseg] {datetime.now()}: {record.getMessage()}", flush=True)


class TakeTurns:
    """Training callback: after each kubeseg epoch, nnunetv2 runs one epoch."""

    def __init__(self, other: OracleTrainer, meter: LoadMeter, num_epochs: int):
        self.other, self.meter, self.num_epochs = other, meter, num_epochs
        self.resumed_at = time.time()

    def __deepcopy__(self, memo):
        # kubeseg's trainer summarises its settings with dataclasses.asdict(), which deep-copies
        # the callbacks too; a subprocess and a thread cannot be copied
        return self

    def on_epoch_end(self, epoch: int, metrics) -> None:
        self.meter.switch("nnunetv2", f"epoch {epoch}")
        self.other.epoch()
        last = epoch == self.num_epochs - 1
        self.meter.switch("kubeseg", "final validation" if last else f"epoch {epoch + 1}")
        self.resumed_at = time.time()


def train_kubeseg(pre: Path, plans_path: Path, out: Path, a, turns: TakeTurns) -> dict:
    clock = IterationClock()
    handler = _Prefixed()
    logger = logging.getLogger("kubeseg.training")
    logger.addHandler(handler)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, by the handler above
    torch.set_num_threads(a.threads)
    settings = TrainSettings(
        device=a.device, schedule=Schedule(a.epochs, a.iterations, a.val_iterations, "benchmark"), seed=a.seed,
        num_workers=a.workers, torch_threads=a.threads, callbacks=[clock, turns], save_probabilities=False,
        progress_bar=False, log_to_console=False)
    try:
        fold_dir = train_fold(pre, plans_path, a.configuration, FOLD, out, settings)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    t_end = time.time()
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    lg = ckpt["logging"]
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    val_keys = [c["case"] for c in summary["metric_per_case"]]
    return {
        "fold_dir": str(fold_dir), "val_keys": val_keys, "summary": summary,
        "epoch_start_timestamps": lg["epoch_start_timestamps"], "epoch_end_timestamps": lg["epoch_end_timestamps"],
        "train_losses": lg["train_losses"], "pseudo_dice": lg["dice_per_class_or_region"],
        "iteration_ends": clock.ends,
        # from nnunetv2's last epoch to the end: final checkpoint + final validation
        "seconds_final_validation": t_end - turns.resumed_at,
    }


# ---------------------------------------------------------------------------------------- scoring
def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom


def nanmean(values) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def score(cases: dict[str, tuple[np.ndarray, np.ndarray]], labels: list[int]) -> dict:
    """Per class: mean Dice over cases; plus the foreground mean (mean of class means)."""
    per_class = {lab: nanmean([dice(p, r, lab) for p, r in cases.values()]) for lab in labels}
    return {"per_class": per_class, "foreground_mean": nanmean(per_class.values())}


def load_kubeseg_cases(fold_dir: Path, pre: Path, plans: dict, keys: list[str], config: str) -> dict:
    folder = pre / plans["configurations"][config]["data_identifier"]
    out = {}
    for k in keys:
        with np.load(fold_dir / "validation" / f"{k}.npz") as z:
            seg = z["segmentation"]
        ref = np.load(folder / f"{k}_seg.npy")[0].astype(np.int16)
        ref[ref < 0] = 0
        out[k] = (seg, ref)
    return out


def load_nnunet_cases(folder: Path, keys: list[str]) -> dict:
    out = {}
    for k in keys:
        with np.load(folder / f"{k}.npz") as z:
            out[k] = (z["segmentation"], z["reference"])
    return out


# ---------------------------------------------------------------------------------------- speed
def speed(epoch_starts: list[float], iteration_ends: list[list[float]], epoch_ends: list[float],
          warmup: int) -> dict:
    """Training iterations per second over the epochs after ``warmup``."""
    epochs = list(range(len(iteration_ends)))
    used = epochs[warmup:] if len(epochs) > warmup else epochs
    n_iter = sum(len(iteration_ends[e]) for e in used)
    loop_s = sum(iteration_ends[e][-1] - epoch_starts[e] for e in used)
    durations = []
    for e in used:
        stamps = [epoch_starts[e], *iteration_ends[e]]
        durations += [b - a for a, b in zip(stamps, stamps[1:])]
    median = statistics.median(durations)
    return {
        "epochs_used": used, "iterations": n_iter, "loop_s": loop_s, "its_per_s": n_iter / loop_s,
        "median_iteration_s": median, "its_per_s_median": 1 / median,
        "loop_s_per_epoch": [iteration_ends[e][-1] - epoch_starts[e] for e in used],
        "mean_epoch_s": statistics.mean(epoch_ends[e] - epoch_starts[e] for e in used),
        "first_epoch_s": epoch_ends[0] - epoch_starts[0],
    }


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10, help="training cases to synthesize (fold 0 validates on 1/5)")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 96, 96), metavar=("Z", "Y", "X"),
                   help="median case shape (numpy order)")
    p.add_argument("--configuration", default="3d_fullres", choices=CONFIGURATIONS, help="trained by both tools")
    p.add_argument("--lesions", default="default", choices=sorted(LESIONS),
                   help="lesion difficulty of the synthetic CT: default (weak contrast, small, 15 %% of cases "
                        "without one) or demo (the demo's: stronger, larger, one or more per case)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=2, help="validation (pseudo-Dice) iterations per epoch")
    p.add_argument("--workers", type=int, default=1,
                   help="augmentation worker processes, both tools (0 = augment in the training process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both tools")
    p.add_argument("--device", default="cpu", help="cpu or cuda, both tools (cuda: AMP, as nnU-Net)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs left out of the speed measurement")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; also both tools' training seed")
    p.add_argument("--dataset-seed", type=int, help="dataset seed when it should differ from --seed "
                   "(benchmarks/quality.py: one dataset, several training seeds)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep everything (default: a temporary folder)")
    a = p.parse_args(argv)
    if a.cases < 5:
        p.error("--cases must be at least 5 (5-fold split)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.keep:
        work = Path(a.keep).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--keep {work}: the folder is not empty (a finished fold would not be retrained)")
        work.mkdir(parents=True, exist_ok=True)
        return run(a, work)
    with tempfile.TemporaryDirectory(prefix="kubeseg-train-bench-") as tmp:
        return run(a, Path(tmp))


def run(a, work: Path) -> int:
    say(f"work folder {work}")
    say(f"synthesizing {a.cases} CT-like cases, median shape {tuple(a.shape)}, seed {a.seed}")
    config = a.configuration
    raw = synthesize(work / "raw", SynthSettings(kind="ct", num_cases=a.cases, shape=tuple(a.shape),
                                                 seed=a.seed if a.dataset_seed is None else a.dataset_seed,
                                                 **LESIONS[a.lesions]))

    say(f"kubeseg: fingerprint, plan (small preset), preprocess {config}")
    t = time.time()
    pre, plans_path = prepare_kubeseg(raw, work / "kubeseg", a.workers, config)
    say(f"kubeseg: prepared in {time.time() - t:.0f} s")
    say(f"nnunetv2: fingerprint, plan (same small settings), preprocess {config}")
    t = time.time()
    nn_work = work / "nnunet"
    run_oracle(["prepare", str(raw), str(nn_work), "--workers", str(a.workers), "--configuration", config])
    say(f"nnunetv2: prepared in {time.time() - t:.0f} s")

    plans = json.loads(plans_path.read_text())
    nn_info = json.loads((nn_work / "prepare.json").read_text())
    nn_plans = json.loads(Path(nn_info["plans_file"]).read_text())
    cfg = plans["configurations"][config]
    plan_problems = compare_plans(plans, nn_plans, config)
    say(f"{config}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, spacing "
        f"{[round(s, 3) for s in cfg['spacing']]}, features "
        f"{cfg['architecture']['arch_kwargs']['features_per_stage']}")
    if plan_problems:
        say("WARNING: the plans differ (the comparison is not at equal plans):")
        for line in plan_problems:
            print(f"    {line}")
    else:
        say(f"plans: kubeseg's and nnunetv2's {config} configurations are identical")

    ids = list_case_identifiers(pre / cfg["data_identifier"])
    val_expected = sorted(generate_crossval_split(sorted(ids))[FOLD]["val"])
    say(f"fold {FOLD} validation cases (kubeseg's split): {val_expected}")

    say(f"training {config} fold {FOLD} with both tools, taking turns epoch by epoch: {a.epochs} epochs x "
        f"{a.iterations} iterations (+{a.val_iterations} validation), {a.workers} worker(s), "
        f"{a.threads} thread(s) each")
    meter = LoadMeter()
    t = time.time()
    meter.switch("nnunetv2", "setup")
    other = OracleTrainer([str(nn_work), "--epochs", str(a.epochs), "--iterations", str(a.iterations),
                           "--val-iterations", str(a.val_iterations), "--workers", str(a.workers),
                           "--threads", str(a.threads), "--device", a.device, "--seed", str(a.seed),
                           "--configuration", config, "--expect-val", *val_expected])
    meter.oracle_pid = other.proc.pid
    try:
        other.expect("wait")  # nnunetv2 is set up (workers started) and waits for its first epoch
        say(f"nnunetv2 set up in {time.time() - t:.0f} s; kubeseg starts")
        meter.switch("kubeseg", "epoch 0")  # with kubeseg's setup
        ours = train_kubeseg(pre, plans_path, work / "kubeseg" / "results", a, TakeTurns(other, meter, a.epochs))
        say(f"kubeseg: final validation done in {ours['seconds_final_validation']:.0f} s; nnunetv2's next")
        meter.switch("nnunetv2", "final validation")
        other.validate()
        meter.switch(None)  # before the subprocess is reaped (its CPU time then moves to ours)
        other.wait()
    finally:
        other.stop()
    ref = json.loads((nn_work / "train.json").read_text())
    say(f"both done in {time.time() - t:.0f} s")

    # ---- accuracy
    if sorted(ours["val_keys"]) != sorted(ref["val_keys"]):
        raise SystemExit(f"validation cases differ: kubeseg {ours['val_keys']} / nnunetv2 {ref['val_keys']}")
    keys = sorted(ours["val_keys"])
    labels = sorted(int(v) for k, v in load_dataset_json(raw).raw["labels"].items() if int(v) != 0)
    ours_cases = load_kubeseg_cases(Path(ours["fold_dir"]), pre, plans, keys, config)
    ref_cases = load_nnunet_cases(nn_work / "pred_preprocessed", keys)
    ref_notes = []
    for k in keys:
        r1, r2 = ours_cases[k][1], ref_cases[k][1]
        if r1.shape != r2.shape:
            ref_notes.append(f"{k}: reference shapes differ {r1.shape} / {r2.shape}")
        elif (r1 != r2).any():
            ref_notes.append(f"{k}: references differ in {int((r1 != r2).sum())} of {r1.size} voxels")
    s_ours, s_ref = score(ours_cases, labels), score(ref_cases, labels)
    nn_summary = json.loads(Path(ref["summary_file"]).read_text())
    ks_summary = ours["summary"]

    # ---- speed
    warm = a.warmup_epochs if a.epochs > a.warmup_epochs else 0
    sp_ours = speed(ours["epoch_start_timestamps"], ours["iteration_ends"], ours["epoch_end_timestamps"], warm)
    sp_ref = speed(ref["epoch_start_timestamps"], ref["iteration_ends"], ref["epoch_end_timestamps"], warm)
    (work / "timings.json").write_text(json.dumps({
        "kubeseg": {k: ours[k] for k in ("epoch_start_timestamps", "epoch_end_timestamps", "iteration_ends")},
        "nnunetv2": {k: ref[k] for k in ("epoch_start_timestamps", "epoch_end_timestamps", "iteration_ends")},
        "speed": {"kubeseg": sp_ours, "nnunetv2": sp_ref},
        "cpu_windows": meter.windows,
        "dice": {"kubeseg": s_ours, "nnunetv2": s_ref, "validation_cases": keys}}, indent=1))

    # ---- report
    print()
    print("=" * 78)
    print(f"dataset: {a.cases} synthetic CT cases, median shape {tuple(a.shape)}, seed {a.seed}; "
          f"{config} fold {FOLD}, lesions {a.lesions}")
    print(f"plans: patch {cfg['patch_size']}, batch {cfg['batch_size']}"
          + ("" if not plan_problems else f"  (WARNING: {len(plan_problems)} plan difference(s), see above)"))
    print(f"schedule (both): {a.epochs} epochs x {a.iterations} training iterations + {a.val_iterations} "
          f"validation iterations; device {a.device}; {a.workers} augmentation worker(s); {a.threads} torch thread(s)")
    print(f"validation cases: {', '.join(keys)}")
    print(f"references (preprocessed grid): " + ("identical" if not ref_notes else "; ".join(ref_notes)))
    print()
    print("Validation Dice (preprocessed grid, same scoring code for both; diff = kubeseg - nnunetv2)")
    print(f"{'class':<14}{'kubeseg':>10}{'nnunetv2':>10}{'diff':>9}   {'nnunetv2 own summary.json*':>27}")
    for lab in labels:
        x, y = s_ours["per_class"][lab], s_ref["per_class"][lab]
        own = nn_summary["mean"].get(str(lab), {}).get("Dice")
        name = f"{lab} {LABEL_NAMES.get(lab, '')}"
        own_text = "n/a" if own is None else f"{own:.4f}"
        print(f"{name:<14}{x:>10.4f}{y:>10.4f}{x - y:>+9.4f}   {own_text:>27}")
    x, y = s_ours["foreground_mean"], s_ref["foreground_mean"]
    own = nn_summary["foreground_mean"]["Dice"]
    print(f"{'foreground':<14}{x:>10.4f}{y:>10.4f}{x - y:>+9.4f}   {own:>27.4f}")
    print("  * nnunetv2's own evaluation, after resampling to the original images (not the same grid)")
    ks_fg = ks_summary["foreground_mean"]["Dice"]
    if ks_fg is not None and not math.isclose(ks_fg, s_ours["foreground_mean"], abs_tol=1e-6):
        print(f"  note: kubeseg's own summary.json says foreground Dice {ks_fg:.4f}")
    verdict = "met" if x - y >= -0.02 else "NOT met"
    print(f"  accuracy goal (kubeseg >= nnunetv2 - 0.02 foreground Dice): {verdict}")
    print(f"  last training loss: kubeseg {ours['train_losses'][-1]:.4f}, nnunetv2 {ref['train_losses'][-1]:.4f}")
    print()
    used = sp_ours["epochs_used"]
    which = (f"epochs {used[0]}-{used[-1]}" if len(used) > 1 else f"epoch {used[0]}") + \
        (f" (epoch 0 left out as warm-up)" if warm else " (no warm-up epoch left out)")
    print(f"Training speed, {which}")
    print(f"{'':<36}{'kubeseg':>10}{'nnunetv2':>10}{'ratio':>8}")
    rows = [
        ("training iterations/s", sp_ours["its_per_s"], sp_ref["its_per_s"], True),
        ("  from median iteration time", sp_ours["its_per_s_median"], sp_ref["its_per_s_median"], True),
        ("epoch time s (train + val its)", sp_ours["mean_epoch_s"], sp_ref["mean_epoch_s"], False),
        ("first epoch s (warm-up)", sp_ours["first_epoch_s"], sp_ref["first_epoch_s"], False),
        ("final validation s", ours["seconds_final_validation"], ref["seconds_final_validation"], False),
    ]
    cpu = meter.cpu_per_epoch(used)
    if cpu is not None:
        rows.append(("CPU s per epoch (all processes)", cpu["kubeseg"], cpu["nnunetv2"], False))
    for name, x, y, higher_better in rows:
        ratio = x / y if higher_better else y / x
        print(f"{name:<36}{x:>10.3f}{y:>10.3f}{ratio:>8.2f}")
    print("  ratio: kubeseg faster above 1 (its/s kubeseg/nnunetv2; times nnunetv2/kubeseg)")
    r = sp_ours["its_per_s"] / sp_ref["its_per_s"]
    print(f"  speed ratio kubeseg/nnunetv2 = {r:.2f} (goal >= 1.0): {'met' if r >= 1.0 else 'NOT met'}")
    paired = [y / x for x, y in zip(sp_ours["loop_s_per_epoch"], sp_ref["loop_s_per_epoch"])]
    print(f"  per epoch (the two ran back to back): ratios {' '.join(f'{p:.2f}' for p in paired)}, "
          f"median {statistics.median(paired):.2f}")
    lo, lr = meter.other_cores("kubeseg"), meter.other_cores("nnunetv2")
    if lo is not None and lr is not None:
        print(f"  CPU used by other jobs while each side ran: kubeseg {lo:.2f} cores, nnunetv2 {lr:.2f} cores "
              f"(of {os.cpu_count()})")
    print("  timings come from a machine that may be shared with other jobs: rerun before trusting "
          "small differences")
    print("=" * 78)
    if a.keep:
        print(f"outputs kept in {work}: kubeseg/results/fold_0, "
              f"nnunet/results/{nn_info['dataset_name']}/*/fold_0")
    return 0


if __name__ == "__main__":  # kubeseg's and nnunetv2's worker pools use "spawn": keep this guard
    sys.exit(main())
