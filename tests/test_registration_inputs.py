"""Input checking of the registration task and `medfast register`: training task_args types and ranges,
--dice-weight without labels, 2D images in any plane, single-slice volumes, bad affines, RGB / complex
voxels and unusable output folders."""

from pathlib import Path

import numpy as np
import pytest

from medfast.cli import main
from medfast.train.config import ConfigError

nib = pytest.importorskip("nibabel")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reg_demo_cpu.yaml"
AXIAL = np.array([[2.0, 0, 0, -20], [0, 2, 0, -30], [0, 0, 1, 5], [0, 0, 0, 1]])
CORONAL = np.array([[2.0, 0, 0, -20], [0, 0, 1, 5], [0, 2, 0, -30], [0, 0, 0, 1]])  # plane x-z
_C, _S = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE = np.array([[2.0, 0, 0, -20], [0, 2 * _C, -_S, -30], [0, 2 * _S, _C, 5], [0, 0, 0, 1]])  # 30 deg about x
FAST = ["--affine-levels", "2,1", "--deform-levels", "", "--affine-iters", "60", "--kernel-size", "5",
        "--device", "cpu", "--no-progress"]


def _blobs(n=32):
    """A smooth 2D image of four Gaussian blobs (distinct sizes and heights: a unique alignment)."""
    g = np.mgrid[0:n, 0:n].astype(np.float64)
    img = np.zeros((n, n))
    for cx, cy, s, a in [(12, 14, 4, 1.0), (20, 18, 3, 0.6), (15, 23, 2.5, 0.8), (22, 9, 2, 0.5)]:
        img += a * np.exp(-((g[0] - cx) ** 2 + (g[1] - cy) ** 2) / (2 * s * s))
    return img.astype(np.float32)


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return str(path)


def _shifted(affine, shift):
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] += shift
    return out


def _mean_ddf(out):
    """Mean stored ddf.nii.gz vector over the central 16 x 16 pixels of a 32 x 32 image (any slice layout)."""
    d = np.asarray(nib.load(out / "ddf.nii.gz").dataobj)[:, :, :, 0, :]
    d = d.reshape(*[s for s in d.shape[:3] if s != 1], d.shape[-1])  # the flat axis dropped
    return d[8:24, 8:24].reshape(-1, d.shape[-1]).mean(0)


# ---- training task_args --------------------------------------------------------------------------------


def _task(*overrides):
    from medfast.train import get_task, load_config

    return get_task("registration")(load_config([str(DEMO_CONFIG)], list(overrides)))


@pytest.mark.parametrize("override, match", [
    ('task_args.velocity="false"', "task_args.velocity must be true or false"),
    ("task_args.global_net=1", "task_args.global_net must be true or false"),
    ('task_args.augment_fixed="no"', "task_args.augment_fixed must be true or false"),
    ("task_args.kernel_size=7.9", "task_args.kernel_size must be an int"),
    ("task_args.kernel_size=abc", "task_args.kernel_size must be an int"),
    ("task_args.integration_steps=100", r"task_args.integration_steps must be in 0\.\.64"),
    ("task_args.integration_steps=-1", r"task_args.integration_steps must be in 0\.\.64"),
    ("task_args.val_pairs=0", "task_args.val_pairs must be >= 1"),
    ("task_args.val_pairs=2.5", "task_args.val_pairs must be an int"),
    ("task_args.bending_weight=.nan", "task_args.bending_weight must be a finite number"),
    ("task_args.lncc_weight=heavy", "task_args.lncc_weight must be a number"),
])
def test_task_args_are_type_checked_not_coerced(override, match):
    with pytest.raises(ConfigError, match=match):
        _task(override)


def test_task_args_valid_values_reach_the_network():
    task = _task("task_args.velocity=true", "task_args.integration_steps=5", "task_args.kernel_size=5")
    assert task.net_kwargs["velocity"] is True and task.net_kwargs["integration_steps"] == 5
    assert task.args["kernel_size"] == 5 and task.args["augment_fixed"] is False  # the demo config's value
    assert _task().net_kwargs["velocity"] is False


def test_registration_net_rejects_non_bool_flags():
    from medfast.tasks.registration import RegistrationConfig, RegistrationNet

    with pytest.raises(TypeError, match="velocity must be True or False"):
        RegistrationNet(2, velocity="false")
    with pytest.raises(ValueError, match="integration_steps"):
        RegistrationNet(2, velocity=True, integration_steps=100)
    with pytest.raises(ValueError, match="integration_steps"):
        RegistrationConfig(integration_steps=65)


# ---- medfast register -----------------------------------------------------------------------------------


