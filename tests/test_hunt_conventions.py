"""Conventions a bug hunt found wrong in the metrics, the augmentation and the UNet: evaluate's Dice of a
pure false positive, the macro F1 of never-predicted classes, NumPy / tensor scalars as arguments, a
"diffeomorphic" deformation that folded under flips, deep-supervision targets off the coarse grid, and
group norm widths."""

import types

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from sklearn.metrics import f1_score

from medfast.data.augment import AugmentConfig, RandomAugment
from medfast.metrics import hausdorff_distance
from medfast.nets import UNet
from medfast.tasks.classification.metrics import precision_recall_f1
from medfast.tasks.evaluation import evaluate_pair, summarize
from medfast.tasks.segmentation import SegmentationTask
from medfast.tasks.synthesis.metrics import psnr, ssim


def test_evaluate_scores_a_pure_false_positive_as_dice_zero(tmp_path):
    # ignore_empty made it NaN, and summarize() dropped the row: mean Dice 1.0 instead of 0.5
    ref = np.zeros((8, 8, 8), np.int16)
    ref[2:5, 2:5, 2:5] = 1
    pred = ref.copy()
    pred[6:8, 6:8, 6:8] = 2
    for name, a in (("ref", ref), ("pred", pred)):
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / f"{name}.nii.gz")
    rows = evaluate_pair(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", num_classes=4)
    assert [r["dice"] for r in rows[:2]] == [1.0, 0.0]
    assert np.isnan(rows[2]["dice"])  # class 3: in neither
    assert summarize(rows)["all"]["dice"]["mean"] == pytest.approx(0.5)


def test_macro_f1_counts_never_predicted_classes():
    # F1 was NaN where precision was undefined, so a majority-class predictor scored 0.947 for 0.316
    target = np.array([0] * 90 + [1] * 5 + [2] * 5)
    pred = np.zeros(100, dtype=np.int64)
    f1 = precision_recall_f1(pred, target, 4)["f1"]
    assert np.isnan(f1[3])  # absent from both
    assert np.nanmean(f1) == pytest.approx(f1_score(target, pred, average="macro", zero_division=0))


def test_numpy_and_tensor_scalars_are_numbers():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    y = (x + 0.05 * torch.rand_like(x)).clamp(0, 1)
    ref = psnr(x, y, 1.0)
    torch.testing.assert_close(psnr(x, y, np.float32(1.0)), ref)
    torch.testing.assert_close(psnr(x, y, torch.tensor(1.0)), ref)
    torch.testing.assert_close(ssim(x, y, np.int64(1)), ssim(x, y, 1.0))
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, 2:5, 2:5] = 1
    other = torch.roll(masks, 1, 1)
    torch.testing.assert_close(hausdorff_distance(masks, other, np.float32(95), num_classes=2),
                               hausdorff_distance(masks, other, 95, num_classes=2))


def _folded_fraction(field, inside):
    p = field.numpy()
    J = np.stack([np.stack(np.gradient(p[i]), 0) for i in range(p.shape[0])])
    det = np.linalg.det(np.moveaxis(J, (0, 1), (-2, -1)))
    det *= np.sign(np.median(det))  # a flip makes the whole map orientation-reversing
    ok = ndi.binary_erosion(inside, np.ones((3,) * p.shape[0]), border_value=0)
    return float((det[ok] <= 0).mean())


@pytest.mark.parametrize("flip", [[], [0]])
def test_random_deformation_stays_diffeomorphic_under_flips(flip):
    # the displacement was added after the affine (x_in = A x + t + u(x)): with a flip 0.82 % of the voxels
    # folded (40^3 volume, 30 seeds); now x_in = A (x + u(x)) + t
    shape, patch = (40, 40, 40), [32, 32, 32]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    img = torch.cat([grid, torch.ones_like(grid[:1])])[None]  # channels: the input position and an inside marker
    aug = RandomAugment(AugmentConfig(rotation=15, scale=0.15, deform_magnitude=3.0, deform_grid=5, flip=flip),
                        geometric_only=True)
    for seed in range(6):
        out = aug(img, None, [seed], patch)[0][0]
        assert _folded_fraction(out[:3], (out[3] - 1).abs().numpy() < 1e-9) == 0.0


def test_deep_supervision_targets_sit_on_the_coarse_grid():
    # a 13 x 13 patch (the UNet pads to 16): the level-j logits sit on fine voxels 2^j i, but the targets
    # were a nearest resize from 13 to ceil(13 / 2^j): columns [0, 1, 3, 5, ...] instead of [0, 2, 4, ...]
    net = UNet(2, 1, 3, (4, 8, 16, 32), 1, "instance", deep_supervision=True).train()
    outs = [o.detach() for o in net(torch.randn(1, 1, 13, 13))]
    label = torch.arange(13).repeat(13, 1)[None]  # label[0, y, x] = x
    seen = []
    task = SegmentationTask.__new__(SegmentationTask)
    task.config = types.SimpleNamespace(loss=types.SimpleNamespace(deep_supervision_weights=None))
    task.loss_fn = lambda out, target: (seen.append(target[0, 0].tolist()), out.sum() * 0)[1]
    task._loss(outs, label)
    for j, columns in enumerate(seen):
        assert columns == [2**j * i for i in range(len(columns))]


@pytest.mark.parametrize("channels", [(6, 12), (12, 24), (20, 40)])
def test_group_norm_takes_any_width(channels):
    # GroupNorm(min(8, c), c) raised for widths that are not multiples of 8
    net = UNet(2, 1, 2, channels, 1, "group")
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


DOCUMENTED_MODULES = (
    "medfast", "medfast.data", "medfast.losses", "medfast.losses.registration", "medfast.metrics", "medfast.nets",
    "medfast.tasks.classification", "medfast.tasks.evaluation", "medfast.tasks.registration",
    "medfast.tasks.segmentation", "medfast.tasks.synthesis.data", "medfast.tasks.synthesis.generate",
    "medfast.tasks.synthesis.metrics", "medfast.tasks.synthesis.task", "medfast.train", "medfast.ultrasound",
)


@pytest.mark.parametrize("name", DOCUMENTED_MODULES)
def test_documented_modules_star_import_only_their_api(name):
    # without __all__, `from medfast.tasks.registration import *` overwrote a user's `time`, `np`, `torch`...
    import importlib

    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), name
    ns: dict = {}
    exec(f"from {name} import *", ns)  # noqa: S102 - the import a user writes
    leaked = sorted(k for k, v in ns.items() if k != "__builtins__" and isinstance(v, types.ModuleType))
    assert not leaked, leaked
    assert all(hasattr(mod, k) for k in mod.__all__)
