"""Edge cases of the classification task: image modes (16-bit, CMYK, palette), mixed channels, argument
validation of the data set, the encoders, Grad-CAM and the simulator, ordinal classes, and predict leaving
no partial output."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medfast.data import DatasetError, collate
from medfast.tasks.classification import ImageFolderDataset, make_encoder, read_image
from medfast.train import ConfigError

Image = pytest.importorskip("PIL.Image")


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path)
    return path


# ---- 1. 16-bit grey PNGs and the integer / float modes -----------------------------------------------------
def test_16bit_png_keeps_its_levels(tmp_path):
    a16 = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = _png(tmp_path / "grad16.png", a16)
    assert Image.open(path).mode.startswith("I")
    img = read_image(path)
    assert img.shape == (1, 8, 8) and len(np.unique(img)) == 64
    np.testing.assert_allclose(img[0], a16 / 65535.0, atol=1e-6)


def test_int_and_float_modes():
    from medfast.tasks.classification.data import _pil_array

    a = np.array([[0, 1000], [40000, 65535]], dtype=np.int32)
    arr = _pil_array(Image.fromarray(a, mode="I"))
    assert arr.dtype == np.uint16 and arr.tolist() == a.tolist()
    big = Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        _pil_array(big)
    f = np.array([[0.25, -1.5]], dtype=np.float32)
    assert _pil_array(Image.fromarray(f, mode="F")).tolist() == f.tolist()
    b16 = Image.frombytes("I;16B", (2, 1), np.array([[3, 60000]], dtype=">u2").tobytes())
    out = _pil_array(b16)
    assert out.dtype == np.uint16 and out.tolist() == [[3, 60000]]


# ---- 2. CMYK, palette and grey + alpha ---------------------------------------------------------------------
def test_cmyk_palette_and_la_modes(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(red).convert("CMYK").save(cmyk)
    assert Image.open(cmyk).mode == "CMYK"
    img = read_image(cmyk)
    assert img.shape == (3, 8, 8)
    np.testing.assert_allclose(img.reshape(3, -1).mean(1), [1, 0, 0], atol=0.05)
    pal = _png(tmp_path / "p.png", red, "P")
    assert Image.open(pal).mode == "P"
    img = read_image(pal)
    assert img.shape == (3, 8, 8) and img.reshape(3, -1)[:, 0].tolist() == [1, 0, 0]
    g = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    la = read_image(_png(tmp_path / "la.png", g, "LA"))
    assert la.shape == (1, 8, 8)
    np.testing.assert_allclose(la[0], g / 255.0, atol=1e-6)


# ---- 3. mixed grey / colour folders ------------------------------------------------------------------------
def _mixed_folder(root, n=4, size=12, mixed=True):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(n):
            shape = (size, size) if i % 2 or not mixed else (size, size, 3)
            _png(root / c / f"{i}.png", rng.integers(0, 255, shape, dtype=np.uint8))
    return root


def test_mixed_channels_error_at_construction_or_converted(tmp_path):
    root = _mixed_folder(tmp_path / "mix")
    with pytest.raises(DatasetError, match=r"a/1.png: 1 channel\(s\) but .*a/0.png has 3"):
        ImageFolderDataset(root)
    for c in (1, 3):
        ds = ImageFolderDataset(root, channels=c)
        assert collate([ds[i] for i in range(len(ds))])["image"].shape == (8, c, 12, 12)
    rng = np.random.default_rng(1)
    for c in ("a", "b"):  # all colour: channels as stored
        _png(tmp_path / "rgb" / c / "0.png", rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path / "rgb")
    assert ds.num_channels == 3 and ds[0]["image"].shape == (3, 6, 6)


def _config_text(root, out, extra_args="", encoding="nominal", steps=2):
    return f"""
task: classification
data: {{root: {root}, shape: [16, 16], normalize: minmax, val_fraction: 0.25, cache: none
        {extra_args}}}
model: {{name: sononet, spatial_dims: 2, in_channels: 1, out_channels: 2, channels: [4],
        kwargs: {{encoding: {encoding}, convs_per_block: [1, 1]}}}}
optim: {{lr: 0.001}}
trainer: {{out_dir: {out}, batch_size: 4, max_steps: {steps}, val_every: {steps}, checkpoint_every: {steps},
          progress: false, tensorboard: false, plots: false, threads: 1, device: cpu}}
