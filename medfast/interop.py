"""Zero-copy interoperability with other array libraries through DLPack (CuPy on the GPU, NumPy on the CPU,
or anything else that implements ``__dlpack__``).

medfast's operators take and return ``torch.Tensor``. :func:`call` runs one of them on foreign arrays without
copying: it views every array argument as a tensor with :func:`torch.from_dlpack` (same memory, same device,
same stream semantics), calls the operator, and views tensor results as arrays of the library of the first
array argument::

    import cupy as cp
    import medfast as mf
    from medfast import interop

    image = cp.random.rand(1, 1, 64, 64, 64, dtype=cp.float32)
    ddf = cp.zeros((1, 3, 64, 64, 64), dtype=cp.float32)
    moved = interop.call(mf.warp, image, ddf, mode="linear")   # a cupy.ndarray on the same GPU

Gradients do not cross the boundary: results come back detached. For autograd, convert once with
:func:`as_tensor` and stay in PyTorch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["as_tensor", "call", "from_tensor", "is_foreign_array"]


def is_foreign_array(value: object) -> bool:
    """True for a non-torch object that exports DLPack (``__dlpack__``)."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "__dlpack__")


def as_tensor(value: Any) -> torch.Tensor:
    """A tensor sharing the memory of ``value`` (a tensor is returned as is; a NumPy array with negative
    strides is copied first, a read-only one is shared with PyTorch's warning).

    Raises
    ------
    TypeError
        If ``value`` is neither a tensor nor a DLPack-capable array.
    """
    if isinstance(value, torch.Tensor):
        return value
    if not hasattr(value, "__dlpack__"):
        raise TypeError(f"expected a torch.Tensor or an array with __dlpack__, got {type(value).__name__}")
    if isinstance(value, np.ndarray):
        # NumPy: negative strides (np.flip, [::-1]) and big-endian data (nibabel's dataobj of a big-endian
        # NIfTI) have no tensor view: a copy; a read-only array is shared as torch.from_numpy shares it, with
        # its warning (writing to the tensor would change the array)
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        elif any(st < 0 for st in value.strides):
            value = np.ascontiguousarray(value)
        return torch.from_numpy(value)
    return torch.from_dlpack(value)


def _library(array: Any):
    """The namespace whose ``from_dlpack`` makes arrays like ``array``: the array API namespace when the array
    has one (NumPy 2, JAX, CuPy: a JAX array's type lives in ``jaxlib``, which has no ``from_dlpack``), else
    the root module of its type."""
    if hasattr(array, "__array_namespace__"):
        try:
            namespace = array.__array_namespace__()
        except Exception:  # an array API version it does not support: fall back to the module
            namespace = None
        if namespace is not None and hasattr(namespace, "from_dlpack"):
            return namespace
    root = type(array).__module__.split(".")[0]
    module = importlib.import_module(root)
    if not hasattr(module, "from_dlpack"):
        raise TypeError(f"{root} has no from_dlpack: cannot return {type(array).__name__} results")
    return module


def from_tensor(tensor: torch.Tensor, like: Any) -> Any:
    """A view of ``tensor`` as an array of the library ``like`` comes from (NumPy, CuPy, JAX, ...)."""
    return _library(like).from_dlpack(tensor.detach())


def call(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs ``op`` (a medfast operator or any function of tensors) on DLPack arrays, zero-copy.

    Array arguments (positional or keyword) become tensors; tensor results (also inside tuples and lists)
    become arrays of the first array argument's library. Without any foreign array argument, this is
    just ``op(*args, **kwargs)``.
    """
    like = next((a for a in [*args, *kwargs.values()] if is_foreign_array(a)), None)
    library = None if like is None else _library(like)  # before the op: an unknown library fails fast
    args = tuple(as_tensor(a) if is_foreign_array(a) else a for a in args)
    kwargs = {k: as_tensor(v) if is_foreign_array(v) else v for k, v in kwargs.items()}
    result = op(*args, **kwargs)
    if like is None:
        return result

    def back(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return library.from_dlpack(value.detach())
        if isinstance(value, (tuple, list)):
            items = [back(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
        return value

    return back(result)
