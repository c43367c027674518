"""Staging folders (OUT/.prunescope-*): where `save` writes before it moves the files into place.

A run killed mid-way (SIGKILL, the machine's OOM killer, a lost session) cannot remove its
staging folder, and for a large model that folder holds gigabytes. Each staging folder
records its owner (pid and the process's start time, so a recycled pid is not mistaken for
it); the next run into the same folder removes the folders of owners no longer alive.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from engine.errors import PruneScopeError

STAGING_PREFIX = ".prunescope-"
OWNER_FILE = ".owner.json"


def process_start(pid: int) -> str | None:
    """An identifier of when process `pid` started (Linux: clock ticks since boot, field 22
    of /proc/PID/stat), or None where it cannot be read (another OS, no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` still runs (and, given `start`, is the same process, not a
    recycled pid). Where the OS gives no clear answer it counts as alive: the callers remove
    a dead run's files, and keeping litter is cheaper than deleting a live run's work."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    now = process_start(pid)
    return start is None or now is None or now == start


def open_staging(out: Path, error: type[PruneScopeError] = PruneScopeError) -> Path:
    """A fresh staging folder in `out` (created if needed), after removing the staging
    folders of runs no longer alive there (a warning names them). An unwritable `out` raises
    `error` with one line naming the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_dead_staging(out)
        staging = new_staging(out)
    except OSError as exc:
        raise error(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    if removed:
        warnings.warn(f"removed {len(removed)} staging folder(s) of runs no longer alive in "
                      f"{out}: {', '.join(p.name for p in removed)}", UserWarning, stacklevel=4)
    return staging


def new_staging(out: Path) -> Path:
    """A fresh staging folder inside `out`, its owner (this process) recorded in it."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    owner = {"pid": os.getpid(), "start": process_start(os.getpid())}
    (staging / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return staging


def remove_dead_staging(out: Path) -> list[Path]:
    """Remove the staging folders in `out` whose run is no longer alive; the removed paths.

    A folder without a readable owner record is left alone (it may be another tool's, or a
    run that has just created it and not yet written the record)."""
    removed = []
    try:
        candidates = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    except OSError:
        return removed
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
            pid, start = int(owner["pid"]), owner.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_alive(pid, start):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed
