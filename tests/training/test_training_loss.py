"""Dice + CE loss and deep supervision weights."""
import numpy as np
import pytest
import torch

from kubeseg.training.loss import DiceCELoss, build_loss, deep_supervision_weights
from tests.oracle import run_oracle


def test_perfect_prediction_is_low_and_wrong_is_high():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 16, 16))
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    loss = DiceCELoss(batch_dice=False)
    perfect = loss(onehot * 50, target)
    wrong = loss(torch.roll(onehot, 1, dims=1) * 50, target)
    assert perfect.item() == pytest.approx(-1.0, abs=1e-3)  # CE ~0, Dice ~1
    assert wrong.item() > 10


@pytest.mark.integration
@pytest.mark.parametrize("batch_dice", [True, False])
def test_matches_nnunet_dc_and_ce(batch_dice, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 16, 16)
    y = torch.randint(0, 3, (2, 1, 8, 16, 16)).float()
    w = deep_supervision_weights(3)
    outs = [x, x[:, :, ::2, ::2, ::2], x[:, :, ::4, ::4, ::4]]
    tgts = [y, y[:, :, ::2, ::2, ::2], y[:, :, ::4, ::4, ::4]]
    torch.save({"outputs": outs, "targets": tgts, "weights": torch.as_tensor(w)}, tmp_path / "in.pt")
    run_oracle("-m", "tests.oracle.nnunet_calls", "loss", str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
               "--batch-dice", str(int(batch_dice)))
    ref = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(DiceCELoss(batch_dice)(x, y), ref["plain"])
    torch.testing.assert_close(build_loss(batch_dice, 3)(outs, tgts), ref["deep_supervision"])


def test_deep_supervision_weights():
    w = deep_supervision_weights(4)
    expected = np.array([1, 0.5, 0.25, 0.0]) / 1.75
    np.testing.assert_allclose(w, expected)
    assert w.sum() == pytest.approx(1) and w[-1] == 0
    np.testing.assert_allclose(deep_supervision_weights(1), [1.0])


def test_minus_one_counts_as_background():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 4, 8, 8)
    y = torch.randint(0, 2, (2, 1, 4, 8, 8))
    y_neg = y.clone()
    y_neg[:, :, 0] = -1
    y_zero = y.clone()
    y_zero[:, :, 0] = 0
    loss = DiceCELoss(batch_dice=True)
    torch.testing.assert_close(loss(x, y_neg), loss(x, y_zero))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignore_label_matches_nnunet(batch_dice):
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(3)
    ref = compound.DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                  weight_ce=1, weight_dice=1, ignore_label=3, dice_class=MemoryEfficientSoftDiceLoss)
    x = torch.randn(2, 3, 8, 16, 16)
    y = torch.randint(0, 4, (2, 1, 8, 16, 16)).float()
    torch.testing.assert_close(DiceCELoss(batch_dice, ignore_label=3)(x, y), ref(x, y))


@pytest.mark.parametrize("ignore", [False, True])
def test_regions_match_nnunet_dc_and_bce(ignore):
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(4)
    ref = compound.DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                                   use_ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    x = torch.randn(2, 3, 8, 16, 16)
    y = (torch.rand(2, 3 + ignore, 8, 16, 16) > 0.6).to(torch.int16)
    torch.testing.assert_close(build_loss(True, None, regions=True, ignore_label=4 if ignore else None)(x, y),
                               ref(x, y))
