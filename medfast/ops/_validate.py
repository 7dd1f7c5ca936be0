"""Argument checks shared by the public operators: clear exceptions before any kernel launches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar, cast

import numpy as np
import torch

IMAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MODES = ("nearest", "linear", "cubic")
PADDINGS = ("zeros", "border", "reflection")


def check_choice(name: str, value: object, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def plain(value: object) -> object:
    """A tensor subclass from outside torch (MONAI's MetaTensor) as a plain tensor: same memory, same autograd
    graph. For the ops whose output lies on another grid than their inputs (warp, affine_warp, resample, the
    ultrasound frames): the subclass's __torch_function__ would copy an input's affine onto the output, which
    then claims the wrong geometry; a plain tensor claims none. torch's own subclasses (Parameter, the fake
    tensors of torch.compile) are left as they are."""
    if (isinstance(value, torch.Tensor) and type(value) is not torch.Tensor
            and not type(value).__module__.startswith("torch.") and not torch.compiler.is_compiling()):
        return value.as_subclass(torch.Tensor)
    return value


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        hint = (" (a DLPack array: run the op through medfast.interop.call, or convert it with "
                "medfast.interop.as_tensor)" if hasattr(value, "__dlpack__") else "")
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")
    return value


def position_dtype(image_dtype: torch.dtype) -> torch.dtype:
    """dtype of displacements / affines that go with an image dtype (float64 only with float64)."""
    return torch.float64 if image_dtype == torch.float64 else torch.float32


_HALF = (torch.float16, torch.bfloat16)
_T = TypeVar("_T")


def autocast_on(tensor: object) -> bool:
    """Whether torch.autocast is active for the tensor's device (medfast runs on CPU and CUDA only)."""
    return (isinstance(tensor, torch.Tensor) and tensor.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(tensor.device.type))


def autocast_image(image: _T) -> _T:
    """Under autocast, a float16/bfloat16 image as float32: the resampling ops take part in autocast as
    F.grid_sample does (autocast's float32 list). Anything else unchanged, for the caller's checks."""
    if isinstance(image, torch.Tensor) and image.dtype in _HALF and autocast_on(image):
        return cast(_T, image.float())
    return image


def autocast_position(value: _T, image: object) -> _T:
    """Under autocast (for the image's device), a displacement / affine from a network's low-precision output
    upcast to the image's position dtype (float32, float64 with a float64 image). Never a downcast: a float64
    field beside a float32 image stays an error, as outside autocast."""
    if isinstance(value, torch.Tensor) and isinstance(image, torch.Tensor) and image.dtype in IMAGE_DTYPES:
        pos = position_dtype(image.dtype)
        # (the dtype test first: the autocast query costs microseconds, and matching dtypes need none)
        if (value.dtype != pos and value.is_floating_point() and torch.finfo(value.dtype).bits < torch.finfo(pos).bits
                and autocast_on(image)):
            return cast(_T, value.to(pos))
    return value


def check_image(image: object, name: str = "image") -> int:
    """Checks a (B, C, *spatial) image with 2 or 3 spatial dims; returns the number of spatial dims."""
    image = check_tensor(name, image)
    if image.dtype not in IMAGE_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), got {image.dtype}; "
            f"convert label maps with .float() and use mode='nearest'"
        )
    if image.dim() not in (4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)} "
            f"({image.dim()} dims)"
        )
    if image.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    return image.dim() - 2


def check_field(field: object, name: str, image: torch.Tensor, ndim: int) -> torch.Tensor:
    """Checks a (B, ndim, *spatial) displacement field that goes with `image`."""
    field = check_tensor(name, field)
    expected = position_dtype(image.dtype)
    if field.dtype != expected:
        raise TypeError(
            f"{name} must have dtype {expected} for an image of dtype {image.dtype}, got {field.dtype}"
        )
    if field.dim() != ndim + 2 or field.shape[1] != ndim:
        raise ValueError(
            f"{name} must have shape (B, {ndim}, *spatial) for a {ndim}-d image (channel i is the "
            f"displacement along spatial axis i), got {tuple(field.shape)}"
        )
    if field.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(field.shape)}")
    check_device(name, field, image)
    return field