def test_dice_weight_without_label_maps_is_an_error(tmp_path, capsys):
    f = _save(tmp_path / "f.nii.gz", _blobs(), AXIAL)
    out = tmp_path / "out"
    assert main(["register", f, f, "--dice-weight", "1", "--out", str(out), *FAST]) == 1
    assert "--dice-weight needs --fixed-labels and --moving-labels" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    assert main(["register", f, f, "--dice-weight", "0", "--out", str(out), *FAST]) == 0


@pytest.mark.parametrize("plane, affine, shift, expected", [
    ("axial", AXIAL, (4, -6, 0), (-4, 6)),
    ("coronal", CORONAL, (4, 0, -6), (-4, 6)),  # was "affine_in is singular"
    ("oblique", OBLIQUE, (0, 6 * _C, 6 * _S), (0, -6)),  # 6 mm along the plane's 2nd axis (was 6 cos 30 deg)
])
def test_2d_images_in_any_plane_register_in_the_plane_frame(tmp_path, plane, affine, shift, expected):
    """The moving image is the fixed one with its header moved by ``shift`` mm within the plane: the affine
    stage recovers it, and ddf.nii.gz holds it in mm in the plane's frame with ITK's LPS signs (both in-plane
    components negated: LPS x, y for an axial image)."""
    img = _blobs()
    f = _save(tmp_path / "f.nii.gz", img, affine)
    m = _save(tmp_path / "m.nii.gz", img, _shifted(affine, shift))
    out = tmp_path / "out"
    assert main(["register", f, m, "--out", str(out), *FAST]) == 0
    assert nib.load(out / "ddf.nii.gz").shape == (32, 32, 1, 1, 2)
    np.testing.assert_allclose(nib.load(out / "warped.nii.gz").affine, affine)
    np.testing.assert_allclose(_mean_ddf(out), expected, atol=0.3)


def test_2d_images_in_different_planes_are_refused(tmp_path, capsys):
    f = _save(tmp_path / "f.nii.gz", _blobs(), AXIAL)
    m = _save(tmp_path / "m.nii.gz", _blobs(), CORONAL)
    assert main(["register", f, m, "--out", str(tmp_path / "out"), *FAST]) == 1
    assert "90 degrees apart" in capsys.readouterr().err


def test_single_slice_volumes_are_2d_images(tmp_path, capsys):
    img = _blobs()
    # (X, Y, 1) fixed against a plain 2D moving image
    f = _save(tmp_path / "f.nii.gz", img[:, :, None], AXIAL)
    m = _save(tmp_path / "m.nii.gz", img, _shifted(AXIAL, (4, -6, 0)))
    out = tmp_path / "out"
    assert main(["register", f, m, "--out", str(out), *FAST]) == 0
    assert nib.load(out / "warped.nii.gz").shape == (32, 32, 1)  # the fixed file's layout
    assert nib.load(out / "ddf.nii.gz").shape == (32, 32, 1, 1, 2)
    np.testing.assert_allclose(_mean_ddf(out), (-4, 6), atol=0.3)  # LPS x, y
    # a sagittal slice stored (1, Y, Z): its in-plane axes are the image axes
    sag = np.array([[1.0, 0, 0, 3], [0, 2, 0, -30], [0, 0, 2, -20], [0, 0, 0, 1]])
    f = _save(tmp_path / "fs.nii.gz", img[None], sag)
    m = _save(tmp_path / "ms.nii.gz", img[None], _shifted(sag, (0, 4, -6)))
    out = tmp_path / "out_sag"
    assert main(["register", f, m, "--out", str(out), *FAST]) == 0
    assert nib.load(out / "warped.nii.gz").shape == (1, 32, 32)
    assert nib.load(out / "ddf.nii.gz").shape == (1, 32, 32, 1, 3)  # world vectors, LPS
    np.testing.assert_allclose(_mean_ddf(out), (0, -4, -6), atol=0.3)
    # a single slice against a volume: both must be 2D
    vol = _save(tmp_path / "vol.nii.gz", np.repeat(img[:, :, None], 8, 2), AXIAL)
    assert main(["register", str(tmp_path / "f.nii.gz"), vol, "--out", str(tmp_path / "o3"), *FAST]) == 1
    assert "both must be 2D or both 3D" in capsys.readouterr().err


def _with_sform(path, data, matrix):
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(matrix, code=1)  # written as is (a NIfTI with a broken header)
    nib.save(img, path)
    return str(path)


