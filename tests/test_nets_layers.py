"""medfast.nets._layers: the oneDNN convolution path (forward, backward, double backward) against
torch.nn.functional.conv3d in float64, in both layouts and on both backward routes, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfast.nets import LocalNet
from medfast.nets._layers import CL3, Conv3d, InstanceNorm3d, _torch_picks_slow_path, use_torch_layers

# (batch, in, out, kernel, stride, padding, depth): odd and even depths, depth 1 and 2 (one half empty),
# strides 1 and 2, kernels 1/3/5, no padding; batch 2 and a large input take torch's own oneDNN backward
CASES = [(1, 2, 8, 3, 1, 1, 13), (1, 4, 4, 3, 2, 1, 13), (1, 4, 4, 3, 2, 1, 12), (1, 3, 5, 1, 1, 0, 9),
         (1, 3, 5, 5, 1, 2, 11), (1, 3, 5, 3, 1, 0, 10), (1, 3, 5, 3, 2, 0, 9), (1, 6, 6, 3, 1, 1, 2),
         (1, 6, 6, 3, 1, 1, 1), (1, 6, 6, 3, 2, 1, 1), (2, 3, 4, 3, 1, 1, 8), (1, 64, 4, 3, 1, 1, 60)]


def _input(b, ci, d, layout, hw=(7, 6)):
    x = torch.randn(b, ci, d, *hw)
    return (x.contiguous(memory_format=CL3) if layout == "channels_last" else x).requires_grad_()


def _reference_grads(x, conv, g):
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    y = F.conv3d(xr, wr, br, conv.stride, conv.padding)
    return y, torch.autograd.grad(y, (xr, wr, br), g)


@pytest.mark.parametrize("layout", ["channels_last", "ncdhw"])
@pytest.mark.parametrize("case", CASES)
def test_conv3d_matches_float64_conv3d(case, layout):
    b, ci, co, k, s, p, d = case
    torch.manual_seed(0)
    conv = Conv3d(ci, co, k, stride=s, padding=p)
    x = _input(b, ci, d, layout)
    y = conv(x)
    assert y.grad_fn.name().startswith("_OneDNNConv3d")
    assert y.is_contiguous(memory_format=CL3) == (layout == "channels_last")
    assert _torch_picks_slow_path(x, conv.weight) == (b == 1 and k <= 3 and ci * d * 7 <= 20480)
    g = torch.randn(y.shape, dtype=torch.float64)
    ref, ref_grads = _reference_grads(x, conv, g)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), g.float())
    for a, r in zip(grads, ref_grads):
        assert a.shape == r.shape
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_partial_grads_and_no_bias(stride):
    """A data input (no gradient) and a bias-free convolution: only the gradients asked for."""
    torch.manual_seed(1)
    conv = Conv3d(3, 5, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(1, 3, 9, 8, 7).contiguous(memory_format=CL3)
    y = conv(x)
    (gw,) = torch.autograd.grad(y.square().sum(), conv.weight)
    xr, wr = x.double(), conv.weight.detach().double().requires_grad_()
    (rw,) = torch.autograd.grad(F.conv3d(xr, wr, None, stride, 1).square().sum(), wr)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5 * float(rw.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_double_backward(stride):
    """The backward is made of differentiable ops: a gradient penalty's gradient matches the reference."""
    torch.manual_seed(2)
    conv = Conv3d(2, 3, 3, stride=stride, padding=1)
    x = _input(1, 2, 7, "channels_last", (6, 5))

    def penalty(weight, bias, inp, fn):
        y = fn(inp, weight, bias)
        (gx,) = torch.autograd.grad(y.square().sum(), inp, create_graph=True)
        return gx.square().sum()

    w = conv.weight
    ours = penalty(w, conv.bias, x, lambda i, w_, b_: conv(i))
    (gw,) = torch.autograd.grad(ours, w)
    wr = w.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    ref = penalty(wr, conv.bias.detach().double(), xr, lambda i, w_, b_: F.conv3d(i, w_, b_, stride, 1))
    (rw,) = torch.autograd.grad(ref, wr)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-4 * float(rw.abs().max()))


def test_conv3d_other_inputs_take_the_torch_path():
    """float64 (gradcheck), dilation, groups and padding='same' run torch's own convolution."""
    torch.manual_seed(3)
    x = torch.randn(1, 2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    conv = Conv3d(2, 2, 3, padding=1).double()
    assert not conv(x).grad_fn.name().startswith("_OneDNN")
    assert torch.autograd.gradcheck(conv, (x,))
    xf = torch.randn(1, 2, 6, 6, 6)
    for c in (Conv3d(2, 2, 3, padding=2, dilation=2), Conv3d(2, 2, 3, padding=1, groups=2),
              Conv3d(2, 2, 3, padding="same")):
        y = c(xf)
        assert not y.grad_fn.name().startswith("_OneDNN")
        torch.testing.assert_close(y, F.conv3d(xf, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups))


def test_conv3d_under_cpu_autocast_casts_like_torch():
    conv = Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5, 5).contiguous(memory_format=CL3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = conv(x), torch.nn.functional.conv3d(x, conv.weight, conv.bias, 1, 1)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's flags() warns on CPU-only builds
def test_conv3d_respects_disabled_onednn():
    conv = Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5, 5)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not conv(x).grad_fn.name().startswith("_OneDNN")
    assert conv(x).grad_fn.name().startswith("_OneDNN")


def test_instance_norm_channels_last_matches_torch():
    torch.manual_seed(4)
    norm = InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 6, 7) * 3 + 1
    y = norm(x.contiguous(memory_format=CL3))
    assert y.is_contiguous(memory_format=CL3)
    torch.testing.assert_close(y, torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias),
                               rtol=1e-5, atol=1e-5)


def test_use_torch_layers_restores_the_stock_classes():
    net = LocalNet(3, num_channel_initial=2, depth=1, extract_levels=(0, 1))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert use_torch_layers(net) is net
    kinds = {type(m) for m in net.modules()}
    assert torch.nn.Conv3d in kinds and torch.nn.ConvTranspose3d in kinds and torch.nn.InstanceNorm3d in kinds
    assert not any(k.__module__ == "medfast.nets._layers" for k in kinds)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_localnet_under_torch_compile():
    """torch.compile traces the network (mkldnn_convolution has no fake kernel, so compiled code takes
    torch's convolution) and gives the eager outputs and gradients."""
    torch.manual_seed(5)
    net = LocalNet(3, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2))
    with torch.no_grad():
        for h in net.heads.values():
            h.weight.normal_(0, 0.1)
    x = torch.rand(1, 2, 12, 10, 8)
    ref = net(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    out = torch.compile(net, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.detach().abs().max()))
    scale = max(float(g.abs().max()) for g in ref_grads)
    for p, g in zip(net.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4 * scale)
