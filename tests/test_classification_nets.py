"""Classification networks: output shapes for each encoding, and a short training lowers the loss."""

from __future__ import annotations

import pytest
import torch

from medfast.nets import ClassificationHead, CoralHead, ResNetClassifier, SonoNet
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
                                                ("resnet", 3, "binary")])
def test_short_training_lowers_loss(name, dims, encoding):
    torch.manual_seed(0)
    k = 2 if encoding == "binary" else 3
    size = 12 if dims == 2 else 8
    x, y = squares(16 if dims == 3 else 30, size, k, dims=dims)
    enc = make_encoder(encoding, k)
    t = enc.encode(y)
    if name == "sononet":
        net = SonoNet(1, k, encoding, width=4, convs_per_block=(1, 1, 1))
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
