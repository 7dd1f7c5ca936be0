"""Strict JSON for the files medfast writes (results, logs, reports): a NaN or infinite number is written as
``null``, since bare ``NaN`` / ``Infinity`` are not JSON (``json.dumps`` writes them by default, and strict
readers such as ``jq``, JavaScript's ``JSON.parse`` or pandas' ``read_json`` refuse the file)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["dumps", "json_ready"]


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as ``None``, NumPy and torch scalars / arrays as Python numbers /
    lists and tuples as lists (mappings and sequences converted recursively; other values kept)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return json_ready(value.tolist())
    if type(value).__module__.startswith("torch") and hasattr(value, "tolist"):  # a tensor, without importing torch
        return json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_ready` ``(value)``; ``allow_nan=False`` makes a missed non-finite number an
    error instead of an invalid file."""
    return json.dumps(json_ready(value), allow_nan=False, **kwargs)
