"""Network building from plans, and loading nnU-Net v2 checkpoints (nnunetv2 as oracle)."""
import copy
import json

import pytest
import torch

from kubeseg.network import (build_network_from_plans, load_network_weights, locate,
                             set_deep_supervision)
from kubeseg.training.plans import ConfigurationView, LabelInfo, num_input_channels, resolve_configuration

from tests.oracle import run_oracle
from tiny_dataset import tiny_dataset_json, tiny_plans


def _oracle_network(tmp_path, plans, configuration, dataset_json, deep_supervision) -> dict:
    """nnunetv2 builds the network from the plans (in its own venv): its weights, input and logits."""
    job = {"plans": plans, "configuration": configuration, "dataset_json": dataset_json,
           "deep_supervision": deep_supervision, "batch": 2}
    (tmp_path / "network.json").write_text(json.dumps(job))
    run_oracle("-m", "tests.oracle.nnunet_calls", "network", str(tmp_path / "network.json"),
               str(tmp_path / "network.pt"))
    return torch.load(tmp_path / "network.pt", weights_only=True)


@pytest.mark.integration
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d", "3d_cascade_fullres"])
def test_nnunet_checkpoint_loads_and_gives_same_logits(tmp_path, configuration):
    plans, ds = tiny_plans(), tiny_dataset_json(10)
    oracle = _oracle_network(tmp_path, plans, configuration, ds, deep_supervision=True)
    n_in, n_out = oracle["n_in"], oracle["n_out"]
    # a checkpoint as nnUNetTrainer.save_checkpoint writes it (state dict of the plain module)
    ckpt = {"network_weights": oracle["state_dict"], "optimizer_state": {}, "grad_scaler_state": None,
            "logging": {}, "_best_ema": 0.5, "current_epoch": 3, "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": configuration, "fold": 0},
            "inference_allowed_mirroring_axes": (0, 1, 2)}
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ckpt, path)

    torch.manual_seed(123)  # different init: the weights must come from the checkpoint
    net = build_network_from_plans(plans, configuration, ds, deep_supervision=True)
    assert list(net.state_dict()) == oracle["keys"]
    load_network_weights(net, path)

    cfg = ConfigurationView.from_plans(plans, configuration)
    assert n_in == num_input_channels(cfg, LabelInfo.from_dataset_json(ds))
    if configuration == "3d_cascade_fullres":
        assert n_in == 1 + 1  # image + one-hot of the one foreground label
    x = oracle["x"]
    assert tuple(x.shape) == (2, n_in, *cfg.patch_size)
    net.eval()
    with torch.no_grad():
        ref, out = oracle["logits"], net(x)
    assert len(ref) == len(out) == len(cfg.pool_op_kernel_sizes) - 1
    for r, o in zip(ref, out):
        assert o.shape[1] == n_out
        torch.testing.assert_close(o, r, rtol=0, atol=0)

    set_deep_supervision(net, False)
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == ref[0].shape


def test_ddp_and_compile_prefixes_are_stripped():
    plans, ds = tiny_plans(), tiny_dataset_json(10)
    a = build_network_from_plans(plans, "3d_fullres", ds)
    b = build_network_from_plans(plans, "3d_fullres", ds)
    prefixed = {"module." + k: v for k, v in a.state_dict().items()}
    load_network_weights(b, {"network_weights": prefixed})
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_inheritance_and_he_init():
    plans = tiny_plans()
    low = resolve_configuration(plans, "3d_lowres")
    assert low["data_identifier"] == "nnUNetPlans_3d_lowres" and low["patch_size"] == [16, 32, 32]
    casc = ConfigurationView.from_plans(plans, "3d_cascade_fullres")
    assert casc.is_cascaded and casc.data_identifier == "nnUNetPlans_3d_fullres"
    net = build_network_from_plans(plans, "3d_fullres", tiny_dataset_json(3))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs if c.bias is not None)
    w = convs[1].weight  # kaiming normal, a=1e-2: std = sqrt(2 / (1 + a^2) / fan_in)
    fan_in = w.shape[1] * w[0, 0].numel()
    assert abs(float(w.detach().std()) / (2 / (1 + 1e-4) / fan_in) ** 0.5 - 1) < 0.25


def test_locate_is_allow_listed():
    assert locate("torch.nn.LeakyReLU") is torch.nn.LeakyReLU
    with pytest.raises(ValueError):
        locate("os.system")


def test_out_of_place_activations_give_identical_results():
    """The CPU trainer turns in-place activations out-of-place (faster backward after instance
    norm); outputs and gradients must not change."""
    from kubeseg.training.trainer import _out_of_place_activations

    plans, ds = tiny_plans(), tiny_dataset_json(10)
    torch.manual_seed(0)
    a = build_network_from_plans(plans, "3d_fullres", ds, deep_supervision=True)
    b = copy.deepcopy(a)
    assert _out_of_place_activations(b) > 0
    assert not any(getattr(m, "inplace", False) for m in b.modules() if isinstance(m, torch.nn.LeakyReLU))
    x = torch.randn(2, 1, 16, 32, 32)
    outs = []
    for net in (a, b):
        out = net(x)
        sum(o.square().mean() for o in out).backward()
        outs.append((out, [p.grad.clone() for p in net.parameters()]))
    for r, o in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    for r, o in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-7)
