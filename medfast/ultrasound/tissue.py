"""Tissue descriptions for the ultrasound simulator: CT (HU), label maps with a table, raw maps.

All three end as a property volume ``(B, 5, D, H, W)`` with channels (``PROP_NAMES``):
impedance Z (MRayl), attenuation alpha (dB/cm/MHz), scatterer density (0..1, relative), mean and
spread of the scatter amplitude (relative reflectivity of the scatterers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch._C import _functorch

from medfast.ops._ussim import N_PROPS, PROP_NAMES

__all__ = ["HU_KNOTS", "MAX_LABEL", "PROP_NAMES", "LabelTable", "hu_to_properties", "WATER"]

#: Water's acoustic properties, in ``PROP_NAMES`` order: the default ``background`` of ``simulate`` and the
#: property row of a label a ``LabelTable`` does not map.
WATER = (1.48, 0.0022, 0.0, 0.0, 0.0)
#: The largest label key a ``LabelTable`` takes (its table holds a row per label up to its largest key).
MAX_LABEL = 2**24 - 1  # a mapping table holds a row per label up to its largest key (2**24 rows: 320 MiB)
_SLAB_VOXELS = 1 << 18  # voxels per slab of hu_to_properties without autograd (~70 bytes of temporaries each)
_SLAB_VOXELS_GPU = 1 << 22  # fewer, larger launches on a GPU

#: Piecewise-linear map from CT number to acoustic properties. Knots: HU, then the 5 properties.
#: Impedances and attenuations are typical literature values (Duck, "Physical properties of tissue",
#: 1990; Szabo, "Diagnostic ultrasound imaging", 2004): air 0.0004 MRayl, fat 1.38, water 1.48,
#: soft tissue 1.63-1.7, bone 4-7.8 MRayl; attenuation fat 0.6, soft tissue 0.5-0.7, bone 10-20
#: dB/cm/MHz. Water-like fluid (CSF, HU ~ 0-15) does not scatter. Scatter amplitudes are relative to
#: the plane-reflector amplitude R: the mean soft-tissue speckle intensity sits about 31 dB below the
#: echo of a soft tissue -> bone (6 MRayl) interface.
HU_KNOTS: tuple[tuple[float, float, float, float, float, float], ...] = (
    (-1000.0, 0.0004, 20.0, 0.0, 0.0, 0.0),
    (-500.0, 0.80, 12.0, 0.6, 0.015, 0.005),
    (-100.0, 1.38, 0.60, 1.0, 0.010, 0.003),
    (0.0, 1.48, 0.05, 0.05, 0.002, 0.0005),
    (15.0, 1.53, 0.30, 0.5, 0.008, 0.002),
    (40.0, 1.63, 0.55, 1.0, 0.015, 0.004),
    (100.0, 1.68, 0.70, 1.0, 0.025, 0.006),
    (300.0, 2.50, 4.00, 1.0, 0.040, 0.010),
    (1000.0, 6.00, 15.0, 1.0, 0.050, 0.012),
    (3000.0, 7.80, 20.0, 1.0, 0.050, 0.012),
)


def _knot_tensor(knots, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # the knots are checked where they are and moved to the CT's device after: a meta CT (shapes only) read
    # them back from the meta device ("Cannot copy out of meta tensor")
    if isinstance(knots, torch.Tensor):
        if knots.is_complex():  # (.to(dtype) dropped the imaginary part)
            raise TypeError(f"knots must be real, got {knots.dtype}")
        if knots.device.type == "meta":
            raise ValueError("knots is a meta tensor: a meta tensor has no values (they are checked on the host)")
        k = knots.to(dtype=dtype)
    else:
        k = torch.tensor(knots, dtype=dtype)
    if k.dim() != 2 or k.shape[1] != 1 + N_PROPS or k.shape[0] < 2:
        raise ValueError(f"knots must be (n >= 2, {1 + N_PROPS}) rows (HU, *properties), got {tuple(k.shape)}")
    host = k.detach().to("cpu", torch.float64)  # a few numbers: one copy, checked on the host
    if not bool(torch.isfinite(host).all()):  # a NaN property made every frame NaN, silently
        raise ValueError(f"knots must hold finite values, got non-finite ones in rows "
                         f"{torch.nonzero(~torch.isfinite(host).all(1)).flatten().tolist()}")
    if not bool((host[1:, 0] > host[:-1, 0]).all()):
        raise ValueError("knots must have strictly increasing HU values")
    if not bool((host[:, 1] > 0).all()):  # reflection coefficients (Z2 - Z1) / (Z2 + Z1) need Z > 0
        raise ValueError(f"knots: the impedance Z (column 1, MRayl) must be > 0, got {host[:, 1].tolist()}")
    bad = (host[:, 2:4] < 0).any(1)  # a negative attenuation is an exponential gain, a negative density no tissue
    if bool(bad.any()):
        raise ValueError(f"knots: the attenuation alpha (column 2) and scatterer density (column 3) must be >= 0, "
                         f"got negative ones in rows {torch.nonzero(bad).flatten().tolist()}")
    k = k.to(device)
    return k[:, 0], k[:, 1:]


def hu_to_properties(ct: torch.Tensor, knots=HU_KNOTS) -> torch.Tensor:
    """Maps a CT volume in Hounsfield units to acoustic property maps (differentiable).

    Parameters
    ----------
    ct : Tensor
        ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` CT numbers (HU), float32/float64.
    knots : sequence or Tensor
        ``(n, 6)`` rows ``(HU, Z, alpha, density, amplitude_mean, amplitude_std)`` with increasing
        HU, finite values, ``Z > 0`` and ``alpha, density >= 0`` (else ValueError, as for ``simulate``'s
        ``background``); linear interpolation between knots, constant
        beyond the ends. A tensor that requires grad makes the map itself trainable. Default ``HU_KNOTS``.

    Returns
    -------
    Tensor
        ``(B, 5, D, H, W)`` property maps, differentiable w.r.t. ``ct`` and ``knots``.
    """
    if not isinstance(ct, torch.Tensor):
        raise TypeError(f"ct must be a torch.Tensor, got {type(ct).__name__}")
    if ct.is_complex() or ct.dtype == torch.bool:  # (.float() dropped the imaginary part; a mask is no HU)
        raise TypeError(f"ct must be real CT numbers (HU), got {ct.dtype}")
    if not ct.is_floating_point():
        ct = ct.float()
    if ct.dim() == 5:
        if ct.shape[1] != 1:
            raise ValueError(f"ct must be (B, 1, D, H, W) or (B, D, H, W), got {tuple(ct.shape)}")
        ct = ct[:, 0]
    if ct.dim() != 4:
        raise ValueError(f"ct must be (B, 1, D, H, W) or (B, D, H, W), got {tuple(ct.shape)}")
    hu, vals = _knot_tensor(knots, ct.device, ct.dtype)
    if (torch.is_grad_enabled() and (ct.requires_grad or vals.requires_grad or hu.requires_grad)) \
            or _transformed():
        x = ct.clamp(hu[0], hu[-1])
        idx = torch.searchsorted(hu.contiguous(), x.detach().contiguous(), right=True).clamp(1, hu.numel() - 1) - 1
        h0, h1 = hu[idx], hu[idx + 1]
        t = ((x - h0) / (h1 - h0)).unsqueeze(1)  # (B, 1, D, H, W)
        v0 = vals[idx].permute(0, 4, 1, 2, 3)
        v1 = vals[idx + 1].permute(0, 4, 1, 2, 3)
        return v0 + t * (v1 - v0)
    return _hu_slabs(ct, hu.contiguous(), vals)


def _transformed() -> bool:
    """Forward-mode AD or a torch.func transform is active: its dual / wrapped tensors report
    ``requires_grad=False``, and the ``out=`` / in-place slab path has no forward derivative nor batching rule."""
    if torch.compiler.is_compiling():  # traced graphs hold no transform wrappers
        return False
    return torch.autograd.forward_ad._current_level >= 0 or _functorch.peek_interpreter_stack() is not None


def _hu_slabs(ct: torch.Tensor, hu: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """hu_to_properties without autograd: the same operations in the same order (same values), written into a
    preallocated channels-last output a slab of D at a time. The whole-volume formula held ~97 bytes per voxel of
    temporaries (int64 indices, gathered knots) besides its 20-byte output: 9 GiB for a 512 x 512 x 300 CT."""
    B, D, H, W = ct.shape
    n = hu.numel()
    out = torch.empty((B, D, H, W, vals.shape[1]), dtype=ct.dtype, device=ct.device)
    plane = max(1, B * H * W)
    step = max(1, (_SLAB_VOXELS if ct.device.type == "cpu" else _SLAB_VOXELS_GPU) // plane)
    for d0 in range(0, D, step):
        x = ct[:, d0:d0 + step].clamp(hu[0], hu[-1])
        idx = torch.searchsorted(hu, x.contiguous(), right=True).clamp_(1, n - 1).sub_(1)
        idx1 = idx + 1
        h0 = hu[idx]
        t = x.sub_(h0).div_(hu[idx1].sub_(h0)).unsqueeze_(-1)  # (x - h0) / (h1 - h0)
        v0 = vals[idx]
        torch.add(v0, vals[idx1].sub_(v0).mul_(t), out=out[:, d0:d0 + step])  # v0 + t * (v1 - v0)
    return out.permute(0, 4, 1, 2, 3)


def _row_error(rows: torch.Tensor) -> int | None:
    """The index of the first row of ``(n, 5)`` property rows that breaks simulate's ``background`` rule (Z > 0,
    attenuation and density >= 0), or None. Reads detached values: a trainable table keeps its graph."""
    v = rows.detach()
    bad = ~((v[:, 0] > 0) & (v[:, 1] >= 0) & (v[:, 2] >= 0))
    if not bool(bad.any()):
        return None
    return int(torch.nonzero(bad)[0, 0])


_ROW_RULE = "the impedance Z must be > 0 and the attenuation alpha and scatterer density >= 0"


class LabelTable:
    """Per-label acoustic properties: a ``(n_labels, 5)`` tensor (optionally trainable).

    Parameters
    ----------
    values : Mapping[int, Sequence[float]] or Tensor
        Either ``{label: (Z, alpha, density, amplitude_mean, amplitude_std)}`` for labels
        0..n-1 (missing labels get water; keys up to ``MAX_LABEL`` = 2**24 - 1, a row per label up to the
        largest) or a non-empty ``(n_labels, 5)`` tensor (kept as is, so a tensor with ``requires_grad`` stays a
        leaf you can optimise). Every row needs finite values, ``Z > 0`` and ``alpha, density >= 0``, as
        ``simulate``'s ``background`` (else ValueError naming the label): ``Z <= 0`` imaged like air and a
        negative attenuation was an exponential gain.
    """

    def __init__(self, values: Mapping[int, Sequence[float]] | torch.Tensor):
        if isinstance(values, torch.Tensor):
            if values.dim() != 2 or values.shape[1] != N_PROPS:
                raise ValueError(f"a label table tensor must be (n_labels, {N_PROPS}), got {tuple(values.shape)}")
            if values.shape[0] == 0:  # it would fail only at the first label map, "labels must lie in [0, -1]"
                raise ValueError(f"the label table tensor is empty: {tuple(values.shape)} (no row for label 0)")
            if values.device.type == "meta":  # (the finiteness check below raised "Tensor.item() ... meta tensors")
                raise ValueError("values is a meta tensor: a meta tensor has no values (they are checked on the host)")
            if not values.is_floating_point() or not bool(torch.isfinite(values.detach()).all()):
                raise ValueError("a label table tensor must hold finite floating values")
            row = _row_error(values)
            if row is not None:
                raise ValueError(f"label {row}: {_ROW_RULE} {PROP_NAMES}, got {values[row].detach().tolist()}")
            self.values = values
        else:
            if not isinstance(values, Mapping):
                hint = " (convert an array with torch.as_tensor)" if hasattr(values, "__array__") else ""
                raise TypeError(f"values must be a mapping {{label: {N_PROPS} properties}} or a (n_labels, {N_PROPS}) "
                                f"tensor, got {type(values).__name__}{hint}")
            if not values:
                raise ValueError("the label table is empty")
            for k in values:
                if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
                    raise ValueError(f"label table keys must be ints >= 0, got {k!r}")
                if k > MAX_LABEL:
                    raise ValueError(f"label table key {k} is above the limit {MAX_LABEL} (the table holds a row per "
                                     "label up to the largest key): number the labels consecutively")
            rows = []
            for k, v in values.items():
                try:
                    v = [float(x) for x in v]
                except (TypeError, ValueError):
                    raise ValueError(f"label {k}: expected {N_PROPS} numbers {PROP_NAMES}, got {v!r}") from None
                if len(v) != N_PROPS:
                    raise ValueError(f"label {k}: expected {N_PROPS} values {PROP_NAMES}, got {len(v)}")
                if not all(math.isfinite(x) for x in v):
                    raise ValueError(f"label {k}: values must be finite, got {v}")
                if not (v[0] > 0 and v[1] >= 0 and v[2] >= 0):
                    raise ValueError(f"label {k}: {_ROW_RULE} {PROP_NAMES}, got {v}")
                rows.append(v)
            # dense, with tensor ops: a Python list of max(key) + 1 rows took 9 s and 700 MiB for key 5e6
            keys = torch.tensor([int(k) for k in values], dtype=torch.int64)
            table = torch.tensor(WATER, dtype=torch.float32).repeat(int(keys.max()) + 1, 1)
            table[keys] = torch.tensor(rows, dtype=torch.float32)
            self.values = table

    @property
    def n_labels(self) -> int:
        return self.values.shape[0]

    def properties(self, labels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, 5, D, H, W)`` property maps from an integer label map ``(B, 1, D, H, W)`` or ``(B, D, H, W)``."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.device.type == "meta":  # (the range check below raised "Tensor.item() ... meta tensors")
            raise ValueError("labels is a meta tensor: a meta tensor has no values (the label range is checked on "
                             "the host)")
        if labels.dim() == 5:
            if labels.shape[1] != 1:
                raise ValueError(f"labels must be (B, 1, D, H, W) or (B, D, H, W), got {tuple(labels.shape)}")
            labels = labels[:, 0]
        if labels.dim() != 4:
            raise ValueError(f"labels must be (B, 1, D, H, W) or (B, D, H, W), got {tuple(labels.shape)}")
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            # (checked first: .long() of an inf gave -2**63 and a range error naming that number)
            raise ValueError("labels must be finite (a floating label map holds NaN or inf)")
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            # a float label map (nibabel's get_fdata) is fine; a fraction would truncate to another label
            raise ValueError("labels must be integers (a floating label map must hold whole numbers)")
        lab = labels.long()
        if labels.is_floating_point():  # the range before .long(): a whole float past 2**63 wrapped to -2**63
            lo, hi = (int(float(x)) for x in torch.aminmax(labels))
        else:
            lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= self.n_labels:
            raise ValueError(f"labels must lie in [0, {self.n_labels - 1}] (the table rows), got [{lo}, {hi}]")
        table = self.values.to(labels.device)
        if dtype is not None:
            table = table.to(dtype)
        return table[lab].permute(0, 4, 1, 2, 3)
