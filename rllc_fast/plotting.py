"""Figure helpers shared by the report, the analysis figures, the demo and ``rllc calibrate`` (matplotlib).

Figures are built on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), never through
``pyplot``: nothing here selects a backend or registers a figure, so importing or calling this module
leaves the caller's matplotlib state (backend, open figures) as it was.

- ``subplots``: a new figure and its axes;
- ``save_figure``: write a figure as a PNG, atomically;
- ``log_step_axis``: a log x-axis of training steps that still shows step 0;
- ``head_key`` / ``sort_key``: order components ``"l:h"`` by layer then head (other names after them);
- ``head_colour``, ``TYPE_COLORS``: line colours per head and per head type;
- ``line_styles``: a (colour, line style, marker) per head, no two alike, so heads that share a colour (one
  head type, one cluster) stay apart;
- ``colour_key``: a figure legend that says what each colour means (head type, cluster);
- ``RLLC_LABEL`` etc.: axis labels of the estimates, with their definition and units;
- ``describe_steps``: "3 checkpoints at steps 1, 10, 100", for the settings a figure states.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .atomic import write_atomically
from .components import parse_head_name

#: One colour per head type (the demo's figure and ``rllc analyze``).
TYPE_COLORS = {"induction": "#d62728", "previous-token": "#1f77b4", "current-token": "#2ca02c",
               "multigram": "#9a9a9a", "other": "#9a9a9a"}

#: Line styles and markers ``line_styles`` combines (4 x 8 distinct pairs per colour).
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")

#: Axis labels: an (r)LLC is n*beta times the expected loss increase (nats) over w* under the posterior.
RLLC_LABEL = "rLLC  $\\hat\\lambda = n\\beta\\,(E[L] - L^*)$"
LLC_LABEL = "LLC  $\\hat\\lambda = n\\beta\\,(E[L] - L^*)$"
RLLC_DIFFERENCE_LABEL = "rLLC difference  $\\Delta\\hat\\lambda$"
STEP_LABEL = "training step"


def subplots(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (6.4, 4.8),
             layout: Optional[str] = None, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots`` (same ``squeeze``/``sharex``/``sharey`` keywords), on an
    Agg canvas of its own: no pyplot state, no backend switch, no ``close`` needed. ``layout``: matplotlib's
    layout engine ("constrained" makes room for figure legends placed ``loc="outside ..."``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG (atomically: a reader never sees half a file); return the path."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def log_step_axis(ax, steps, label: str = STEP_LABEL) -> None:
    """A log x-axis for ``steps`` that still shows 0 (symmetric log, linear below 1), labelled ``label``."""
    if min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def head_key(name: str) -> Tuple[int, int]:
    """``"l:h"`` -> ``(l, h)``; ``ValueError`` for a name of another form."""
    return parse_head_name(name)


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


def line_styles(names: Sequence[str], colours: Optional[Mapping[str, object]] = None,
                groups: Optional[Mapping[str, object]] = None) -> Dict[str, dict]:
    """``{name: {"color", "linestyle", "marker"}}`` (keywords of ``Axes.plot``) for lines ``names`` (in order).

    Colour: ``colours[name]`` when given, else the name's turn in the ``tab10`` palette (cycling). Within a
    group (``groups[name]``; default: the names of one colour) each name gets the next (line style, marker)
    pair, so no two names of a group share one, and no two names of one colour share all three as long as a
    colour has at most 32 names (4 line styles x 8 markers)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    palette = colormaps["tab10"]
    out, taken = {}, {}
    for i, name in enumerate(names):
        colour = colours[name] if colours and name in colours else palette(i % palette.N)
        group = groups[name] if groups and name in groups else to_rgba(colour)
        k = taken.get(group, 0)
        taken[group] = k + 1
        q, r = divmod(k, len(LINESTYLES))
        out[name] = {"color": colour, "linestyle": LINESTYLES[r], "marker": MARKERS[(q * 5 + r) % len(MARKERS)]}
    return out


def colour_key(fig, entries: Mapping[str, object], title: str, loc: str = "outside right upper"):
    """A figure legend of ``entries`` ``{meaning: colour}`` (e.g. head type -> colour) titled ``title``;
    ``loc="outside ..."`` needs a figure made with ``layout="constrained"``. Returns the legend."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="none", label=str(label)) for label, c in entries.items()]
    return fig.legend(handles=handles, title=title, loc=loc, fontsize=8, title_fontsize=8)


def describe_steps(steps) -> str:
    """``"N checkpoints at steps a, b, c"`` for the distinct training ``steps`` (the first two and the last
    when there are more than 8)."""
    steps = sorted(set(int(s) for s in steps))
    shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    n = len(steps)
    return f"{n} checkpoint{'s' if n != 1 else ''} at step{'s' if n != 1 else ''} {shown}"
