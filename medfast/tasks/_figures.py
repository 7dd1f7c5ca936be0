"""Figure output shared by the tasks' PNG writers (see :mod:`medfast._figures`: no pyplot, no backend switch)."""

from __future__ import annotations

from medfast._figures import figures_enabled, new_figure, save_figure

__all__ = ["figures_enabled", "new_figure", "save_figure"]
