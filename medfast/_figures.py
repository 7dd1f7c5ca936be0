"""PNG figures without pyplot, for every layer (trainer, tasks, ultrasound, bench).

Figures are ``matplotlib.figure.Figure`` objects saved with ``fig.savefig``: no ``matplotlib.use`` and no
pyplot, so writing a PNG never switches the backend of the process (a notebook's inline backend, a GUI's
QtAgg) nor adds figures to pyplot's list. matplotlib is optional (the ``cli`` extra): the writers that run
inside longer work (training, prediction, simulation) check :func:`figures_enabled` first and skip their
figures with a one-line note instead of failing after the work is done.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: the notes :func:`figures_enabled` printed in this process (one per command, not one per figure)
_NOTED: set[str] = set()


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (its ``Figure``, all the writers need)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def figures_enabled(command: str) -> bool:
    """True when matplotlib is installed; else prints, once per process and ``command`` (e.g.
    ``"medfast train"``), a note to stderr that its figures are skipped, and returns False."""
    if have_matplotlib():
        return True
    if command not in _NOTED:
        _NOTED.add(command)
        print(f'{command}: note: matplotlib is not installed: figures (PNG plots) are skipped; '
              f'pip install "medfast[cli]" to get them', file=sys.stderr, flush=True)
    return False


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure(**kwargs)`` outside pyplot (no backend selected, nothing to close).
    Raises ModuleNotFoundError (``name="matplotlib"``) without matplotlib."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` (from :func:`new_figure`: nothing to close) to ``path``, creating its folder; returns the path.
    Complete or absent (:func:`medfast._atomic.replacing`): a run stopped while it draws leaves no truncated PNG."""
    from medfast._atomic import replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path
