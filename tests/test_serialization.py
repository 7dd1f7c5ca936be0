"""Shipping models (a bug hunt): checkpoints load with torch.load(weights_only=True) and refuse pickled code,
torch.jit.trace of the ops and nets, torch.export's clear refusal of the simulator, dtype moves of the
classification loss."""

import io
import os
import warnings

import numpy as np
import pytest
import torch

import medfast as mf
from medfast.losses import DiceCELoss
from medfast.nets import GlobalNet, LocalNet
from medfast.tasks.classification import ClassificationLoss
from medfast.tasks.registration import RegistrationError, load_model_info
from medfast.train.trainer import CheckpointError, _rng_state, _set_rng_state, load_checkpoint


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))  # runs on unpickling if the loader allows arbitrary objects


def test_checkpoints_refuse_pickled_code(tmp_path):
    marker = str(tmp_path / "code_ran")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "medfast-checkpoint-1", "task": "classification", "model": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(evil)
    torch.save({"net": "localnet", "x": _Payload(marker)}, tmp_path / "evil_reg.pt")
    with pytest.raises(RegistrationError, match="cannot read"):
        load_model_info(tmp_path / "evil_reg.pt")
    assert not os.path.exists(marker)


def test_rng_state_is_weights_only_safe_and_restores_numpy():
    np.random.seed(7)
    np.random.normal()  # a cached gaussian in the state
    state = _rng_state()
    want = (np.random.rand(4), np.random.normal(), torch.rand(2))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    _set_rng_state(torch.load(buf, weights_only=True))
    assert np.array_equal(np.random.rand(4), want[0]) and np.random.normal() == want[1]
    assert torch.equal(torch.rand(2), want[2])


def test_jit_trace_of_the_losses_keeps_bad_labels_visible():
    torch.manual_seed(0)
    x, y = torch.randn(1, 3, 8, 8, 8), torch.randint(0, 3, (1, 8, 8, 8))
    bad = y.clone()
    bad[0, :4] = 7
    for fn in (DiceCELoss(), mf.dice_loss, mf.cross_entropy):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(fn, (x, y))
        torch.testing.assert_close(traced(x, y), fn(x, y))
        assert torch.isnan(traced(x, bad))  # a finite wrong loss before: the host check ran only once
        with pytest.raises(ValueError, match="label 7"):
            fn(x, bad)


def test_jit_trace_of_warp_compose_integrate():
    img, ddf = torch.rand(1, 1, 8, 8, 8), 0.5 * torch.randn(1, 3, 8, 8, 8)
    for fn in (lambda i, d: mf.warp(i, d), lambda i, d: mf.compose(d, d), lambda i, d: mf.integrate(d, 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(fn, (img, ddf))  # an internal assert of the tracer before
        torch.testing.assert_close(traced(img, ddf), fn(img, ddf), rtol=0, atol=0)


@pytest.mark.parametrize("net", [lambda: LocalNet(3, 2, 4, 2, (0, 1, 2)), lambda: GlobalNet(3, 2, 4, 2)])
def test_traced_registration_nets_save_and_load(net):
    model = net().eval()
    x = torch.rand(1, 2, 16, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)  # 'Could not export Python function call _OneDNNConv3d' before
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_of_simulate_is_refused_clearly():
    from medfast.ultrasound import Probe, look_at, simulate

    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64)
    props = torch.rand(1, 5, 16, 16, 16) + 0.5

    class Sim(torch.nn.Module):
        def forward(self, pose):
            return simulate(props, np.eye(4), pose, probe, sub_rays=1).bmode

    pose = look_at((8, 8, 0), (0, 0, 1), (1, 0, 0)).float()
    assert Sim()(pose).dim() == 4
    with pytest.raises(Exception, match="cannot be traced by torch.export"):
        torch.export.export(Sim(), (pose,))


@pytest.mark.parametrize("convert", ["double", "half", "bfloat16"])
def test_classification_loss_with_class_weights_after_a_dtype_move(convert):
    logits, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    want = ClassificationLoss("nominal", class_weights=torch.tensor([1.0, 2.0, 3.0]))(logits, t)
    moved = getattr(ClassificationLoss("nominal", class_weights=torch.tensor([1.0, 2.0, 3.0])), convert)()
    torch.testing.assert_close(moved(logits, t), want)


def test_checkpoints_written_before_the_tensor_rng_state_still_load(tmp_path):
    # before 2026-11-28 the NumPy RNG state was np.random.get_state(): a pickled ndarray
    import random

    state = {"format": "medfast-checkpoint-1", "task": "segmentation", "config": {"task": "segmentation"},
             "model": {"w": torch.zeros(2)}, "step": 10, "epoch": 0, "micro_batches": 10, "world_size": 1,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(state, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    np.random.seed(4)
    want = np.random.rand(3)
    np.random.seed(4)
    _set_rng_state({**loaded["rng"], "numpy": np.random.get_state()})
    assert np.array_equal(np.random.rand(3), want)


def test_registration_models_with_numpy_kwargs_save_and_load(tmp_path):
    from medfast.tasks.registration import RegistrationNet, save_model

    kw = dict(spatial_dims=2, in_channels=2, num_channel_initial=np.int64(4), depth=2, velocity=np.True_)
    save_model(tmp_path / "reg.pt", RegistrationNet(**kw), kw, [32, 32])
    net, info = load_model_info(tmp_path / "reg.pt")  # weights_only refused the NumPy scalars before
    assert isinstance(net, torch.nn.Module)
