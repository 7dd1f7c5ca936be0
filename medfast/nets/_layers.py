"""3D layers with a faster CPU path and the parameters (state dict) of the ``torch.nn`` ones.

On the CPU, 3D networks run channels-last (``torch.channels_last_3d``), where oneDNN is fastest. Two
of torch's own choices are then slow for the small, batch-1 volumes of registration and segmentation:

* Its convolution heuristic sends a batch-1 convolution whose input has ``C * D * H <= 20480``
  (``use_mkldnn`` in ATen's ``Convolution.cpp``) to its im2col kernels, in the forward AND in the
  backward: 5-8x slower than oneDNN here at 16 channels and 32^3, 2 threads. :class:`Conv3d` calls
  oneDNN directly in the forward, and :class:`_OneDNNConv3d` gives it a oneDNN backward: torch's own
  backward on the volume cut in two halves along D (with the halo the kernel needs) and stacked as a
  batch of 2, which its heuristic sends to oneDNN; at stride 1 the input gradient is instead the
  forward convolution with the flipped, transposed kernel.
* Instance norm of a channels-last input: :class:`InstanceNorm3d` runs it as a group norm with one
  channel per group (the same statistics) on an NCDHW copy, and returns it channels-last (torch's
  channels-last group norm backward is slower than the two copies).

The convolution path also serves NCDHW float32 CPU inputs. Everything else (other dtypes and devices,
dilation, groups, ``padding="same"``) takes the ``torch.nn`` path unchanged; :func:`use_torch_layers`
turns a network's layers back into the ``torch.nn`` ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CL3 = torch.channels_last_3d

# ATen's use_mkldnn: a batch-1 convolution whose last two kernel sizes are not both > 3 goes to oneDNN
# only when its input's N * C * D * H is above this
_TORCH_ONEDNN_MIN = 20480


def is_channels_last(x: torch.Tensor) -> bool:
    """A 5D tensor laid out channels-last (and not also contiguous, as 1-channel tensors are)."""
    return x.dim() == 5 and x.is_contiguous(memory_format=CL3) and not x.is_contiguous()


def _torch_picks_slow_path(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.shape[0] == 1 and not (w.shape[-1] > 3 and w.shape[-2] > 3)
            and x.shape[1] * x.shape[2] * x.shape[3] <= _TORCH_ONEDNN_MIN)


def _halves_backward(go, x, w, stride, padding, mask, fmt):
    """Gradients of a batch-1 convolution through torch's oneDNN backward: the output rows are split in
    two halves along D, each with the input rows (zero-padded by the D padding) its kernel reads, and
    the halves are stacked as a batch of 2 (which torch's heuristic sends to oneDNN). The input
    gradients of the halves are added back where their rows overlap. Differentiable ops only."""
    k, s, p = w.shape[2], stride[0], padding[0]
    d, do = x.shape[2], go.shape[2]
    h = (do + 1) // 2
    rows = s * (h - 1) + k  # padded input rows read by h output rows
    end = s * h + rows  # padded rows the two halves span
    z = (0, 0, 0, 0)
    xp = F.pad(x, (*z, p, end - p - d))  # negative padding crops rows no output reads
    x2 = torch.cat([xp[:, :, :rows], xp[:, :, s * h:end]]).contiguous(memory_format=fmt)
    g2 = torch.cat([go[:, :, :h], F.pad(go[:, :, h:], (*z, 0, 2 * h - do))]).contiguous(memory_format=fmt)
    gx2, gw, gb = torch.ops.aten.convolution_backward(
        g2, x2, w, [w.shape[0]] if mask[2] else None, list(stride), [0, padding[1], padding[2]], [1, 1, 1], False,
        [0, 0, 0], 1, mask)
    gx = None
    if mask[0]:
        gxp = F.pad(gx2[:1], (*z, 0, end - rows)) + F.pad(gx2[1:], (*z, s * h, 0))
        gx = F.pad(gxp, (*z, -p, p + d - end))
    return gx, gw, gb


class _OneDNNConv3d(torch.autograd.Function):
    """Undilated, ungrouped, zero-padded float32 CPU convolution of a channels-last input, forward and
    backward through oneDNN (see the module docstring). The backward is made of differentiable ops, so
    double backward works."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        return torch.mkldnn_convolution(x, w, b, padding, stride, [1, 1, 1], 1)

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward: the form torch.func transforms accept
        x, w, b, stride, padding = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, b is not None

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        fmt = CL3 if is_channels_last(x) else torch.contiguous_format
        go = go.contiguous(memory_format=fmt)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        if not _torch_picks_slow_path(x, w):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                go, x, w, [w.shape[0]] if mask[2] else None, stride, padding, [1, 1, 1], False, [0, 0, 0], 1, mask)
        elif stride == [1, 1, 1]:
            gx = None
            if mask[0]:
                # a stride-1 transposed convolution is the convolution with the kernel flipped and its
                # in/out channels swapped, padded by k - 1 - p (cheaper than the halves' overlap-add)
                wt = w.flip(2, 3, 4).transpose(0, 1).contiguous(memory_format=fmt)
                pad = [k - 1 - p for k, p in zip(w.shape[2:], padding)]
                gx = torch.mkldnn_convolution(go, wt, None, pad, [1, 1, 1], [1, 1, 1], 1)
            _, gw, gb = _halves_backward(go, x, w, stride, padding, [False, *mask[1:]], fmt)
        else:
            gx, gw, gb = _halves_backward(go, x, w, stride, padding, mask, fmt)
        return gx, gw, gb, None, None


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that runs through oneDNN, forward and backward, for
    float32 CPU inputs (see the module docstring), channels-last when its input is channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = is_channels_last(x)
        w = self.weight.contiguous(memory_format=CL3) if cl else self.weight
        # not under torch.compile (mkldnn_convolution has no fake-tensor kernel; the compiler picks its own
        # convolution) nor under CPU autocast (which casts torch's convolution, not this call)
        if (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.dim() == 5
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()  # a Python Function
                and self.padding_mode == "zeros" and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled
                and not isinstance(self.padding, str) and self.dilation == (1, 1, 1) and self.groups == 1
                and all(p < k for p, k in zip(self.padding, self.kernel_size))):
            x = x if cl else x.contiguous()
            return _OneDNNConv3d.apply(x, w, self.bias, list(self.stride), list(self.padding))
        return self._conv_forward(x, w, self.bias)


class ConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` that keeps a channels-last input channels-last."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None or not is_channels_last(x):
            return super().forward(x, output_size)
        w = self.weight.contiguous(memory_format=CL3)
        return F.conv_transpose3d(x, w, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters) that returns a channels-last input's result channels-last.
    It is computed as a group norm with one channel per group (the same statistics) on an NCDHW copy:
    torch's channels-last group norm backward is 2x slower than the copies and the NCDHW kernels together
    (8 channels at 64^3, 2 threads: 5.9 against 13.9 ms forward + backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x) and not self.track_running_stats:
            y = F.group_norm(x.contiguous(), x.shape[1], self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=CL3)
        return super().forward(x)


_TORCH_BASES = {Conv3d: nn.Conv3d, ConvTranspose3d: nn.ConvTranspose3d, InstanceNorm3d: nn.InstanceNorm3d}


def use_torch_layers(module: nn.Module) -> nn.Module:
    """Turns medfast's layers inside ``module`` back into their ``torch.nn`` classes, in place (the same
    parameters and state dict), and returns ``module``: the stock PyTorch path, for comparisons and for
    exporters that only know the ``torch.nn`` classes. Set the network's ``channels_last`` to False too."""
    for m in module.modules():
        base = _TORCH_BASES.get(type(m))
        if base is not None:
            m.__class__ = base
    return module
