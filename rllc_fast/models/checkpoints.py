"""Checkpoint series of a training run: find, order by training step, load; save in our own format.

A checkpoint directory may hold, in any mix:
- ``*.pt`` / ``*.pth`` files written by ``save_checkpoint`` (TransformerLens state dict + config + step);
- plain TransformerLens state dicts (``*.pt``), loaded into a model shaped like ``like``;
- Hugging Face directories (with ``config.json``) of a family ``load_hf`` supports, such as Pythia's ``step1000/``.

The training step comes from the file's stored metadata, else from the last number in its name.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..atomic import write_atomically
from . import hub_cache
from .build import hooked_config, hooked_transformer

FORMAT = "rllc_fast.checkpoint/1"
_SUFFIXES = (".pt", ".pth")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, unreadable, or of another architecture); names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: ``path`` (file or HF directory), training ``step``, ``kind`` ("rllc", "state_dict", "hf")."""

    path: Path
    step: int
    kind: str
    label: Optional[str] = None  # the name to show and store (a hub revision: "pythia-70m@step1000")

    @property
    def name(self) -> str:
        return self.label or self.path.name

    def load(self, like=None, device: str | torch.device = "cpu"):
        """The checkpoint as a ``HookedTransformer`` (eval mode) on ``device``.

        ``like``: a ``HookedTransformer`` or ``HookedTransformerConfig`` that the checkpoint must match
        (required for plain state dicts). Raises ``CheckpointError`` naming the file on any failure.
        """
        try:
            if self.kind == "hf":
                from .families import load_hf

                model = load_hf(self.path, device=device)
                _check_same_architecture(model.cfg, like, self.path)
                return model.eval()
            payload = _torch_load(self.path)
            state, cfg_fields = _split_payload(payload, self.path)
            cfg = _config(cfg_fields, like, self.path, device)
            model = hooked_transformer(cfg)
            _load_state(model, state, self.path)
            return model.to(device, print_details=False).eval()
        except CheckpointError:
            raise
        except Exception as err:  # anything else a broken file can raise
            raise CheckpointError(f"{self.path}: cannot load checkpoint: {err}") from err