"""


def _train(tmp, mixed):
    """A 1-channel SonoNet trained (2 steps) on a folder of grey PNGs, or of grey and colour PNGs."""
    from medfast.cli import main

    root = _mixed_folder(tmp / "img", mixed=mixed)
    cfg = tmp / "cls.yaml"
    cfg.write_text(_config_text(root, tmp / "run"))
    assert main(["train", str(cfg)]) == 0
    return tmp


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("grey"), mixed=False)


def test_train_and_predict_on_mixed_grey_and_colour(tmp_path):
    from medfast.cli import main

    mixed_run = _train(tmp_path / "mixed", mixed=True)  # collate: every batch has 1 channel
    files = [str(mixed_run / "img" / "a" / "0.png"), str(mixed_run / "img" / "b" / "1.png")]  # colour, grey
    assert main(["predict", *files, "--model", str(mixed_run / "run" / "checkpoints" / "last.pt"),
                 "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [r["file"] for r in rows] == files and all(r["class"] in ("a", "b") for r in rows)
    assert len(list((tmp_path / "pred" / "cam").glob("*.png"))) == 2


def test_predict_checks_channels_against_the_model(grey_run, tmp_path):
    from medfast.tasks.classification.task import predict_files

    ckpt = grey_run / "run" / "checkpoints" / "last.pt"
    rgb = _png(tmp_path / "rgb.png", np.zeros((12, 12, 3), np.uint8))
    assert predict_files(ckpt, [rgb], tmp_path / "p", device="cpu")[0].is_file()  # converted to grey
    with pytest.raises(ConfigError, match="model.in_channels=1"):
        predict_files(ckpt, [rgb], tmp_path / "q", device="cpu", overrides=["data.dataset_args.channels=3"])


def test_predict_set_takes_only_the_settings_predict_reads(grey_run, tmp_path):
    # before: trainer.*, optim.*, model.* and data.dataset_args.classes were accepted and ignored (or broke the net)
    from medfast.tasks.classification.task import predict_files

    ckpt = grey_run / "run" / "checkpoints" / "last.pt"
    img = _png(tmp_path / "g.png", np.zeros((12, 12), np.uint8))
    for bad in ("trainer.max_steps=-3", "optim.lr=-1", "model.channels=[1,2]", "data.dataset_args.classes=[x,y]"):
        with pytest.raises(ConfigError, match="medfast predict does not read"):
            predict_files(ckpt, [img], tmp_path / "q", device="cpu", overrides=[bad])
    assert not (tmp_path / "q").exists()
    assert predict_files(ckpt, [img], tmp_path / "p", device="cpu", overrides=["data.normalize=minmax"])[0].is_file()


# ---- 9. predict writes nothing when an input is bad --------------------------------------------------------
def test_predict_reads_all_inputs_before_writing(grey_run, tmp_path, capsys):
    from medfast.cli import main

    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    out = tmp_path / "pred"
    assert main(["predict", str(grey_run / "img" / "a" / "1.png"), str(bad), "--model",
                 str(grey_run / "run" / "checkpoints" / "last.pt"), "--out", str(out)]) == 1
    assert "corrupt.png" in capsys.readouterr().err
    assert not (out / "predictions.csv").exists() and not (out / "cam").exists()


def test_a_failed_predictions_write_keeps_the_previous_csv(grey_run, tmp_path, monkeypatch):
    # predictions.csv goes through medfast._atomic.replacing: Ctrl-C after some rows leaves the previous file whole
    # and no temporary one
    from medfast.tasks.classification.task import predict_files

    ckpt, images = grey_run / "run" / "checkpoints" / "last.pt", grey_run / "img" / "a"
    out = tmp_path / "pred"
    path = predict_files(ckpt, [images / "0.png"], out, device="cpu", save_cam=False)[0]
    before = path.read_text()

    def stopped(self, rows):
        self.writerow(rows[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", stopped)
    with pytest.raises(KeyboardInterrupt):
        predict_files(ckpt, [images / "1.png", images / "2.png"], out, device="cpu", save_cam=False)
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in out.iterdir()] == ["predictions.csv"]


# ---- 4. simulator arguments --------------------------------------------------------------------------------
NAN = float("nan")


@pytest.mark.parametrize("key,value", [
    ("dynamic_range_db", (0.0, 0.0)), ("dynamic_range_db", (-50.0, -40.0)), ("dynamic_range_db", (50.0,)),
    ("dynamic_range_db", (60.0, 45.0)), ("max_rotation_deg", NAN), ("tgc_db_cm_mhz", NAN), ("gain_db", (NAN, 0.0)),
    ("gel_mm", (-30.0, -20.0)), ("gel_mm", (1.0, 2.0, 3.0)), ("sub_rays", 0), ("sub_rays", -1), ("voxel_mm", 0.0),
    ("voxel_mm", -2.0), ("max_shift_mm", -1.0), ("variants", 2.5), ("planes", "coronal"), ("probes", "C5-2v"),
])
def test_simulator_rejects_bad_arguments(key, value):
    from medfast.tasks.classification import SimulatedUltrasound

    with pytest.raises(ValueError, match=key):
        SimulatedUltrasound(volumes=["phantom:1"], val_volumes=[], **{key: value})


@pytest.mark.parametrize("spec,match", [
    ([[0, 0, 0], [0, 0, 0], [1, 0, 0]], "beam direction .* is zero"),
    ([[0, 0, 0], [0, 0, -1], [0, 0, 1]], "parallel to the beam"),
    ([[0, 0, 0], [0, 0, -1], [NAN, 1, 0]], "3 x 3 finite"),
])
def test_simulator_rejects_degenerate_custom_planes(spec, match):
    from medfast.tasks.classification import SimulatedUltrasound

    with pytest.raises(ValueError, match=rf"custom_planes\['bad'\].*{match}"):
        SimulatedUltrasound(volumes=["phantom:1"], val_volumes=[], planes=["coronal", "bad"],
                            custom_planes={"bad": spec})


def test_simulator_argument_errors_are_clean_in_medfast_train(tmp_path, capsys):
    from medfast.cli import main
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import load_config

    cfg = tmp_path / "sim.yaml"
    cfg.write_text(f"""
