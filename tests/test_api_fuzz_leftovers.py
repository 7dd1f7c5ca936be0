"""The rest of a fuzz of the public API (one bad argument at a time on tiny valid calls): NaN / negative SSIM
constants, a float noise-table size, 64-bit overflows that named no argument, complex tensors whose imaginary
part was dropped silently, meta tensors read on the host, and a NaN memory allowance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfast.metrics as mm
import medfast.tasks.classification.metrics as cm
from medfast.data.preprocess import spatial_affine
from medfast.tasks.classification.losses import coral_loss
from medfast.tasks.registration import grid_affines
from medfast.tasks.synthesis.metrics import sliced_wasserstein, ssim
from medfast.ultrasound import LabelTable, freehand_sweep, hu_to_properties, noise_table, simulate

NAN, INF = float("nan"), float("inf")
EYE = torch.eye(4, dtype=torch.float64)


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, device="meta", dtype=dtype)


def _images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, 16, 16, generator=gen), torch.rand(1, 1, 16, 16, generator=gen)


@pytest.mark.parametrize("name, bad", [("k1", NAN), ("k1", -0.01), ("k1", 0.0), ("k1", True), ("k2", NAN),
                                       ("k2", -0.5), ("k2", INF), ("sigma", INF), ("sigma", True)])
def test_ssim_refuses_non_finite_or_non_positive_constants(name, bad):
    """NaN / negative k gave NaN or a wrong SSIM; sigma=inf raised an OverflowError naming nothing."""
    x, y = _images()
    assert torch.isfinite(ssim(x, y, **{name: torch.tensor(1.0) if name == "sigma" else 0.02})).all()
    with pytest.raises(ValueError, match=f"{name} must be a positive, finite number"):
        ssim(x, y, **{name: bad})


def test_ssim_names_a_sigma_too_large_for_the_image():
    x, y = _images()
    with pytest.raises(ValueError, match="smaller than the .* SSIM window"):  # (1e300: OverflowError before)
        ssim(x, y, sigma=1e300)


@pytest.mark.parametrize("rows, error", [(16.0, TypeError), (torch.tensor(16.0), TypeError), (True, TypeError),
                                         ("16", TypeError), (2**63, ValueError), (2**32, ValueError)])
def test_noise_table_rows_must_be_an_int_power_of_two(rows, error):
    assert noise_table(0, rows=np.int64(16)).shape == noise_table(0, rows=torch.tensor(16)).shape == (16, 4)
    with pytest.raises(error, match="rows must be"):
        noise_table(0, rows=rows)


@pytest.mark.parametrize("num_classes", [2**63, 2**62, 2**40])
def test_dice_refuses_an_absurd_num_classes(num_classes):
    """2**63: 'Overflow when unpacking long long'; 2**62 / 2**40: storage errors; 2**31 exhausted memory."""
    lab = torch.randint(0, 2, (1, 4, 4, 4))
    with pytest.raises(ValueError, match="num_classes must be at most"):
        mm.dice(lab, lab, num_classes)


def test_huge_ints_are_named():
    """OverflowError / MemoryError naming no argument (range(2**62) in spatial_affine); ndim 4 of a 4x4 affine
    read its translation row twice."""
    for ndim in (2**63, 2**62, 4, 0, True, 3.0):
        with pytest.raises(ValueError, match="ndim"):
            spatial_affine(np.eye(4), ndim)
    assert spatial_affine(np.eye(5), 4).shape == (5, 5)  # (an (ndim + 1)-square affine is still returned as is)
    for n in (2**63, 2**62, 4):
        with pytest.raises(ValueError, match="n must be 2 or 3"):
            grid_affines(np.eye(4), np.eye(4), n)
    p, t = [0, 1, 1], [0, 1, 0]
    for fn in (cm.confusion_matrix, cm.precision_recall_f1, cm.balanced_accuracy, cm.classification_report):
        for num_classes in (2**63, 2**20):  # (2**20: an 8 TiB matrix)
            with pytest.raises(ValueError, match="num_classes must be at most"):
                fn(p, t, num_classes)


@pytest.mark.parametrize("call, name", [
    (lambda: hu_to_properties(torch.zeros(1, 4, 4, 4, dtype=torch.complex64)), "ct"),
    (lambda: hu_to_properties(torch.zeros(1, 4, 4, 4, dtype=torch.bool)), "ct"),
    (lambda: hu_to_properties(torch.zeros(1, 4, 4, 4), torch.tensor([[0.0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
                                                                    dtype=torch.complex64)), "knots"),
    (lambda: freehand_sweep(EYE.to(torch.complex128), [0, 0, 10], 3), "start_pose"),
    (lambda: freehand_sweep(torch.eye(4, dtype=torch.bool), [0, 0, 10], 3), "start_pose"),
    (lambda: freehand_sweep(EYE, torch.tensor([0, 0, 10 + 1j]), 3), "travel_mm"),
    (lambda: freehand_sweep(EYE, np.array([0, 0, 10 + 1j]), 3), "travel_mm"),
    (lambda: freehand_sweep(EYE, torch.tensor([True, False, False]), 3), "travel_mm"),
    (lambda: sliced_wasserstein(torch.zeros(2, 1, 8, 8, dtype=torch.complex64), torch.zeros(2, 1, 8, 8),
                                patch_size=3), "a"),
    (lambda: sliced_wasserstein(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.complex64),
                                patch_size=3), "b"),
    (lambda: coral_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.complex64)), "levels"),
    (lambda: coral_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.complex64)), "importance"),
])
def test_complex_and_bool_tensors_are_refused(call, name):
    """Each was cast to a real dtype, the imaginary part dropped (a warning at most); a bool eye was a pose."""
    with pytest.raises(TypeError, match=f"^{name} must"):
        call()
    # real tensors as before: integer HU, an integer travel, bool CORAL levels
    assert hu_to_properties(torch.zeros(1, 4, 4, 4, dtype=torch.int16)).shape == (1, 5, 4, 4, 4)
    assert freehand_sweep(EYE, torch.tensor([0, 0, 10]), 3).shape == (3, 4, 4)
    assert torch.isfinite(coral_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.ones(3)))


_META_CALLS = {
    "dice": (lambda: mm.dice(_meta(1, 4, 4, dtype=torch.long), _meta(1, 4, 4, dtype=torch.long), 2), "pred_labels"),
    "hausdorff_distance": (lambda: mm.hausdorff_distance(_meta(1, 4, 4, 4, dtype=torch.long),
                                                         _meta(1, 4, 4, 4, dtype=torch.long), num_classes=2), "pred"),
    "confusion_matrix": (lambda: cm.confusion_matrix(_meta(3, dtype=torch.long), [0, 1, 0], 2), "pred"),
    "accuracy": (lambda: cm.accuracy([0, 1, 0], _meta(3, dtype=torch.long)), "target"),
    "roc_auc": (lambda: cm.roc_auc(_meta(3, 2), [0, 1, 0]), "scores"),
    "hu_to_properties knots": (lambda: hu_to_properties(torch.zeros(1, 4, 4, 4), _meta(3, 6)), "knots"),
    "LabelTable": (lambda: LabelTable(_meta(3, 5)), "values"),
    "LabelTable.properties": (lambda: LabelTable({0: (1.5, 0.5, 1.0, 0.01, 0.0)}).properties(
        _meta(1, 4, 4, 4, dtype=torch.long)), "labels"),
    "freehand_sweep start_pose": (lambda: freehand_sweep(_meta(4, 4, dtype=torch.float64), [0, 0, 10], 3),
                                  "start_pose"),
    "freehand_sweep travel_mm": (lambda: freehand_sweep(EYE, _meta(3), 3), "travel_mm"),
    "simulate pose": (lambda: simulate(_meta(1, 5, 8, 8, 8), np.eye(4), _meta(4, 4), "L11-5v"), "pose"),
    "simulate affine": (lambda: simulate(_meta(1, 5, 8, 8, 8), _meta(4, 4), torch.eye(4), "L11-5v"), "affine"),
    "simulate volume_index": (lambda: simulate(_meta(1, 5, 8, 8, 8), np.eye(4), torch.eye(4), "L11-5v",
                                               volume_index=_meta(1, dtype=torch.long)), "volume_index"),
    "ssim data_range": (lambda: ssim(*_images(), data_range=_meta(())), "data_range"),
    "noise_table seed": (lambda: noise_table(_meta((), dtype=torch.long), rows=16), "seed"),
}


@pytest.mark.parametrize("case", list(_META_CALLS))
def test_meta_tensors_read_on_the_host_are_named(case):
    """'Tensor.item() cannot be called on meta tensors' / 'Cannot copy out of meta tensor', naming nothing."""
    call, name = _META_CALLS[case]
    with pytest.raises(ValueError, match=f"^{name} is a meta tensor: a meta tensor has no values"):
        call()


def test_hu_to_properties_of_a_meta_ct_gives_the_shapes():
    """The knots are checked on the host before they move to the CT's device: a meta CT (shapes only, as
    simulate takes meta props) no longer read them back from the meta device."""
    out = hu_to_properties(_meta(2, 1, 3, 4, 5))
    assert out.device.type == "meta" and out.shape == (2, 5, 3, 4, 5)


@pytest.mark.parametrize("max_bytes", [NAN, INF, -1, 0, True, "1e9"])
def test_simulate_refuses_a_bad_max_bytes(max_bytes):
    """NaN and inf were no limit at all; 0, -1 and True gave the 'needs about ... GiB' error, naming nothing."""
    props = _meta(1, 5, 8, 8, 8)  # (shapes only: the checks run, no simulation)
    assert simulate(props, np.eye(4), torch.eye(4), "L11-5v", max_bytes=2e12).bmode.shape[0] == 1
    with pytest.raises(ValueError, match="max_bytes must be a positive, finite number"):
        simulate(props, np.eye(4), torch.eye(4), "L11-5v", max_bytes=max_bytes)
