"""Classification networks: output shapes for each encoding, and a short training lowers the loss."""

from __future__ import annotations

import pytest
import torch

from medfast.nets import ClassificationHead, CoralHead, DenseNetClassifier, ResNetClassifier, SonoNet
from medfast.tasks.classification import ClassificationLoss, make_encoder

OUT = {"nominal": 4, "binary": 1, "ordinal": 3}


@pytest.mark.parametrize("encoding", ["nominal", "binary", "ordinal"])
def test_sononet_shapes(encoding):
    k = 2 if encoding == "binary" else 4
    net = SonoNet(1, k, encoding, width=4, convs_per_block=(1, 1, 2))
    x = torch.randn(2, 1, 32, 24)
    out = net(x)
    assert out.shape == (2, OUT[encoding] if encoding != "nominal" else 4)
    assert net.features(x).shape == (2, 8, 8, 6)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("encoding", ["nominal", "binary", "ordinal"])
def test_resnet_shapes(dims, encoding):
    k = 2 if encoding == "binary" else 4
    net = ResNetClassifier(dims, 2, k, encoding, width=4, blocks=(1, 2, 1))
    x = torch.randn(2, 2, *([8] * dims))
    assert net(x).shape == (2, OUT[encoding])
    assert net.features(x).shape == (2, 16, *([2] * dims))
    # odd sizes, stride-2 stem
    net2 = ResNetClassifier(dims, 1, k, encoding, width=4, blocks=(1, 1), stem_stride=2)
    assert net2(torch.randn(1, 1, *([7] * dims))).shape == (1, OUT[encoding])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("encoding", ["nominal", "binary", "ordinal"])
def test_densenet_shapes(dims, encoding):
    k = 2 if encoding == "binary" else 4
    net = DenseNetClassifier(dims, 2, k, encoding, width=6, growth_rate=4, blocks=(2, 3), bn_size=2)
    x = torch.randn(2, 2, *([8] * dims))
    assert net(x).shape == (2, OUT[encoding])
    # stem 6 + 2 * 4 = 14 -> transition keeps 7 -> + 3 * 4 = 19 channels at half the size
    assert net.num_features == 19
    assert net.features(x).shape == (2, 19, *([4] * dims))
    net2 = DenseNetClassifier(dims, 1, k, encoding, width=4, growth_rate=3, blocks=(1, 1, 1), compression=1.0,
                              stem_stride=2, norm="group")
    assert net2(torch.randn(1, 1, *([9] * dims))).shape == (1, OUT[encoding])
    assert net2.num_features == 4 + 3 * 3
    net3 = DenseNetClassifier(dims, 1, k, encoding, width=4, growth_rate=3, blocks=(1, 1), stem_stride=2,
                              stem_pool=True)
    assert net3.features(torch.randn(1, 1, *([16] * dims))).shape == (1, 3 + 3, *([2] * dims))


def test_densenet_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        DenseNetClassifier(1)
    with pytest.raises(ValueError, match="blocks"):
        DenseNetClassifier(2, blocks=())
    with pytest.raises(ValueError, match="compression"):
        DenseNetClassifier(2, compression=0.0)
    with pytest.raises(ValueError, match="norm must be"):
        DenseNetClassifier(2, norm="layer")


def test_densenet_group_norm_is_per_sample():
    """With ``norm="group"`` each sample's output does not depend on the rest of the batch (what makes DDP
    on several processes equal one process on the combined batch); with batch norm in training it does."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 12, 12)
    g = DenseNetClassifier(2, 1, 3, width=4, growth_rate=4, blocks=(2, 2), norm="group").train()
    torch.testing.assert_close(g(x)[:2], g(x[:2]), rtol=1e-5, atol=1e-6)
    b = DenseNetClassifier(2, 1, 3, width=4, growth_rate=4, blocks=(2, 2), norm="batch").train()
    assert not torch.allclose(b(x)[:2], b(x[:2]), atol=1e-4)


def test_heads():
    h = CoralHead(6, 5)
    assert h(torch.randn(3, 6)).shape == (3, 4)
    assert sum(p.numel() for p in h.parameters()) == 6 + 4  # one weight vector, K-1 biases
    # rank consistency: with ordered biases, P(y > k) is non-increasing in k for every input
    p = torch.sigmoid(h(torch.randn(50, 6)))
    assert (p[:, 1:] <= p[:, :-1] + 1e-7).all()
    with pytest.raises(ValueError):
        ClassificationHead(4, 3, "binary")
    with pytest.raises(ValueError):
        ClassificationHead(4, 3, "softmax")
    with pytest.raises(ValueError):
        ResNetClassifier(1)


def squares(n: int, size: int = 16, classes: int = 3, seed: int = 0, dims: int = 2):
    """Noisy images with one bright square (cube) whose side ``2 + 2 * label`` is the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.2 * torch.randn(n, 1, *([size] * dims), generator=g)
    for i in range(n):
        s = 2 + 2 * int(y[i])
        o = torch.randint(0, size - s + 1, (dims,), generator=g).tolist()
        idx = (i, 0, *[slice(a, a + s) for a in o])
        x[idx] += 1.0
    return x, y