def save_checkpoint(model, path: str | os.PathLike, step: int) -> Path:
    """Write ``model`` (a ``HookedTransformer``) with its config and ``step`` to ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": int(step),
        "config": config_fields(model.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
    return path


def config_fields(cfg) -> dict:
    """The JSON-safe fields of a ``HookedTransformerConfig`` (dtype as a string, device dropped)."""
    out = {}
    for k, v in cfg.to_dict().items():
        if k in ("device", "n_devices"):
            continue
        if isinstance(v, torch.dtype):
            out[k] = str(v).replace("torch.", "")
            continue
        if isinstance(v, np.generic):
            v = v.item()
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def checkpoint_series(directory: str | os.PathLike, revisions=None) -> List[Checkpoint]:
    """The checkpoints in ``directory``, ordered by training step (ties: by name).

    directory: a folder of checkpoints, or a Hugging Face hub cache entry (a hub name ``org/name`` looked up
               offline in the local cache, its ``models--org--name`` folder or that folder's ``snapshots``):
               its ``stepN`` revisions, steps read from the revision names (``rllc_fast.models.hub_cache``).
    revisions: hub caches only: revision names (a list, or "step0,step1000") instead of every ``stepN``.

    Raises ``FileNotFoundError`` for a missing directory or one without checkpoints, and
    ``CheckpointError`` for an entry whose step cannot be told (naming it and the fix)."""
    hub = _hub_series(directory, revisions)
    if hub is not None:
        return hub
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist (argument: checkpoints)")
    found = [_entry(entry) for entry in sorted(root.iterdir()) if _is_checkpoint(entry)]
    if not found:
        raise FileNotFoundError(
            f"no checkpoints in {root}: expected *.pt/*.pth files or Hugging Face directories with config.json"
        )
    return sorted(found, key=lambda c: (c.step, c.name))


def checkpoint_at(path: str | os.PathLike) -> Checkpoint:
    """One checkpoint file (``*.pt``/``*.pth``) or Hugging Face directory (with ``config.json``) as a
    ``Checkpoint``; its step from its metadata or name, else 0 (a single checkpoint needs none).

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``CheckpointError`` when it is not a
    checkpoint (a directory of checkpoints: use ``checkpoint_series`` or ``select_checkpoints``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not _is_checkpoint(path):
        raise CheckpointError(f"{path}: not a checkpoint: expected a *.pt/*.pth file or a Hugging Face directory "
                              "with config.json")
    try:
        return _entry(path)
    except CheckpointError:  # no step in its metadata (so not an rllc_fast checkpoint file) nor in its name
        return Checkpoint(path, 0, "hf" if path.is_dir() else "state_dict")


def _hub_series(source, revisions) -> Optional[List[Checkpoint]]:
    """The checkpoints of a hub cache entry (``checkpoint_series``), or None when ``source`` is not one."""
    repo = hub_cache.find_repo(source)
    if repo is None:
        if revisions is not None:
            raise ValueError(f"revisions: {os.fspath(source)} is not a Hugging Face hub cache entry (a hub name "
                             "org/name or a models--org--name folder); revisions select among a hub cache's refs")
        return None
    wanted = hub_cache.parse_revisions(revisions) if isinstance(revisions, str) else revisions
    short = hub_cache.repo_label(repo).split("/")[-1]
    return [Checkpoint(snapshot, step, "hf", label=f"{short}@{rev}")
            for rev, step, snapshot in hub_cache.hub_series(repo, wanted)]


def select_checkpoints(source: str | os.PathLike, steps=None, revisions=None) -> List[Checkpoint]:
    """The checkpoints of ``source``, ordered by training step, restricted to ``steps``.

    source: a directory of checkpoints (``checkpoint_series``), one checkpoint file or Hugging Face
            directory (``checkpoint_at``), a glob pattern such as ``run/step*.pt``, or a Hugging Face hub
            cache entry (a hub name such as ``EleutherAI/pythia-70m``, offline; see ``checkpoint_series``).
    revisions: hub caches only: the revisions to take (default: every ``stepN``).
    steps:  None (all); exact steps ``"0,1000,5000"`` or ``[0, 1000, 5000]`` (each must exist); or an
            inclusive range ``"1000:5000"``, ``"1000:"``, ``":5000"`` or ``slice(1000, 5000)`` (must
            select at least one). See ``parse_steps``.

    Raises ``FileNotFoundError``/``CheckpointError`` for a bad ``source`` and ``ValueError`` for bad or
    unmatched ``steps`` (listing the steps found)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    hub = _hub_series(source, revisions)
    if hub is not None:
        series = hub
    elif path.is_dir() and not (path / "config.json").is_file():
        series = checkpoint_series(path)
    elif path.exists():
        series = [checkpoint_at(path)]
    elif glob.has_magic(text):
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text)))]
        series = sorted((_entry(m) for m in matches if _is_checkpoint(m)), key=lambda c: (c.step, c.name))
        if not series:
            raise FileNotFoundError(f"no checkpoints match {text}: expected *.pt/*.pth files or Hugging Face "
                                    "directories with config.json")
    else:
        raise FileNotFoundError(f"{path} does not exist: give a checkpoint directory, one checkpoint file or "
                                "Hugging Face directory, or a glob pattern")
    if steps is None:
        return series
    wanted = parse_steps(steps) if isinstance(steps, str) else steps
    found = [c.step for c in series]
    if isinstance(wanted, slice):
        lo, hi = wanted.start, wanted.stop
        chosen = [c for c in series if (lo is None or c.step >= lo) and (hi is None or c.step <= hi)]
        if not chosen:
            raise ValueError(f"no checkpoint of {text} has a step in {'' if lo is None else lo}:"
                             f"{'' if hi is None else hi}; steps found: {_list_steps(found)}")
        return chosen
    wanted = sorted({int(s) for s in ([wanted] if isinstance(wanted, int) else wanted)})
    if not wanted:
        raise ValueError(f"steps: give at least one step; steps found: {_list_steps(found)}")
    missing = [s for s in wanted if s not in found]
    if missing:
        raise ValueError(f"no checkpoint of {text} at step(s) {', '.join(map(str, missing))}; steps found: "
                         f"{_list_steps(found)}")
    return [c for c in series if c.step in wanted]


def parse_steps(text: str):
    """``"0,1000,5000"`` -> ``(0, 1000, 5000)``; ``"1000:5000"`` (inclusive), ``"1000:"``, ``":5000"`` -> a
    ``slice``. Raises ``ValueError`` naming the expected forms."""
    text = str(text).strip()
    bad = ValueError(f"steps {text!r}: use comma-separated training steps (0,1000,5000) or an inclusive range "
                     "A:B (1000:5000, 1000: or :5000) of steps >= 0")
    number = re.compile(r"[0-9]+")
    parts = [p.strip() for p in text.split(":")]
    if len(parts) == 1:
        items = [i.strip() for i in text.split(",")]
        if not all(number.fullmatch(i) for i in items):
            raise bad
        return tuple(int(i) for i in items)
    if len(parts) != 2 or not all(p == "" or number.fullmatch(p) for p in parts):
        raise bad
    lo, hi = (int(p) if p else None for p in parts)
    if lo is None and hi is None:
        raise bad
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"steps {text!r}: an empty range ({lo} > {hi}); write it low:high")
    return slice(lo, hi)


def _list_steps(steps: List[int]) -> str:
    """Steps for an error message: all of them, or the first 10 and last 5 of a long list."""
    shown = [str(s) for s in steps] if len(steps) <= 20 else [*map(str, steps[:10]), "...", *map(str, steps[-5:])]
    return ", ".join(shown) + (f" ({len(steps)} checkpoints)" if len(steps) > 20 else "")


def _is_checkpoint(path: Path) -> bool:
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix in _SUFFIXES)


def _entry(path: Path) -> Checkpoint:
    """A checkpoint file or Hugging Face directory (``_is_checkpoint``) with its step; raises
    ``CheckpointError`` when its step cannot be told."""
    if path.is_dir():
        return Checkpoint(path, _step_of_hf_dir(path), "hf")
    step, kind = _step_and_kind_of_file(path)
    return Checkpoint(path, step, kind)


def _step_from_name(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem if path.is_file() else path.name)
    if not numbers:
        raise CheckpointError(
            f"{path}: cannot tell its training step: put the step in the name (e.g. step1000.pt) or save it "
            "with rllc_fast.models.save_checkpoint(model, path, step)"
        )
    return int(numbers[-1])


def _step_of_hf_dir(path: Path) -> int:
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError):
            pass
    return _step_from_name(path)


def _step_and_kind_of_file(path: Path):
    """Peek at a file's metadata without keeping its tensors; a corrupt file is still listed (by name)
    so that the sweep can record it as failed."""
    try:
        payload = torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return _step_from_name(path), "state_dict"
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return int(payload["step"]), "rllc"
    return _step_from_name(path), "state_dict"


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {first}") from err


def _split_payload(payload, path: Path):
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return payload["state_dict"], payload["config"]
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, None
    raise CheckpointError(f"{path}: neither an rllc_fast checkpoint nor a state dict of tensors")


def _config(cfg_fields, like, path: Path, device):
    like_cfg = getattr(like, "cfg", like)
    if cfg_fields is None:
        if like_cfg is None:
            raise CheckpointError(
                f"{path}: a plain state dict carries no architecture; pass like=<a model or config of the run> "
                "(--like on the command line) or save checkpoints with rllc_fast.models.save_checkpoint"
            )
        return like_cfg
    fields = dict(cfg_fields)
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = getattr(torch, fields["dtype"])
    cfg = hooked_config(**fields, device=str(device))
    _check_same_architecture(cfg, like_cfg, path)
    return cfg


_ARCH_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "attn_only",
                "positional_embedding_type", "normalization_type")


def _check_same_architecture(cfg, like, path: Path) -> None:
    like_cfg = getattr(like, "cfg", like)
    if like_cfg is None:
        return
    diff = {k: (getattr(cfg, k, None), getattr(like_cfg, k, None)) for k in _ARCH_FIELDS
            if getattr(cfg, k, None) != getattr(like_cfg, k, None)}
    if diff:
        shown = ", ".join(f"{k} {a} (expected {b})" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: a different architecture from the run's: {shown}")


def _load_state(model, state, path: Path):
    own = model.state_dict()
    wanted = {k for k in own if not k.endswith(("IGNORE", "mask"))}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                  for k in wanted & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        parts = []
        if bad_shapes:
            parts.append("shape mismatch: " + "; ".join(sorted(bad_shapes)[:5]))
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{path}: a different architecture from the run's: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
