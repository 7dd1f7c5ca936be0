"""Network findings of the nets hunt: LocalNet's coarse levels on sizes that are not multiples of 2^depth, argument
checks of the registration and classification networks (named errors at construction, not torch's at forward), the
registration depth from model.channels, and the classification input-size check in training mode."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfast.nets import ClassificationHead, DenseNetClassifier, GlobalNet, LocalNet, ResNetClassifier, SonoNet, UNet
from medfast.train.config import ConfigError, config_from_dict, config_to_dict


def _centres(n: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Fine-voxel centre of each of ``n`` cells of a ``k``-voxel pooling window: ``k j + (k - 1) / 2``."""
    return k * torch.arange(n, dtype=dtype) + (k - 1) / 2


def _axis_ramp(out: torch.Tensor, values: torch.Tensor, channels=None) -> torch.Tensor:
    """A tensor like ``out`` holding ``values`` along spatial axis 0 in ``channels`` (all by default), else 0."""
    o = torch.zeros_like(out)
    view = [1, -1] + [1] * (out.dim() - 3)
    o[:, slice(None) if channels is None else channels] = values.to(out.dtype).reshape(view)
    return o


# ---- 1. LocalNet upsampling undoes the ceil-mode pooling --------------------------------------------------------

@pytest.mark.parametrize("shape, depth", [((10, 10), 2), ((44, 12), 3), ((13, 9), 1), ((11, 6, 7), 2)])
def test_localnet_head_fields_land_on_their_pooled_voxels(shape, depth):
    """The deepest head's cell j pools input voxels [2^d j, 2^d j + 2^d - 1]; a head that outputs that window's
    centre must give back the voxel index i at every interior voxel. The old resize to the full size stretched
    the grid: 1.5 voxels off at 10 (depth 2), 3.6 at 44 (depth 3, the registration demo's axis)."""
    warnings.filterwarnings("ignore")
    ndim, k = len(shape), 2**depth
    net = LocalNet(ndim, 2, 2, depth, extract_levels=(depth,)).eval()

    def hook(mod, inp, out):
        return _axis_ramp(out, _centres(out.shape[2], k), channels=0)

    net.heads[str(depth)].register_forward_hook(hook)
    with torch.no_grad():
        ddf = net(torch.randn(1, 2, *shape))
    got = ddf[0, 0].reshape(shape[0], -1)  # every column along axis 0 is the same
    i = torch.arange(shape[0], dtype=got.dtype)[:, None].expand_as(got)
    inner = slice(k // 2, shape[0] - k // 2)  # away from the borders (clamped there)
    assert float((got - i)[inner].abs().max()) < 1e-5
    assert ddf[0, 1:].abs().max() == 0


@pytest.mark.parametrize("shape, depth", [((11, 6), 1), ((13, 8), 2), ((44, 8), 3), ((10, 6, 6), 2)])
def test_localnet_additive_upsampling_lands_on_the_pooled_cells(shape, depth):
    """The additive branch of the first decoder (deepest level -> level depth - 1) with the skip and the transposed
    conv zeroed: its input is the resized coarse features alone, which must put coarse cell j on the finer cells
    [2j, 2j + 1] (centre 2j + 0.5) whatever the size."""
    warnings.filterwarnings("ignore")
    ndim = len(shape)
    net = LocalNet(ndim, 2, 2, depth).eval()
    with torch.no_grad():
        for p in net.ups[depth - 1].parameters():
            p.zero_()
    fine = [-(-s // 2 ** (depth - 1)) for s in shape]  # the skip's (level depth - 1) size, ceil-mode pooling
    n_skip = net.encoder.channels[depth - 1]
    net.encoder.blocks[depth - 1].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    # the additive branch sums channel pairs: half the centre in each channel sums to the centre
    net.encoder.blocks[depth].register_forward_hook(
        lambda m, i, o: _axis_ramp(o, _centres(o.shape[2], 2) / 2))
    seen = {}
    net.decoders[depth - 1].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        net(torch.randn(1, 2, *shape))
    x = seen["x"]
    assert tuple(x.shape) == (1, n_skip, *fine)
    got = x[0].reshape(n_skip, fine[0], -1)
    i = torch.arange(fine[0], dtype=got.dtype)[None, :, None].expand_as(got)
    assert float((got - i)[:, 1:-1].abs().max()) < 1e-5  # (old resize: 0.5 at 11 -> 6 cells, more deeper)


def _old_forward(net: LocalNet, x: torch.Tensor) -> torch.Tensor:
    """LocalNet.forward as it was: every upsampling a resize to the target size."""
    from medfast.nets._layers import CL3
    from medfast.nets.registration import _channels_last

    size = x.shape[2:]
    mode = "trilinear" if net.ndim == 3 else "bilinear"
    fmt = CL3 if _channels_last(x, net.ndim, net.channels_last) else torch.contiguous_format
    feats = net.encoder(x.contiguous(memory_format=fmt))
    h = feats[-1]
    outs = [net.heads[str(len(feats) - 1)](h)] if len(feats) - 1 in net.levels else []
    for i in reversed(range(len(net.decoders))):
        skip = feats[i]
        up = net.ups[i](h)[tuple([slice(None), slice(None)] + [slice(0, s) for s in skip.shape[2:]])]
        add = h.reshape(h.shape[0], skip.shape[1], -1, *h.shape[2:]).sum(2)
        add = F.interpolate(add, size=skip.shape[2:], mode=mode, align_corners=False)
        h = net.decoders[i]((up + add + skip).contiguous(memory_format=fmt))
        if i in net.levels:
            outs.append(net.heads[str(i)](h))
    return torch.stack([F.interpolate(o, size=size, mode=mode, align_corners=False) if o.shape[2:] != size else o
                        for o in outs]).mean(0).contiguous()


@pytest.mark.parametrize("shape, depth, levels", [((16, 24), 2, None), ((32, 16), 3, (0, 2, 3)), ((16, 8, 8), 3, None),
                                                  ((8, 8, 12), 2, (1,))])
def test_localnet_sizes_that_are_multiples_are_unchanged(shape, depth, levels):
    """Where the size is a multiple of 2^depth, upsampling by the pooling factor is exactly the old resize (the
    scale is 1 / factor either way): same outputs as the old formula, with trained (non-zero) heads."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    net = LocalNet(len(shape), 2, 4, depth, extract_levels=levels).eval()
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.normal_(0, 0.1)
            head.bias.normal_(0, 0.1)
        x = torch.randn(2, 2, *shape)
        new, old = net(x), _old_forward(net, x)
        assert new.abs().max() > 0
        torch.testing.assert_close(new, old, rtol=0, atol=1e-7)
        # and the reference is the old code: on a size that is not a multiple it differs
        x = torch.randn(1, 2, *[s + 2 for s in shape])
        assert not torch.allclose(net(x), _old_forward(net, x), atol=1e-4)


# ---- 4. LocalNet extract_levels ----------------------------------------------------------------------------------

def test_localnet_extract_levels_default_follows_depth():
    """Default None = every level, range(depth + 1): LocalNet(depth=2) was refused, pointing at extract_levels the
    user never passed; at the default depth 3 the network is the one (0, 1, 2, 3) built before."""
    assert LocalNet(2, 2, 4, depth=2).levels == [0, 1, 2]
    assert LocalNet(2, 2, 4, depth=1).levels == [0, 1]
    default, explicit = LocalNet(2, 2, 4), LocalNet(2, 2, 4, 3, (0, 1, 2, 3))
    assert default.levels == [0, 1, 2, 3]
    assert {k: v.shape for k, v in default.state_dict().items()} == \
        {k: v.shape for k, v in explicit.state_dict().items()}


@pytest.mark.parametrize("levels", [[0, 1.9], [True, 2], "012", [0.5], [np.float64(1)], [np.bool_(True)], b"01",
                                    [None], 2])
def test_localnet_extract_levels_must_be_ints(levels):
    """int() truncated 1.9 to level 1 and read True and "0", "1", "2" as levels."""
    with pytest.raises(TypeError, match="extract_levels must be a sequence of ints"):
        LocalNet(2, 2, 4, 2, extract_levels=levels)


def test_localnet_extract_levels_accepts_integer_scalars():
    assert LocalNet(2, 2, 4, 2, extract_levels=[np.int64(0), torch.tensor(2), 1, 1]).levels == [0, 1, 2]
    with pytest.raises(ValueError, match=r"extract_levels must lie in \[0, depth = 2\]"):
        LocalNet(2, 2, 4, 2, extract_levels=(0, 3))
    with pytest.raises(ValueError, match="extract_levels must lie"):
        LocalNet(2, 2, 4, 2, extract_levels=())


def _reg_config(channels, kwargs=None):
    return config_from_dict({"task": "registration", "model": {"name": "localnet", "spatial_dims": 2,
                                                               "in_channels": 1, "channels": channels,
                                                               "kwargs": kwargs or {}},
                             "data": {"shape": [16, 16]}})


def test_registration_config_extract_levels_checked_naming_the_setting():
    from medfast.tasks.registration import RegistrationNet, _net_kwargs

    for bad in ([0, 1.5], "012", [True]):
        with pytest.raises(ConfigError, match="model.kwargs.extract_levels must be a sequence of ints"):
            _net_kwargs(_reg_config([8, 16, 32], {"extract_levels": bad}))
    with pytest.raises(ConfigError, match=r"model.kwargs.extract_levels must lie in \[0, depth = 2\]"):
        _net_kwargs(_reg_config([8, 16, 32], {"extract_levels": [0, 3]}))
    assert RegistrationNet(**_net_kwargs(_reg_config([8, 16, 32], {"extract_levels": [2, 0]}))).local.levels == [0, 2]
    assert RegistrationNet(**_net_kwargs(_reg_config([8, 16, 32]))).local.levels == [0, 1, 2]


# ---- 3. registration depth = len(model.channels) - 1 ------------------------------------------------------------

def test_registration_channels_need_two_entries():
    """model.channels [8] (depth 0 by the documented rule) silently trained a depth-1 network, as [8, 16]."""
    from medfast.tasks.registration import RegistrationNet, _net_kwargs

    with pytest.raises(ConfigError, match=r"model.channels = \[8\] gives depth 0.*\[8, 16\]"):
        _net_kwargs(_reg_config([8]))
    kw = _net_kwargs(_reg_config([8, 16]))
    assert kw["depth"] == 1 and RegistrationNet(**kw).local.encoder.channels == [8, 16]
    assert _net_kwargs(_reg_config([4, 8, 16, 32]))["depth"] == 3
    # a checkpoint trained with [8] was the depth-1 network: it still loads as that
    assert _net_kwargs(_reg_config([8]), trained=True)["depth"] == 1


def test_registration_checkpoint_with_one_channel_entry_still_loads():
    from medfast.tasks.registration import RegistrationNet, _load_trainer_checkpoint, _net_kwargs

    cfg = _reg_config([8])
    net = RegistrationNet(**_net_kwargs(cfg, trained=True))
    loaded, info = _load_trainer_checkpoint({"config": config_to_dict(cfg), "model": net.state_dict()})
    assert loaded.local.encoder.channels == [8, 16] and info.input_shape == [16, 16]


# ---- 6. constructor arguments checked when the network is built --------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: GlobalNet(3, 2, 0, 1), "num_channel_initial must be an int >= 1, got 0"),
    (lambda: LocalNet(3, 0, 4, 1), "in_channels must be an int >= 1, got 0"),
    (lambda: LocalNet(3, 2, -4, 1), "num_channel_initial must be an int >= 1"),
    (lambda: SonoNet(1, 3, width=0), "width must be an int >= 1, got 0"),
    (lambda: SonoNet(0, 3), "in_channels must be an int >= 1"),
    (lambda: SonoNet(1, 0), "num_classes must be an int >= 1, got 0"),
    (lambda: ResNetClassifier(2, 1, 3, width=0), "width must be an int >= 1"),
    (lambda: ResNetClassifier(2, 1, 3, stem_stride=0), "stem_stride must be an int >= 1, got 0"),
    (lambda: ResNetClassifier(2, 0, 3), "in_channels must be an int >= 1"),
    (lambda: ResNetClassifier(2, 1, 0), "num_classes must be an int >= 1"),
    (lambda: DenseNetClassifier(2, 1, 3, stem_stride=0), "stem_stride must be an int >= 1, got 0"),
    (lambda: DenseNetClassifier(2, 1, 3, width=0), "width must be an int >= 1"),
    (lambda: DenseNetClassifier(2, 1, -1), "num_classes must be an int >= 1"),
])
def test_bad_sizes_refused_at_construction(build, match):
    """These were accepted and failed at the first forward with torch's message (or, num_classes 0, ran)."""
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("build, match", [
    (lambda: LocalNet(3, 2.0, 4, 1), "in_channels must be an int"),
    (lambda: GlobalNet(3, 2, True, 1), "num_channel_initial must be an int"),
    (lambda: SonoNet(1, 3, width=4.5), "width must be an int"),
    (lambda: ResNetClassifier(2, 1, 3, stem_stride="2"), "stem_stride must be an int"),
    (lambda: DenseNetClassifier(2, 1, 3, stem_stride=1.0), "stem_stride must be an int"),
])
def test_non_int_sizes_refused(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_integer_scalars_still_accepted():
    assert ResNetClassifier(2, np.int64(1), 3, width=np.int64(4), stem_stride=torch.tensor(2)).num_features == 32
    assert LocalNet(2, np.int64(2), torch.tensor(4), 1).encoder.channels == [4, 8]


def test_unet_refuses_wrong_input_channels_naming_x():
    net = UNet(2, 1, 2, (4, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, in_channels = 1, \*S\), got \(1, 3, 16, 16\)"):
        net(torch.randn(1, 3, 16, 16))
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


# ---- 2 / 5. classifier counts, dropout, adaptation --------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: ResNetClassifier(2, 1, 3, blocks=[2, 0, 2]), "blocks"),
    (lambda: ResNetClassifier(2, 1, 3, blocks=[1, -3]), "blocks"),
    (lambda: ResNetClassifier(2, 1, 3, blocks=[]), "blocks"),
    (lambda: SonoNet(1, 3, convs_per_block=[2, 0, 2]), "convs_per_block"),
    (lambda: SonoNet(1, 3, convs_per_block=()), "convs_per_block"),
    (lambda: DenseNetClassifier(2, 1, 3, blocks=[2, 0]), "blocks"),
])
def test_zero_or_negative_stage_counts_refused(build, name):
    """blocks [2, 0, 2] trained [2, 1, 2] blocks; convs_per_block [2, 0, 2] dropped a block's convs."""
    with pytest.raises(ValueError, match=f"{name} must be a non-empty sequence of ints >= 1"):
        build()


@pytest.mark.parametrize("build", [lambda: ResNetClassifier(2, 1, 3, blocks=[1.5]),
                                   lambda: ResNetClassifier(2, 1, 3, blocks="22"),
                                   lambda: SonoNet(1, 3, convs_per_block=[1, True]),
                                   lambda: DenseNetClassifier(2, 1, 3, blocks=2)])
def test_non_int_stage_counts_refused(build):
    with pytest.raises(TypeError, match="must be a sequence of ints"):
        build()


def test_stage_counts_built_as_given():
    assert [len(s) for s in ResNetClassifier(2, 1, 3, width=4, blocks=[2, 1, 3]).stages] == [2, 1, 3]
    assert [len(s) for s in ResNetClassifier(2, 1, 3, width=4, blocks=np.array([1, 2])).stages] == [1, 2]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in SonoNet(1, 3, width=4, convs_per_block=(2, 1, 3)).body)
    assert convs == 2 + 1 + 3 + 1  # and the adaptation conv


@pytest.mark.parametrize("bad", [-0.5, math.nan, 1.0, 1.5, -1e-9])
def test_dropout_outside_unit_interval_refused(bad):
    """A negative or NaN dropout was silently no dropout (Identity)."""
    for build, name in ((lambda: ClassificationHead(8, 3, dropout=bad), "dropout"),
                        (lambda: ResNetClassifier(2, 1, 3, width=4, dropout=bad), "dropout"),
                        (lambda: SonoNet(1, 3, width=4, dropout=bad), "dropout"),
                        (lambda: DenseNetClassifier(2, 1, 3, width=4, blocks=[1], dropout=bad), "dropout"),
                        (lambda: DenseNetClassifier(2, 1, 3, width=4, blocks=[1], layer_dropout=bad),
                         "layer_dropout")):
        with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\)"):
            build()
    with pytest.raises(TypeError, match="dropout must be a number"):
        ClassificationHead(8, 3, dropout="0.1")
    with pytest.raises(TypeError, match="dropout must be a number"):
        ClassificationHead(8, 3, dropout=True)


def test_valid_dropout_unchanged():
    assert isinstance(ClassificationHead(8, 3).drop, torch.nn.Identity)
    assert ClassificationHead(8, 3, dropout=np.float32(0.25)).drop.p == 0.25
    net = DenseNetClassifier(2, 1, 3, width=4, blocks=[1], layer_dropout=0.2)
    assert {type(m.drop).__name__ for m in net.body if hasattr(m, "drop")} == {"Dropout2d"}


def test_sononet_adaptation_none_is_the_default_and_zero_refused():
    """adaptation=0 silently became 2 * width (``adaptation or 2 * width``)."""
    assert SonoNet(1, 3, width=4).num_features == 8
    assert SonoNet(1, 3, width=4, adaptation=None).num_features == 8
    assert SonoNet(1, 3, width=4, adaptation=12).num_features == 12
    with pytest.raises(ValueError, match="adaptation must be an int >= 1, got 0"):
        SonoNet(1, 3, width=4, adaptation=0)
    with pytest.raises(TypeError, match="adaptation must be an int"):
        SonoNet(1, 3, width=4, adaptation=8.0)


def test_densenet_group_norm_groups_documented():
    """The docstring said 8 groups; the layers use gcd(channels, 8) (4 for 12 or 28 channels)."""
    assert "gcd(channels, 8)" in DenseNetClassifier.__doc__ and "(8 groups)" not in DenseNetClassifier.__doc__
    net = DenseNetClassifier(2, 1, 3, width=12, growth_rate=8, blocks=[1], norm="group")
    groups = {(m.num_groups, m.num_channels) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert all(g == math.gcd(c, 8) for g, c in groups) and (4, 12) in groups


# ---- 7. classification input size in training mode ---------------------------------------------------------------

def _cls_task(tmp_path, name="resnet", shape=(8, 8), batch_size=1, kwargs=None):
    from medfast.tasks.classification.task import ClassificationTask

    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir(exist_ok=True)
    cfg = config_from_dict({"task": "classification",
                            "model": {"name": name, "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                      "channels": [8], "kwargs": kwargs or {}},
                            "data": {"root": str(tmp_path), "shape": list(shape)},
                            "trainer": {"batch_size": batch_size}})
    return ClassificationTask(cfg, refuse_unused=False)


def test_classification_batch_norm_one_pixel_last_stage_refused_with_batch_size_1(tmp_path):
    """ResNet (4 stages) at 8x8 ends 1x1: eval mode (the min_input_size probe) takes it, the first training step
    with one sample per batch fails in batch norm. Refused when the model is built, naming both settings."""
    with pytest.raises(ConfigError, match=r"data.shape=\[8, 8\] with trainer.batch_size=1.*batch normalization"):
        _cls_task(tmp_path).build_model()
    task = _cls_task(tmp_path, batch_size=2)  # two values per channel: trains
    model = task.build_model()
    model.train()(torch.randn(2, 1, 8, 8))
    task = _cls_task(tmp_path, shape=(8, 16))  # last stage 1x2: two values per channel, trains with batch 1
    task.build_model().train()(torch.randn(1, 1, 8, 16))
    with pytest.raises(ConfigError, match="trainer.batch_size=1"):
        _cls_task(tmp_path, name="densenet", shape=(4, 4), kwargs={"blocks": [1, 1, 1]}).build_model()
    task = _cls_task(tmp_path, name="densenet", shape=(4, 4), kwargs={"blocks": [1, 1, 1], "norm": "group"})
    task.build_model().train()(torch.randn(1, 1, 4, 4))  # group norm has no batch statistics


def test_classification_training_probe_leaves_the_model_alone(tmp_path):
    """The training-mode probe runs on a meta-device copy: the built model's batch-norm statistics and the RNG
    are untouched, and it is returned in its usual (training) state."""
    task = _cls_task(tmp_path, shape=(32, 32))
    torch.manual_seed(3)
    model = task.build_model()
    after = torch.rand(1)
    torch.manual_seed(3)
    reference = _cls_task(tmp_path, shape=(32, 32), batch_size=2).build_model()
    assert torch.equal(after, torch.rand(1))  # (the batch-size-2 build does no training probe)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert model.training and task.min_size is not None
