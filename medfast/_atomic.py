"""Output files that are complete or absent: written under a temporary name in their folder, then renamed."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replacing"]


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; when the block ends normally it replaces ``path``
    (``os.replace``, atomic on one file system), else it is removed. A kill, a full disk or Ctrl-C during the
    write leaves the previous file (or none), never a truncated one under the final name, and two processes
    writing one file leave one of their versions whole. The temporary name ends with ``path``'s own name, so
    writers that pick the format from the suffix (nibabel's ``.nii.gz``, PIL's ``.png``) still do."""
    path = Path(path)
    tmp = path.with_name(f".{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
