"""UNet: 2D/3D shapes (also sizes not divisible by the downsampling), deep supervision, gradients, errors."""

import pytest
import torch

from medfast.nets import UNet


@pytest.mark.parametrize("nd, size", [(2, (32, 24)), (3, (16, 12, 8)), (3, (13, 10, 7)), (2, (17, 9))])
def test_shapes(nd, size):
    net = UNet(nd, 2, 5, channels=(4, 8, 16), convs_per_level=1)
    x = torch.randn(2, 2, *size)
    y = net(x)
    assert y.shape == (2, 5, *size)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_deep_supervision_outputs():
    net = UNet(3, 1, 3, channels=(4, 8, 16), deep_supervision=True)
    x = torch.randn(1, 1, 16, 16, 8)
    outs = net(x)
    assert isinstance(outs, list) and [tuple(o.shape) for o in outs] == [(1, 3, 16, 16, 8), (1, 3, 8, 8, 4)]
    net.eval()
    assert net(x).shape == (1, 3, 16, 16, 8)


def test_instance_norm_makes_samples_independent():
    net = UNet(2, 1, 2, channels=(4, 8)).eval()
    a, b = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(net(torch.cat([a, b]))[:1], net(a))
    # and invariant to the input scale (bias-free convs, then instance norm)
    torch.testing.assert_close(net(a * 3), net(a), atol=1e-4, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(4)
    with pytest.raises(ValueError, match="channels"):
        UNet(3, channels=[8])
    with pytest.raises(ValueError, match="norm"):
        UNet(3, norm="layer")
    with pytest.raises(ValueError, match="spatial dims"):
        UNet(3)(torch.randn(1, 1, 8, 8))
