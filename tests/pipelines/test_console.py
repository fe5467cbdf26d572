"""The demo's console: one line per step and training task, everything else to the log file."""
import json
import os
import subprocess
import sys

from pipelines.console import RunWatcher, describe_task, quiet_console


def test_quiet_console_sends_child_output_to_the_log_and_keeps_a_terminal(tmp_path, capfd):
    log = tmp_path / "run.log"
    with quiet_console(log) as terminal:
        os.write(1, b"executor json {...}\n")  # what kfp.local and the task processes write
        subprocess.run([sys.executable, "-c", "import sys; print('task stdout'); print('task stderr', file=sys.stderr)"],
                       check=True)
        print("✓ step done", file=terminal, flush=True)
    text = log.read_text()
    assert "executor json" in text and "task stdout" in text and "task stderr" in text
    out = capfd.readouterr().out
    assert "✓ step done" in out and "task stdout" not in out and "executor json" not in out
    os.write(1, b"after\n")  # file descriptor 1 is restored
    assert "after" in capfd.readouterr().out


def test_run_watcher_reports_steps_and_training_tasks(tmp_path):
    lines = []
    root = tmp_path / "kfp"
    root.mkdir()
    (root / "kubeseg-training-old").mkdir()  # a finished earlier run is ignored
    watcher = RunWatcher(root, "kubeseg-training", lines.append)
    run = root / "kubeseg-training-2026"
    (run / "fingerprint").mkdir(parents=True)
    watcher.poll()
    assert len(lines) == 1 and lines[0].endswith("▶ fingerprint")
    (run / "fingerprint" / "executor_output.json").write_text("{}")
    fold = run / "for-loop-2-iteration-1" / "train" / "model" / "nnUNetTrainer__kubesegSmallPlans__2d" / "fold_1"
    fold.mkdir(parents=True)
    (run / "select-2").mkdir()
    watcher.poll()
    assert "✓ fingerprint" in lines[1] and lines[2].endswith("▶ select")  # the branch copy's "-2" dropped
    assert not any("train" in x for x in lines)  # a training task is reported once, when it is done
    (fold / "metrics.json").write_text(json.dumps({"epochs": [{"pseudo_dice": [0.9, 0.5]}, {"pseudo_dice": [0.95, 0.8]}]}))
    (fold.parents[2] / "executor_output.json").write_text("{}")
    watcher.poll()
    watcher.poll()
    train = [x for x in lines if "train" in x]
    assert len(train) == 1 and "✓ train 2d fold 1" in train[0] and "2 epochs" in train[0] and "0.95 / 0.80" in train[0]
    assert describe_task(run / "select-2") == "select"
