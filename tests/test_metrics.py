"""medfast.metrics against MONAI: DiceMetric, compute_hausdorff_distance, compute_average_surface_distance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

import medfast.metrics as mm

monai_metrics = pytest.importorskip("monai.metrics")

SHAPES = [(33, 40), (18, 21, 16)]
SPACINGS = [None, (0.7, 1.3, 0.9)]


def blobs(shape, batch, channels, seed, sigma=2.5, level=0.4):
    """Smoothed random masks (B, C, *shape) bool: several blobs per mask, touching the border at times."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((batch, channels, *shape)), (0, 0) + (sigma,) * len(shape))
    return torch.from_numpy(x / x.std() > level)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def spacing_for(shape, spacing):
    return None if spacing is None else list(spacing[: len(shape)])


def assert_close(got, want):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("percentile", [None, 95, 50.5])
@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_hausdorff_matches_monai(shape, spacing, percentile, directed, include_background):
    pred, target = blobs(shape, 2, 3, 1), blobs(shape, 2, 3, 2)
    sp = spacing_for(shape, spacing)
    got = mm.hausdorff_distance(
        pred, target, percentile, sp, include_background=include_background, directed=directed
    )
    want = quiet(
        monai_metrics.compute_hausdorff_distance, pred.float(), target.float(), include_background,
        percentile=percentile, directed=directed, spacing=sp,
    )
    assert got.shape == want.shape and got.dtype == torch.float32
    assert_close(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_surface_distance_matches_monai(shape, spacing, symmetric, include_background):
    pred, target = blobs(shape, 2, 3, 3), blobs(shape, 2, 3, 4)
    sp = spacing_for(shape, spacing)
    got = mm.surface_distance(pred, target, sp, include_background=include_background, symmetric=symmetric)
    want = quiet(
        monai_metrics.compute_average_surface_distance, pred.float(), target.float(), include_background,
        symmetric, spacing=sp,
    )
    assert_close(got, want)


def edge_case_masks(shape):
    """Channels: empty pred, empty target, both empty, single voxels, full image; background channel 0."""
    pred = torch.zeros(1, 6, *shape, dtype=torch.bool)
    target = torch.zeros_like(pred)
    centre = tuple(s // 2 for s in shape)
    target[(0, 1, *centre)] = True  # class 1: empty pred
    pred[(0, 2, *centre)] = True  # class 2: empty target
    pred[(0, 4, *centre)] = True  # class 4: single voxels (class 3: both empty)
    target[(0, 4) + (0,) * len(shape)] = True
    pred[0, 5] = True  # class 5: full image vs a single voxel
    target[(0, 5, *centre)] = True
    pred[0, 0] = ~pred[0, 1:].any(0)
    target[0, 0] = ~target[0, 1:].any(0)
    return pred, target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_edge_cases_match_monai(shape, symmetric):
    pred, target = edge_case_masks(shape)
    with pytest.warns(UserWarning, match="all 0"):
        hd = mm.hausdorff_distance(pred, target, 95, directed=not symmetric)
    with pytest.warns(UserWarning, match="all 0"):
        asd = mm.surface_distance(pred, target, symmetric=symmetric)
    want_hd = quiet(
        monai_metrics.compute_hausdorff_distance, pred.float(), target.float(), percentile=95,
        directed=not symmetric,
    )
    want_asd = quiet(monai_metrics.compute_average_surface_distance, pred.float(), target.float(), symmetric=symmetric)
    assert_close(hd, want_hd)
    assert_close(asd, want_asd)
    hd_max = quiet(mm.hausdorff_distance, pred, target, None)
    assert_close(hd_max, quiet(monai_metrics.compute_hausdorff_distance, pred.float(), target.float()))
    assert torch.isinf(hd_max[0, :2]).all() and torch.isnan(hd_max[0, 2])
    assert torch.isnan(hd[0, :3]).all() and torch.isinf(asd[0, :2]).all() and torch.isnan(asd[0, 2])


def test_label_maps_and_per_batch_spacing():
    pred, target = blobs((20, 22, 17), 2, 3, 5), blobs((20, 22, 17), 2, 3, 6)
    pred_lab, target_lab = pred.long().argmax(1), target.long().argmax(1)
    one_hot = [torch.nn.functional.one_hot(x, 3).movedim(-1, 1) for x in (pred_lab, target_lab)]
    spacing = [[1.0, 2.0, 0.5], [0.8, 0.8, 1.2]]
    got = mm.hausdorff_distance(pred_lab, target_lab, 95, spacing, num_classes=3)
    want = quiet(monai_metrics.compute_hausdorff_distance, *one_hot, percentile=95, spacing=spacing)
    assert_close(got, want)
    got = mm.surface_distance(pred_lab, target_lab, spacing, num_classes=3, symmetric=True)
    want = quiet(monai_metrics.compute_average_surface_distance, *one_hot, symmetric=True, spacing=spacing)
    assert_close(got, want)


def monai_dice(pred, target, num_classes, **kwargs):
    metric = monai_metrics.DiceMetric(reduction="none", num_classes=num_classes, **kwargs)
    return quiet(metric, pred[:, None], target[:, None])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore_empty", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("ignore_index", [None, 2, 255])
def test_dice_matches_monai(shape, ignore_empty, include_background, ignore_index):
    gen = torch.Generator().manual_seed(0)
    num_classes = 5
    target = torch.randint(0, 4, (3, *shape), generator=gen)  # class 4 never in target: empty
    pred = torch.where(torch.rand(target.shape, generator=gen) < 0.7, target, torch.randint(0, 5, target.shape))
    pred[1] = 0  # empty prediction for every foreground class
    target[2] = 0
    if ignore_index == 255:
        target[:, : shape[0] // 3] = 255
        pred[0, -3:] = 255
    kwargs = dict(ignore_empty=ignore_empty, include_background=include_background)
    got = mm.dice(pred, target, num_classes, ignore_index, **kwargs)
    want = monai_dice(pred, target, num_classes, ignore_index=ignore_index, **kwargs)
    assert got.shape == (3, num_classes - (not include_background))
    assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.bool])
def test_dice_label_dtypes(dtype):
    """Narrow and bool label maps give the int64 result (the pair index is formed in int64: a uint8
    ``t * (C + 1) + p`` would wrap)."""
    gen = torch.Generator().manual_seed(3)
    classes = 2 if dtype == torch.bool else 200
    target = torch.randint(0, classes, (2, 9, 10, 11), generator=gen)
    pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target, torch.randint(0, classes, target.shape))
    want = mm.dice(pred, target, classes)
    torch.testing.assert_close(mm.dice(pred.to(dtype), target.to(dtype), classes), want, equal_nan=True)