task: classification
data: {{dataset: simulated_ultrasound, shape: [16, 16],
        dataset_args: {{volumes: ["phantom:1"], val_volumes: [], dynamic_range_db: [0, 0]}}}}
model: {{name: sononet, spatial_dims: 2, out_channels: 4, channels: [4], kwargs: {{convs_per_block: [1, 1]}}}}
trainer: {{out_dir: {tmp_path / 'run'}, max_steps: 1, progress: false, tensorboard: false, device: cpu}}
""")
    with pytest.raises(ConfigError, match=r"data.dataset_args: dynamic_range_db"):
        ClassificationTask(load_config(cfg)).build_datasets()
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "medfast train: error: data.dataset_args: dynamic_range_db" in err and "Traceback" not in err


def test_held_out_sets_are_not_training_data(tmp_path):
    """A held-out volume that is a training volume (same name, the same phantom seed, or the same file under
    another name) is refused, and so is a held-out-pose set with one pose bin (the training distribution),
    in the constructor (ValueError) and in the config check of medfast train (ConfigError)."""
    import nibabel as nib

    from medfast.tasks.classification import SimulatedUltrasound
    from medfast.tasks.classification.task import check_config
    from medfast.train import load_config

    t1 = np.zeros((24, 24, 24), np.float32)
    t1[4:20, 4:20, 4:20] = 1.0
    nib.save(nib.Nifti1Image(t1, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "t1.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "t1.nii.gz")
    same_file = {"name": "other", "path": str(tmp_path / "link.nii.gz")}
    kw = dict(n_lines=16, n_samples=32, sub_rays=1, image_shape=(16, 16), variants=1)
    for vols, vals, match in (
            (["phantom:1", "phantom:2"], ["phantom:2"], "'phantom:2' is also a training volume"),
            (["phantom:0"], ["phantom"], "'phantom' is the training volume 'phantom:0'"),
            ([{"path": str(tmp_path / "t1.nii.gz")}], [same_file], "'other' is the training volume 't1'")):
        with pytest.raises(ValueError, match=f"val_volumes: {match}"):
            SimulatedUltrasound(volumes=vols, val_volumes=vals, **kw)
        with pytest.raises(ConfigError, match=f"data.dataset_args.val_volumes: {match}"):
            SimulatedUltrasound.check_args({"volumes": vols, "val_volumes": vals})
    (tmp_path / "s2").mkdir()  # two subjects' files of one name (s1/t1.nii.gz, s2/t1.nii.gz) are two volumes
    nib.save(nib.Nifti1Image(t1[::-1].copy(), np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "s2" / "t1.nii.gz")
    SimulatedUltrasound.check_args({"volumes": [{"path": str(tmp_path / "t1.nii.gz")}],
                                    "val_volumes": [{"path": str(tmp_path / "s2" / "t1.nii.gz")}]})
    with pytest.raises(ConfigError, match="'colin27' is also a training volume"):  # the default training volumes
        SimulatedUltrasound.check_args({"val_volumes": ["colin27"]})
    sim = SimulatedUltrasound(volumes=["phantom:1"], val_volumes=["phantom:2"], pose_bins=1, **kw)
    sim.train_dataset(4)  # one bin is fine for training alone
    with pytest.raises(ValueError, match="pose_bins=1: held-out poses need pose_bins >= 2"):
        sim.validation_datasets(4)
    assert len(SimulatedUltrasound(volumes=["phantom:1"], val_volumes=["phantom:2"], pose_bins=2,
                                   **kw).validation_datasets(4)) == 2
    cfg = tmp_path / "sim.yaml"
    for args, match in (("val_volumes: [phantom:1]", "val_volumes: 'phantom:1' is also a training volume"),
                        ("val_volumes: [], pose_bins: 1", r"pose_bins=1: the held_out_poses .* pose_bins >= 2")):
        cfg.write_text(f"""
