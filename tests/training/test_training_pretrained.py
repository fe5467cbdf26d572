"""Fine-tuning from pretrained weights (nnU-Net's -pretrained_weights): what is loaded, what
is skipped, what is refused; the trainer and the train verb pass it through; resume wins."""
import copy
import json

import pytest
import torch

from kubeseg.errors import KubesegError
from kubeseg.network import build_network_from_plans
from kubeseg.training import Schedule, TrainSettings, train_fold
from kubeseg.training.checkpoint import atomic_torch_save, load_pretrained_weights, make_checkpoint

from tiny_dataset import make_tiny_preprocessed, tiny_dataset_json, tiny_plans


def _save(net, path):
    atomic_torch_save(make_checkpoint(net.state_dict(), {}, None, {}, None, 1000,
                                      {"configuration": "3d_fullres", "fold": 0}, (0, 1, 2)), path)
    return path


def _net(seed, plans=None, n_labels=2):
    ds = tiny_dataset_json(3)
    if n_labels == 3:
        ds["labels"] = {"background": 0, "organ": 1, "tumour": 2}
    torch.manual_seed(seed)
    return build_network_from_plans(plans or tiny_plans(), "3d_fullres", ds, deep_supervision=True)


def _heads(sd):
    return [k for k in sd if "seg_layers." in k]


def test_same_network_loads_everything_including_heads(tmp_path):
    src = _save(_net(1), tmp_path / "checkpoint_final.pth")
    dst = _net(2)
    info = load_pretrained_weights(dst, src)
    ref = torch.load(src, weights_only=True)["network_weights"]
    assert info == {"loaded": len(ref), "heads": "loaded"}
    for k, v in dst.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_other_label_set_skips_only_the_heads(tmp_path):
    src = _save(_net(1, n_labels=2), tmp_path / "checkpoint_final.pth")
    dst = _net(2, n_labels=3)
    fresh = copy.deepcopy(dst.state_dict())
    info = load_pretrained_weights(dst, src)
    ref = torch.load(src, weights_only=True)["network_weights"]
    assert info["heads"] == "skipped" and _heads(fresh)
    for k, v in dst.state_dict().items():
        if "seg_layers." in k:
            assert torch.equal(v, fresh[k]), k  # fresh initialisation kept
        else:
            assert torch.equal(v, ref[k]), k


def test_incompatible_network_is_refused_naming_the_file(tmp_path):
    plans = tiny_plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 32]
    src = _save(_net(1, plans), tmp_path / "other_checkpoint.pth")
    dst = _net(2)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(KubesegError, match=r"other_checkpoint\.pth.*encoder\..*shape"):
        load_pretrained_weights(dst, src)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched

    with pytest.raises(KubesegError, match="missing.pth"):
        load_pretrained_weights(dst, tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "x": copy.deepcopy}, evil)  # a global: refused, not run
    with pytest.raises(KubesegError, match="evil.pth"):
        load_pretrained_weights(dst, evil)


def test_trainer_starts_from_pretrained_and_resume_wins(tmp_path):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    src = _save(_net(1), tmp_path / "pretrained.pth")
    base = dict(device="cpu", schedule=Schedule(1, 1, 1, name="one"), num_workers=0, run_validation=False,
                progress_bar=False, log_to_console=False)
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 0, tmp_path / "OUT",
                          TrainSettings(pretrained_weights=src, **base))
    log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
    assert "from pretrained weights" in log and "segmentation heads loaded" in log
    # one SGD step away from the pretrained weights, far from a fresh init
    ref = torch.load(src, weights_only=True)["network_weights"]
    got = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)["network_weights"]
    k = "encoder.stages.1.0.convs.0.conv.weight"
    assert (got[k] - ref[k]).abs().max() < 0.05 * ref[k].abs().max()

    # a resumable run ignores the pretrained file (it would be refused if it were read)
    (fold_dir / "checkpoint_final.pth").rename(fold_dir / "checkpoint_latest.pth")
    bad = tmp_path / "not_a_checkpoint.pth"
    bad.write_text("nonsense")
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, tmp_path / "OUT",
               TrainSettings(pretrained_weights=bad, **{**base, "schedule": Schedule(2, 1, 1, name="two")}))
    log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
    assert "ignored: resuming wins" in log
    # and a fresh run with the bad file stops with the file named
    with pytest.raises(KubesegError, match="not_a_checkpoint.pth"):
        train_fold(pre, pre / "plans.json", "3d_fullres", 0, tmp_path / "OUT2",
                   TrainSettings(pretrained_weights=bad, **base))


def test_train_verb_passes_pretrained_weights(tmp_path, monkeypatch):
    from kubeseg import cli
    import kubeseg.training.trainer as trainer

    seen = {}

    def fake_train_fold(pre, plans, configuration, fold, out, settings):
        seen["settings"] = settings
        return tmp_path

    monkeypatch.setattr(trainer, "train_fold", fake_train_fold)
    assert cli.main(["train", str(tmp_path), "--plans", "p.json", "-c", "3d_fullres", "-f", "0",
                     "-o", str(tmp_path / "o"), "--pretrained-weights", "/models/checkpoint_final.pth"]) == 0
    assert str(seen["settings"].pretrained_weights) == "/models/checkpoint_final.pth"
    cli.main(["train", str(tmp_path), "--plans", "p.json", "-c", "3d_fullres", "-f", "0", "-o", str(tmp_path)])
    assert seen["settings"].pretrained_weights is None
