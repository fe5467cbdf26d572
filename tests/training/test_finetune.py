"""Incremental fine-tuning (kubeseg.training.finetune): layer-wise parameter groups on nnU-Net's two
network classes, the carried-over splits (new cases in training only), the choice of new cases,
and one real fine-tune through the pipeline's task preparation (epochs, learning rates, splits)."""
import copy
import json

import pytest
import torch

from kubeseg.errors import KubesegError
from kubeseg.network import build_network_from_plans
from kubeseg.training.finetune import (FINETUNE_FILE, FinetuneSettings, check_no_leak, choose_new_cases,
                                       incremental_splits, parameter_groups, write_finetune_spec)
from kubeseg.training.schedule import OptimizerSettings, make_optimizer, set_lr
from kubeseg.training.splits import generate_crossval_split

from tiny_dataset import tiny_dataset_json, tiny_plans


def _resenc_plans():
    plans = tiny_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kw = arch["arch_kwargs"]
    kw["n_blocks_per_stage"] = [1, 1, 2]
    kw.pop("n_conv_per_stage")
    return plans


@pytest.mark.parametrize("plans", [tiny_plans, _resenc_plans], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_encoder_and_decoder_groups(plans):
    net = build_network_from_plans(plans(), "3d_fullres", tiny_dataset_json(3), deep_supervision=True)
    groups = parameter_groups(net, 0.5, 1.0)
    assert [g["name"] for g in groups] == ["encoder", "decoder"]
    ids = [[id(p) for p in g["params"]] for g in groups]
    every = [id(p) for p in net.parameters()]
    assert sorted(ids[0] + ids[1]) == sorted(every) and not set(ids[0]) & set(ids[1])  # each once
    assert set(ids[0]) == {id(p) for p in net.encoder.parameters()}
    heads = {id(p) for p in net.decoder.seg_layers.parameters()} | {id(p) for p in net.decoder.transpconvs.parameters()}
    assert heads <= set(ids[1])
    if hasattr(net.encoder, "stem"):
        assert {id(p) for p in net.encoder.stem.parameters()} <= set(ids[0])

    opt = make_optimizer(groups, OptimizerSettings(initial_lr=1e-4, encoder_lr_scale=0.5, decoder_lr_scale=1.0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 1e-4])
    set_lr(opt, 2e-5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 2e-5])
    # equal scales: one group, as nnU-Net's optimiser
    assert [g["name"] for g in parameter_groups(net, 1.0, 1.0)] == ["all"]


def test_layerwise_rates_move_the_encoder_less():
    torch.manual_seed(0)
    net = build_network_from_plans(tiny_plans(), "3d_fullres", tiny_dataset_json(3), deep_supervision=False)
    before = copy.deepcopy(net.state_dict())
    opt = make_optimizer(parameter_groups(net, 0.0 + 1e-9, 1.0),
                         OptimizerSettings(initial_lr=1e-2, encoder_lr_scale=1e-9, decoder_lr_scale=1.0, momentum=0,
                                           nesterov=False))
    net(torch.randn(1, 1, 16, 32, 32)).pow(2).mean().backward()
    opt.step()
    after = net.state_dict()
    enc = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("encoder.") and
              after[k].is_floating_point() and "running" not in k)
    dec = max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("decoder.seg_layers"))
    assert enc < 1e-6 < dec


def test_settings_refuse_nonsense():
    assert FinetuneSettings() == FinetuneSettings(10, 1e-4, 0.5, 1.0, 0)  # the design's defaults
    for bad in ({"epochs": 0}, {"lr": 0}, {"lr": float("nan")}, {"encoder_lr_scale": -1}, {"max_new_cases": -2}):
        with pytest.raises(KubesegError):
            FinetuneSettings(**bad)


