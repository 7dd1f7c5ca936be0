"""Checkpoints written before a change of what a network or its inputs compute keep computing what they were
trained with: LocalNet's upsampling (aligned with its ceil-mode pooling, 2026-11-29) and the classification
task's resize (antialiased / area-averaged shrinking, 2026-11-29); and the classification z-score is the
population one of ``medfast.data.normalize_intensity`` and MONAI (a constant image gives 0)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfast.nets import GlobalNet, LocalNet
from medfast.nets._layers import CL3
from medfast.nets.registration import _channels_last
from medfast.tasks.classification.data import ImageFolderDataset, _resize, _zscore, read_image


# ---- 1. LocalNet: a state dict without upsampling_version keeps the old resize ----------------------------------
def _old_localnet_forward(net: LocalNet, x: torch.Tensor) -> torch.Tensor:
    """LocalNet's forward as it was before the alignment fix (medfast a07382d): coarse features and fields
    resized to the target size with ``F.interpolate(size=...)``; the layers are ``net``'s."""
    size = x.shape[2:]
    mode = "trilinear" if net.ndim == 3 else "bilinear"
    fmt = CL3 if _channels_last(x, net.ndim, net.channels_last) else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    feats = net.encoder(x)
    h = feats[-1]
    outs = []
    if len(feats) - 1 in net.levels:
        outs.append(net.heads[str(len(feats) - 1)](h))
    for i in reversed(range(len(net.decoders))):
        skip = feats[i]
        up = net.ups[i](h)
        up = up[tuple([slice(None), slice(None)] + [slice(0, s) for s in skip.shape[2:]])]
        add = h.reshape(h.shape[0], skip.shape[1], -1, *h.shape[2:]).sum(2)
        add = F.interpolate(add, size=skip.shape[2:], mode=mode, align_corners=False)
        h = net.decoders[i]((up + add + skip).contiguous(memory_format=fmt))
        if i in net.levels:
            outs.append(net.heads[str(i)](h))
    ddf = torch.stack([F.interpolate(o, size=size, mode=mode, align_corners=False)
                       if o.shape[2:] != size else o for o in outs]).mean(0)
    return ddf.contiguous()