task: classification
data: {{dataset: simulated_ultrasound, shape: [16, 16], dataset_args: {{volumes: [phantom:1], {args}}}}}
model: {{name: sononet, spatial_dims: 2, out_channels: 4, channels: [4], kwargs: {{convs_per_block: [1, 1]}}}}
trainer: {{out_dir: {tmp_path / 'run'}, max_steps: 1, progress: false, tensorboard: false, device: cpu}}
""")
        with pytest.raises(ConfigError, match=match):
            check_config(load_config(cfg))


# ---- 5. encoders -------------------------------------------------------------------------------------------
def test_encoders_check_output_widths_and_indices():
    ordinal = make_encoder("ordinal", 4)
    with pytest.raises(ValueError, match=r"\(N, 3\) for the ordinal encoding of 4 classes, got \(2, 5\)"):
        ordinal.decode(torch.randn(2, 5), logits=True)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ordinal.probabilities(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ordinal.decode(torch.randn(2, 2))
    binary = make_encoder("binary", 2)
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        binary.decode(torch.randn(2, 2), logits=True)
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        binary.probabilities(torch.randn(2, 3))
    assert binary.decode(torch.tensor([2.0, -1.0]), logits=True).tolist() == [1, 0]
    nominal = make_encoder("nominal", 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        nominal.probabilities(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        nominal.decode(torch.randn(2, 3, 4))
    for bad in ([-1], [3]):
        with pytest.raises(ValueError, match=r"\[0, 2\]"):
            nominal.names(torch.tensor(bad))
    assert nominal.names(torch.tensor([2, 0])) == ["c", "a"]
    with pytest.raises(ValueError, match="duplicate class names"):
        make_encoder("nominal", 3, ["a", "a", "b"])
    with pytest.raises(ValueError, match="duplicate class names"):
        make_encoder("ordinal", 3, ["low", "high", "low"])


def test_encoders_refuse_non_integer_labels():
    """Float labels must be whole numbers, as the metrics require (0.7 is not class 0, 2.99 not class 2);
    whole-number floats are indices. Nominal decode reads a 1-D tensor as indices, so scores there are an
    error; the binary encoding's documented 1-D path is one logit per sample."""
    from medfast.tasks.classification.metrics import confusion_matrix

    with pytest.raises(ValueError, match="whole numbers"):
        confusion_matrix([0.7], [0], 3)  # the metrics' rule the encoders share
    for enc, k in (("nominal", 3), ("binary", 2), ("ordinal", 4)):
        e = make_encoder(enc, k)
        for bad in (torch.tensor([0.7, 1.0]), [1, 0.7], torch.tensor([1.0, float("nan")]), np.array([0.5])):
            with pytest.raises(ValueError, match="whole numbers"):
                e.encode(bad)
        assert e.index(torch.tensor([1.0, 0.0])).tolist() == [1, 0] == e.index([1.0, np.int64(0)]).tolist()
    assert make_encoder("ordinal", 4).encode(torch.tensor([2.0])).tolist() == [[1.0, 1.0, 0.0]]
    nominal = make_encoder("nominal", 3)
    with pytest.raises(ValueError, match=r"read as class indices .*\(N, 3\)"):
        nominal.decode(torch.tensor([0.9, 0.6]))
    assert nominal.decode(torch.tensor([2.0, 0.0])).tolist() == [2, 0]
    assert make_encoder("binary", 2).decode(torch.tensor([0.9, -0.6])).tolist() == [1, 0]  # logits (N,)


