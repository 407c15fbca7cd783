"""Checkpoints in a local Hugging Face hub cache, read offline (nothing is ever downloaded).

``from_pretrained("EleutherAI/pythia-70m", revision="step1000")`` leaves this layout under the hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)::

    models--EleutherAI--pythia-70m/
        refs/step1000          (a text file holding a commit hash)
        snapshots/<hash>/      (config.json, model.safetensors, ...)

A *revision* is a name under ``refs/``. Training steps come from revision names ``stepN`` (Pythia's
convention), never from the commit hashes of the snapshot folders.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_STEP = re.compile(r"step(\d+)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class RevisionNotCached(FileNotFoundError):
    """A revision asked for is not in the local hub cache; the message lists the revisions that are."""


def hub_cache_dir() -> Path:
    """The hub cache folder: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_name(text: str) -> bool:
    """Whether ``text`` reads as a hub model name ``org/name`` (and is not an existing path)."""
    return bool(_HUB_NAME.fullmatch(text)) and not Path(text).expanduser().exists()


def find_repo(source: str | os.PathLike) -> Optional[Path]:
    """The ``models--org--name`` folder that ``source`` names, or None when ``source`` is not a hub repo.

    source: a hub name ``org/name`` (looked up in ``hub_cache_dir()``), a ``models--org--name`` folder, or
    its ``snapshots`` folder. Raises ``FileNotFoundError`` for a hub name that is not in the cache."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if path.name == "snapshots" and path.parent.name.startswith("models--"):
            return path.parent
        if path.name.startswith("models--") and ((path / "refs").is_dir() or (path / "snapshots").is_dir()):
            return path
        return None
    if is_hub_name(text):
        repo = hub_cache_dir() / ("models--" + text.replace("/", "--"))
        if repo.is_dir():
            return repo
        raise FileNotFoundError(
            f"{text} does not exist, and as a hub name it is not in the local Hugging Face cache "
            f"({hub_cache_dir()}; set HF_HUB_CACHE or HF_HOME to use another); rllc_fast never downloads weights: "
            f"download the revisions where you have network, e.g. `huggingface-cli download {text} --revision "
            "step1000`, or pass a local directory")
    return None


def revisions(repo: Path) -> Dict[str, Path]:
    """``{revision: snapshot folder}`` of every ref of ``repo`` whose snapshot holds a config.json."""
    refs = repo / "refs"
    found = {}
    for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
        if not ref.is_file():
            continue
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            found[ref.relative_to(refs).as_posix()] = snapshot
    return found


def step_of_revision(revision: str) -> Optional[int]:
    """The training step a revision name states (``step1000`` -> 1000), or None."""
    match = _STEP.fullmatch(revision)
    return int(match.group(1)) if match else None


def repo_label(repo: Path) -> str:
    """``org/name`` of a ``models--org--name`` folder."""
    return repo.name[len("models--"):].replace("--", "/")


def snapshot_of(repo: Path, revision: Optional[str] = None) -> Path:
    """The snapshot folder of ``revision`` (default ``main``, or the only revision when the cache has one);
    a ``FileNotFoundError`` lists the revisions found otherwise."""
    found = revisions(repo)
    if revision is None:
        if "main" in found or len(found) != 1:
            revision = "main"
        else:
            revision = next(iter(found))
    if revision in found:
        return found[revision]
    raise RevisionNotCached(f"{repo_label(repo)}: no revision {revision!r} in the local cache ({repo}); "
                            f"revisions found: {_listing(found)}; pass revision= one of them")


def hub_series(repo: Path, wanted: Optional[Iterable[str]] = None):
    """``[(revision, step, snapshot folder)]`` of ``repo``, ordered by step.

    wanted: None for every ``stepN`` revision; else these revisions (each must be cached). A revision whose
    name states no step (such as ``main``) is allowed only alone (step 0), since a sweep needs steps."""
    found = revisions(repo)
    if wanted is None:
        chosen = [r for r in found if step_of_revision(r) is not None]
        if not chosen:
            raise FileNotFoundError(f"{repo_label(repo)}: no stepN revisions in the local cache ({repo}); revisions "
                                    f"found: {_listing(found)}; pass revisions=[...] to choose")
    else:
        chosen = list(dict.fromkeys(wanted))
        if not chosen:
            raise ValueError(f"revisions: give at least one; revisions found: {_listing(found)}")
        missing = [r for r in chosen if r not in found]
        if missing:
            raise RevisionNotCached(f"{repo_label(repo)}: revision(s) {', '.join(missing)} not in the local cache "
                                    f"({repo}); revisions found: {_listing(found)}")
        unnamed = [r for r in chosen if step_of_revision(r) is None]
        if unnamed and len(chosen) > 1:
            raise ValueError(f"revisions: {', '.join(unnamed)} state no training step (names like step1000 do); "
                             "sweep them one at a time")
    series = [(r, step_of_revision(r) or 0, found[r]) for r in chosen]
    return sorted(series, key=lambda item: (item[1], item[0]))


def parse_revisions(text: str) -> List[str]:
    """``"step0,step1000"`` -> ``["step0", "step1000"]``."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise ValueError(f"revisions {text!r}: give comma-separated revision names, e.g. step0,step1000")
    return items


def _listing(found) -> str:
    names = sorted(found, key=lambda r: (step_of_revision(r) is None, step_of_revision(r) or 0, r))
    return ", ".join(names) if names else "none"
