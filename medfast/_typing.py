"""Type aliases of the public signatures: the argument forms the functions accept at run time (NumPy arrays and
scalars, tensors, sequences), so that a user's type checker accepts the documented usages."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

#: A whole number: a Python int or a NumPy integer scalar (``np.int64(3)``).
Int: TypeAlias = int | np.integer
#: A real number: a Python float or int, or a NumPy scalar.
Float: TypeAlias = float | np.floating | np.integer
#: Numbers given as a sequence (vector or nested rows), an ndarray or a tensor, e.g. a position (3,), a pose
#: (4, 4), class scores (N, C).
ArrayLike: TypeAlias = Sequence[float] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor
#: A matrix (e.g. a 4 x 4 voxel-to-world affine or pose) as an ndarray or a tensor.
MatrixLike: TypeAlias = np.ndarray | torch.Tensor
#: A spatial shape: a sequence of ints (``torch.Size`` included), an integer ndarray or tensor.
ShapeLike: TypeAlias = Sequence[int] | np.ndarray | torch.Tensor
#: Voxel spacing: one number for every axis, or one per axis.
SpacingLike: TypeAlias = Float | Sequence[float] | np.ndarray | torch.Tensor
#: A file path.
PathLike: TypeAlias = str | os.PathLike[str]

__all__ = ["ArrayLike", "Float", "Int", "MatrixLike", "PathLike", "ShapeLike", "SpacingLike"]
