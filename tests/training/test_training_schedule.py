"""Schedules, LR decay, optimiser defaults, worker-count default, callback protocol."""
import pytest
import torch

from kubeseg.training import Schedule, TrainingCallback, TrainingCallbackProtocol, get_schedule
from kubeseg.training.augmentation import default_num_workers
from kubeseg.training.schedule import OptimizerSettings, make_optimizer, poly_lr


def test_named_schedules():
    assert get_schedule("default") == Schedule(1000, 250, 50, "default")
    tiny = get_schedule("tiny")
    assert tiny.num_epochs * tiny.train_iterations <= 200
    assert get_schedule("250epochs") == Schedule(250, 250, 50, "250epochs")
    assert get_schedule("1epoch").num_epochs == 1
    custom = Schedule(3, 4, 1, "mine")
    assert get_schedule(custom) is custom
    with pytest.raises(ValueError):
        get_schedule("forever")


def test_poly_lr_and_sgd_defaults():
    assert poly_lr(0, 1000, 1e-2) == pytest.approx(1e-2)
    assert poly_lr(500, 1000, 1e-2) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert poly_lr(999, 1000, 1e-2) == pytest.approx(1e-2 * 0.001 ** 0.9)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerSettings())
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert OptimizerSettings().grad_clip_norm == 12


def test_default_workers(monkeypatch):
    monkeypatch.delenv("KUBESEG_N_PROC_DA", raising=False)
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    assert 1 <= default_num_workers() <= 12
    monkeypatch.setenv("KUBESEG_N_PROC_DA", "3")
    assert default_num_workers() == 3


def test_callback_base_satisfies_protocol():
    assert isinstance(TrainingCallback(), TrainingCallbackProtocol)


def test_compact_schedule_syntax():
    assert get_schedule("2x3x1") == Schedule(2, 3, 1, "2x3x1")
    assert get_schedule("4x10") == Schedule(4, 10, 2, "4x10")
    with pytest.raises(ValueError, match="EPOCHSxITERS"):
        get_schedule("fast")


def test_settings_summary_does_not_copy_callbacks():
    import threading

    from kubeseg.training.trainer import TrainSettings, _settings_summary

    class HoldsALock(TrainingCallback):
        def __init__(self):
            self.lock = threading.Lock()  # cannot be deep-copied

    summary = _settings_summary(TrainSettings(callbacks=[HoldsALock()]), get_schedule("tiny"))
    assert "callbacks" not in summary and summary["schedule"]["num_epochs"] == 6
    assert summary["optimizer"]["initial_lr"] == 0.01
