"""Run folders that are never silently replaced.

A run folder (``everseg train``, ``learn``, ``scenario run``, ``demo``) holds an hour of a
user's training. Before anything is written, :func:`claim_run_folder` decides whether the
folder may be used: a new or empty folder may; one holding a run only with ``resume`` (the
same run continues) or ``overwrite`` (the user said so); one holding anything else never,
since ``--overwrite`` must not delete files everseg did not write. A folder that holds the
model being taught is refused even with ``overwrite``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterable

# What runs write at the top of their folder. Only these are removed by --overwrite.
RUN_FILES = ("config.yaml", "checkpoint.pt", "history.json", "results.json", "results.md",
             "iou_across_steps.png")
RUN_FOLDERS = ("model", "tensorboard", "report")
_STEP_FOLDER = re.compile(r"step\d+")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do instead."""


def run_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that a run wrote."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if (p.name in RUN_FILES and p.is_file()) or (p.name in RUN_FOLDERS and p.is_dir()):
            out.append(p)
        elif p.is_dir() and _STEP_FOLDER.fullmatch(p.name) and ((p / "config.yaml").is_file()
                                                                 or (p / "model").is_dir()):
            out.append(p)
    return sorted(out)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def claim_run_folder(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                     protect: Iterable[str | Path] = (), what: str = "--out") -> bool:
    """Check that a run may be written into ``out``; returns whether an old run must be cleared.

    Changes nothing on disk: the caller calls :func:`clear_run_folder` once everything else
    that can fail before training (data, model) has been checked.

    ``protect``: paths (e.g. the model being taught) that must not lie inside ``out``.
    """
    out = Path(out)
    for p in protect:
        if _inside(Path(p), out):
            raise RunFolderError(f"{what} {out} holds {p}, the model this run starts from; writing the run "
                                 "there would destroy it: choose another folder")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{what} {out} is a file, not a folder")
    if resume:
        if overwrite:
            raise RunFolderError("--resume continues the run in --out and --overwrite replaces it: give one")
        if not (out / "checkpoint.pt").is_file():
            raise RunFolderError(f"{what} {out} has no checkpoint.pt to resume from"
                                 + ("" if out.exists() else " (the folder does not exist)"))
        return False
    if not out.exists() or not any(out.iterdir()):
        return False
    entries = run_entries(out)
    if not entries:
        raise RunFolderError(f"{what} {out} is not empty and holds no everseg run: choose a new or empty "
                             "folder (--overwrite only replaces runs)")
    if not overwrite:
        names = ", ".join(p.name for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunFolderError(f"{what} {out} already holds a run ({names}): pass --overwrite to replace it, "
                             "--resume to continue it (train, learn, scenario run), or choose another folder")
    return True


def clear_run_folder(out: str | Path) -> None:
    """Remove what an earlier run wrote into ``out`` (and nothing else)."""
    for p in run_entries(Path(out)):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