def test_new_cases_join_training_sets_only():
    old_ids = [f"c{i:02d}" for i in range(12)]
    champ = generate_crossval_split(old_ids)
    new = ["new_000", "new_001", "new_002"]
    splits = incremental_splits(champ, old_ids + new, new)
    assert len(splits) == 5 and check_no_leak(champ, splits) == []
    for old, now in zip(champ, splits):
        assert now["val"] == old["val"]  # validation sets untouched
        assert now["train"] == old["train"] + new  # every fold trains on every new case
    # a case nobody planned for is refused; a "new" case the champion knew is refused
    with pytest.raises(KubesegError, match="neither in the champion's splits nor new"):
        incremental_splits(champ, old_ids + new + ["stray"], new)
    with pytest.raises(KubesegError, match="already in the champion's splits"):
        incremental_splits(champ, old_ids, ["c03"])
    # a dropped case leaves the splits; fresh splits of the merged set would leak
    fewer = incremental_splits(champ, old_ids[1:] + new, new)
    assert all("c00" not in f["train"] + f["val"] for f in fewer)
    fresh = generate_crossval_split(sorted(old_ids + new))
    assert any("validation case(s)" in p for p in check_no_leak(champ, fresh))


def test_choose_new_cases():
    cases = [f"n{i}" for i in range(6)]
    assert choose_new_cases(cases) == cases
    assert choose_new_cases(cases, 2) == ["n4", "n5"]  # without confidences: the most recent
    conf = {"n0": 0.9, "n1": 0.2, "n2": 0.5, "n3": 0.1, "n4": 0.95}  # n5 unscored: least confident
    assert choose_new_cases(cases, 3, conf) == ["n1", "n3", "n5"]


def test_finetune_task_uses_spec(tmp_path):
    """The pipeline's train-task preparation reads the spec the retraining plan wrote beside the
    champion: at most its epochs, its learning rates per group, the carried-over splits."""
    from tiny_dataset import make_tiny_preprocessed

    from kubeseg.training import Schedule, TrainSettings, train_fold
    from kubeseg.training.splits import SPLITS_FILENAME
    from kubeseg.workflow import model_folder_name, prepare_training_task

    pre = make_tiny_preprocessed(tmp_path, n_cases=7)
    plans = json.loads((pre / "plans.json").read_text())
    ids = sorted(p.name[:-4] for p in (pre / plans["configurations"]["3d_fullres"]["data_identifier"]).glob("*.npy")
                 if not p.name.endswith("_seg.npy"))
    old, new = ids[:5], ids[5:]
    champion = tmp_path / "champion"
    base = dict(device="cpu", num_workers=0, run_validation=False, progress_bar=False, log_to_console=False)
    (champion_splits_file := tmp_path / "champ_splits.json").write_text(json.dumps(generate_crossval_split(old)))
    train_fold(pre, pre / "plans.json", "3d_fullres", 1, champion / model_folder_name(plans, "3d_fullres"),
               TrainSettings(schedule=Schedule(1, 1, 1, "one"), splits_file=champion_splits_file, **base))
    champ = json.loads(champion_splits_file.read_text())
    ft = FinetuneSettings(epochs=2, lr=1e-4, encoder_lr_scale=0.5, decoder_lr_scale=1.0)
    splits = incremental_splits(champ, ids, new)
    write_finetune_spec(champion, ft, splits, champ, new, "test")
    assert (champion / FINETUNE_FILE).is_file()

    task = prepare_training_task(pre, "3d_fullres", 1, "5x2x1", "cpu", 0, 1, False, tmp_path / "out",
                                 pretrained_root=champion)
    assert task.settings.schedule.num_epochs == 2 and task.settings.schedule.train_iterations == 2  # min(10→2, 5)
    assert task.settings.optimizer.initial_lr == 1e-4 and task.settings.optimizer.encoder_lr_scale == 0.5
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 1, task.out_dir,
                          TrainSettings(**{**task.settings.__dict__, "run_validation": False}))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert ckpt["init_args"]["optimizer"]["initial_lr"] == 1e-4 and ckpt["current_epoch"] == 2
    groups = ckpt["optimizer_state"]["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "decoder"]
    assert groups[0]["lr"] == pytest.approx(0.5 * groups[1]["lr"])  # last epoch's poly-decayed rate
    log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
    assert "epoch 0  lr 0.0001 (encoder 5e-05, decoder 0.0001)" in log and "epoch 2" not in log
    used = json.loads((task.out_dir / SPLITS_FILENAME).read_text())
    assert used == splits and check_no_leak(champ, used) == []
    assert set(new) <= set(used[1]["train"]) and not set(new) & set(used[1]["val"])

    # a fine-tune of a configuration the champion has no weights for is refused
    with pytest.raises(KubesegError, match="no weights for this configuration"):
        prepare_training_task(pre, "2d", 1, "5x2x1", "cpu", 0, 1, False, tmp_path / "out2", pretrained_root=champion)
