"""Registration with multi-channel images and multi-label maps: every channel (modality) is normalized on its
own, ``medfast register`` reads 4D (X, Y, Z, C) images (with and without ``--model``) and checks the channel
count against the checkpoint, and the registration task's label Dice counts the classes of ALL label maps
(not just the first subject's), never clamping a label into another class."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast import cli
from medfast.data import DatasetError
from medfast.tasks.registration import (
    ModelInfo,
    RegistrationConfig,
    RegistrationNet,
    RegistrationTask,
    load_model_info,
    normalize_intensity,
    register_pair,
    register_with_model,
    save_model,
)
from medfast.train import Trainer, config_from_dict

S = 16
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _subject(seed, top_label=4, shape=(S, S, S)):
    """A 2-channel image ``(*shape, 2)`` (T1-like in the thousands, FLAIR-like in the tens, different
    structures) and its label map (0, 1, 2 and, unless ``top_label`` is None, ``top_label``)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = rng.uniform(6, 10, len(shape))
    r = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grid, c)))
    lab = np.zeros(shape, np.int16)
    lab[r < 5] = 2
    lab[r < 3] = 1
    if top_label is not None:
        lab[(r < 3) & (r > 2)] = top_label
    t1 = (1.0 + 0.6 * (r < 5) - 0.4 * (r < 3) + 0.05 * rng.standard_normal(shape)) * 1000
    x = grid[0] - c[0]
    flair = (1.0 + 0.8 * np.exp(-((r - 4) ** 2)) + 0.5 * (x > 0) * (r < 6) + 0.05 * rng.standard_normal(shape)) * 10
    return np.stack([t1, flair], -1).astype(np.float32), lab


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


# ---- normalization per channel ----------------------------------------------------------------------------


