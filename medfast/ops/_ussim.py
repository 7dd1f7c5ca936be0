"""Ultrasound ray march: ``ray_march`` (the hot part of the B-mode simulator, ``medfast.ultrasound``).

Kernels: ``csrc/ussim/``. This module validates arguments, registers the fake (meta) kernels of every
``torch.ops.medfast.ussim_*`` op and the autograd of ``ussim_march``, ``ussim_march_lines`` and ``ussim_psf``, and
documents them. Imported by ``medfast.ops`` (so by ``import medfast``): without these registrations a direct op
call under FakeTensorMode / torch.compile failed and its backward silently gave no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medfast._extension import _C  # noqa: F401  (registers torch.ops.medfast)
from medfast.ops._autograd import once_differentiable, refuse_function_transforms
from medfast.ops._validate import check_op_devices, check_tensor, py_scalar

_ops = torch.ops.medfast

N_PROPS = 5
#: The acoustic properties, in the order of the last axis of a property volume: impedance (MRayl),
#: attenuation (dB/cm/MHz), scatterer density, scatter amplitude mean and spread.
PROP_NAMES = ("impedance", "attenuation", "density", "amplitude_mean", "amplitude_std")


@torch.library.register_fake("medfast::ussim_march")
def _march_fake(props, coords, noise, grid_affine, att, background, seed, sharp):
    check_op_devices("medfast::ussim_march", props=props, coords=coords, noise=noise)
    return coords.new_empty((coords.shape[0], coords.shape[1], coords.shape[2], 3))


@torch.library.register_fake("medfast::ussim_march_backward")
def _march_backward_fake(grad, props, coords, noise, grid_affine, att, background, seed, sharp, props_grad,
                         coords_grad, volume_index=None):
    check_op_devices("medfast::ussim_march_backward", grad=grad, props=props, coords=coords, noise=noise,
                     volume_index=volume_index)
    gp = props.new_empty(props.shape) if props_grad else props.new_empty((0,))
    gc = coords.new_empty(coords.shape) if coords_grad else coords.new_empty((0,))
    return gp, gc


def _march_setup(ctx, inputs, output):
    props, coords, noise, grid_affine, att, background, seed, sharp = inputs
    ctx.save_for_backward(props, coords, noise)
    ctx.args = (list(grid_affine), float(att), list(background), int(seed), _sharp3(sharp))


def _march_backward(ctx, grad):
    props, coords, noise = ctx.saved_tensors
    need_props, need_coords = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_props or need_coords):
        return None, None, None, None, None, None, None, None
    gp, gc = _ops.ussim_march_backward(grad, props, coords, noise, *ctx.args, need_props, need_coords)
    gp, gc = once_differentiable("medfast ultrasound ray march", (gp if need_props else None,
                                                                  gc if need_coords else None),
                                 (props, coords, grad))
    return gp, gc, None, None, None, None, None, None


torch.library.register_autograd("medfast::ussim_march", _march_backward, setup_context=_march_setup)


def noise_table(seed: int, rows: int = 1 << 14, device: torch.device | str | None = None) -> torch.Tensor:
    """The seeded table of scatterer values that the world-anchored speckle field is hashed into.

    Parameters
    ----------
    seed : int
        Seed of the table (the same seed always gives the same table, on every device).
    rows : int
        Number of rows, a power of two from 1 to 2**31 (the kernels' 32-bit hash; default 16384: 256 KiB,
        stays in L2 next to the volume; 1 MiB tables measured ~1 ms slower per 256 x 1024 frame from cache
        misses).
    device : torch.device, optional
        Where to put the table.

    Returns
    -------
    Tensor
        ``(rows, 4)`` float32: columns 0 and 1 are the real and imaginary parts of a circular complex
        Gaussian ``n`` of unit power (each N(0, 1/2): a scatterer's phase and amplitude); columns 2 and 3
        are ``g * n`` with ``g`` a standard Gaussian (the scatterer's amplitude spread). The product is
        stored per row, not ``g``: interpolated between rows it correlates exactly as ``n`` does, so the
        simulator's speckle gain holds for the spread part too (an interpolated ``g`` times an
        interpolated ``n`` correlated as the square, and its mean intensity fell 1-3 dB).
    """
    rows = py_scalar(rows)  # NumPy ints and 0-d integer tensors as the ints they hold
    # (a float or a float tensor failed in `&`, True in randn, 2**63 in its size: errors naming no argument)
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"rows must be an int (a power of two), got {rows!r}")
    if not 1 <= rows <= 1 << 31 or rows & (rows - 1):  # (past 2**31 the kernels refuse the table anyway)
        raise ValueError(f"rows must be a power of two from 1 to 2**31, got {rows}")
    if isinstance(seed, torch.Tensor) and seed.device.type == "meta":  # (int() raised "... on meta tensors")
        raise ValueError("seed is a meta tensor: a meta tensor has no values")
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    table = torch.randn(rows, 4, generator=gen, dtype=torch.float32)
    table[:, :2] *= 0.5**0.5
    table[:, 2:] = table[:, 2:3] * table[:, :2]  # (the same n and g draws as the former (re, im, g, 0) table)
    return table.to(device) if device is not None else table


def ray_march(
    props: torch.Tensor,
    coords: torch.Tensor,
    noise: torch.Tensor,
    grid_affine: torch.Tensor | Sequence[float],
    att: float,
    background: Sequence[float],
    seed: int = 0,
    sharp: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    """Marches scanlines through a property volume: specular and scatter echoes with transmission.

    Parameters
    ----------
    props : Tensor
        ``(Bv, D, H, W, 5)`` channels-last property volume, float32 or float64: impedance Z (MRayl),
        attenuation alpha (dB/cm/MHz), scatterer density (>= 0), mean and spread of the scatter
        amplitude. ``Bv`` is 1 (shared by all rays) or ``B``. Differentiable.
    coords : Tensor
        ``(B, R, S, 3)`` voxel coordinates (axis 0, 1, 2 of the volume) of S samples evenly spaced
        along each of R rays, the first sample nearest the probe. Same dtype and device as
        ``props``. Differentiable (the pose gradient flows through it). A sample beyond 1e12 voxels or
        a NaN coordinate reads the background (no gradient); the kernels never convert it to an index.
    noise : Tensor
        ``(N, 4)`` float32 table from :func:`noise_table`, N a power of two (one row: that row everywhere,
        e.g. ``(1, 0, 0, 0)`` for speckle-free unit scatterers).
    grid_affine : Tensor or sequence of 12 floats
        Row-major 3x4 map from voxel coordinates to the scatter-grid cell coordinates (world mm
        divided by the scatter cell size): anchors the speckle in world space.
    att : float
        Round-trip log-amplitude loss per sample per unit attenuation: ``2 f dz ln(10) / 20`` with
        the centre frequency f in MHz and the sample step dz in cm.
    background : sequence of 5 floats
        Properties outside the volume.
    seed : int
        Seed of the hash from scatter cells to table rows.
    sharp : float or sequence of 3 floats
        >= 1: steepness of the impedance interpolation, one value for all voxel axes or one per axis
        (0, 1, 2). Between two voxels the impedance changes over 1/sharp of the voxel instead of all
        of it, so interfaces stay sharp (specular echoes of full amplitude; the transmission loss of the
        full jump, taken per monotone run of samples: docs/ultrasound.md) in coarse volumes;
        1 = trilinear. An anisotropic volume needs one per axis (the
        simulator's ``voxel size / interface width``), else its fine axes get steps much narrower
        than a sample.

    Returns
    -------
    Tensor
        ``(B, R, S, 3)``: per sample, ``E * R`` (specular echo: reflection coefficient times the
        round-trip transmission E down to the sample), and the real and imaginary parts of
        ``E * sqrt(density) * (mean * n + std * m)`` (scatter echo; n and m the table's columns (0, 1) and
        (2, 3) interpolated with the same weights: the complex Gaussian field and its product with the
        amplitude spread).
    """
    props = check_tensor("props", props)
    coords = check_tensor("coords", coords)
    noise = check_tensor("noise", noise)
    if props.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"props must be float32 or float64, got {props.dtype}")
    if coords.dtype != props.dtype:
        raise TypeError(f"coords must have the dtype of props ({props.dtype}), got {coords.dtype}")
    if props.dim() != 5 or props.shape[-1] != N_PROPS:
        raise ValueError(f"props must have shape (B, D, H, W, {N_PROPS}), got {tuple(props.shape)}")
    if coords.dim() != 4 or coords.shape[-1] != 3 or coords.numel() == 0:
        raise ValueError(f"coords must have shape (B, R, S, 3) with R, S >= 1, got {tuple(coords.shape)}")
    if props.shape[0] not in (1, coords.shape[0]):
        raise ValueError(f"props batch ({props.shape[0]}) must be 1 or the coords batch ({coords.shape[0]})")
    if noise.dtype != torch.float32 or noise.dim() != 2 or noise.shape[1] != 4:
        raise ValueError(f"noise must be a (N, 4) float32 table (see noise_table), got {tuple(noise.shape)}")
    for name, t in (("coords", coords), ("noise", noise)):
        if t.device != props.device:
            raise ValueError(f"{name} is on {t.device} but props is on {props.device}")
    g = [float(v) for v in (grid_affine.flatten().tolist() if isinstance(grid_affine, torch.Tensor) else grid_affine)]
    if len(g) != 12:
        raise ValueError(f"grid_affine must have 12 entries (3x4), got {len(g)}")
    bg = [float(v) for v in background]
    if len(bg) != N_PROPS:
        raise ValueError(f"background must have {N_PROPS} entries, got {len(bg)}")
    k = _sharp3(sharp)
    if not torch.compiler.is_compiling():  # (compiled: the numbers may be symbolic; simulate checked them)
        att, seed = py_scalar(att), py_scalar(seed)
        # a negative att is gain, not loss (1.9e11 echoes); NaN made every sample NaN
        if isinstance(att, bool) or not isinstance(att, (int, float)) or not 0 <= att < float("inf"):
            raise ValueError(f"att must be a finite number >= 0, got {att!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
            raise ValueError(f"seed must be a 64-bit int, got {seed!r}")
    refuse_function_transforms("medfast.ops.ray_march", props, coords)
    return _ops.ussim_march(props, coords, noise, g, float(att), bg, int(seed), k)


def _sharp3(sharp: float | Sequence[float]) -> list[float]:
    """``sharp`` as the ops take it: one value >= 1 per voxel axis (a single value for all three)."""
    try:
        k = [float(v) for v in sharp]
    except TypeError:  # (a number, or a 0-d tensor or array)
        k = [float(sharp)] * 3
    if len(k) != 3 or not all(v >= 1.0 for v in k):  # (also refuses NaN)
        raise ValueError(f"sharp must be >= 1 (one value or one per voxel axis), got {sharp}")
    return k


@torch.library.register_fake("medfast::ussim_march_lines")
def _march_lines_fake(props, start, step, weights, noise, grid_affine, att, background, seed, sharp,
                      volume_index=None):
    check_op_devices("medfast::ussim_march_lines", props=props, start=start, step=step, weights=weights, noise=noise,
                     volume_index=volume_index)
    return start.new_empty((start.shape[0], start.shape[1], 3, weights.shape[1]))


@torch.library.register_fake("medfast::ussim_march_lines_backward")
def _march_lines_backward_fake(grad, props, start, step, weights, noise, grid_affine, att, background, seed, sharp,
                               props_grad, coords_grad, volume_index=None):
    check_op_devices("medfast::ussim_march_lines_backward", grad=grad, props=props, start=start, step=step,
                     weights=weights, noise=noise, volume_index=volume_index)
    B, L, E, _ = start.shape
    gp = props.new_empty(props.shape) if props_grad else props.new_empty((0,))
    gc = start.new_empty((B, L * E, weights.shape[1], 3)) if coords_grad else start.new_empty((0,))
    return gp, gc


def _march_lines_setup(ctx, inputs, output):
    props, start, step, weights, noise, g, att, bg, seed, sharp, volume_index = inputs
    ctx.save_for_backward(props, start, step, weights, noise, volume_index)
    ctx.args = (list(g), float(att), list(bg), int(seed), list(sharp))


def _march_lines_backward(ctx, grad):
    """The gradient of ``ussim_march_lines``: ``ussim_march_lines_backward``, the per-ray backward of the
    sub-rays (sample positions ``start + i * step``; on CPU without materialising them). ``weights`` and
    ``noise`` are constants (no gradient)."""
    props, start, step, weights, noise, volume_index = ctx.saved_tensors
    need_props = ctx.needs_input_grad[0]
    need_coords = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    none = (None,) * 8
    if not (need_props or need_coords):
        return (None, None, None) + none
    B, L, E, _ = start.shape
    S = weights.shape[1]
    gp, gc = _ops.ussim_march_lines_backward(grad, props, start, step, weights, noise, *ctx.args, need_props,
                                             need_coords, volume_index)
    gstart = gstep = None
    if need_coords:
        i = torch.arange(S, device=start.device, dtype=start.dtype)
        gc = gc.view(B, L, E, S, 3)
        gstart = gc.sum(3)
        gstep = torch.einsum("blesk,s->blk", gc, i)
    gp, gstart, gstep = once_differentiable("medfast ultrasound ray march",
                                            (gp if need_props else None, gstart, gstep),
                                            (props, start, step, grad))
    return (gp, gstart, gstep) + none


torch.library.register_autograd("medfast::ussim_march_lines", _march_lines_backward, setup_context=_march_lines_setup)


def march_lines(props: torch.Tensor, start: torch.Tensor, step: torch.Tensor, weights: torch.Tensor,
                noise: torch.Tensor, grid_affine: Sequence[float], att: float, background: Sequence[float],
                seed: int = 0, sharp: float | Sequence[float] = 1.0,
                volume_index: torch.Tensor | None = None) -> torch.Tensor:
    """Scanlines of E sub-rays each, summed over the sub-rays (the fused forward of the simulator).

    Sample i of sub-ray e of line l is at the voxel position ``start[b, l, e] + i * step[b, l]``
    (``start`` ``(B, L, E, 3)``, ``step`` ``(B, L, 3)``); its echoes (those of :func:`ray_march`)
    are weighted by ``weights[e, i]`` (``(E, S, 3)``, constant) and summed over e. Returns
    ``(B, L, 3, S)`` (channel-major per line). Frame b reads volume ``volume_index[b]`` of ``props``
    (``(V, D, H, W, 5)``, an int64 ``(B,)`` index on the same device), or without an index volume 0
    if ``V == 1``, else volume b. ``sharp``: one value or one per voxel axis (:func:`ray_march`).
    Arguments are not validated (internal to
    :func:`medfast.ultrasound.simulate`); props, start and step are differentiable.
    """
    g = [float(v) for v in grid_affine]
    return _ops.ussim_march_lines(props, start, step, weights, noise, g, float(att), [float(v) for v in background],
                                  int(seed), _sharp3(sharp), volume_index)


@torch.library.register_fake("medfast::ussim_psf")
def _psf_fake(x, h, w, transpose):
    check_op_devices("medfast::ussim_psf", x=x, h=h, w=w)
    if transpose:
        return x.new_empty((x.shape[0], x.shape[2], 3, x.shape[3]))
    return x.new_empty((x.shape[0], 2, x.shape[1], x.shape[3]))


def _psf_setup(ctx, inputs, output):
    _, h, w, transpose = inputs
    ctx.save_for_backward(h, w)
    ctx.transpose = transpose


def _psf_backward(ctx, grad):
    """The PSF (``transpose=False``) and its adjoint are each the other's backward: linear in x, so
    differentiable any number of times (create_graph included: this call is recorded too). ``h`` and ``w``
    are constants (no gradient)."""
    h, w = ctx.saved_tensors
    return _ops.ussim_psf(grad, h, w, not ctx.transpose), None, None, None


torch.library.register_autograd("medfast::ussim_psf", _psf_backward, setup_context=_psf_setup)


def psf(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The simulator's IQ point-spread function (linear, constant weights; differentiable in x).

    ``x`` ``(B, L, 3, S)`` (specular, scatter re, scatter im per line), ``h`` ``(3, K)`` axial taps per
    channel (K odd, centred), ``w`` ``(3, J, S)`` depth-dependent lateral taps across the lines (J
    odd, centred; lines outside the frame are zero). Returns ``(B, 2, L, S)``: the real part (lateral
    of channels 0 + 1) and the imaginary part (channel 2).
    """
    return _ops.ussim_psf(x, h, w, False)
