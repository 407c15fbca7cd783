"""What observables recorded: per-token losses on fixed probe sets at the observed SGLD draws.

``Observations.losses[name]`` is ``[component, chain, draw, context, position]`` (nats; NaN from a
chain's divergence on), in RAM or memory-mapped from the folder the run wrote it to;
``Observations.at_optimum[name]`` is ``[context, position]`` at ``w*``. ``labelled(name)`` gives the
same array with its dimension names and coordinates (``LabelledArray``), and ``Observations.load``
reopens a folder without reading the arrays into RAM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

LOSS_DIMS = ("component", "chain", "draw", "context", "position")
INDEX_FILE = "observations.json"


@dataclass
class LabelledArray:
    """An array with named dimensions and a coordinate list per dimension (a small xarray-like view).

    values: the array (ndarray or memmap); dims: one name per axis; coords: ``{dim: labels}`` with one
    label per index along that axis."""

    values: np.ndarray
    dims: Sequence[str]
    coords: Dict[str, list]

    def __post_init__(self) -> None:
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"dims {tuple(self.dims)} do not match an array of {self.values.ndim} axes")
        for axis, dim in enumerate(self.dims):
            if len(self.coords[dim]) != self.values.shape[axis]:
                raise ValueError(f"coords[{dim!r}] has {len(self.coords[dim])} labels for {self.values.shape[axis]} entries")

    def sel(self, **labels) -> "LabelledArray":
        """The sub-array at the given labels, e.g. ``sel(component="0:1", chain=0)`` (those axes dropped)."""
        index, dims = [], []
        for dim in self.dims:
            if dim in labels:
                try:
                    index.append(list(self.coords[dim]).index(labels[dim]))
                except ValueError:
                    raise KeyError(f"no {dim} {labels[dim]!r}; have {list(self.coords[dim])}") from None
            else:
                index.append(slice(None))
                dims.append(dim)
        unknown = set(labels) - set(self.dims)
        if unknown:
            raise KeyError(f"no dimension(s) {sorted(unknown)}; have {list(self.dims)}")
        return LabelledArray(np.asarray(self.values[tuple(index)]), dims, {d: self.coords[d] for d in dims})

    def to_dataframe(self, name: str = "value"):
        """A long pandas DataFrame: one column per dimension and ``name`` for the values (reads the array)."""
        import pandas as pd

        grid = np.meshgrid(*[np.arange(len(self.coords[d])) for d in self.dims], indexing="ij")
        frame = {d: np.asarray(self.coords[d], dtype=object)[g.ravel()] for d, g in zip(self.dims, grid)}
        frame[name] = np.asarray(self.values).ravel()
        return pd.DataFrame(frame)


@dataclass
class Observations:
    """Per-token probe losses of one ``estimate_llc`` call.

    names:      probe set names, in the order given.
    components: component names (the first axis of ``losses``).
    num_chains: chains per component.
    draws:      ``[D]`` the draw index (0-based, among the kept draws) of each observed draw.
    steps:      ``[D]`` the SGLD step of each observed draw (burn-in included); the losses are those
                of the weights before that step's update, like the LLC's ``loss_trace``.
    losses:     ``{name: [component, chain, draw, context, position]}`` (nats; float32 or float16);
                NaN from the step a chain diverged on.
    at_optimum: ``{name: [context, position]}`` the per-token losses at ``w*`` (float32).
    tokens:     ``{name: [context, T] int64}`` the probe contexts (None for non-token probes).
    directory:  the folder the arrays are memory-mapped from (None: in RAM).
    """

    names: List[str]
    components: List[str]
    num_chains: int
    draws: np.ndarray
    steps: np.ndarray
    losses: Dict[str, np.ndarray]
    at_optimum: Dict[str, np.ndarray]
    tokens: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)
    directory: Optional[Path] = None

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.losses[name]
        except KeyError:
            raise KeyError(f"no probe set {name!r}; have {self.names}") from None

    def component_losses(self, name: str, component: str) -> np.ndarray:
        """``[chain, draw, context, position]`` losses of one component on probe set ``name``."""
        try:
            c = self.components.index(component)
        except ValueError:
            raise KeyError(f"no component {component!r}; have {self.components}") from None
        return self[name][c]

    def labelled(self, name: str) -> LabelledArray:
        """``losses[name]`` with dims ``(component, chain, draw, context, position)``; ``draw`` labels are
        the observed draws' indices."""
        arr = self[name]
        coords = {"component": list(self.components), "chain": list(range(self.num_chains)),
                  "draw": [int(d) for d in self.draws], "context": list(range(arr.shape[3])),
                  "position": list(range(1, arr.shape[4] + 1))}
        return LabelledArray(arr, LOSS_DIMS, coords)

    def index(self) -> dict:
        """What ``Observations.load`` needs besides the arrays (JSON-ready)."""
        return {"names": self.names, "components": self.components, "num_chains": self.num_chains,
                "draws": [int(d) for d in self.draws], "steps": [int(s) for s in self.steps],
                "shapes": {n: list(self.losses[n].shape) for n in self.names},
                "dtypes": {n: str(self.losses[n].dtype) for n in self.names},
                "token_probes": [n for n in self.names if self.tokens.get(n) is not None]}

    @classmethod
    def load(cls, directory) -> "Observations":
        """Reopen the observations a run wrote to ``directory`` (arrays memory-mapped read-only)."""
        directory = Path(directory)
        path = directory / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(f"{directory}: no {INDEX_FILE}; this folder holds no finished observations "
                                    "(an interrupted run leaves none: run it again)")
        meta = json.loads(path.read_text())
        losses, at_opt, tokens = {}, {}, {}
        for n in meta["names"]:
            files = probe_files(directory, n)
            losses[n] = np.memmap(files["losses"], dtype=meta["dtypes"][n], mode="r", shape=tuple(meta["shapes"][n]))
            at_opt[n] = np.load(files["at_optimum"])
            tokens[n] = np.load(files["tokens"]) if n in meta["token_probes"] else None
        return cls(names=list(meta["names"]), components=list(meta["components"]), num_chains=meta["num_chains"],
                   draws=np.asarray(meta["draws"]), steps=np.asarray(meta["steps"]), losses=losses,
                   at_optimum=at_opt, tokens=tokens, directory=directory)


def probe_files(directory: Path, name: str) -> Dict[str, Path]:
    """The files of probe set ``name`` in ``directory``: raw losses, losses at ``w*``, contexts."""
    return {"losses": directory / f"{name}.losses.bin", "at_optimum": directory / f"{name}.at_optimum.npy",
            "tokens": directory / f"{name}.tokens.npy"}