def test_normalize_intensity_maps_each_channel_on_its_own():
    img, _ = _subject(0)
    x = torch.from_numpy(np.moveaxis(img, -1, 0).copy())  # (2, *S): T1 ~1000s, FLAIR ~10s
    n = normalize_intensity(x)
    for c in range(2):  # each channel as if it were alone (before: FLAIR squashed to ~0 by T1's percentiles)
        assert torch.equal(n[c], normalize_intensity(x[c]))
        assert float(n[c].max()) == 1.0 and float(n[c].std()) > 0.1
    # the scale of one modality does not matter
    scaled = x * torch.tensor([1.0, 1e-4]).view(2, 1, 1, 1)
    torch.testing.assert_close(normalize_intensity(scaled), n, atol=1e-5, rtol=0)
    # (B, C, *S): each channel of each image
    batch = torch.stack([x, x.flip(1) * 3])
    nb = normalize_intensity(batch)
    assert torch.equal(nb[0], n) and torch.equal(nb[1], normalize_intensity(x.flip(1) * 3))
    # 2D images with channels: spatial_dims=2
    x2 = x[:, :, :, S // 2]
    n2 = normalize_intensity(x2, spatial_dims=2)
    assert torch.equal(n2[1], normalize_intensity(x2[1]))
    # a single channel: one percentile pair over all voxels, as before (bitwise)
    v = x[1]
    flat = v.flatten()
    lo = torch.quantile(flat, 0.005)
    hi = torch.quantile(flat[flat > lo], 0.995)
    ref = ((v - lo) / float(hi - lo)).clamp(0, 1)
    for form in (v, v[None], v[None, None]):
        assert torch.equal(normalize_intensity(form).reshape(v.shape), ref)


def test_register_pair_does_not_depend_on_a_modality_scale():
    f, _ = _subject(1)
    m, _ = _subject(2)
    f, m = (torch.from_numpy(np.moveaxis(a, -1, 0).copy()) for a in (f, m))
    cfg = RegistrationConfig(affine_levels=(2,), affine_iters=10, deform_levels=(2, 1), deform_iters=10)
    scale = torch.tensor([1.0, 1e-4]).view(2, 1, 1, 1)
    ref = register_pair(f, m, config=cfg, progress=False)
    small = register_pair(f * scale, m * scale, config=cfg, progress=False)
    assert ref.warped.shape == (1, 2, S, S, S)
    torch.testing.assert_close(small.ddf, ref.ddf, atol=0.05, rtol=0)  # rounding only (joint: 3 voxels off)
    # and FLAIR counts: registering on T1 alone gives another field
    t1_only = register_pair(f[:1], m[:1], config=cfg, progress=False)
    assert float((t1_only.ddf - ref.ddf).abs().max()) > 0.5


# ---- trained models with multi-channel images -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_channel_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reg2ch")
    torch.manual_seed(0)
    net = RegistrationNet(3, in_channels=4, num_channel_initial=4, depth=2)  # 2 channels per image
    with torch.no_grad():  # a non-identity network, so the warp does something
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = folder / "reg2ch.pt"
    save_model(ckpt, net, {"spatial_dims": 3, "in_channels": 4, "num_channel_initial": 4, "depth": 2}, [S, S, S])
    images = []
    for s in range(2):
        img, lab = _subject(10 + s)
        images.append((_save(folder / f"img{s}.nii.gz", img), _save(folder / f"lab{s}.nii.gz", lab),
                       _save(folder / f"t1_{s}.nii.gz", np.ascontiguousarray(img[..., 0]))))
    return ckpt, images


def test_register_with_model_checks_the_channels(two_channel_model):
    ckpt, _ = two_channel_model
    net, info = load_model_info(ckpt)
    assert info.in_channels == 2
    x = torch.rand(1, 2, S, S, S)
    res = register_with_model(x, x.flip(2), net, info)
    assert res.warped.shape == (1, 2, S, S, S)
    with pytest.raises(ValueError, match=r"expects 2-channel images \(model.in_channels=2\).*1 channel"):
        register_with_model(x[:, :1], x[:, :1], net, info)
    with pytest.raises(ValueError, match="same channels"):
        register_with_model(x, x[:, :1], net, ModelInfo([S, S, S]))


def test_cli_register_with_a_two_channel_model(tmp_path, two_channel_model, capsys):
    ckpt, images = two_channel_model
    (f, fl, f_t1), (m, ml, m_t1) = images
    out = tmp_path / "out"
    rc = cli.main(["register", f, m, "--model", str(ckpt), "--fixed-labels", fl, "--moving-labels", ml,
                   "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == (S, S, S, 2)  # all channels written, channels last
    data = np.asarray(warped.dataobj)
    assert data[..., 1].std() > 0.1  # FLAIR normalized on its own, not squashed near 0
    assert (out / "overlay.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"dice_before", "dice_after", "lncc_before", "lncc_after"} <= set(metrics)
    # 3D (1-channel) images to a 2-channel network: a clear error naming the checkpoint and the setting
    capsys.readouterr()
    rc = cli.main(["register", f_t1, m_t1, "--model", str(ckpt), "--out", str(tmp_path / "o2"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"checkpoint {ckpt} expects 2-channel images (model.in_channels=2)" in err and f_t1 in err
    assert "Traceback" not in err


def test_cli_register_multichannel_without_a_model(tmp_path, capsys):
    f, _ = _subject(3)
    m, _ = _subject(4)
    fp, mp = _save(tmp_path / "f.nii.gz", f), _save(tmp_path / "m.nii.gz", m)
    args = ["--affine-levels", "2", "--deform-levels", "2", "--affine-iters", "3", "--deform-iters", "3",
            "--no-progress", "--device", "cpu"]
    assert cli.main(["register", fp, mp, "--out", str(tmp_path / "o3"), *args]) == 0, capsys.readouterr().err
    assert nib.load(tmp_path / "o3" / "warped.nii.gz").shape == (S, S, S, 2)
    # NIfTI vector layout (X, Y, Z, 1, C) reads the same
    vp = _save(tmp_path / "mv.nii.gz", m[:, :, :, None, :])
    assert cli.main(["register", fp, vp, "--out", str(tmp_path / "o4"), *args]) == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "o4" / "warped.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "o3" / "warped.nii.gz").get_fdata())
    # 2D with channels: (X, Y, 1, C)
    f2, m2 = (_save(tmp_path / f"{k}2d.nii.gz", np.ascontiguousarray(a[:, :, S // 2 : S // 2 + 1]))
              for k, a in (("f", f), ("m", m)))
    assert cli.main(["register", f2, m2, "--out", str(tmp_path / "o5"), *args]) == 0, capsys.readouterr().err
    assert nib.load(tmp_path / "o5" / "warped.nii.gz").shape == (S, S, 1, 2)
    # different channel counts
    capsys.readouterr()
    one = _save(tmp_path / "one.nii.gz", np.ascontiguousarray(m[..., 0]))
    assert cli.main(["register", fp, one, "--out", str(tmp_path / "o6"), *args]) == 1
    assert "has 2 channel(s) but the moving image" in capsys.readouterr().err


# ---- the task's label classes ------------------------------------------------------------------------------


def _task_cfg(tmp_path, images, labels, val_images=(), val_labels=(), steps=2, **task_args):
    return {
        "task": "registration",
        "data": {"train_images": list(images), "train_labels": list(labels), "val_images": list(val_images),
                 "val_labels": list(val_labels), "shape": [S, S, S], "normalize": "none"},
        "augment": {"rotation": 3.0, "deform_magnitude": 0.5, "gamma": 0.0, "intensity_scale": 0.0,
                    "intensity_shift": 0.0, "noise_std": 0.0},
        "model": {"name": "localnet", "spatial_dims": 3, "in_channels": 2, "channels": [4, 8]},
        "trainer": {"out_dir": str(tmp_path / "run"), "max_steps": steps, "batch_size": 1, "val_every": steps,
                    "checkpoint_every": steps, "progress": False, "tensorboard": False, "plots": False,
                    "device": "cpu", "threads": 1},
        "task_args": {"pairing": "pairs", "dice_weight": 1.0, "val_pairs": 1, **task_args},
    }


@pytest.fixture(scope="module")
def brats_like(tmp_path_factory):
    """3 training subjects with labels {0, 1, 2, 4}, the FIRST without label 4 (as BraTS cases without
    enhancing tumour), and one validation subject with a label 5 no training subject has."""
    folder = tmp_path_factory.mktemp("bratslike")
    out = {"images": [], "labels": []}
    for s, top in enumerate((None, 4, 4)):
        img, lab = _subject(20 + s, top)
        out["images"].append(_save(folder / f"img{s}.nii.gz", img))
        out["labels"].append(_save(folder / f"lab{s}.nii.gz", lab))
    img, lab = _subject(30, 5)
    out["val_images"] = [_save(folder / "val.nii.gz", img)]
    out["val_labels"] = [_save(folder / "val_lab.nii.gz", lab)]
    return out


def test_label_classes_come_from_every_label_map(tmp_path, brats_like):
    d = brats_like
    task = RegistrationTask(config_from_dict(_task_cfg(tmp_path, d["images"], d["labels"])))
    train, _ = task.build_datasets()
    assert sorted(torch.unique(train.subjects[0]["label"]).tolist()) == [0, 1, 2]
    assert task.num_classes == 5  # labels up to 4 (before: 3, from the first subject: label 4 merged into 2)
    task = RegistrationTask(config_from_dict(_task_cfg(tmp_path, d["images"], d["labels"], d["val_images"],
                                                       d["val_labels"])))
    task.build_datasets()
    assert task.num_classes == 6  # the validation subject's label 5
    # the atlas's labels count too
    atlas_img, atlas_lab = _subject(40, 7)
    cfg = _task_cfg(tmp_path, d["images"], d["labels"], pairing="atlas",
                    fixed_image=_save(tmp_path / "atlas.nii.gz", atlas_img),
                    fixed_label=_save(tmp_path / "atlas_lab.nii.gz", atlas_lab))
    task = RegistrationTask(config_from_dict(cfg))
    task.build_datasets()
    assert task.num_classes == 8


def test_a_label_beyond_the_classes_is_an_error_not_a_merge(tmp_path, brats_like):
    d = brats_like
    task = RegistrationTask(config_from_dict(_task_cfg(tmp_path, d["images"], d["labels"], augment_fixed=False)))
    train, _ = task.build_datasets()
    model = task.build_model()
    item = train[train.pairs.index((1, 2))]  # both hold label 4
    batch = {"moving": item["moving"][None], "fixed": item["fixed"][None],
             "moving_label": item["moving_label"][None], "fixed_label": item["fixed_label"][None],
             "files": [item["files"]], "seed": [0]}
    loss, metrics = task.training_step(model, batch, torch.device("cpu"))
    assert torch.isfinite(loss) and 0 <= metrics["dice_loss"] <= 1
    bad = dict(batch, moving_label=batch["moving_label"].clone())
    bad["moving_label"][0, 8, 8, 8] = 9  # a value no label map holds
    with pytest.raises(DatasetError, match=r"label value\(s\) \[9\].*img1.nii.gz -> .*img2.nii.gz.*5 classes"):
        task.training_step(model, bad, torch.device("cpu"))


def test_train_two_channel_then_register_with_the_trainer_checkpoint(tmp_path, brats_like, capsys):
    d = brats_like
    res = Trainer(config_from_dict(_task_cfg(tmp_path, d["images"], d["labels"], d["val_images"],
                                             d["val_labels"]))).fit()
    assert "dice_after" in res["validation"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    _, info = load_model_info(ckpt)
    assert info.in_channels == 2
    out = tmp_path / "out"
    assert cli.main(["register", d["images"][1], d["images"][2], "--model", str(ckpt), "--out", str(out),
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    assert nib.load(out / "warped.nii.gz").shape == (S, S, S, 2)
    one = _save(tmp_path / "one.nii.gz", np.ascontiguousarray(nib.load(d["images"][1]).get_fdata()[..., 0]))
    capsys.readouterr()
    assert cli.main(["register", one, one, "--model", str(ckpt), "--out", str(tmp_path / "o2"), "--device",
                     "cpu"]) == 1
    assert "expects 2-channel images (model.in_channels=2)" in capsys.readouterr().err
