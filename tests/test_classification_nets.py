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