@pytest.mark.parametrize("name,dims,encoding", [("sononet", 2, "nominal"), ("resnet", 2, "ordinal"),
                                                ("resnet", 3, "binary"), ("densenet", 2, "nominal"),
                                                ("densenet", 3, "ordinal")])
def test_short_training_lowers_loss(name, dims, encoding):
    torch.manual_seed(0)
    k = 2 if encoding == "binary" else 3
    size = 12 if dims == 2 else 8
    x, y = squares(16 if dims == 3 else 30, size, k, dims=dims)
    enc = make_encoder(encoding, k)
    t = enc.encode(y)
    if name == "sononet":
        net = SonoNet(1, k, encoding, width=4, convs_per_block=(1, 1, 1))
    elif name == "densenet":
        net = DenseNetClassifier(dims, 1, k, encoding, width=4, growth_rate=4, blocks=(2, 2), bn_size=2)
    else:
        net = ResNetClassifier(dims, 1, k, encoding, width=4, blocks=(1, 1))
    loss_fn = ClassificationLoss(encoding)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn(net(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses
    with torch.no_grad():  # batch statistics (train mode): the running ones lag after 25 steps
        acc = (enc.decode(net(x), logits=True) if encoding != "nominal" else enc.decode(net(x))) == y
    assert acc.float().mean() > 1 / k + 0.2


def _constant(net):
    """Constant positive weights: every receptive field is symmetric about its cell's centre."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            torch.nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
    return net.eval()


@pytest.mark.parametrize("make, size", [
    (lambda: ResNetClassifier(2, 1, 2, width=2, blocks=(1, 2, 1)), 96),
    (lambda: ResNetClassifier(2, 1, 2, width=2, stem_stride=2), 160),
    (lambda: ResNetClassifier(3, 1, 2, width=2, blocks=(1, 1, 1)), 48),
    (lambda: DenseNetClassifier(2, 1, 2, width=2, growth_rate=2, blocks=(1, 1, 1)), 64),
    (lambda: DenseNetClassifier(2, 1, 2, width=2, growth_rate=2, blocks=(1, 1, 1), stem_stride=2), 96),
    (lambda: DenseNetClassifier(3, 1, 2, width=2, growth_rate=2, blocks=(1, 1), stem_stride=2), 40),
])
def test_feature_grid_is_the_receptive_field_centre(make, size):
    """``feature_grid()`` against autograd: with constant weights, an all-ones input and the field away from
    the border, the gradient of an interior feature cell over the input is symmetric about the cell's centre,
    so its centroid is that centre (networks without max pooling, whose gradient picks one tied input; those
    are covered by the Grad-CAM dot tests)."""
    net = _constant(make())
    dims = net.spatial_dims
    x = torch.ones(1, 1, *[size] * dims, requires_grad=True)
    f = net.features(x)
    j = f.shape[2] // 2
    (g,) = torch.autograd.grad(f[(0, slice(None)) + (j,) * dims].sum(), x)
    g = g[0, 0].double()
    nz = g.nonzero()
    assert nz.min() > 0 and nz.max() < size - 1  # the whole field inside the image
    ax = torch.arange(size, dtype=torch.float64)
    centre = [float((g.sum([k for k in range(dims) if k != a]) * ax).sum() / g.sum()) for a in range(dims)]
    origin, stride = net.feature_grid()
    assert len(origin) == len(stride) == dims
    expected = [o + s * j for o, s in zip(origin, stride, strict=True)]
    assert max(abs(a - b) for a, b in zip(centre, expected, strict=True)) < 1e-4, (centre, expected)


def test_feature_grid_follows_the_layer_options():
    """Hand-derived grids: a 2x2 pooling centres cell j on 2j + 0.5, a stride-2 3x3 conv of padding 1 (or a
    3x3 max pooling of stride 2, padding 1) on 2j."""
    assert SonoNet(1, 2, width=4, convs_per_block=(1, 1, 1, 1)).feature_grid() == ((3.5, 3.5), (8.0, 8.0))
    assert ResNetClassifier(2, 1, 2, width=4).feature_grid() == ((0.0, 0.0), (8.0, 8.0))
    assert ResNetClassifier(3, 1, 2, width=4, stem_stride=2).feature_grid() == ((0.0,) * 3, (16.0,) * 3)
    assert DenseNetClassifier(2, 1, 2, width=4, blocks=(1, 1, 1)).feature_grid() == ((1.5, 1.5), (4.0, 4.0))
    assert DenseNetClassifier(2, 1, 2, width=4, blocks=(1, 1), stem_stride=2,
                              stem_pool=True).feature_grid() == ((2.0, 2.0), (8.0, 8.0))
