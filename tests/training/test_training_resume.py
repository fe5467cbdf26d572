"""Killing training at any point and running it again resumes from checkpoint_latest."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kubeseg.training import Schedule, TrainSettings, TrainingCallback, train_fold

from tiny_dataset import make_tiny_preprocessed

REPO = Path(__file__).resolve().parents[2]


class Crash(Exception):
    pass


class CrashMidEpoch(TrainingCallback):
    def __init__(self, epoch, iteration):
        self.at = (epoch, iteration)

    def on_iteration_end(self, epoch, iteration, loss):
        if (epoch, iteration) == self.at:
            raise Crash(f"simulated crash in epoch {epoch}, iteration {iteration}")


class Recorder(TrainingCallback):
    def __init__(self):
        self.start = None
        self.epochs = []

    def on_train_start(self, info):
        self.start = dict(info)

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append(epoch)


def _settings(schedule, callbacks):
    return TrainSettings(device="cpu", schedule=schedule, num_workers=0, callbacks=callbacks, progress_bar=False,
                         log_to_console=False, validation_mirroring=False)


def test_crash_mid_epoch_then_resume(tmp_path):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    schedule = Schedule(4, 5, 2, "resume-test")
    out = tmp_path / "OUT"
    with pytest.raises(Crash):
        train_fold(pre, pre / "plans.json", "3d_fullres", 1, out, _settings(schedule, [CrashMidEpoch(2, 3)]))
    latest = out / "fold_1" / "checkpoint_latest.pth"
    assert torch.load(latest, weights_only=True)["current_epoch"] == 2  # epochs 0 and 1 finished
    assert not (out / "fold_1" / "checkpoint_final.pth").exists()

    rec = Recorder()
    train_fold(pre, pre / "plans.json", "3d_fullres", 1, out, _settings(schedule, [rec]))
    assert rec.start["start_epoch"] == 2 and rec.start["resumed"] is True
    assert rec.epochs == [2, 3]  # continued, not restarted
    final = torch.load(out / "fold_1" / "checkpoint_final.pth", weights_only=True)
    assert final["current_epoch"] == 4
    logged = final["logging"]
    assert all(len(v) == 4 for v in logged.values())
    assert logged["lrs"] == pytest.approx([1e-2 * (1 - e / 4) ** 0.9 for e in range(4)])
    assert [m["epoch"] for m in json.loads((out / "fold_1" / "metrics.json").read_text())["epochs"]] == [0, 1, 2, 3]
    assert (out / "fold_1" / "validation" / "summary.json").is_file()


SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from kubeseg.training import Schedule, TrainSettings, train_fold
    pre, out = Path(sys.argv[1]), Path(sys.argv[2])
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, out,
               TrainSettings(device="cpu", schedule=Schedule(8, 6, 1, "kill-test"), num_workers=0,
                             progress_bar=False, validation_mirroring=False))
""")


def _train_in_subprocess_until_first_checkpoint(script: str, pre: Path, out: Path):
    """Start ``script`` training in a subprocess; return once checkpoint_latest exists (or it died / 2 min)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script, str(pre), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "fold_0" / "checkpoint_latest.pth"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc, latest


def test_sigkill_then_resume(tmp_path):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    out = tmp_path / "OUT"
    proc, latest = _train_in_subprocess_until_first_checkpoint(SCRIPT, pre, out)
    try:
        assert latest.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        time.sleep(0.3)  # somewhere inside the next epoch (or a checkpoint write)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(latest, weights_only=True)["current_epoch"]
    assert 1 <= done < 8

    rec = Recorder()
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, out,
               _settings(Schedule(8, 6, 1, "kill-test"), [rec]))
    assert rec.start["start_epoch"] == done
    assert rec.epochs == list(range(done, 8))
    final = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert final["current_epoch"] == 8 and len(final["logging"]["train_losses"]) == 8
    assert not list((out / "fold_0").glob(".*.tmp*"))


SCRIPT_WORKERS = SCRIPT.replace("num_workers=0", "num_workers=2")


def _processes_mentioning(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find worker processes")
def test_sigterm_stops_workers_and_keeps_resume_point(tmp_path):
    """Kubernetes deletes pods with SIGTERM: augmentation workers must go away with the trainer."""
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    out = tmp_path / "OUT_term"
    proc, latest = _train_in_subprocess_until_first_checkpoint(SCRIPT_WORKERS, pre, out)
    try:
        assert latest.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        assert len(_processes_mentioning(str(out))) >= 3  # trainer + 2 train workers (+ val worker)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None)
    deadline = time.time() + 15
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(out)) == []
    assert torch.load(latest, weights_only=True)["current_epoch"] >= 1