def _trained(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``net`` with random ("trained") heads: the zero-initialised ones give the identity at any upsampling."""
    torch.manual_seed(seed)
    for name, p in net.named_parameters():
        if "heads" in name:
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _old_format(state_dict: dict) -> dict:
    """A state dict as written before the fix: without the ``upsampling_version`` entries."""
    return {k: v for k, v in state_dict.items() if not k.endswith("upsampling_version")}


@pytest.mark.parametrize("ndim, shape", [(2, (44, 52)), (3, (20, 24, 44))])
def test_localnet_old_state_dict_keeps_the_old_upsampling(ndim, shape):
    src = _trained(LocalNet(ndim, 2, 4, 3))
    assert int(src.upsampling_version) == 2 and "upsampling_version" in src.state_dict()
    torch.manual_seed(1)
    x = torch.randn(1, 2, *shape)
    with torch.no_grad():
        reference = _old_localnet_forward(src, x)
        aligned = src(x)
    assert float((aligned - reference).abs().max()) > 1e-3  # the 44-voxel axis: the two paths differ

    old = LocalNet(ndim, 2, 4, 3).eval()
    old.load_state_dict(_old_format(src.state_dict()))  # strict: the missing key is supplied
    assert int(old.upsampling_version) == 1
    new = LocalNet(ndim, 2, 4, 3).eval()
    new.load_state_dict(src.state_dict())
    assert int(new.upsampling_version) == 2
    with torch.no_grad():
        torch.testing.assert_close(old(x), reference, rtol=0, atol=0)  # exactly the old forward
        torch.testing.assert_close(new(x), aligned, rtol=0, atol=0)
    # saved again, the legacy network stays legacy (the key now says 1)
    again = LocalNet(ndim, 2, 4, 3).eval()
    again.load_state_dict(old.state_dict())
    assert int(again.upsampling_version) == 1
    with torch.no_grad():
        torch.testing.assert_close(again(x), reference, rtol=0, atol=0)
    # and a new state dict switches a legacy network back
    again.load_state_dict(src.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), aligned, rtol=0, atol=0)


def test_localnet_upsampling_version_bad_values_and_partial_loads():
    net = _trained(LocalNet(2, 2, 4, 2))
    sd = net.state_dict()
    for bad in (torch.tensor(3), torch.tensor(2.0), torch.tensor([2]), torch.tensor(True)):
        with pytest.raises(RuntimeError, match="upsampling_version must be a 0-d int tensor, 1 .* or 2"):
            LocalNet(2, 2, 4, 2).load_state_dict({**sd, "upsampling_version": bad})
    # a partial load without any of this net's entries infers nothing
    wrapper = torch.nn.ModuleDict({"a": LocalNet(2, 2, 4, 2), "b": LocalNet(2, 2, 4, 2)})
    partial = {f"a.{k}": v for k, v in _old_format(sd).items()}
    result = wrapper.load_state_dict(partial, strict=False)
    assert int(wrapper["a"].upsampling_version) == 1 and int(wrapper["b"].upsampling_version) == 2
    assert "a.upsampling_version" not in result.missing_keys and "b.upsampling_version" in result.missing_keys


def test_wrappers_pass_the_old_format_through():
    from medfast.tasks.registration import RegistrationNet

    src = _trained(RegistrationNet(2, 2, 4, 3, global_net=True))
    assert "local.upsampling_version" in src.state_dict()
    assert not any("upsampling_version" in k for k in GlobalNet(2, 2, 4, 3).state_dict())
    old = RegistrationNet(2, 2, 4, 3, global_net=True).eval()
    old.load_state_dict(_old_format(src.state_dict()))
    assert int(old.local.upsampling_version) == 1 and old.globalnet is not None
    torch.manual_seed(2)
    x = torch.randn(1, 2, 44, 44)
    with torch.no_grad():
        ref_local = _old_localnet_forward(old.local, x)
        theta, _ = old(x)
        torch.testing.assert_close(theta, src(x)[0], rtol=0, atol=0)  # GlobalNet: unchanged
        plain = RegistrationNet(2, 2, 4, 3).eval()
        plain.load_state_dict(_old_format({k: v for k, v in src.state_dict().items() if not k.startswith("glob")}))
        torch.testing.assert_close(plain(x)[1], ref_local, rtol=0, atol=0)


def test_register_model_and_resume_load_an_old_checkpoint(tmp_path):
    from medfast.tasks.registration import RegistrationNet, load_model_info, save_model
    from medfast.train.trainer import load_model_state

    kw = {"spatial_dims": 2, "in_channels": 2, "num_channel_initial": 4, "depth": 3}
    src = _trained(LocalNet(**kw))
    path = tmp_path / "m.pt"
    save_model(path, src, kw, [44, 44])
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = _old_format(ckpt["state_dict"])
    torch.save(ckpt, path)  # as written before the fix
    net, info = load_model_info(path)  # register --model
    assert info.input_shape == [44, 44] and int(net.upsampling_version) == 1
    torch.manual_seed(3)
    x = torch.randn(1, 2, 44, 44)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _old_localnet_forward(src, x), rtol=0, atol=0)

    # the trainer's resume (load_model_state) of a registration checkpoint without the key
    reg = _trained(RegistrationNet(**kw))
    state = {"model": _old_format(reg.state_dict())}
    resumed = RegistrationNet(**kw)
    load_model_state(resumed, state, tmp_path / "last.pt")
    assert int(resumed.local.upsampling_version) == 1
    assert int(resumed.state_dict()["local.upsampling_version"]) == 1  # its next checkpoint keeps it


# ---- 2. classification resize: checkpoints without the record get the plain resize -------------------------------
def test_resize_version_1_is_plain_bilinear_and_trilinear():
    torch.manual_seed(0)
    x2, x3 = torch.randn(2, 40, 36), torch.randn(1, 20, 18, 10)
    torch.testing.assert_close(_resize(x2, (16, 50), 1), F.interpolate(
        x2[None], size=(16, 50), mode="bilinear", align_corners=False)[0], rtol=0, atol=0)
    torch.testing.assert_close(_resize(x3, (8, 9, 12), 1), F.interpolate(
        x3[None], size=(8, 9, 12), mode="trilinear", align_corners=False)[0], rtol=0, atol=0)
    torch.testing.assert_close(_resize(x2, (16, 50)), F.interpolate(  # the default: antialiased
        x2[None], size=(16, 50), mode="bilinear", align_corners=False, antialias=True)[0], rtol=0, atol=0)


def _png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def _folder(root, size=48, n=4):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(n):
            _png(root / c / f"{i}.png", rng.integers(0, 255, (size, size)))
    return root


def test_dataset_resize_version_argument(tmp_path):
    pytest.importorskip("PIL")
    root = _folder(tmp_path / "img")
    f = root / "a" / "0.png"
    plain = F.interpolate(torch.from_numpy(read_image(f))[None], size=(16, 16), mode="bilinear",
                          align_corners=False)[0]
    ds = ImageFolderDataset(root, size=(16, 16), resize_version=1)
    torch.testing.assert_close(ds[0]["image"], plain, rtol=0, atol=0)
    assert not torch.equal(ImageFolderDataset(root, size=(16, 16))[0]["image"], plain)
    with pytest.raises(ValueError, match="resize_version must be 1 .* or 2"):
        ImageFolderDataset(root, size=(16, 16), resize_version=3)
    with pytest.raises(TypeError, match="resize_version must be an int"):
        ImageFolderDataset(root, size=(16, 16), resize_version="2")


def _config(root, out, *overrides):
    from medfast.train import load_config

    base = [f"data.root={root}", "data.normalize=minmax", "data.val_fraction=0.25", "data.shape=[16, 16]",
            "task=classification", "model.name=sononet", "model.spatial_dims=2", "model.out_channels=2",
            "model.channels=[4]", "model.kwargs={convs_per_block: [1, 1, 1]}", "trainer.batch_size=4",
            "trainer.max_steps=1", "trainer.val_every=1", "trainer.checkpoint_every=1", "trainer.progress=false",
            "trainer.tensorboard=false", "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu",
            f"trainer.out_dir={out}"]
    return load_config([], [*base, *overrides])


def _strip_resize_record(path):
    """Rewrites the checkpoint ``path`` as written before the resize record (its config without the key)."""
    state = torch.load(path, weights_only=True)
    del state["config"]["data"]["dataset_args"]["resize_version"]
    torch.save(state, path)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    pytest.importorskip("PIL")
    from medfast.train import Trainer

    tmp = tmp_path_factory.mktemp("old_cls")
    root = _folder(tmp / "img")
    Trainer(_config(root, tmp / "run")).fit()
    return tmp


def test_new_classification_checkpoints_record_the_resize(cls_run):
    from medfast.train.trainer import load_checkpoint

    state = load_checkpoint(cls_run / "run" / "checkpoints" / "last.pt")
    assert state["config"]["data"]["dataset_args"]["resize_version"] == 2
    assert "resize_version" not in (cls_run / "run" / "config.yaml").read_text()  # the config as given


def _probabilities(path):
    return np.array([[float(r["p_a"]), float(r["p_b"])] for r in csv.DictReader(open(path, encoding="utf-8"))])


def test_predict_resizes_as_the_checkpoint_was_trained(cls_run, tmp_path):
    import shutil

    from medfast.tasks.classification.task import build_classifier, predict_files
    from medfast.train.config import config_from_dict
    from medfast.train.trainer import load_checkpoint

    new = cls_run / "run" / "checkpoints" / "last.pt"
    old = tmp_path / "old.pt"
    shutil.copy(new, old)
    _strip_resize_record(old)
    files = sorted(str(p) for p in (cls_run / "img").rglob("*.png"))[:3]
    predict_files(new, files, tmp_path / "new", save_cam=False)
    predict_files(old, files, tmp_path / "old", save_cam=False)

    state = load_checkpoint(new)
    model = build_classifier(config_from_dict(state["config"]))
    model.load_state_dict(state["model"])
    model.eval()

    def expected(antialias):
        out = []
        for f in files:
            x = torch.from_numpy(read_image(f))[None]
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=antialias)
            x = (x - x.min()) / (x.max() - x.min())
            with torch.no_grad():
                out.append(torch.softmax(model(x), 1)[0].numpy())
        return np.array(out)

    p_old, p_new = _probabilities(tmp_path / "old" / "predictions.csv"), _probabilities(
        tmp_path / "new" / "predictions.csv")
    np.testing.assert_allclose(p_old, expected(False), atol=2e-6)
    np.testing.assert_allclose(p_new, expected(True), atol=2e-6)
    assert np.abs(p_old - p_new).max() > 1e-5  # the two resizes feed the network other inputs


def test_resume_of_an_old_checkpoint_keeps_the_plain_resize(cls_run, tmp_path):
    import shutil

    from medfast.train import Trainer
    from medfast.train.trainer import CheckpointError, load_checkpoint

    root = cls_run / "img"
    shutil.copytree(cls_run / "run", tmp_path / "run")
    for p in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        _strip_resize_record(p)
    with pytest.raises(CheckpointError, match="resize_version=1 but this run sets 2"):
        Trainer(_config(root, tmp_path / "run", "trainer.resume=auto", "trainer.max_steps=2",
                        "data.dataset_args={resize_version: 2}")).fit()
    trainer = Trainer(_config(root, tmp_path / "run", "trainer.resume=auto", "trainer.max_steps=2"))
    assert trainer.fit()["step"] == 2
    item = trainer.train_ds[0]
    x = torch.from_numpy(read_image(item["files"]))[None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(item["image"], (x - x.min()) / (x.max() - x.min()), rtol=0, atol=1e-6)
    # the resumed run's checkpoints record the plain resize, so that predict keeps it too
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["config"]["data"]["dataset_args"]["resize_version"] == 1


def test_resize_version_setting_is_checked(tmp_path):
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import ConfigError

    for bad, err in (("3", "must be 1 .* or 2"), ("true", "must be an int")):
        with pytest.raises(ConfigError, match=f"data.dataset_args.resize_version {err}"):
            ClassificationTask(_config(tmp_path, tmp_path / "run", f"data.dataset_args={{resize_version: {bad}}}"))


# ---- 3. classification z-score: population std, a constant image gives 0 --------------------------------------
def test_zscore_matches_monai_and_normalize_intensity():
    monai = pytest.importorskip("monai.transforms")
    from medfast.data.preprocess import normalize_intensity

    torch.manual_seed(0)
    for shape in ((1, 8, 8), (3, 37, 41), (1, 6, 7, 5)):
        x = torch.randn(shape) * 7 + 3
        ref = torch.as_tensor(monai.NormalizeIntensity()(x.clone()))  # over all channels, population std
        torch.testing.assert_close(_zscore(x), ref, rtol=1e-5, atol=1e-5)
    for v in (0.1, 0.3, 1234.567, 3.3):  # sample std on these gave +-1 rounding noise
        for shape in ((1, 37, 41), (3, 64, 64), (1, 300, 257)):
            x = torch.full(shape, v)
            assert float(_zscore(x).abs().max()) == 0
            if shape[0] == 1:
                torch.testing.assert_close(_zscore(x), normalize_intensity(x, "zscore"), rtol=0, atol=0)
    assert float(_zscore(torch.full((1, 1, 1), 5.0)).abs().max()) == 0  # one pixel


def test_dataset_zscore_of_a_constant_image_is_zero(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "img"
    for c in ("a", "b"):
        _png(root / c / "0.png", np.full((37, 41), 15))  # 15 / 255: the sample z-score gave +-0.75 noise
    ds = ImageFolderDataset(root, normalize="zscore")
    assert float(ds[0]["image"].abs().max()) == 0


def test_an_old_depth_4_localnet_saved_by_save_model_loads_with_its_levels(tmp_path):
    """LocalNet's default extract_levels was (0, 1, 2, 3) at any depth, now every level of the depth: a depth-4
    LocalNet saved (net_kwargs without the levels) before the change was rebuilt with a fifth head and refused."""
    from medfast.tasks.registration import RegistrationError, load_model_info, save_model

    kw = {"spatial_dims": 2, "in_channels": 2, "num_channel_initial": 4, "depth": 4}
    path = tmp_path / "old.pt"
    save_model(path, LocalNet(**kw, extract_levels=(0, 1, 2, 3)), kw, [64, 64])
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"].pop("upsampling_version")  # a file written before the buffer existed
    torch.save(ckpt, path)
    net, _ = load_model_info(path)
    assert tuple(net.levels) == (0, 1, 2, 3) and net._legacy_upsampling
    # a weight that does not fit is named (the message stopped at "Error(s) in loading state_dict for LocalNet:")
    ckpt["state_dict"]["heads.0.weight"] = ckpt["state_dict"]["heads.0.weight"][:1]
    torch.save(ckpt, path)
    with pytest.raises(RegistrationError, match="heads.0.weight"):
        load_model_info(path)


def test_old_state_dicts_load_into_meta_modules_with_assign():
    """load_state_dict(assign=True) into a meta-built module reported all keys matched but left the supplied
    buffer on the meta device (a later .to() failed, and a state dict saved from it was refused)."""
    from medfast.nets.gan import ConditionalGAN, PatchDiscriminator, UNetGenerator

    old = {k: v for k, v in LocalNet(3, 2, 4, 3).state_dict().items() if k != "upsampling_version"}
    with torch.device("meta"):
        net = LocalNet(3, 2, 4, 3)
    net.load_state_dict(old, assign=True)
    assert not net.upsampling_version.is_meta and int(net.upsampling_version) == 1
    LocalNet(3, 2, 4, 3).load_state_dict(net.to("cpu").state_dict())

    def gan():
        return ConditionalGAN(UNetGenerator(3, 1, (4, 8), 2, 1, "batch"), PatchDiscriminator(4, 4, 2, 2, "batch"),
                              range_channels=3)

    old = {k: v for k, v in gan().state_dict().items() if k != "cond_range"}
    with torch.device("meta"):
        g = gan()
    g.load_state_dict(old, assign=True)
    assert not g.cond_range.is_meta and g.known_range() is None
