"""Figure helpers shared by the report, the analysis figures, the demo and ``rllc calibrate`` (matplotlib).

Figures are built on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), never through
``pyplot``: nothing here selects a backend or registers a figure, so importing or calling this module
leaves the caller's matplotlib state (backend, open figures) as it was.

- ``subplots``: a new figure and its axes;
- ``save_figure``: write a figure as a PNG, atomically;
- ``log_step_axis``: a log x-axis of training steps that still shows step 0;
- ``head_key`` / ``sort_key``: order components ``"l:h"`` by layer then head (other names after them);
- ``head_colour``, ``TYPE_COLORS``: line colours per head and per head type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from .atomic import write_atomically

#: One colour per head type (the demo's figure and ``rllc analyze``).
TYPE_COLORS = {"induction": "#d62728", "previous-token": "#1f77b4", "current-token": "#2ca02c",
               "multigram": "#9a9a9a", "other": "#9a9a9a"}


def subplots(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (6.4, 4.8), **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots`` (same ``squeeze``/``sharex``/``sharey`` keywords), on an
    Agg canvas of its own: no pyplot state, no backend switch, no ``close`` needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG (atomically: a reader never sees half a file); return the path."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def log_step_axis(ax, steps, label: str = "training step") -> None:
    """A log x-axis for ``steps`` that still shows 0 (symmetric log, linear below 1), labelled ``label``."""
    if min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def head_key(name: str) -> Tuple[int, int]:
    """``"l:h"`` -> ``(l, h)``; ``ValueError`` for a name of another form."""
    layer, head = name.split(":")
    return int(layer), int(head)


def sort_key(name: str):
    """Sort key of a component name: heads ``"l:h"`` by (layer, head) first, then other names alphabetically."""
    try:
        return (0,) + head_key(name)
    except ValueError:
        return (1, name)


def head_colour(name: str, i: int, n: int, colours: Optional[dict] = None):
    """``colours[name]`` when given, else the ``i``-th colour of a qualitative palette sized for ``n`` lines."""
    if colours and name in colours:
        return colours[name]
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)