@pytest.mark.parametrize("ignore_index", [None, 3, 1000])
def test_dice_many_classes_counts_without_a_pair_table(monkeypatch, ignore_index):
    """Past a pair table larger than the data, the counts come from three bincounts: the same values, and
    a million classes no longer allocate a (10^6)^2 table (8 TB)."""
    from medfast.metrics import _segmentation as seg

    gen = torch.Generator().manual_seed(4)
    target = torch.randint(0, 40, (2, 9, 10, 11), generator=gen)
    pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target, torch.randint(0, 40, target.shape))
    if ignore_index is not None:
        target[:, ::3] = ignore_index
    monkeypatch.setattr(seg, "_TABLE_LIMIT", 1 << 60)
    table = mm.dice(pred, target, 40, ignore_index=ignore_index)
    monkeypatch.setattr(seg, "_TABLE_LIMIT", 0)
    counts = mm.dice(pred, target, 40, ignore_index=ignore_index)
    torch.testing.assert_close(counts, table, equal_nan=True)
    monkeypatch.undo()
    huge = torch.randint(0, 10**6, (1, 16, 16, 16), generator=gen)
    score = mm.dice(huge, huge, 10**6)
    assert score.shape == (1, 10**6) and (score[~score.isnan()] == 1).all()


@pytest.mark.parametrize("ignore_index", [2**40, -(2**35), 255])
def test_dice_ignore_index_beyond_int32(ignore_index):
    # the counts index in int32 while everything fits: an int64 ignore_index beyond int32 would wrap into a class
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 4, (2, 6, 7), generator=gen)
    pred = torch.randint(0, 4, (2, 6, 7), generator=gen)
    keep = torch.rand(target.shape, generator=gen) < 0.7
    want = torch.cat([mm.dice(pred[b][keep[b]][None], target[b][keep[b]][None], 4) for b in range(2)])
    got = mm.dice(pred, target.where(keep, ignore_index), 4, ignore_index=ignore_index)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_bad_inputs():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        mm.dice(labels, labels[:1], 2)
    with pytest.raises(TypeError, match="pred_labels .*integer"):
        mm.dice(labels.float(), labels, 2)
    bad = labels.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="target has labels outside"):
        mm.dice(labels, bad, 3)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="pred_labels has labels outside"):
        mm.dice(bad, labels, 3)
    assert mm.dice(bad, labels, 3, ignore_index=-1).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        mm.dice(labels, labels, 1, include_background=False)
    with pytest.raises(TypeError, match="num_classes"):
        mm.dice(labels, labels, 2.0)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        mm.dice(labels, labels.numpy(), 2)
    with pytest.raises(ValueError, match="same shape"):
        mm.hausdorff_distance(masks, masks[:, :1])
    with pytest.raises(ValueError, match="pred must be binary"):
        mm.hausdorff_distance(masks.float() + 0.5, masks)
    for bad_value in (0.5, -1.0, 2.0, float("nan")):  # one bad voxel of a counted channel is enough
        odd = masks.float()
        odd[0, -1, 0, 0] = bad_value
        with pytest.raises(ValueError, match="target must be binary"):
            mm.hausdorff_distance(masks, odd)
    # a dropped background channel is not read (as MONAI ignores it): soft values there change nothing
    soft_bg = masks.float()
    soft_bg[:, 0] = 0.3
    torch.testing.assert_close(mm.hausdorff_distance(masks, soft_bg), mm.hausdorff_distance(masks, masks),
                               equal_nan=True)
    with pytest.raises(ValueError, match="one-hot"):
        mm.hausdorff_distance(masks[:, 0], masks[:, 0])
    # a single channel is a binary mask, scored whatever include_background says (MONAI's reading; it raised)
    with pytest.warns(UserWarning, match="all 0"):
        assert mm.surface_distance(masks[:, :1], masks[:, :1]).shape == (masks.shape[0], 1)
    with pytest.raises(TypeError, match="target must be an integer label map"):
        mm.hausdorff_distance(labels, labels.float(), num_classes=2)
    with pytest.raises(ValueError, match="pred has labels outside"):
        mm.hausdorff_distance(labels + 2, labels, num_classes=2)
    with pytest.raises(ValueError, match="percentile"):
        mm.hausdorff_distance(masks, masks, 101)
    with pytest.raises(ValueError, match="spacing"):
        mm.hausdorff_distance(masks, masks, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        mm.hausdorff_distance(masks, masks, spacing=[[1.0, 1.0]] * 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            mm.hausdorff_distance(masks, masks.cuda())
        with pytest.raises(ValueError, match="same device"):
            mm.dice(labels, labels.cuda(), 2)
    with pytest.raises(ValueError, match="same device"):
        mm.dice(labels, labels.to("meta"), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_cpu(shape):
    pred, target = blobs(shape, 2, 3, 7), blobs(shape, 2, 3, 8)
    pred[0, 1] = False
    sp = spacing_for(shape, SPACINGS[1])
    for fn, kwargs in [
        (mm.hausdorff_distance, dict(percentile=95)),
        (mm.hausdorff_distance, dict(percentile=None, directed=True)),
        (mm.surface_distance, dict(symmetric=True)),
    ]:
        cpu = quiet(fn, pred, target, spacing=sp, **kwargs)
        cuda = quiet(fn, pred.cuda(), target.cuda(), spacing=sp, **kwargs)
        assert cuda.device.type == "cuda"
        assert_close(cuda, cpu)
    labels_p, labels_t = pred.long().argmax(1), target.long().argmax(1)
    assert_close(mm.dice(labels_p.cuda(), labels_t.cuda(), 3, 0), mm.dice(labels_p, labels_t, 3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
def test_segment_quantile_matches_torch_quantile(dtype, signed):
    """The per-segment quantile behind HD95 (a keyed sort for non-negative float32) against torch.quantile."""
    from medfast.metrics._segmentation import _segment_quantile

    g = torch.Generator().manual_seed(3)
    values = (torch.rand(500, generator=g, dtype=torch.float64) * 20).to(dtype)
    values[:40] = 0.0
    values[40:45] = -0.0
    values[45:50] = float("inf")
    values[50:70] = values[70:90]  # ties
    if signed:
        values = values - 5
    seg = torch.randint(0, 6, (500,), generator=g)
    seg[seg == 4] = 5  # segment 4 empty
    values[seg == 3] = 2.5  # one segment of a single repeated value (the next order statistic is lo again)
    values[seg == 1] = values[seg == 1].round()  # many ties
    order = torch.argsort(seg, stable=True)
    for q in (0.0, 0.37, 0.5, 0.9, 0.95, 0.99, 1.0):
        got = _segment_quantile(values, seg, 7, q)
        # the selection path for contiguous segments (few of them, CPU) and the sort path for many
        few = _segment_quantile(values[order], seg[order], 7, q, contiguous=True)
        many = _segment_quantile(values[order], seg[order], 17, q, contiguous=True)[:7]
        for i in range(7):
            sel = values[seg == i]
            want = torch.quantile(sel, q) if sel.numel() else torch.tensor(float("nan"), dtype=dtype)
            for result in (got, few, many):
                torch.testing.assert_close(result[i], want, equal_nan=True)  # lerp: 1 ulp from torch.quantile


def test_crop_box_keeps_every_surface_voxel():
    """The CUDA path crops the masks to the union's box grown by one voxel before taking surfaces: the box
    (clipped to the image, None when empty) and the surfaces inside it equal those of the whole volume."""
    from medfast.metrics._segmentation import _crop_box
    from medfast.ops._distance import surface_edges

    mask = torch.zeros(2, 20, 17, 15, dtype=torch.bool)
    mask[0, 3:9, 0:5, 6:14] = True  # touches the image border along axis 1
    mask[1, 10:12, 8:9, 2:3] = True
    union = mask.any(0)
    box = _crop_box(union, 1)
    assert box == [slice(2, 13), slice(0, 10), slice(1, 15)]
    full, counts = surface_edges(mask)
    cropped, cropped_counts = surface_edges(mask[(slice(None), *box)])
    assert torch.equal(cropped, full[(slice(None), *box)]) and torch.equal(cropped_counts, counts)
    assert _crop_box(torch.zeros(4, 5, dtype=torch.bool), 1) is None
    # against the plain definition (nonzero per axis) on random masks, 2D and 3D, single voxels and full ones
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (7, 5), (6, 9, 4), (3, 3, 3), (10, 1, 8)]:
        for density in (0.0, 0.002, 0.05, 1.0):
            m = torch.rand(shape, generator=g) < density
            if density == 0.002 and not m.any():
                m.view(-1)[int(torch.randint(m.numel(), (1,), generator=g))] = True
            for margin in (0, 1, 2):
                want = None
                if m.any():
                    idx = torch.nonzero(m)
                    want = [slice(max(int(idx[:, a].min()) - margin, 0), min(int(idx[:, a].max()) + 1 + margin,
                                                                             shape[a])) for a in range(len(shape))]
                assert _crop_box(m, margin) == want, (shape, density, margin)


@pytest.mark.parametrize("labels", [False, True])
def test_chunks_of_classes_give_the_same_results(monkeypatch, labels):
    """Masks are built and measured a few classes at a time (_CHUNK_BYTES): one class per chunk gives what one
    chunk of all gives, bitwise, with per-element spacing, empty classes and their warning included."""
    from medfast.metrics import _segmentation as seg

    shape = (17, 19, 14)
    pred, target = blobs(shape, 2, 5, 11), blobs(shape, 2, 5, 12)
    pred[1, 2] = False  # an empty class in one element
    if labels:  # label maps: the last set channel wins, 0 where none
        weights = torch.arange(1, 6).view(1, 5, 1, 1, 1)
        pred, target = (pred * weights).amax(1), (target * weights).amax(1)
        kwargs = dict(num_classes=6)
    else:
        kwargs = {}
    sp = [[1.2, 0.8, 1.0], [0.9, 1.1, 2.0]]
    calls = [
        lambda: mm.hausdorff_distance(pred, target, 95, sp, **kwargs),
        lambda: mm.hausdorff_distance(pred, target, None, sp, directed=True, **kwargs),
        lambda: mm.surface_distance(pred, target, sp, symmetric=True, **kwargs),
    ]
    with warnings.catch_warnings(record=True) as whole_warnings:
        warnings.simplefilter("always")
        whole = [call() for call in calls]
    monkeypatch.setattr(seg, "_CHUNK_BYTES", 1)  # one class per chunk
    with warnings.catch_warnings(record=True) as chunk_warnings:
        warnings.simplefilter("always")
        chunked = [call() for call in calls]
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape == (2, 5 if labels else 4)
        assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    assert [str(w.message) for w in whole_warnings] == [str(w.message) for w in chunk_warnings]
    if not labels:
        assert "pred is all 0 for (batch 1, class 2)" in str(whole_warnings[0].message)


def _fortran(x, lead):
    """x with the same values in Fortran order over its spatial axes (from `lead` on), as nibabel reads NIfTI."""
    dims = [*range(lead), *reversed(range(lead, x.dim()))]
    return x.permute(dims).contiguous().permute(dims)


@pytest.mark.parametrize("labels", [False, True])
def test_fortran_ordered_inputs_give_the_same_results(labels):
    """Volumes read by nibabel are Fortran-ordered: the metrics permute the axes (and the spacing) to contiguous
    views instead of copying; results equal those of C-ordered inputs, also with one input in each order."""
    shape = (15, 18, 13)
    pred, target = blobs(shape, 2, 4, 21), blobs(shape, 2, 4, 22)
    if labels:
        weights = torch.arange(1, 5).view(1, 4, 1, 1, 1)
        pred, target = (pred * weights).amax(1), (target * weights).amax(1)
        kwargs, lead = dict(num_classes=5), 1
    else:
        kwargs, lead = {}, 2
    fp, ft = _fortran(pred, lead), _fortran(target, lead)
    assert not fp.is_contiguous() and torch.equal(fp, pred)
    for sp in ([1.3, 0.7, 2.1], [[1.3, 0.7, 2.1], [0.5, 1.0, 1.5]]):
        for fn, kw in [(mm.hausdorff_distance, dict(percentile=95)), (mm.hausdorff_distance, dict(percentile=None)),
                       (mm.surface_distance, dict(symmetric=True))]:
            want = quiet(fn, pred, target, spacing=sp, **kw, **kwargs)
            for a, b in [(fp, ft), (fp, target), (pred, ft)]:
                assert torch.equal(quiet(fn, a, b, spacing=sp, **kw, **kwargs), want)
    if labels:
        want = mm.dice(pred, target, 5)
        assert torch.equal(mm.dice(fp, ft, 5), want) and torch.equal(mm.dice(fp, target, 5), want)


def test_a_single_channel_binary_mask_is_scored_as_monai_scores_it():
    """MONAI drops channel 0 only when there are more: compute_hausdorff_distance(p, t, percentile=95) on binary
    (B, 1, *S) masks works with its default include_background=False; medfast raised on the same call."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, t = torch.zeros(2, 1, 12, 11), torch.zeros(2, 1, 12, 11)
    p[:, :, 2:6, 3:8], t[:, :, 3:7, 3:9] = 1, 1
    p[1, :, 8:10, 2:4] = 1
    hd = mm.hausdorff_distance(p, t, percentile=95)
    asd = mm.surface_distance(p, t, symmetric=True)
    torch.testing.assert_close(hd.double(), compute_hausdorff_distance(p, t, percentile=95).double())
    torch.testing.assert_close(asd.double(), compute_average_surface_distance(p, t, symmetric=True).double())
    assert torch.equal(hd, mm.hausdorff_distance(p, t, percentile=95, include_background=True))
