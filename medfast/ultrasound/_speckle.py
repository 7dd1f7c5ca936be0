"""Sampling-invariant speckle power.

The scatter echo of a sample is a weighted sum (axial pulse taps, neighbouring lines, elevation
sub-rays) of the world-anchored scatter field. Normalising those weights to unit energy keeps the
mean speckle intensity equal to the scatter power only when the summed samples are independent,
i.e. farther apart than a scatter cell. Denser sampling (the default 1024 samples over 40 mm are
0.04 mm apart; a sector's lines converge at its apex) adds correlated values coherently: the mean
speckle intensity grew with ``n_samples`` / ``n_lines`` (up to +13 dB near a phased array's apex)
and a sector image darkened with depth without any attenuation. :func:`scatter_gain` gives the
per-depth factor that removes this: ``1 / sqrt(w^T C w)`` with ``C`` the correlation of the field
between the summed samples.

The field is the trilinear interpolation of i.i.d. cell values divided by the norm of the
interpolation weights. Its correlation factorises over the three grid axes; averaged over where the
samples fall in the cells it is ``prod_a rho1(delta_a)`` (``delta`` in cells), and averaged over
directions (a probe's rays point anywhere in the world grid) a function of ``|delta|`` alone, which
a Gaussian of variance ``_CORRELATION_VAR`` cells^2 matches within 0.011 (the test derives it by
quadrature). A Gaussian is separable in the probe's axes, so ``w^T C w`` is a product of three
small quadratic forms.
"""

from __future__ import annotations

import torch

_CORRELATION_VAR = 0.401  # cells^2: exp(-r^2 / (2 var)) ~ the field's correlation at distance r (cells)


def _correlated_energy(w: torch.Tensor, step_mm: torch.Tensor | float, cell_mm: float) -> torch.Tensor:
    """``w^T C w`` for weights ``w`` ``(..., n)`` of samples ``step_mm`` (scalar or ``(...,)``) apart. ``C`` is
    Toeplitz: summed over the lags (``(..., n)`` memory, not the ``(..., n, n)`` matrix: 8192 depths of 257
    lateral taps would be 4 GB)."""
    n = w.shape[-1]
    step = torch.as_tensor(step_mm, dtype=torch.float64)
    scale = (step / cell_mm).square() / (2 * _CORRELATION_VAR)
    total = w.square().sum(-1)
    for lag in range(1, n):
        corr = torch.exp(-scale * lag * lag)
        if bool((corr < 1e-12).all()):  # farther lags correlate even less
            break
        total = total + 2 * corr * (w[..., :-lag] * w[..., lag:]).sum(-1)
    return total


def scatter_gain(axial: torch.Tensor, lateral: torch.Tensor, elevation: torch.Tensor, dz_mm: float,
                 line_mm: torch.Tensor, sub_ray_mm: float, cell_mm: float) -> torch.Tensor:
    """``(S,)`` factor for the scatter weights so that the mean speckle intensity equals the scatter
    power at every depth, whatever the sampling.

    axial ``(K,)``, lateral ``(S, J)`` and elevation ``(S, E)`` are the unit-energy scatter weights
    (float64); ``dz_mm``, ``line_mm`` ``(S,)`` and ``sub_ray_mm`` the spacings of the samples they sum
    (along a line, between lines at each depth, between sub-rays); ``cell_mm`` the scatter cell.
    """
    energy = (_correlated_energy(axial, dz_mm, cell_mm) * _correlated_energy(lateral, line_mm, cell_mm)
              * _correlated_energy(elevation, sub_ray_mm, cell_mm))
    return energy.rsqrt()
