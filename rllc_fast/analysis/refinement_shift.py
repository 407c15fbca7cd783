"""How a data refinement moves each head: the ratio drLLC(refined data) / wrLLC(base data), per head,
averaged over the late checkpoints, and summarised per head type (the paper's Figure 3 idea)."""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np


def refinement_ratios(df, refined: str, base: str, late_fraction: float = 0.25, min_checkpoints: int = 3) -> Dict[str, dict]:
    """``{head: {"base", "refined", "ratio", "checkpoints"}}`` from sweep rows ``df`` (``ResultStore.rows()``).

    ``base`` and ``refined`` are data names (component set "heads"); per head, ``base`` and ``refined`` are
    the mean rLLC over the last ``late_fraction`` of checkpoints (at least ``min_checkpoints``) that both
    have, and ``ratio`` is ``refined / base``. Checkpoints where either estimate diverged are left out."""
    if not 0 < late_fraction <= 1:
        raise ValueError(f"late_fraction must be in (0, 1], got {late_fraction}")
    heads = df[df["component_set"] == "heads"]
    a = heads[heads["data"] == refined].set_index(["step", "component"])["llc_mean"]
    b = heads[heads["data"] == base].set_index(["step", "component"])["llc_mean"]
    both = a.to_frame("refined").join(b.to_frame("base"), how="inner").dropna().reset_index()
    if both.empty:
        raise ValueError(f"no checkpoint has per-head estimates on both {refined!r} and {base!r}")
    steps = sorted(both["step"].unique())
    keep = max(min_checkpoints, int(np.ceil(late_fraction * len(steps))))
    late = both[both["step"].isin(steps[-keep:])]
    out = {}
    for name, g in late.groupby("component"):
        base_mean, refined_mean = float(g["base"].mean()), float(g["refined"].mean())
        out[name] = {"base": base_mean, "refined": refined_mean, "ratio": refined_mean / base_mean,
                     "checkpoints": int(len(g))}
    return out


def ratios_by_type(ratios: Mapping[str, dict], head_types: Mapping[str, str]) -> Dict[str, dict]:
    """``{type: {"mean_ratio", "heads"}}``: the per-head ratios of ``refinement_ratios`` averaged per head
    type (``head_types``: ``{head: type}``), plus ``"non-induction"`` (every head not typed induction)."""
    groups: Dict[str, list] = {}
    for name, r in ratios.items():
        kind = head_types.get(name, "other")
        groups.setdefault(kind, []).append(name)
        if kind != "induction":
            groups.setdefault("non-induction", []).append(name)
    return {kind: {"mean_ratio": float(np.mean([ratios[n]["ratio"] for n in names])), "heads": sorted(names)}
            for kind, names in groups.items()}
