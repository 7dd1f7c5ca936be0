"""Build-time metadata for scikit-build-core (a local ``[[tool.dynamic-metadata]]`` provider).

medfast's compiled extension links against torch's C++ API, which is only stable within one torch
minor release. A wheel therefore requires the torch release it was compiled against
(``torch==X.Y.*``), read from the torch installed in the build environment; the sdist keeps the loose
requirement, since building it compiles against whatever torch is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_state = "wheel"
_BASE = ["numpy"]
_LOOSE = "torch>=2.11"  # the oldest release the suite passes on (2.4-2.10: see docs/install.md)


def build_state(state: str) -> None:
    global _state
    _state = state


def dynamic_wheel(settings: Mapping[str, Any]) -> dict[str, bool]:
    return {"dependencies": True}  # the wheel's torch pin differs from the sdist's requirement


def torch_requirement() -> str:
    try:
        import torch
    except ImportError:  # metadata-only queries without torch: the loose requirement
        return _LOOSE
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    torch_req = _LOOSE if _state == "sdist" else torch_requirement()
    return {"dependencies": [torch_req, *_BASE]}