# ---- 6. ImageFolderDataset arguments, CSV encoding, constant images, empty class folders -------------------
def _two_classes(root, shape=(6, 6)):
    for c in ("x", "y"):
        _png(root / c / "0.png", np.full(shape, 7, np.uint8))
    return root


def test_folder_dataset_argument_validation(tmp_path):
    root = _two_classes(tmp_path / "d")
    with pytest.raises(ValueError, match=r"classes lists \['x'\] more than once"):
        ImageFolderDataset(root, classes=["x", "y", "x"])
    with pytest.raises(ValueError, match="classes must be a list"):
        ImageFolderDataset(root, classes="xy")
    for c in (0, 2, 4):
        with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
            ImageFolderDataset(root, channels=c)
    for size in ((0, 0), (-4, 8)):
        with pytest.raises(ValueError, match="positive integer sizes"):
            ImageFolderDataset(root, size=size)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        ImageFolderDataset(root, spatial_dims=4)


def test_csv_encodings(tmp_path):
    root = _two_classes(tmp_path / "d")
    bom = tmp_path / "bom.csv"
    bom.write_text("file,label\nx/0.png,x\ny/0.png,y\n", encoding="utf-8-sig")
    assert ImageFolderDataset(root, csv_file=bom).classes == ["x", "y"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("file,label\nx/0.png,caf\xe9\ny/0.png,y\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin.csv: label CSV is not UTF-8"):
        ImageFolderDataset(root, csv_file=latin)


def test_constant_and_one_pixel_images_zscore_to_zero(tmp_path):
    for shape in ((1, 1), (5, 5)):
        root = _two_classes(tmp_path / f"d{shape[0]}", shape)
        x = ImageFolderDataset(root, normalize="zscore")[0]["image"]
        assert torch.isfinite(x).all() and torch.all(x == 0)


def test_empty_class_folder_is_an_error(tmp_path):
    root = _two_classes(tmp_path / "d")
    (root / "z").mkdir()
    (root / "z" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError, match=r"d/z: class folder without images"):
        ImageFolderDataset(root)
    with pytest.raises(DatasetError, match=r"d/z: class folder without images"):
        ImageFolderDataset(root, classes=["x", "y", "z"])
    assert ImageFolderDataset(root, classes=["x", "y"]).classes == ["x", "y"]  # not a class: ignored


# ---- 7. ordinal labels need the class order ----------------------------------------------------------------
def test_ordinal_needs_explicit_classes(tmp_path, capsys):
    from medfast.cli import main
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import load_config

    root = _two_classes(tmp_path / "d")
    cfg = tmp_path / "ord.yaml"
    cfg.write_text(_config_text(root, tmp_path / "run", encoding="ordinal"))
    with pytest.raises(ConfigError, match="encoding='ordinal' needs data.dataset_args.classes"):
        ClassificationTask(load_config(cfg))
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 1
    assert "needs data.dataset_args.classes" in capsys.readouterr().err
    cfg.write_text(_config_text(root, tmp_path / "run", ", dataset_args: {classes: [y, x, x]}", "ordinal"))
    with pytest.raises(ConfigError, match="more than once"):
        ClassificationTask(load_config(cfg))
    cfg.write_text(_config_text(root, tmp_path / "run", ", dataset_args: {classes: [y, x], channels: 2}",
                                "ordinal"))
    with pytest.raises(ConfigError, match="channels must be 1"):
        ClassificationTask(load_config(cfg))
    cfg.write_text(_config_text(root, tmp_path / "run", ", dataset_args: {classes: [y, x]}", "ordinal"))
    task = ClassificationTask(load_config(cfg))
    train, _ = task.build_datasets()
    assert task.encoder.class_names == ["y", "x"]


# ---- 8. Grad-CAM targets and titles ------------------------------------------------------------------------
@pytest.mark.parametrize("encoding,k,bad", [("nominal", 3, [0, 7]), ("nominal", 3, [0, -1]), ("binary", 2, [0, -1]),
                                            ("binary", 2, [2, 0]), ("ordinal", 4, [0, 4]), ("ordinal", 4, [-1, 1])])
def test_cam_rejects_targets_outside_the_classes(encoding, k, bad):
    from medfast.nets import SonoNet
    from medfast.tasks.classification import class_activation_map

    torch.manual_seed(0)
    model = SonoNet(1, k, encoding, width=4, convs_per_block=(1, 1)).eval()
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=rf"target .* outside the valid classes \[0, {k - 1}\]"):
        class_activation_map(model, x, target=bad, encoding=encoding)
    cam, t = class_activation_map(model, x, target=[0, k - 1], encoding=encoding)
    assert cam.shape == (2, 16, 16) and t.tolist() == [0, k - 1]