def check_op_devices(op: str, **tensors: object) -> None:
    """For the fake (meta) kernels: a ``ValueError`` when the tensor arguments (None and non-tensors skipped) of a
    call of ``op`` lie on different devices, as the compiled kernels raise. The fake kernels also serve as the ops'
    Meta kernels, which a call mixing a meta tensor with a CPU one reaches: without this check it returned an
    uninitialized CPU tensor. Under FakeTensorMode each fake tensor reports the device it stands for."""
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}; "
                             "every tensor of one call must be on one device")


def check_backend(name: str, tensor: torch.Tensor) -> None:
    """A CUDA tensor needs a build with CUDA kernels: say so instead of the dispatcher's message."""
    if tensor.device.type == "cuda":
        from medfast._extension import _C

        if not _C.build_info()["cuda"]:
            raise RuntimeError(
                f"{name} is on {tensor.device} but this medfast build has no CUDA kernels; rebuild it with a "
                "CUDA toolkit on PATH (scripts/setup.sh) or move the tensors to the CPU"
            )
    elif tensor.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} is on {tensor.device}; medfast runs on CPU and CUDA devices")


def check_device(name: str, tensor: torch.Tensor, image: torch.Tensor) -> None:
    if tensor.device != image.device:
        raise ValueError(f"{name} is on {tensor.device} but image is on {image.device}; move them to one device")


def check_batch(image: torch.Tensor, **others: torch.Tensor | None) -> int:
    """The common batch size: every batch is 1 (broadcast) or equal to the largest."""
    sizes = {"image": image.shape[0]}
    sizes.update({k: v.shape[0] for k, v in others.items() if v is not None})
    batch = max(sizes.values())
    bad = {k: b for k, b in sizes.items() if b not in (1, batch)}
    if bad:
        raise ValueError(
            "batch sizes must be equal or 1 (broadcast); got "
            + ", ".join(f"{k}: {b}" for k, b in sizes.items())
        )
    return batch


def py_scalar(value: object) -> object:
    """A NumPy scalar (``np.float32(0.5)``, ``np.int64(3)``, ``np.bool_``) or a 0-d tensor that does not require
    grad, as the Python bool / int / float it holds (PyTorch and MONAI accept them for scalar arguments); any
    other value unchanged, for the caller's own check. Not while torch.compile traces (no graph break)."""
    if isinstance(value, np.generic):
        return value.item()
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
            and value.device.type != "meta" and not torch.compiler.is_compiling()):
        return value.item()
    return value


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (NumPy ints and 0-d tensors too; not a bool, nor a float: 4.7 is not
    silently 4, nor a string). Sizes are checked where they are given, not left to a later error that does not
    name the argument."""
    value = py_scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def non_negative_finite(value: object) -> bool:
    """A non-negative finite int or float (not a bool, not NaN). Comparisons, not math.isfinite: under
    torch.compile(dynamic=True) the value is a symbolic float, which math.isfinite cannot trace."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def check_bool(name: str, value: object) -> bool:
    value = py_scalar(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_shape(name: str, shape: object, ndim: int) -> list[int]:
    # Integers only (Python or NumPy ints, 0-dim integer tensors): 4.7 is not silently a size of 4.
    def size(s: object) -> int:
        # A symbolic size as it is (torch.compile sees it as an int, make_fx / non-strict export as a SymInt):
        # __index__ would specialize it (dynamo: a graph break, "torch.* op returned non-Tensor").
        if (isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, torch.SymInt):
            return cast(int, s)
        if isinstance(s, torch.Tensor):
            if s.dim() == 0 and not s.is_floating_point() and s.dtype != torch.bool:
                return int(s)
        elif not isinstance(s, bool) and hasattr(s, "__index__"):
            return s.__index__()
        raise TypeError

    if isinstance(shape, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {ndim} ints, got {shape!r}")
    try:
        out = [size(s) for s in shape]  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {ndim} ints, got {shape!r}") from None
    if len(out) != ndim or any(s <= 0 for s in out):
        raise ValueError(f"{name} must be {ndim} positive sizes, got {tuple(out)}")
    return out
