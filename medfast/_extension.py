"""Loads the compiled extension ``medfast._C`` (which registers ``torch.ops.medfast.*``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import NoReturn

import torch

_REBUILD = (
    "Rebuild medfast against the installed torch {torch}: in the medfast source folder run "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` (or `scripts/test.sh`, which "
    "sets everything up)."
)
_MISSING = (
    "medfast's compiled extension could not be loaded: medfast._C (_C*.so) is not in {where}. "
    "From a source checkout, build it against the installed torch {torch}: in the medfast source folder run "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` (after `pip install \"scikit-build-core>=1.1\" "
    "\"cmake>=3.24\" ninja numpy`; or `scripts/test.sh`, which sets everything up). From a wheel, reinstall a "
    "medfast wheel built for torch {release}: `pip install --force-reinstall --no-deps <that wheel>`."
)


def _built_for() -> str | None:
    """The torch release (major.minor) this medfast was built for, read without loading ``_C``: a wheel requires
    ``torch==X.Y.*`` (the build's pin); None for a source build (``torch>=...``) or unreadable metadata."""
    import re
    from importlib import metadata

    try:
        for req in metadata.requires("medfast") or []:
            m = re.match(r"torch\s*==\s*(\d+\.\d+)", req)
            if m:
                return m.group(1)
    except Exception:  # noqa: BLE001 - metadata of an odd install: no version to name
        return None
    return None


def _load_failure(exc: ImportError) -> str:
    """The message for a ``_C`` that does not load (the usual result of a torch mismatch: a missing library or an
    undefined symbol, before :func:`build_info` could be read): names the torch the wheel was built for when its
    metadata says, and what to install (a wheel user has no source folder to rebuild in)."""
    built = _built_for()
    text = str(exc)
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    msg = f"medfast's compiled extension could not be loaded ({text}). It is missing or was built for another torch"
    if built is not None:
        msg += f": this medfast was built for torch {built}, and torch {torch.__version__} is installed"
    msg += ". "
    if any(lib in text for lib in ("libc10_cuda", "libtorch_cuda", "libcudart")):
        msg += "It is a CUDA build: it needs the CUDA build of torch it was built for (not a +cpu torch). "
    msg += (f"From a wheel, install a medfast wheel built for torch {release} (`pip install --force-reinstall "
            f"--no-deps <that wheel>`) or the torch {built or 'release'} it was built for. From a source checkout: "
            + _REBUILD.format(torch=torch.__version__))
    return msg


def _same_release(a: str, b: str) -> bool:
    """Torch's C++ ABI changes between minor releases: compare major.minor."""
    return a.split("+")[0].split(".")[:2] == b.split("+")[0].split(".")[:2]


def _running_the_cli() -> bool:
    """Whether this process is the ``medfast`` console script or ``python -m medfast``."""
    argv = getattr(sys, "argv", None) or [""]
    if os.path.basename(argv[0]) in ("medfast", "medfast.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("medfast", "medfast.__main__") for a, b in zip(orig, orig[1:]))


def _one_line_under_the_cli(error: ImportError) -> None:
    """The ``medfast`` command (console script or ``python -m medfast``) imports this package before its
    ``main()`` can catch anything: there, print ``error`` (only that exception object) as one line instead of
    a traceback. Python still exits with status 1."""
    if not _running_the_cli():
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if value is error:
            print(f"medfast: error: {error}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


def _fail(message: str) -> NoReturn:
    """Raise ONE ImportError (no chained traceback: ``message`` already says what went wrong)."""
    error = ImportError(message, name="medfast._C", path=os.path.dirname(os.path.abspath(__file__)))
    _one_line_under_the_cli(error)
    raise error from None


def _load():
    # Checked first: a missing module would otherwise surface as Python's misleading "partially initialized
    # module 'medfast' (most likely due to a circular import)".
    if importlib.util.find_spec("medfast._C") is None:
        release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        _fail(_MISSING.format(where=os.path.dirname(os.path.abspath(__file__)), torch=torch.__version__,
                              release=release))
    try:
        from medfast import _C
    except ImportError as exc:
        _fail(_load_failure(exc))
    built = _C.build_info()["torch"]
    if not _same_release(built, torch.__version__):
        _fail(f"medfast was built against torch {built} but torch {torch.__version__} is installed. "
              + _REBUILD.format(torch=torch.__version__))
    return _C


_C = _load()


def cuda_kernels_built() -> bool:
    """Whether this build of medfast has its CUDA kernels (no GPU query, unlike :func:`build_info`)."""
    return bool(_C.build_info()["cuda"])


def build_info() -> dict:
    """How this medfast was built and what it can use now.

    Returns
    -------
    dict
        ``medfast`` and ``torch`` versions (installed, and the one built against), whether CUDA
        kernels were compiled (``cuda``), the CUDA version and architectures they were compiled for,
        OpenMP, the CPU SIMD fast path in use (``cpu_simd``), CPU threads, whether a GPU is visible, and
        the CUDA kernel variants that the environment selects now (``cuda_variants``: the ultrasound
        march, ``MEDFAST_USSIM_CUDA_MARCH`` = warp (default) or thread; the ultrasound backward's
        property-gradient scatter, ``MEDFAST_USSIM_CUDA_SCATTER`` = merged (default) or plain; the
        linear warp backward's scatter, ``MEDFAST_WARP_CUDA_SCATTER`` = plain or merged, default
        ``auto``: merged for images of several channels, plain for one; the warp forward's voxels per
        thread, ``MEDFAST_WARP_CUDA_FORWARD`` = ilp1 (default), one, ilp2 or ilp4; the fused losses' label
        sums, ``MEDFAST_LOSS_CUDA_SUMS`` = warp (default) or thread).
    """
    from medfast import __version__

    info = dict(_C.build_info())
    built_torch = info.pop("torch")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "medfast": __version__,
        "torch": torch.__version__,
        "torch_built_against": built_torch,
        "cuda_kernels": info["cuda"],
        "cuda_version": info["cuda_version"],
        "cuda_archs": info["cuda_archs"],
        "openmp": info["openmp"],
        "cpu_simd": info["cpu_simd"],
        "compiler": info["compiler"],
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu_visible": gpus > 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "cuda_variants": cuda_variants(),
    }


def cuda_variants() -> dict[str, str]:
    """The CUDA kernel variants the launchers pick now, from the environment (read at every launch, as
    the C++ launchers do): values other than the named ones select the default."""
    march = os.environ.get("MEDFAST_USSIM_CUDA_MARCH", "")
    us_scatter = os.environ.get("MEDFAST_USSIM_CUDA_SCATTER", "")
    scatter = os.environ.get("MEDFAST_WARP_CUDA_SCATTER", "")
    sums = os.environ.get("MEDFAST_LOSS_CUDA_SUMS", "")
    forward = os.environ.get("MEDFAST_WARP_CUDA_FORWARD", "")
    return {"ussim_march": "thread" if march == "thread" else "warp",
            "ussim_scatter": "plain" if us_scatter == "plain" else "merged",
            "warp_scatter": scatter if scatter in ("plain", "merged") else "auto",
            "warp_forward": forward if forward in ("one", "ilp2", "ilp4") else "ilp1",
            "loss_sums": "thread" if sums == "thread" else "warp"}
