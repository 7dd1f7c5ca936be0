"""Build-time metadata for scikit-build-core (a local ``[[tool.dynamic-metadata]]`` provider).

medfast's compiled extension links against torch's C++ API, which is only stable within one torch
minor release. A wheel therefore requires the torch release it was compiled against
(``torch==X.Y.*``), read from the torch installed in the build environment; the sdist keeps the loose
requirement, since building it compiles against whatever torch is present.

The version is medfast's release plus the local label in ``MEDFAST_LOCAL_VERSION`` when the build sets one
(``scripts/build_wheels.sh cpu``: ``0.1.0+cpu``), so that the CPU-only and the CUDA wheel of one release differ
in name and in ``pip list``, as torch's own do. scikit-build-core refuses a version that differs between an
sdist and the wheels built from it, so the label applies to both: the release scripts build sdists without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

VERSION = "0.1.0"
_state = "wheel"
_BASE = ["numpy"]
_LOOSE = "torch>=2.11"  # the oldest release the suite passes on (2.4-2.10: see docs/install.md)


def build_state(state: str) -> None:
    global _state
    _state = state


def dynamic_wheel(settings: Mapping[str, Any]) -> dict[str, bool]:
    # the wheel's torch pin differs from the sdist's requirement (scikit-build-core refuses a version that
    # differs: the local label applies to whatever the build makes, so the release scripts build sdists without it)
    return {"dependencies": True}


def version() -> str:
    label = os.environ.get("MEDFAST_LOCAL_VERSION", "").strip()
    if not label:
        return VERSION
    if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):  # PEP 440 local version, normalized form
        raise ValueError(f"MEDFAST_LOCAL_VERSION={label!r} is not a local version label (PEP 440: lower-case "
                         "letters and digits, separated by dots; e.g. 'cpu' or 'cu130')")
    return f"{VERSION}+{label}"


def torch_requirement() -> str:
    try:
        import torch
    except ImportError:  # metadata-only queries without torch: the loose requirement
        return _LOOSE
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    if _state == "sdist":
        return {"version": version(), "dependencies": [_LOOSE, *_BASE]}
    return {"version": version(), "dependencies": [torch_requirement(), *_BASE]}
