"""Ultrasound probe description: geometry of the scanlines, beam widths, scan conversion.

Probe frame (mm): origin at the centre of the array face, +z axial (into the tissue), +x lateral
(along the array), +y elevation (across the array). A pose is the (4, 4) probe-to-world transform.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, replace

import torch

SPEED_OF_SOUND_MM_US = 1.54  # mm / microsecond (1540 m/s)
# -6 dB widths of the beam model below against pymust's full chain (simus broadband RF of a point at the
# transmit focus, rf2iq, dasmtx), fitted on L11-5v and C5-2v, P4-2v held out (tests/test_ultrasound_pymust.py).
# Axial: 1.22, the former joint fit of both widths, is kept: 2-5 % under pymust's axial width on the fitted
# presets (an axial-only fit, 1.26, would put the held-out P4-2v 12 % over instead of 8 %).
PSF_CALIBRATION_AXIAL = 1.22
# Lateral: the reference is pymust's conventional scan (one focused transmit per line, dynamic receive), the
# two-way beam this model computes; the monochromatic model matches it unscaled (ratios 0.96 / 1.03, fit
# 1.006). The former 1.22 was fitted to a single-transmit image, whose lateral width is one-way: the
# conventional scan is 18-23 % narrower.
PSF_CALIBRATION_LATERAL = 1.0
KINDS = ("linear", "convex", "phased")

# Values of pymust.getparam (pymust 0.1.9, the Python port of MUST by D. Garcia): fc [Hz], pitch [m],
# Nelements, bandwidth [% pulse-echo -6 dB], radius [m], height [m] (elevation), focus [m] (elevation lens).
#   L11-5v: fc 7.6e6, pitch 3.0e-4, 128 elements, bandwidth 77, radius inf, height 5e-3, focus 18e-3
#   C5-2v: fc 3.57e6, pitch 5.08e-4, 128 elements, bandwidth 79, radius 49.57e-3, height 13.5e-3, focus 60e-3
#   P4-2v: fc 2.72e6, pitch 3.0e-4, 64 elements, bandwidth 74, radius inf, height 14e-3, focus 60e-3
_PRESETS = {
    "L11-5v": dict(kind="linear", fc_mhz=7.6, bandwidth=0.77, n_elements=128, pitch_mm=0.300, radius_mm=0.0,
                   elevation_mm=5.0, elevation_focus_mm=18.0, depth_mm=40.0, focus_mm=20.0),
    "C5-2v": dict(kind="convex", fc_mhz=3.57, bandwidth=0.79, n_elements=128, pitch_mm=0.508, radius_mm=49.57,
                  elevation_mm=13.5, elevation_focus_mm=60.0, depth_mm=100.0, focus_mm=60.0),
    "P4-2v": dict(kind="phased", fc_mhz=2.72, bandwidth=0.74, n_elements=64, pitch_mm=0.300, radius_mm=0.0,
                  elevation_mm=14.0, elevation_focus_mm=60.0, depth_mm=120.0, focus_mm=60.0, fov_deg=80.0),
}


@dataclass(frozen=True)
class Probe:
    """An ultrasound probe and its imaging settings.

    Attributes
    ----------
    kind : str
        ``"linear"`` (parallel lines across ``width_mm``), ``"convex"`` (curvilinear: lines normal to
        an arc of radius ``radius_mm`` spanning ``fov_deg``) or ``"phased"`` (sector from the array
        centre spanning ``fov_deg``).
    fc_mhz : float
        Centre frequency (MHz).
    bandwidth : float
        Pulse-echo -6 dB fractional bandwidth (0.77 = 77 %).
    n_elements, pitch_mm : int, float
        Array elements and their pitch (mm); the aperture is ``n_elements * pitch_mm``.
    radius_mm : float
        Radius of curvature (used by convex probes only; a number for every kind).
    elevation_mm, elevation_focus_mm : float
        Element height (elevation aperture) and elevation lens focus (mm).
    depth_mm : float
        Imaging depth along each line (mm).
    focus_mm : float
        Transmit focus depth (mm).
    n_lines, n_samples : int
        Scanlines and samples per line.
    fov_deg : float or None
        Sector angle (convex: default the arc of the array; phased: required; linear: must be None).
    f_number : float
        Smallest F-number of the (dynamically focused) receive aperture; 0 (default, as pymust's
        ``fnumber = 0``): the full aperture, limited only by the element directivity.
    """

    kind: str
    fc_mhz: float
    bandwidth: float
    n_elements: int
    pitch_mm: float
    radius_mm: float = 0.0
    elevation_mm: float = 5.0
    elevation_focus_mm: float = 20.0
    depth_mm: float = 40.0
    focus_mm: float = 20.0
    n_lines: int = 256
    n_samples: int = 1024
    fov_deg: float | None = None
    f_number: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        # NumPy scalars are accepted and stored as Python numbers (the fields key caches by value)
        for name in ("f_number", "fc_mhz", "bandwidth", "pitch_mm", "elevation_mm", "elevation_focus_mm", "depth_mm",
                     "focus_mm", "radius_mm"):
            v = getattr(self, name)
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        for name in ("n_elements", "n_lines", "n_samples"):
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                object.__setattr__(self, name, int(v))
        if not (isinstance(self.f_number, float) and math.isfinite(self.f_number) and self.f_number >= 0):
            raise ValueError(f"f_number must be >= 0, got {self.f_number!r}")
        for name in ("fc_mhz", "bandwidth", "pitch_mm", "elevation_mm", "elevation_focus_mm", "depth_mm", "focus_mm"):
            v = getattr(self, name)
            if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive and finite, got {v!r}")
        if not self.bandwidth < 2:  # -6 dB fractional bandwidth: the band [fc (1 - B/2), fc (1 + B/2)]
            raise ValueError(f"bandwidth (fractional, -6 dB) must be in (0, 2), got {self.bandwidth!r}")
        for name in ("n_elements", "n_lines", "n_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                raise ValueError(f"{name} must be an int >= 2, got {v!r}")
        # radius_mm is only used by a convex probe, but a non-number is refused for every kind, as the other fields
        if not isinstance(self.radius_mm, float):
            raise ValueError(f"radius_mm must be a number, got {self.radius_mm!r}")
        if self.kind == "convex" and not 0 < self.radius_mm < math.inf:
            raise ValueError(f"a convex probe needs a positive, finite radius_mm, got {self.radius_mm!r}")
        if self.kind == "phased" and self.fov_deg is None:
            raise ValueError("a phased probe needs fov_deg (the sector angle)")
        if self.kind == "linear" and self.fov_deg is not None:  # its lines are parallel: the angle was ignored
            raise ValueError(f"fov_deg is for convex and phased probes; a linear probe's lines are parallel across "
                             f"width_mm (no sector), got fov_deg={self.fov_deg!r}")
        if self.fov_deg is not None and (isinstance(self.fov_deg, bool) or not isinstance(self.fov_deg, numbers.Real)
                                         or not 0 < self.fov_deg < 180):
            raise ValueError(f"fov_deg must be a number in (0, 180), got {self.fov_deg!r}")
        if self.kind == "convex" and not self.sector_rad < math.pi:  # the arc of the elements on the radius
            raise ValueError(f"a convex probe's array must span less than 180 degrees of its radius: "
                             f"{self.n_elements} x {self.pitch_mm} mm on radius_mm={self.radius_mm} spans "
                             f"{math.degrees(self.sector_rad):.0f} degrees")

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str, **overrides) -> Probe:
        """A probe from its name (``"L11-5v"``, ``"C5-2v"``, ``"P4-2v"``; values of pymust's ``getparam``).

        Keyword arguments override fields (e.g. ``n_lines=128, depth_mm=60``).
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown probe {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
        return replace(Probe(**_PRESETS[name]), **overrides)

    @staticmethod
    def presets() -> tuple[str, ...]:
        return tuple(sorted(_PRESETS))

    # ----------------------------------------------------------------------------------------
    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_MM_US / self.fc_mhz

    @property
    def aperture_mm(self) -> float:
        return self.n_elements * self.pitch_mm

    @property
    def width_mm(self) -> float:
        """Lateral extent of the lines at the array (linear probes: the image width)."""
        return (self.n_elements - 1) * self.pitch_mm

    @property
    def sector_rad(self) -> float:
        if self.fov_deg is not None:
            return math.radians(self.fov_deg)
        if self.kind == "convex":
            return self.width_mm / self.radius_mm
        return 0.0

    @property
    def dz_mm(self) -> float:
        """Sample step along a line (mm)."""
        return self.depth_mm / (self.n_samples - 1)

    def depths(self, device=None, dtype=torch.float64) -> torch.Tensor:
        """``(S,)`` depth of each sample along its line (mm), 0 at the array."""
        return torch.arange(self.n_samples, device=device, dtype=dtype) * self.dz_mm

    def line_geometry(self, device=None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Origins and unit directions of the scanlines in the probe frame: two ``(L, 3)`` tensors (mm)."""
        L = self.n_lines
        if self.kind == "linear":
            x = torch.linspace(-self.width_mm / 2, self.width_mm / 2, L, dtype=dtype, device=device)
            origin = torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], -1)
            direction = torch.zeros_like(origin)
            direction[:, 2] = 1
            return origin, direction
        half = self.sector_rad / 2
        th = torch.linspace(-half, half, L, dtype=dtype, device=device)
        r = self.radius_mm if self.kind == "convex" else 0.0
        direction = torch.stack([torch.sin(th), torch.zeros_like(th), torch.cos(th)], -1)
        origin = r * direction
        origin[:, 2] -= r
        return origin, direction

    def line_spacing_mm(self, depth: torch.Tensor) -> torch.Tensor:
        """Distance between neighbouring lines at each depth (mm)."""
        if self.kind == "linear":
            return torch.full_like(depth, self.width_mm / (self.n_lines - 1))
        r = self.radius_mm if self.kind == "convex" else 0.0
        return ((r + depth) * self.sector_rad / (self.n_lines - 1)).clamp_min(1e-3)

    # ---- beam model (see docs/ultrasound.md) -----------------------------------------------
    def axial_fwhm_mm(self) -> float:
        """-6 dB width (mm) of the envelope of the pulse-echo signal of a point: a one-cycle excitation
        at fc times the pulse-echo probe response (generalized normal window of -6 dB fractional
        bandwidth ``bandwidth``, the model of MUST/pymust)."""
        return PSF_CALIBRATION_AXIAL * _axial_fwhm(self.fc_mhz, self.bandwidth)

    def lateral_fwhm_mm(self, depth: torch.Tensor) -> torch.Tensor:
        """-6 dB two-way lateral width (mm) of the beam at each depth: transmit focused at
        ``focus_mm``, receive dynamically focused, full aperture (receive F-number >= ``f_number``),
        every element weighted by its directivity (soft baffle). Computed at the centre frequency
        on 24 depths and the transmit focus, and interpolated."""
        z = torch.as_tensor(depth, dtype=torch.float64)
        knots_z, knots_w = _lateral_table(self)
        zz = z.clamp(float(knots_z[0]), float(knots_z[-1]))
        i0 = (torch.searchsorted(knots_z, zz, right=True) - 1).clamp(0, len(knots_z) - 2)  # knots not evenly spaced
        t = (zz - knots_z[i0]) / (knots_z[i0 + 1] - knots_z[i0])
        w = PSF_CALIBRATION_LATERAL * (knots_w[i0] * (1 - t) + knots_w[i0 + 1] * t)
        return w.to(torch.as_tensor(depth).dtype)

    def elevation_fwhm_mm(self, depth: torch.Tensor) -> torch.Tensor:
        """-6 dB elevation beam width at each depth (mm): diffraction limit at the lens focus combined
        with the geometric convergence of the element height."""
        lam = self.wavelength_mm
        diff = 0.886 * lam * self.elevation_focus_mm / self.elevation_mm
        geo = self.elevation_mm * (1 - depth / self.elevation_focus_mm).abs()
        return torch.sqrt(diff**2 + geo**2)

    # ---- scan conversion ---------------------------------------------------------------------
    def image_extent_mm(self) -> tuple[float, float, float, float]:
        """``(x_min, x_max, z_min, z_max)`` of the scan-converted image in the probe frame (mm)."""
        if self.kind == "linear":
            return -self.width_mm / 2, self.width_mm / 2, 0.0, self.depth_mm
        r = self.radius_mm if self.kind == "convex" else 0.0
        half = self.sector_rad / 2
        far = r + self.depth_mm
        x = far * math.sin(half)
        z_min = r * math.cos(half) - r if half < math.pi / 2 else -r
        return -x, x, z_min, far - r

    def image_shape(self, pixel_mm: float | None = None) -> tuple[tuple[int, int], float]:
        """``((H, W), pixel_mm)`` of the scan-converted image (square pixels). Default pixel: the
        extent divided into about ``n_samples / 2`` rows."""
        x0, x1, z0, z1 = self.image_extent_mm()
        if pixel_mm is None:
            pixel_mm = (z1 - z0) / (self.n_samples // 2)
        if not (isinstance(pixel_mm, numbers.Real) and math.isfinite(pixel_mm) and pixel_mm > 0):
            raise ValueError(f"pixel_mm must be positive and finite, got {pixel_mm!r}")
        H = int(math.floor((z1 - z0) / pixel_mm)) + 1
        W = int(math.floor((x1 - x0) / pixel_mm)) + 1
        return (H, W), float(pixel_mm)

    def pixel_of(self, x_mm: float, z_mm: float, pixel_mm: float | None = None) -> tuple[float, float]:
        """(row, column) of a probe-frame point (x, z) in the scan-converted image."""
        _, px = self.image_shape(pixel_mm)
        x0, _, z0, _ = self.image_extent_mm()
        return (z_mm - z0) / px, (x_mm - x0) / px

    def scan_grid(self, pixel_mm: float | None = None, device=None, dtype=torch.float32) -> tuple[torch.Tensor, float]:
        """``(1, H, W, 2)`` grid_sample coordinates (align_corners=True) mapping every Cartesian
        pixel to (line, sample) of the ``(S, L)`` scanline image; outside the scanned region the
        coordinates lie outside [-1, 1]."""
        (H, W), px = self.image_shape(pixel_mm)
        x0, _, z0, _ = self.image_extent_mm()
        z = z0 + torch.arange(H, dtype=torch.float64, device=device) * px
        x = x0 + torch.arange(W, dtype=torch.float64, device=device) * px
        zz, xx = torch.meshgrid(z, x, indexing="ij")
        if self.kind == "linear":
            line = (xx + self.width_mm / 2) / self.width_mm * (self.n_lines - 1)
            samp = zz / self.dz_mm
        else:
            r = self.radius_mm if self.kind == "convex" else 0.0
            rr = torch.sqrt(xx**2 + (zz + r) ** 2)
            th = torch.atan2(xx, zz + r)
            half = self.sector_rad / 2
            line = (th + half) / (2 * half) * (self.n_lines - 1)
            samp = (rr - r) / self.dz_mm
        gx = line / (self.n_lines - 1) * 2 - 1
        gy = samp / (self.n_samples - 1) * 2 - 1
        return torch.stack([gx, gy], -1)[None].to(dtype), px


# ---------------------------------------------------------------------------------------------
# Numerical beam model (monochromatic aperture sums; cached per probe)
# ---------------------------------------------------------------------------------------------


def _fwhm(profile: torch.Tensor, step: float) -> float:
    """Full width at half maximum of a peaked 1D profile (linear interpolation at the crossings)."""
    m = float(profile.max())
    i = int(profile.argmax())
    half = m / 2
    left = i
    while left > 0 and profile[left - 1] >= half:
        left -= 1
    right = i
    while right < len(profile) - 1 and profile[right + 1] >= half:
        right += 1
    lf = left - (float(profile[left]) - half) / max(1e-30, float(profile[left] - profile[left - 1])) if left > 0 else 0
    rf = right + (float(profile[right]) - half) / max(1e-30, float(profile[right] - profile[right + 1])) \
        if right < len(profile) - 1 else right
    return (rf - lf) * step


@functools.lru_cache(maxsize=64)
def _axial_fwhm(fc_mhz: float, bandwidth: float) -> float:
    f = torch.linspace(0, 4 * fc_mhz, 8192, dtype=torch.float64)  # MHz
    # Pulse-echo probe response: generalized normal window of -6 dB fractional bandwidth `bandwidth`
    # (the model of MUST/pymust, Garcia 2022): exp(-(|f - fc| / s)^p), p = ln(126) / ln(2 / B).
    B = bandwidth
    p = math.log(126) / math.log(2 / B)
    s = B * fc_mhz / 2 / math.log(2) ** (1 / p)
    probe = torch.exp(-(((f - fc_mhz).abs() / s) ** p))
    # One-cycle sine excitation at fc: |spectrum| of a windowed sinusoid of duration 1/fc.
    T = 1.0 / fc_mhz
    exc = (torch.sinc((f - fc_mhz) * T) - torch.sinc((f + fc_mhz) * T)).abs()
    spec = exc * probe
    # Analytic signal (positive frequencies only): envelope = |inverse FFT|.
    n = 1 << 16
    df = float(f[1] - f[0])
    env = torch.fft.ifft(torch.nn.functional.pad(spec, (0, n - spec.numel())).to(torch.complex128)).abs()
    env = torch.fft.fftshift(env)
    dt = 1.0 / (n * df)  # microseconds
    return _fwhm(env, dt) * SPEED_OF_SOUND_MM_US / 2


def _element_layout(p: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """Element centres (N, 2) as (x, z) in mm and unit normals (N, 2)."""
    idx = torch.arange(p.n_elements, dtype=torch.float64) - (p.n_elements - 1) / 2
    if p.kind == "convex":
        phi = idx * p.pitch_mm / p.radius_mm
        pos = torch.stack([p.radius_mm * torch.sin(phi), p.radius_mm * torch.cos(phi) - p.radius_mm], -1)
        normal = torch.stack([torch.sin(phi), torch.cos(phi)], -1)
    else:
        pos = torch.stack([idx * p.pitch_mm, torch.zeros_like(idx)], -1)
        normal = torch.stack([torch.zeros_like(idx), torch.ones_like(idx)], -1)
    return pos, normal


def _aperture_field(pos, normal, width, lam, pts, focus, f_number=None):
    """Monochromatic field at pts (P, 2) of the elements focused at `focus` (2,): sum of
    directivity-weighted unit sources with focusing phases. Elements beyond the F-number aperture
    are left out when f_number is given."""
    k = 2 * math.pi / lam
    d_f = (focus[None, :] - pos).norm(dim=1)  # (N,)
    vec = pts[:, None, :] - pos[None, :, :]  # (P, N, 2)
    r = vec.norm(dim=2)
    cos_t = (vec * normal[None]).sum(2) / r
    sin_t = (1 - cos_t.clamp(-1, 1) ** 2).sqrt()
    weight = torch.sinc(width * sin_t / lam) * cos_t.clamp_min(0)  # soft baffle
    if f_number:
        half = focus[1] / (2 * f_number)
        weight = weight * ((pos[:, 0] - focus[0]).abs() <= max(half, 0.0))[None].double()
    phase = k * (r - d_f[None])
    return (weight * torch.exp(1j * phase) / r.sqrt()).sum(1)


@functools.lru_cache(maxsize=64)
def _lateral_table(p: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    lam = p.wavelength_mm
    width = p.pitch_mm * 0.9  # element width (pitch minus kerf; ~90 % for the presets)
    pos, normal = _element_layout(p)
    z_knots = torch.linspace(p.depth_mm / 24, p.depth_mm, 24, dtype=torch.float64)  # 24 distinct depths
    # and the transmit focus: the width has a sharp minimum there, which the knots around it interpolated
    # 0-15 % too wide, by an amount that changed with depth_mm (C5-2v 0.78-0.90 mm at depths 62-150 mm)
    if p.depth_mm / 24 < p.focus_mm < p.depth_mm and min(abs(k - p.focus_mm) for k in z_knots.tolist()) > 1e-9:
        z_knots = torch.sort(torch.cat([z_knots, torch.tensor([p.focus_mm], dtype=torch.float64)])).values
    widths = []
    for z in z_knots.tolist():
        guess = 0.886 * lam * max(1.0, z / max(1e-3, p.aperture_mm / 4))
        X = 6 * guess + 0.5
        x = torch.linspace(-X, X, 401, dtype=torch.float64)
        pts = torch.stack([x, torch.full_like(x, z)], -1)
        tx = _aperture_field(pos, normal, width, lam, pts, torch.tensor([0.0, p.focus_mm], dtype=torch.float64))
        rx = _aperture_field(pos, normal, width, lam, pts, torch.tensor([0.0, z], dtype=torch.float64),
                             f_number=p.f_number)
        widths.append(_fwhm((tx * rx).abs(), float(x[1] - x[0])))
    return z_knots, torch.tensor(widths, dtype=torch.float64)
