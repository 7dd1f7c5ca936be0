"""Warp benchmark cases: ``medfast.warp`` against the routes a user would otherwise take.

Peers (each given a voxel DDF, as medfast is, and timed including the conversion it needs):

* ``grid_sample``: ``medfast.ops._reference.grid_sample_warp`` (builds the normalized grid, then
  ``F.grid_sample(align_corners=True)``).
* ``monai``: ``monai.networks.blocks.Warp`` (voxel DDF, channel i along spatial axis i; without
  MONAI's C++ extension it is the same grid_sample route behind a module that caches the identity).
* ``interpol``: torch-interpol ``grid_pull`` on ``identity + ddf`` (absolute voxel coordinates,
  last dim in tensor axis order), bound ``zero``/``replicate``/``dct1`` for zeros/border/reflection,
  ``extrapolate=True`` (``False`` would zero everything beyond 0.05 voxel outside), ``prefilter`` for cubic.
* ``scipy`` (CPU) / ``cupy`` (CUDA): ``map_coordinates`` per channel on ``identity + ddf``, order
  0/1/3, mode ``grid-constant``/``nearest``/``mirror`` for zeros/border/reflection; forward only.

Affine cases (``op="affine"``): ``medfast.affine_warp(image, theta)`` against ``scipy.ndimage.affine_transform``
(CPU) / ``cupyx.scipy.ndimage.affine_transform`` (CUDA) per channel, given the same (3, 4) voxel matrix
(output voxel -> input voxel, the convention of both), same orders and modes; forward only, one channel.

Padding ("auto"): ``zeros`` (scipy ``grid-constant``) for linear/nearest; ``reflection`` (scipy
``mirror``, interpol ``dct1``) for cubic, the one boundary where interpol's cubic computes the same
values as medfast and scipy (its ``zero``/``replicate`` prefilter and out-of-field handling differ;
see :func:`agreement`). A peer whose package is missing is reported as ``skipped``; a configuration
it cannot express comparably is ``n/a`` (:func:`check` raises :class:`NotRun` for both).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cuda_timing
import torch
import torch.nn.functional as F

OP = "warp"
MODES = ("linear", "nearest", "cubic")
CHANNELS = (1, 4)
PASSES = ("fwd", "fwdbwd")
PEERS = ("grid_sample", "monai", "interpol", "scipy", "cupy")
IMPLS = ("medfast", *PEERS)
OPS = ("warp", "affine")
AFFINE_PEERS = ("scipy", "cupy")  # forward only
AFFINE_CHANNELS = (1,)
PADDINGS = ("zeros", "border", "reflection")
ORDER = {"nearest": 0, "linear": 1, "cubic": 3}
# Python modules each implementation needs (missing -> "skipped").
REQUIRES = {"monai": "monai", "interpol": "interpol", "scipy": "scipy", "cupy": "cupyx"}


@dataclass(frozen=True)
class Case:
    """One comparison: medfast against ``peer`` on one configuration."""

    peer: str
    mode: str
    channels: int
    pass_: str  # "fwd" or "fwdbwd"
    size: int
    device: str = "cpu"
    padding: str = "zeros"
    batch: int = 1
    op: str = OP

    @property
    def config(self) -> str:
        """The configuration, shared by every peer (medfast is measured once per config)."""
        return f"{self.op}-{self.mode}-c{self.channels}-{self.pass_}-{self.padding}-{self.size}-{self.device}"

    @property
    def name(self) -> str:
        return f"{self.config}-vs-{self.peer}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def with_peer(self, peer: str) -> Case:
        return replace(self, peer=peer)


def default_padding(mode: str, padding: str = "auto") -> str:
    """``padding="auto"``: reflection for cubic (see the module docstring), zeros otherwise."""
    if padding != "auto":
        return padding
    return "reflection" if mode == "cubic" else "zeros"


def _on_device(peer: str, device: str) -> bool:
    return not ((peer == "scipy" and device != "cpu") or (peer == "cupy" and device == "cpu"))


def cases(size: int = 128, device: str = "cpu", padding: str = "auto", ops: tuple[str, ...] = OPS) -> list[Case]:
    """The registry: every (op, peer, mode, channels, pass) that applies on ``device``.

    Forward-only peers (scipy, cupy) get no ``fwdbwd`` case; scipy runs on CPU, cupy on CUDA. The affine
    op (``medfast.affine_warp``) has the scipy / cupy ``affine_transform`` peers only.
    """
    out = []
    if "warp" in ops:
        for peer in PEERS:
            if not _on_device(peer, device):
                continue
            for mode in MODES:
                for channels in CHANNELS:
                    for pass_ in PASSES:
                        if pass_ == "fwdbwd" and peer in ("scipy", "cupy"):
                            continue
                        out.append(Case(peer, mode, channels, pass_, size, device, default_padding(mode, padding)))
    if "affine" in ops:
        for peer in AFFINE_PEERS:
            if not _on_device(peer, device):
                continue
            for mode in MODES:
                for channels in AFFINE_CHANNELS:
                    out.append(Case(peer, mode, channels, "fwd", size, device, default_padding(mode, padding),
                                    op="affine"))
    return out


@dataclass(frozen=True)
class Target:
    """What a row must meet: ``peer_ms / medfast_ms >= min_ratio`` and/or medfast peak <= peer peak."""

    min_ratio: float | None = None
    mem_le_peer: bool = False

    def describe(self) -> str:
        parts = ([f">= {self.min_ratio:g}x"] if self.min_ratio else []) + (["mem <= peer"] if self.mem_le_peer else [])
        return ", ".join(parts)


def not_adjoint(case: Case) -> bool:
    """torch-interpol's cubic image gradient with ``zero`` / ``dct1`` bounds (zeros / reflection padding) is not the
    adjoint of its own forward (float64 dot-product test: 0.01-0.3 relative error depending on the field; with
    ``replicate`` it is exact, as is medfast's): its fwd+bwd time is that of a wrong gradient."""
    return (case.peer == "interpol" and case.op == "warp" and case.mode == "cubic" and case.pass_ == "fwdbwd"
            and case.padding != "border")


# the rows of :func:`not_adjoint` carry this note (run_warp's JSON ``note``; ``medfast bench`` shows it with the peer)
NOT_ADJOINT_NOTE = ("its cubic image gradient is not the adjoint of its forward, 0.01-0.3 rel. err: the cubic "
                    "target is judged on the forward")


def target(case: Case) -> Target | None:
    """Targets of the spec: CPU linear fwd+bwd >= 8x the grid_sample route, cubic >= 10x interpol;
    CUDA fwd+bwd >= 2x the grid_sample route; never more peak memory than the grid_sample route.

    The cubic target is judged on the rows where interpol computes what medfast does: the forward (equal to within
    1e-15), not the fwd+bwd of :func:`not_adjoint` (a wrong image gradient is no like-for-like time)."""
    if case.peer == "grid_sample":
        if case.device == "cpu":
            ratio = 8.0 if case.mode == "linear" and case.pass_ == "fwdbwd" else None
        else:
            ratio = 2.0 if case.pass_ == "fwdbwd" else None
        return Target(ratio, mem_le_peer=True)
    if case.peer == "interpol" and case.mode == "cubic" and case.device == "cpu" and not not_adjoint(case):
        return Target(10.0)
    return None


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    image: torch.Tensor  # (B, C, S, S, S)
    ddf: torch.Tensor | None  # (B, 3, S, S, S), voxels (op "warp")
    grad_out: torch.Tensor | None  # upstream gradient for fwdbwd
    theta: torch.Tensor | None = None  # (B, 3, 4): output voxel -> input voxel (op "affine")

    @property
    def field(self) -> torch.Tensor:
        """What the op takes besides the image: the ddf (warp) or theta (affine)."""
        return self.theta if self.theta is not None else self.ddf

    def clear_grads(self) -> None:
        for t in (self.image, self.ddf, self.theta):
            if t is not None:
                t.grad = None

    def nbytes(self) -> int:
        ts = [t for t in (self.image, self.ddf, self.grad_out, self.theta) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def affine_theta(size: int, batch: int = 1) -> torch.Tensor:
    """(batch, 3, 4) float32: a 10 degree rotation about axis 0 and a 1.05 zoom about the volume's centre,
    then a shift of (1.5, -2, 0.5) voxels; maps output voxel coordinates to input voxel coordinates."""
    import math

    a = math.radians(10.0)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    lin = rot / 1.05
    centre = torch.full((3,), (size - 1) / 2, dtype=torch.float64)
    shift = centre - lin @ centre + torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    theta = torch.cat([lin, shift[:, None]], 1).float()
    return theta[None].repeat(batch, 1, 1)


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """A random image and a smooth random DDF (about +-4 voxels), float32, on ``case.device``; for the
    affine op, the image and :func:`affine_theta`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.size,) * 3
    image = torch.rand(case.batch, case.channels, *shape, generator=gen)
    if case.op == "affine":
        theta = affine_theta(case.size, case.batch).to(case.device)
        grad_out = torch.randn(image.shape, generator=gen).to(case.device) if case.pass_ == "fwdbwd" else None
        image = image.to(case.device)
        if case.pass_ == "fwdbwd":
            image.requires_grad_(True)
            theta.requires_grad_(True)
        return Inputs(image, None, grad_out, theta)
    coarse = 4.0 * torch.randn(case.batch, 3, 6, 6, 6, generator=gen)
    ddf = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    grad_out = torch.randn(image.shape, generator=gen) if case.pass_ == "fwdbwd" else None
    image, ddf = image.to(case.device), ddf.to(case.device).contiguous()
    grad_out = grad_out.to(case.device) if grad_out is not None else None
    if case.pass_ == "fwdbwd":
        image.requires_grad_(True)
        ddf.requires_grad_(True)
    return Inputs(image, ddf, grad_out)


# ---------------------------------------------------------------------------------------------
# Implementations: prepare_<impl>(case, inputs) -> forward(image, ddf) -> out
# ---------------------------------------------------------------------------------------------

Forward = Callable[[torch.Tensor, torch.Tensor], Any]


class NotRun(Exception):
    """An implementation that does not run a case: ``status`` is "skipped" or "n/a"."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check(impl: str, case: Case) -> None:
    """Raises NotRun when ``impl`` cannot run ``case`` comparably, without importing the peer."""
    module = REQUIRES.get(impl)
    if module and importlib.util.find_spec(module) is None:
        raise NotRun("skipped", f"{module} is not installed")
    if case.op == "affine" and impl not in ("medfast", *AFFINE_PEERS):
        raise NotRun("n/a", f"{impl} is not an affine_transform peer")
    if impl in ("scipy", "cupy"):
        if (impl == "scipy") != (case.device == "cpu"):
            raise NotRun("n/a", f"{impl} runs on {'CPU' if impl == 'scipy' else 'CUDA'} only")
        if case.pass_ == "fwdbwd":
            raise NotRun("n/a", f"{impl} map_coordinates has no backward")
    if case.mode == "cubic" and impl == "grid_sample":
        raise NotRun("n/a", "grid_sample 'bicubic' is 2D only (and Keys cubic convolution, not a B-spline)")
    if case.mode == "cubic" and impl == "monai":
        raise NotRun(
            "n/a",
            "MONAI Warp 'bicubic' is grid_sample's (2D only); with MONAI's C++ extension it is an "
            "order-3 B-spline without prefilter (smooths, does not interpolate)",
        )


def prepare_medfast(case: Case, inputs: Inputs) -> Forward:
    import medfast

    if case.device == "cuda" and not medfast.build_info().get("cuda_kernels"):
        raise NotRun("skipped", "medfast was built without CUDA kernels")
    if case.op == "affine":
        return lambda image, theta: medfast.affine_warp(image, theta, mode=case.mode, padding=case.padding)
    return lambda image, ddf: medfast.warp(image, ddf, mode=case.mode, padding=case.padding)


def prepare_grid_sample(case: Case, inputs: Inputs) -> Forward:
    from medfast.ops._reference import grid_sample_warp

    return lambda image, ddf: grid_sample_warp(image, ddf, case.mode, case.padding)


def prepare_monai(case: Case, inputs: Inputs) -> Forward:
    import warnings

    from monai.networks.blocks import Warp

    mode = {"linear": "bilinear", "nearest": "nearest"}[case.mode]
    with warnings.catch_warnings():  # "Using PyTorch native grid_sample" (no MONAI C++ extension)
        warnings.simplefilter("ignore")
        warp = Warp(mode=mode, padding_mode=case.padding).to(case.device)
    return lambda image, ddf: warp(image, ddf)


def prepare_interpol(case: Case, inputs: Inputs) -> Forward:
    import interpol

    order, cubic = ORDER[case.mode], case.mode == "cubic"
    bound = {"zeros": "zero", "border": "replicate", "reflection": "dct1"}[case.padding]

    def forward(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        grid = interpol.add_identity_grid(ddf.movedim(1, -1))  # (B, *S, 3) voxel coordinates
        return interpol.grid_pull(image, grid, interpolation=order, bound=bound, extrapolate=True, prefilter=cubic)

    return forward


def _map_coordinates_forward(xp: Any, ndi: Any, to_array: Callable, from_array: Callable, case: Case) -> Forward:
    """map_coordinates (numpy/scipy or cupy/cupyx) over batch and channels, coordinates = identity + ddf."""
    mode = {"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}[case.padding]
    order = ORDER[case.mode]

    def forward(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        img, disp = to_array(image), to_array(ddf)
        ident = xp.indices(disp.shape[2:], dtype=disp.dtype)
        out = xp.empty(img.shape[:2] + disp.shape[2:], dtype=img.dtype)
        for b in range(img.shape[0]):
            coords = ident + disp[b]
            for c in range(img.shape[1]):
                ndi.map_coordinates(img[b, c], coords, output=out[b, c], order=order, mode=mode, cval=0.0)
        return from_array(out)

    return forward


def _affine_transform_forward(xp: Any, ndi: Any, to_array: Callable, from_array: Callable, case: Case,
                              inputs: Inputs) -> Forward:
    """affine_transform (scipy or cupyx) over batch and channels with the case's (3, 4) voxel matrices (made
    once, in float64 on the array library's device: the conversion is not timed, theta being fixed)."""
    mode = {"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}[case.padding]
    order = ORDER[case.mode]
    mats = [xp.asarray(m) for m in inputs.theta.detach().double().cpu().numpy()]

    def forward(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        img = to_array(image)
        out = xp.empty(img.shape, dtype=img.dtype)
        for b in range(img.shape[0]):
            mat = mats[b if len(mats) > 1 else 0]
            for c in range(img.shape[1]):
                ndi.affine_transform(img[b, c], mat, output=out[b, c], order=order, mode=mode, cval=0.0)
        return from_array(out)

    return forward


def prepare_scipy(case: Case, inputs: Inputs) -> Forward:
    import numpy as np
    import scipy.ndimage as ndi

    if case.op == "affine":
        return _affine_transform_forward(np, ndi, lambda t: t.numpy(), torch.from_numpy, case, inputs)
    return _map_coordinates_forward(np, ndi, lambda t: t.numpy(), torch.from_numpy, case)


def _cupy_on_torch_allocator(cp: Any) -> None:
    """Routes CuPy's allocations through PyTorch's caching allocator, so that torch's peak-memory
    statistics see them (the tensor owning each block lives as long as CuPy's pointer)."""

    def alloc(nbytes: int) -> Any:
        block = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
        return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(block.data_ptr(), nbytes, block), 0)

    cp.cuda.set_allocator(alloc)


def prepare_cupy(case: Case, inputs: Inputs) -> Forward:
    import cupy as cp
    import cupyx.scipy.ndimage as cndi

    _cupy_on_torch_allocator(cp)
    if case.op == "affine":
        return _affine_transform_forward(cp, cndi, cp.from_dlpack, torch.from_dlpack, case, inputs)
    return _map_coordinates_forward(cp, cndi, cp.from_dlpack, torch.from_dlpack, case)


PREPARE: dict[str, Callable[[Case, Inputs], Forward]] = {
    "medfast": prepare_medfast,
    "grid_sample": prepare_grid_sample,
    "monai": prepare_monai,
    "interpol": prepare_interpol,
    "scipy": prepare_scipy,
    "cupy": prepare_cupy,
}


def make_step(impl: str, case: Case, inputs: Inputs) -> Callable[[], Any]:
    """The timed callable: forward, or forward + backward w.r.t. image and ddf. Raises NotRun."""
    check(impl, case)
    forward = PREPARE[impl](case, inputs)
    if case.pass_ == "fwd":
        return lambda: forward(inputs.image, inputs.field)

    def step() -> torch.Tensor:
        inputs.clear_grads()
        out = forward(inputs.image, inputs.field)
        out.backward(inputs.grad_out)
        return out

    return step


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def set_threads() -> int:
    """Uses every core this process may run on."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(
    step: Callable[[], Any], device: str, warmup: int, repeats: int, budget_s: float, warmup_s: float = 0.0
) -> list[float]:
    """Milliseconds per call: at least ``warmup`` untimed calls, and more for ``warmup_s`` seconds
    (fast calls run slow for their first few dozen repeats: page faults, clocks), then at least 3
    (or ``repeats`` if fewer) timed calls, more up to ``repeats`` while the timed total stays under
    ``budget_s``."""
    n, t_end = 0, time.perf_counter() + warmup_s
    while n < warmup or (time.perf_counter() < t_end and n < 10_000):
        step()
        _sync(device)
        n += 1
    times: list[float] = []
    while len(times) < repeats and (len(times) < min(3, repeats) or sum(times) < budget_s * 1e3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


# glibc: with MALLOC_MMAP_THRESHOLD_ set when the process starts, every block over it is mmapped and
# unmapped on free, so resident memory follows live memory (by default, freed blocks stay in the heap
# for reuse: they would hide a later call's growth, or count a call's freed temporaries as if live).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def malloc_steady_state() -> None:
    """After the memory probe, glibc's steady state for timing (what its dynamic threshold reaches
    once blocks are freed): blocks under 32 MiB reused from the heap, trimmed beyond 64 MiB."""
    libc = _libc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" in os.environ:
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD


def cpu_peak_mib(step: Callable[[], Any], inputs: Inputs | None = None) -> float | None:
    """Peak resident-memory growth of one call over the resident size just before it (inputs
    included in the baseline), in MiB: the peak (VmHWM) is reset through /proc/self/clear_refs.
    Exact only in a process started with :data:`MALLOC_ENV` (run_warp.py's workers). None where
    unsupported (not Linux)."""
    if not cpu_peak_supported():
        return None
    if inputs is not None:
        inputs.clear_grads()
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = step()
    peak = _proc_status_kib("VmHWM")
    del out
    return (peak - base) / 1024


def cpu_extra_peak_mib(step: Callable[[], Any], clear: Callable[[], Any] | None = None) -> float | None:
    """The CPU workers' memory probe (loss, registration, segmentation suites, as run_warp's): after a warm-up
    call, ``clear()`` (drop what the last call left, e.g. gradients), then :func:`cpu_peak_mib` of one call;
    then glibc's timing steady state. Needs a process started with :data:`MALLOC_ENV` (see :func:`worker_env`):
    with glibc's default heap, freed blocks under 32 MiB stay resident and were counted as if live."""
    step()
    if clear is not None:
        clear()
    peak = cpu_peak_mib(step)
    malloc_steady_state()
    return peak


def worker_env() -> dict[str, str]:
    """The environment of a CPU benchmark worker process (:data:`MALLOC_ENV` added)."""
    return {**os.environ, **MALLOC_ENV}


def cuda_peak_mib(step: Callable[[], Any], inputs: Inputs | None = None) -> float:
    """Peak CUDA allocation of one call above what is allocated before it (inputs included), MiB."""
    if inputs is not None:
        inputs.clear_grads()
    gc.collect()
    return cuda_timing.cuda_peak_mib(step)


def measure(
    impl: str,
    case: Case,
    *,
    warmup: int = 2,
    warmup_s: float = 0.5,
    repeats: int = 5,
    budget_s: float = 5.0,
    memory: bool = True,
) -> dict[str, Any]:
    """Measures the peak memory of one call of ``impl`` on ``case`` after ``warmup`` calls, then times
    it (median ms; the warm-up goes on for ``warmup_s``). Never raises for a peer that does not run
    (status "skipped" / "n/a") or fails (status "error"), its setup included (an import that raises, a module
    that cannot be built): in-process (run_warp's default on CUDA) one broken peer must not end the suite."""
    try:
        check(impl, case)
        set_threads()
        inputs = make_inputs(case)
        step = make_step(impl, case, inputs)
        for _ in range(warmup):  # one-time costs (JIT, thread pools, lazy init) out of both probes
            step()
        peak = None
        if memory:  # first: the timing loop below would leave freed blocks in the heap
            peak = cuda_peak_mib(step, inputs) if case.device == "cuda" else cpu_peak_mib(step, inputs)
            malloc_steady_state()
        times = time_step(step, case.device, 0, repeats, budget_s, warmup_s)
    except NotRun as e:
        return {"status": e.status, "reason": str(e)}
    except Exception as e:  # a peer's own failure is a result, not a crash of the run
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
    return {
        "status": "ok",
        "ms": statistics.median(times),
        "times_ms": times,
        "peak_mib": peak,
        "inputs_mib": inputs.nbytes() / 2**20,
    }


def calibrate_memory(device: str = "cpu", mib: int = 100) -> float | None:
    """What the memory probe reports for one call that allocates and fills a ``mib`` MiB tensor."""
    set_threads()
    step = lambda: torch.ones(mib * 2**18, device=device)  # noqa: E731
    step()
    return cuda_peak_mib(step) if device == "cuda" else cpu_peak_mib(step)


# ---------------------------------------------------------------------------------------------
# Agreement: do the peers compute the same thing (same conventions)?
# ---------------------------------------------------------------------------------------------


def agreement(device: str = "cpu", padding: str = "auto", size: int = 20, channels: int = 2,
              ops: tuple[str, ...] = OPS) -> list[dict[str, Any]]:
    """Max |peer - medfast| of the output and (fwdbwd) of both gradients, on a small volume where
    many samples fall near or beyond the border, relative to the larger max |value| of the two."""
    rows, refs = [], {}
    for case in cases(size, device, padding, ops):
        if case.channels != CHANNELS[0]:
            continue
        case = replace(case, channels=channels)
        row: dict[str, Any] = {"op": case.op, "peer": case.peer, "mode": case.mode, "pass": case.pass_,
                               "padding": case.padding}
        try:
            check(case.peer, case)
            if case.config not in refs:
                refs[case.config] = _run_once("medfast", case)
            got, ref = _run_once(case.peer, case), refs[case.config]
        except NotRun as e:
            rows.append({**row, "status": e.status, "reason": str(e)})
            continue
        except Exception as e:
            if case.config not in refs:  # medfast's own failure: the suite's, raised
                raise
            # a peer's failure (its import or its call) is its row's, as in measure: not the end of the suite
            rows.append({**row, "status": "error", "reason": f"{type(e).__name__}: {e}"[:300]})
            continue
        row["status"] = "ok"
        for key, r in ref.items():
            g = got[key]
            row[key] = float((g - r).abs().max()) / max(float(r.abs().max()), float(g.abs().max()), 1e-12)
        rows.append(row)
    return rows


def _run_once(impl: str, case: Case) -> dict[str, torch.Tensor]:
    inputs = make_inputs(case, seed=1)
    out = make_step(impl, case, inputs)()
    res = {"out": out.detach().double().cpu()}
    if case.pass_ == "fwdbwd":
        res["grad_image"] = inputs.image.grad.double().cpu()
        grad_ddf = inputs.ddf.grad  # None: no gradient (nearest)
        res["grad_ddf"] = (grad_ddf if grad_ddf is not None else torch.zeros_like(inputs.ddf)).double().cpu()
    return res


# ---------------------------------------------------------------------------------------------
# GPU bandwidth: the forward pass against the card's DRAM bandwidth
# ---------------------------------------------------------------------------------------------


def ideal_bytes(case: Case) -> int:
    """Bytes an ideal forward kernel moves: read the image and the ddf once, write the output
    (cubic's prefilter not counted)."""
    voxels = case.size**3
    return 4 * case.batch * voxels * (case.channels + 3 + case.channels)


def dram_peak_gbs() -> float | None:
    """The card's theoretical DRAM bandwidth, GB/s (2 transfers per memory clock), if readable."""
    try:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(torch.cuda.current_device())
        clock_khz, bus_bits = props["memoryClockRate"], props["memoryBusWidth"]
    except Exception:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def copy_gbs(mib: int = 1024) -> float:
    """Achieved device-to-device copy bandwidth (bytes read + written), GB/s."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = statistics.median(time_step(lambda: dst.copy_(src), "cuda", warmup=3, repeats=10, budget_s=1.0))
    return 2 * src.numel() / (ms * 1e-3) / 1e9