@pytest.mark.parametrize("case", ["frozen", "no_grad", "inference_mode", "float64", "float64_model_float32_image"])
def test_cam_of_frozen_float64_and_inference_mode_models(case):
    """A frozen classifier, torch.no_grad / torch.inference_mode callers and float64 models: the same maps as the
    plain call (was: "can't retain_grad on Tensor that has requires_grad=False", and a float32 image cast for a
    float64 model); the parameters get no gradient and keep their requires_grad."""
    import contextlib
    import copy

    from medfast.nets import ResNetClassifier
    from medfast.tasks.classification import class_activation_map

    torch.manual_seed(0)
    model = ResNetClassifier(spatial_dims=2, width=4, num_classes=3).eval()
    x = torch.rand(2, 1, 32, 32)
    ref, ref_t = class_activation_map(model, x)
    m, img, ctx = copy.deepcopy(model), x, contextlib.nullcontext()
    if case == "frozen":
        m.requires_grad_(False)
    elif case == "no_grad":
        ctx = torch.no_grad()
    elif case == "inference_mode":
        ctx = torch.inference_mode()
    elif case == "float64":
        m, img = m.double(), x.double()
    else:
        m = m.double()
    with ctx:
        cam, t = class_activation_map(m, img)
    assert cam.dtype == torch.float32 and t.tolist() == ref_t.tolist()
    torch.testing.assert_close(cam, ref, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad == (case != "frozen") for p in m.parameters())


def test_cam_names_inference_mode_parameters():
    from medfast.nets import ResNetClassifier
    from medfast.tasks.classification import class_activation_map

    with torch.inference_mode():
        model = ResNetClassifier(spatial_dims=2, width=4, num_classes=3).eval()
    with pytest.raises(RuntimeError, match=r"created under torch.inference_mode\(\)"):
        class_activation_map(model, torch.rand(1, 1, 16, 16))


def test_save_cam_png_title_count(tmp_path):
    from medfast.tasks.classification import save_cam_png

    imgs, cams = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match="titles has 1 entries for 2 images"):
        save_cam_png(imgs, cams, tmp_path / "c.png", titles=["a"])
    assert save_cam_png(imgs, cams, tmp_path / "c.png", titles=["a", "b"]).read_bytes()[:4] == b"\x89PNG"


def test_model_channels_other_than_a_doubling_are_refused(tmp_path):
    """The networks take model.channels[0] and double it per stage: a list that says otherwise was silently read as
    its first entry; now a ConfigError naming model.channels (a doubling list, the default, stays valid)."""
    from medfast.tasks.classification.task import check_config
    from medfast.train import load_config

    cfg = tmp_path / "cls.yaml"

    def config(channels):
        cfg.write_text(f"""
task: classification
data: {{dataset: simulated_ultrasound, shape: [16, 16],
       dataset_args: {{volumes: [phantom:1], val_volumes: [phantom:2]}}}}
model: {{name: resnet, spatial_dims: 2, out_channels: 4, channels: {channels}}}
trainer: {{out_dir: {tmp_path / 'run'}, max_steps: 1, progress: false, tensorboard: false, device: cpu}}
""")
        return load_config(cfg)

    for ok in ("[8]", "[8, 16, 32]", "[16, 32, 64, 128]"):
        check_config(config(ok))
    for bad, match in (("[32, 32, 64]", r"model.channels=\[32, 32, 64\].*\[32, 64, 128\]"),
                       ("[16, 24]", r"model.channels=\[16, 24\]"), ("[0]", "positive ints")):
        with pytest.raises(ConfigError, match=match):
            check_config(config(bad))
    check_config(config("[16, 24]"), refuse_unused=False)  # a trained checkpoint's config still loads