@pytest.mark.parametrize("matrix", [np.zeros((4, 4)), np.diag([np.nan, 2.0, 1.0, 1.0]),
                                    np.array([[2.0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])])
def test_singular_or_non_finite_affines_are_refused_before_any_work(tmp_path, capsys, matrix):
    good = _save(tmp_path / "g.nii.gz", _blobs(), AXIAL)
    bad = _with_sform(tmp_path / "bad.nii.gz", _blobs(), matrix)
    out = tmp_path / "out"
    for f, m in ((good, bad), (bad, good)):
        assert main(["register", f, m, "--out", str(out), *FAST]) == 1
        err = capsys.readouterr().err
        assert "bad.nii.gz has a singular or non-finite affine" in err and "Traceback" not in err
        assert not out.exists()
    # a label map with a bad affine too
    lab = (_blobs() > 0.5).astype(np.int16)
    fl = _save(tmp_path / "fl.nii.gz", lab, AXIAL)
    ml = _with_sform(tmp_path / "ml.nii.gz", lab, matrix)
    assert main(["register", good, good, "--fixed-labels", fl, "--moving-labels", ml, "--out", str(out), *FAST]) == 1
    assert "ml.nii.gz has a singular or non-finite affine" in capsys.readouterr().err


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import medfast.tasks.registration as reg

    f = _save(tmp_path / "f.nii.gz", _blobs(), AXIAL)
    assert main(["register", f, f, "--out", "/proc/medfast-no-such-dir/x", *FAST]) == 1
    err = capsys.readouterr().err
    assert "--out /proc/medfast-no-such-dir/x cannot be created" in err and "Traceback" not in err

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reg, "write_outputs", full_disk)
    assert main(["register", f, f, "--out", str(tmp_path / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "No space left on device" in err and "Traceback" not in err


def test_rgb_and_complex_voxels_are_refused_naming_the_file(tmp_path, capsys):
    good = _save(tmp_path / "g.nii.gz", _blobs(), AXIAL)
    rgb = np.zeros((32, 32), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = (_blobs() * 255).astype(np.uint8)
    rgb_path = _save(tmp_path / "rgb.nii.gz", rgb, AXIAL)
    cx_path = _save(tmp_path / "cx.nii.gz", _blobs().astype(np.complex64) * (1 + 1j), AXIAL)
    for f, m, match in ((good, rgb_path, "rgb.nii.gz holds RGB"), (cx_path, good, "cx.nii.gz holds complex")):
        assert main(["register", f, m, "--out", str(tmp_path / "out"), *FAST]) == 1
        assert match in capsys.readouterr().err


def test_grid_affines_axial_is_rows_and_columns_0_1_3():
    from medfast.tasks.registration import grid_affines

    a, a_f = grid_affines(_shifted(AXIAL, (1, 2, 7)), AXIAL, 2)
    np.testing.assert_allclose(a_f, AXIAL[np.ix_([0, 1, 3], [0, 1, 3])])
    np.testing.assert_allclose(a[:2, 2], AXIAL[:2, 3] + (1, 2))  # the depth offset is dropped
    a3, a3_f = grid_affines(AXIAL, _shifted(AXIAL, (1, 2, 7)), 3)
    np.testing.assert_allclose(a3, AXIAL)
    np.testing.assert_allclose(a3_f[:3, 3], AXIAL[:3, 3] + (1, 2, 7))


@pytest.mark.parametrize("shape, flat", [((16, 16, 1), 2), ((1, 16, 16), 0), ((16, 1, 16), 1)])
def test_single_slices_with_a_degenerate_flat_column_load_everywhere(tmp_path, shape, flat):
    # the slice is placed by its two in-plane columns: the flat axis's may be 0 (one rule for every reader)
    import nibabel as nib

    from medfast.data.io import load_nifti as io_load
    from medfast.tasks.registration import load_nifti as reg_load

    def save(data, sform):  # a degenerate sform (nibabel cannot build a qform from it: given in the header)
        img = nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0]))
        img.header.set_sform(sform, code=1)
        nib.save(nib.Nifti1Image(img.dataobj, None, img.header), str(path))

    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[flat, flat] = 0.0
    path = tmp_path / "slice.nii.gz"
    save(np.random.default_rng(0).random(shape).astype(np.float32), affine)
    io_load(path)
    data, _ = reg_load(path)
    assert data.shape == (16, 16)
    zero = np.diag([0.5, 0.0, 0.5, 1.0]) if flat != 1 else np.diag([0.0, 0.5, 0.5, 1.0])
    save(np.zeros(shape, np.float32), zero)  # an in-plane column 0: singular
    with pytest.raises(Exception, match="singular"):
        io_load(path)
    with pytest.raises(Exception, match="singular"):
        reg_load(path)


def test_big_endian_files_register_as_their_native_copies(tmp_path):
    """Big-endian NIfTI (older scanners, SPM / AFNI on big-endian hosts), image and label map: read in native byte
    order (torch refused '>i2' with a message naming no file), with the same outputs as little-endian copies."""
    from medfast.tasks.registration import load_nifti

    img = (_blobs() * 1000).astype(np.int16)
    lab = (_blobs() > 0.3).astype(np.int16)
    fixed = _save(tmp_path / "f.nii.gz", img, AXIAL)
    fl = _save(tmp_path / "fl.nii.gz", lab, AXIAL)
    runs = {}
    for order in ("<", ">"):
        paths = []
        for name, data in (("m", np.roll(img, 2, 0)), ("ml", np.roll(lab, 2, 0))):
            x = nib.Nifti1Image(data.astype(f"{order}i2"), AXIAL, nib.Nifti1Header(endianness=order))
            x.set_data_dtype(f"{order}i2")
            paths.append(str(tmp_path / f"{name}{order == '>'}.nii"))
            nib.save(x, paths[-1])
        assert np.asanyarray(nib.load(paths[0]).dataobj).dtype.isnative == (order == "<")
        data, _ = load_nifti(paths[0])
        assert data.dtype.isnative
        np.testing.assert_array_equal(data, np.roll(img, 2, 0))
        out = tmp_path / f"out{order == '>'}"
        assert main(["register", fixed, paths[0], "--fixed-labels", fl, "--moving-labels", paths[1],
                     "--out", str(out), *FAST, "--affine-iters", "5"]) == 0
        runs[order] = [np.asarray(nib.load(out / f).dataobj) for f in ("warped.nii.gz", "warped_labels.nii.gz")]
    for a, b in zip(runs["<"], runs[">"]):
        np.testing.assert_array_equal(a, b)


def test_float64_inf_reads_as_the_float32_extreme_like_a_float32_file(tmp_path):
    """A float64 image holding inf registers as the float32 file with the same inf does (inf -> float32's largest
    value): np.nan_to_num's float64 extreme became inf again in float32 and was refused, naming no file."""
    from medfast.tasks.registration import load_nifti

    fixed = _save(tmp_path / "f.nii.gz", _blobs(), AXIAL)
    moving = np.roll(_blobs(), 2, 0)
    moving[0, 0], moving[0, 1] = np.inf, -np.inf
    outs = {}
    for dt in (np.float32, np.float64):
        path = _save(tmp_path / f"m{np.dtype(dt).itemsize}.nii.gz", moving.astype(dt), AXIAL)
        data, _ = load_nifti(path)
        f32 = np.finfo(np.float32)
        assert data[0, 0] == f32.max and data[0, 1] == f32.min and np.isfinite(data.astype(np.float32)).all()
        out = tmp_path / f"out{np.dtype(dt).itemsize}"
        assert main(["register", fixed, path, "--out", str(out), *FAST, "--affine-iters", "5"]) == 0
        outs[dt] = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    np.testing.assert_array_equal(outs[np.float32], outs[np.float64])


@pytest.mark.parametrize("edit", ["no input_shape", "text shape", "nan spacing", "zero size"])
def test_an_edited_registration_checkpoint_is_named(tmp_path, edit):
    # a missing input_shape was a bare KeyError traceback; "abc" an int() message without the file
    import torch

    from medfast.nets import LocalNet
    from medfast.tasks.registration import RegistrationError, load_model_info, save_model

    path = tmp_path / "reg.pt"
    kwargs = {"spatial_dims": 3, "in_channels": 2, "num_channel_initial": 4, "extract_levels": (0, 1)}
    save_model(path, LocalNet(**kwargs), kwargs, [8, 8, 8], spacing=[2.0, 2.0, 2.0])
    state = torch.load(path, weights_only=True)
    if edit == "no input_shape":
        del state["input_shape"]
    elif edit == "text shape":
        state["input_shape"] = "abc"
    elif edit == "nan spacing":
        state["spacing"] = [float("nan"), 2.0, 2.0]
    else:
        state["input_shape"] = [8, 0, 8]
    torch.save(state, path)
    with pytest.raises(RegistrationError, match=r"reg.pt: not a usable registration checkpoint"):
        load_model_info(path)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"),
                                          (1e20, "too large for a label"), (2.5, "non-integer")])
def test_register_label_maps_with_non_finite_or_huge_values_are_refused(tmp_path, value, match):
    """register's reader mapped NaN to background and inf to float32's max, which the int64 cast wrapped to label
    -2^63 (1e20 too): a class of its own that halved the reported Dice, with exit status 0."""
    import nibabel as nib

    from medfast.tasks.registration import RegistrationError, _load_label_map

    lab = np.zeros((6, 7, 8), np.float32)
    lab[2:4, 2:4, 2:4] = 1
    lab[0, 0, 0] = value
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    with pytest.raises(RegistrationError, match=rf"label map .*lab.nii.gz holds .*{match}"):
        _load_label_map(str(tmp_path / "lab.nii.gz"), "img.nii.gz", (6, 7, 8), np.eye(4))
    lab[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    out = _load_label_map(str(tmp_path / "lab.nii.gz"), "img.nii.gz", (6, 7, 8), np.eye(4))
    assert out.dtype == np.int64 and out[0, 0, 0] == 3 and out.sum() == 8 + 3
