"""Image-synthesis metrics: PSNR, SSIM (per image) and a patch sliced-Wasserstein distance between two sets of
frames (a distribution metric that needs no pretrained network), plus PNG grids of generated vs reference
frames."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from medfast.ops._validate import py_scalar
from medfast.tasks._figures import new_figure, save_figure

__all__ = ["psnr", "save_grid", "sliced_wasserstein", "ssim"]


def _check_pair(x: torch.Tensor, y: torch.Tensor, name_x: str = "x", name_y: str = "y") -> None:
    for name, t in ((name_x, x), (name_y, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, C, H, W) images, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _check_range(data_range: float, name: str = "data_range") -> float:
    """A positive, finite number (also ssim's sigma, k1 and k2: a NaN or negative k gave NaN or garbage)."""
    if isinstance(data_range, torch.Tensor) and data_range.numel() == 1:  # e.g. x.max() - x.min()
        if data_range.device.type == "meta":  # (.item() raised "cannot be called on meta tensors")
            raise ValueError(f"{name} is a meta tensor: a meta tensor has no values; pass a number")
        data_range = data_range.item()
    if (not isinstance(data_range, numbers.Real) or isinstance(data_range, bool) or not data_range > 0
            or not math.isfinite(data_range)):
        raise ValueError(f"{name} must be a positive, finite number, got {data_range!r}")
    return float(data_range)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image, ``10 log10(data_range^2 / MSE)`` in dB.

    Parameters
    ----------
    x, y : Tensor
        ``(B, C, H, W)`` images (e.g. generated and reference B-mode frames in ``[0, 1]``).
    data_range : float
        Peak-to-peak range of the images (1 for ``[0, 1]``).

    Returns
    -------
    Tensor
        ``(B,)`` float64 dB; ``inf`` where the images are identical. Computed with plain PyTorch ops, so it
        carries autograd from inputs that require grad (an evaluation metric, not a training loss).
    """
    _check_pair(x, y)
    r = _check_range(data_range)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(r * r / mse)


def _gaussian_window(sigma: float, truncate: float, device, dtype) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Structural similarity of each image (Wang et al. 2004) with a Gaussian window.

    Local means, variances and covariance are Gaussian-weighted (``sigma`` pixels, window truncated at 3.5
    sigma: 11 x 11 for sigma 1.5), ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 +
    s_y^2 + C2))`` with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``, averaged over the pixels
    whose window lies inside the image and over channels. Equals scikit-image's
    ``structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=L)``.

    Parameters
    ----------
    x, y : Tensor
        ``(B, C, H, W)`` images, at least as large as the window.
    data_range : float
        Peak-to-peak range of the images.
    sigma : float
        Standard deviation of the Gaussian window, in pixels (finite, > 0; the window spans 2 round(3.5 sigma)
        + 1).
    k1, k2 : float
        The stabilizing constants' factors (finite, > 0): ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.

    Returns
    -------
    Tensor
        ``(B,)`` float64 SSIM in ``[-1, 1]`` (1 for identical images). Computed with plain PyTorch ops, so
        it carries autograd from inputs that require grad (an evaluation metric, not a training loss).
    """
    _check_pair(x, y)
    r = _check_range(data_range)
    sigma, k1, k2 = (_check_range(v, name) for v, name in ((sigma, "sigma"), (k1, "k1"), (k2, "k2")))
    B, C, H, W = x.shape
    # the window's size before it is built: a huge sigma (1e300) overflowed there instead of failing this check
    n = 2 * int(3.5 * sigma + 0.5) + 1
    if H < n or W < n:
        raise ValueError(f"images of {H}x{W} pixels are smaller than the {n}x{n} SSIM window (sigma={sigma})")
    x, y = x.double(), y.double()
    w = _gaussian_window(sigma, 3.5, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid convolution, per channel
        t = t.reshape(B * C, 1, *t.shape[2:])
        t = F.conv2d(t, w.view(1, 1, n, 1))
        return F.conv2d(t, w.view(1, 1, 1, n))

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(B, C, -1).mean(-1).mean(-1)


def _pyramid_levels(shapes: Sequence[Sequence[int]], levels: int, patch_size: int) -> int:
    """At most ``levels``, as many as keep every level of every image at least ``patch_size`` pixels a side
    (the 2x pools round up). The coarsest level is then always the low-pass residual, which holds the mean
    brightness: skipping it would make the distance blind to a change of brightness."""
    sizes = [min(s[-2:]) for s in shapes]
    n = 1
    while n < levels and all(-(-s // 2) >= patch_size for s in sizes):
        sizes = [-(-s // 2) for s in sizes]
        n += 1
    return n


def _laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels (finest first) and the low-pass residual last; 2x average-pool downsampling."""
    out = []
    cur = x
    for _ in range(levels - 1):
        low = F.avg_pool2d(cur, 2, ceil_mode=True)
        up = F.interpolate(low, size=cur.shape[-2:], mode="bilinear", align_corners=False)
        out.append(cur - up)
        cur = low
    out.append(cur)
    return out


def _patches(level: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, C * size * size)`` patches of ``level`` at images ``idx`` and top-left corners ``(rows, cols)``."""
    r = rows[:, None, None] + torch.arange(size, device=level.device)[None, :, None]
    c = cols[:, None, None] + torch.arange(size, device=level.device)[None, None, :]
    p = level[idx[:, None, None], :, r, c]  # (n, size, size, C)
    return p.permute(0, 3, 1, 2).reshape(idx.numel(), -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, levels: int = 3, patch_size: int = 7,
                       n_patches: int = 4096, n_projections: int = 256, seed: int = 0,
                       data_range: float = 1.0) -> torch.Tensor:
    """Sliced Wasserstein distance between the local-patch distributions of two sets of images.

    As the SWD of Karras et al. 2018 ("Progressive growing of GANs"): both sets are decomposed into Laplacian
    pyramids (``levels`` levels, 2x average-pool steps); at each level ``n_patches`` patches of ``patch_size``
    x ``patch_size`` pixels are drawn at random from each set (images and positions seeded by ``seed``; the
    same draws for two sets of equal shape) and standardized per channel with the mean and standard deviation
    of the two sets' patches pooled (the standard deviation at least ``1e-6 * data_range``); the patch
    descriptors are projected on ``n_projections`` random unit directions, and the Wasserstein-1 distance of
    each 1D projection (the mean absolute difference of the sorted projections) is averaged over directions
    and levels. No pretrained network is involved, so the value is comparable between runs with the same
    arguments only.

    0 for identical sets; it grows with a change of the images' local statistics (brightness, contrast,
    texture, blur, speckle) while the change is comparable to the sets' spread, but it is bounded: the pooled
    standardization makes it invariant to scaling (and shifting) both sets alike (above the floor), and it
    saturates once the sets differ by much more than their spread (a brightness offset of 1 and of 1000 score
    alike; an all-black and an all-white generator score alike against one reference). It ranks generators
    against one reference set; absolute brightness or contrast errors are PSNR's and L1's to show.

    Parameters
    ----------
    a, b : Tensor
        ``(N, C, H, W)`` and ``(M, C, H', W')`` sets of images (any sizes; at least ``patch_size`` pixels).
    levels : int
        Pyramid levels, at most: fewer where the images are too small for them (every level keeps at least
        ``patch_size`` pixels a side, the coarsest is always the low-pass residual, so a change of brightness
        always counts).
    patch_size, n_patches, n_projections : int
    seed : int
    data_range : float
        Peak-to-peak range of the images (1 for ``[0, 1]``): the standardization's floor, so that two
        near-constant sets differing by a rounding error score near 0 rather than as far apart as any two
        sets can be (the floor was an absolute 1e-8).

    Returns
    -------
    Tensor
        Scalar float64 distance (in units of the pooled standard deviation of the patch values). Not
        differentiable (the inputs are detached); the same inputs and ``seed`` give the same draws.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] < 1:
            raise ValueError(f"{name} must be a (N, C, H, W) tensor with N >= 1, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.is_complex():  # (.double() dropped the imaginary part)
            raise TypeError(f"{name} must be real images, got {t.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same channels, got {a.shape[1]} and {b.shape[1]}")
    # NumPy scalars and 0-d tensors as the Python ints they hold (docs/api/interop.md)
    levels, patch_size, n_patches, n_projections, seed = (py_scalar(v) for v in (levels, patch_size, n_patches,
                                                                               n_projections, seed))
    for name, v in (("levels", levels), ("patch_size", patch_size), ("n_patches", n_patches),
                    ("n_projections", n_projections)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    floor = 1e-6 * _check_range(data_range)  # relative to the data: a change far below it is no change
    if min(a.shape[-2:]) < patch_size or min(b.shape[-2:]) < patch_size:
        raise ValueError(f"images must have at least patch_size={patch_size} pixels per side, got "
                         f"{tuple(a.shape[-2:])} and {tuple(b.shape[-2:])}")
    dev = a.device
    g = torch.Generator().manual_seed(seed)
    levels = _pyramid_levels((a.shape, b.shape), levels, patch_size)
    pa, pb = _laplacian_pyramid(a.detach().double(), levels), _laplacian_pyramid(b.detach().double().to(dev), levels)
    dists = []
    for la, lb in zip(pa, pb, strict=True):
        draws = []
        for lev in (la, lb):
            if draws and lev.shape == la.shape:  # same shape: the same draws (identical sets -> exactly 0)
                draws.append(draws[0])
                continue
            n, _, h, w = lev.shape
            draws.append(tuple(torch.randint(0, m, (n_patches,), generator=g).to(dev)
                               for m in (n, h - patch_size + 1, w - patch_size + 1)))
        da = _patches(la, *draws[0], patch_size)
        db = _patches(lb, *draws[1], patch_size)
        C = la.shape[1]
        both = torch.cat([da, db]).reshape(-1, C, patch_size * patch_size)
        mean = both.mean(dim=(0, 2)).repeat_interleave(patch_size * patch_size)
        std = both.std(dim=(0, 2)).clamp_min(floor).repeat_interleave(patch_size * patch_size)
        da, db = (da - mean) / std, (db - mean) / std
        dirs = torch.randn(da.shape[1], n_projections, generator=g, dtype=torch.float64).to(dev)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        proj_a, _ = torch.sort((dirs.T @ da.T).contiguous(), dim=1)  # (projections, patches), sorted
        proj_b, _ = torch.sort((dirs.T @ db.T).contiguous(), dim=1)
        dists.append((proj_a - proj_b).abs().mean())
    return torch.stack(dists).mean()


def save_grid(path: str | Path, rows: Sequence[tuple[str, torch.Tensor]], *, max_columns: int = 8,
              title: str | None = None, column_titles: Sequence[str] | None = None,
              ranges: Sequence[tuple[float, float] | None] | None = None) -> Path:
    """Writes a PNG grid: one row per ``(name, images)`` entry (e.g. condition, generated, reference), one
    column per image (the first ``max_columns``).

    Parameters
    ----------
    path : str or Path
        Output PNG.
    rows : sequence of (str, Tensor)
        Row labels and ``(N, C, H, W)`` images; the first channel is shown in grey.
    max_columns : int
        Most columns (images per row) shown.
    title : str, optional
        Figure title.
    column_titles : sequence of str, optional
        Titles above the first row's images, one per column (extra ones are unused).
    ranges : sequence of (vmin, vmax) or None, optional
        Display range per row (default ``(0, 1)``; None: the row's min and max).
    """
    if not rows:
        raise ValueError("rows must not be empty")
    for name, imgs in rows:
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"row {name!r} must hold (N, C, H, W) images, got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
    n = min(max_columns, min(int(imgs.shape[0]) for _, imgs in rows))
    h, w = rows[0][1].shape[-2:]
    scale = 1.6  # inches per image side
    fig = new_figure(figsize=(scale * n * w / max(h, w) + 0.6, scale * len(rows) * h / max(h, w)
                              + (0.4 if title else 0.1)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        rng = (0.0, 1.0) if ranges is None else ranges[r]
        data = imgs[:n, 0].detach().float().cpu()
        vmin, vmax = (float(data.min()), float(data.max())) if rng is None else rng
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(data[c].numpy(), cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and column_titles is not None and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    return save_figure(fig, path, dpi=90)
