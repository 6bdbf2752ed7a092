"""Folder writes that are atomic and never lose a file we did not write. Torch-free.

A new folder content is built in a temporary sibling (``.<name>.tmp-<pid>-*``), then swapped in with two renames.
Entries of the old folder that the new content does not replace are carried over; a file of the user's that the
new content would replace is an error, raised before anything moves. If the swap fails, what was carried over is
moved back. A crash between the two renames leaves ``.<name>.old-<pid>``, which ``recover_interrupted`` restores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import ConfigError


def check_target(target: os.PathLike) -> Path:
    """Resolve ``target`` and refuse folders whose replacement would pull the ground from under the user."""
    path = Path(target).resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ConfigError(f"refusing to write into {path}: it is the current folder or contains it; "
                          "give a new folder")
    if path.parent == path:
        raise ConfigError(f"refusing to write into the root folder {path}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder")
    return path


def temp_beside(target: Path) -> Path:
    """A fresh temporary folder next to ``target`` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def _remove_stale(target: Path) -> None:
    """Temporary folders left by killed writers (their process is gone) are removed."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*-*"):
        pid = leftover.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_in(tmp: Path, target: Path, owned: Iterable[str], keep: Iterable[str] = ()) -> None:
    """Make ``tmp``'s content the content of ``target``.

    ``owned``: names we wrote into ``target`` earlier; the new content may replace or drop them. ``keep``: owned
    names carried over when the new content lacks them. Anything else in ``target`` is the user's: carried over,
    and never replaced.
    """
    owned, keep = set(owned), set(keep)
    if not target.exists():
        os.replace(tmp, target)
        return
    entries = list(target.iterdir())
    clash = [e.name for e in entries if (tmp / e.name).exists() and e.name not in owned]
    if clash:
        raise ConfigError(f"{target} holds {', '.join(sorted(clash))}, which this write did not make and would "
                          "replace; move them away or choose another folder")
    carried = []
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        for entry in entries:
            if not (tmp / entry.name).exists() and (entry.name not in owned or entry.name in keep):
                os.replace(entry, tmp / entry.name)
                carried.append(entry.name)
        os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        for name in carried:
            if (tmp / name).exists() and not (target / name).exists():
                os.replace(tmp / name, target / name)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_dir(target: os.PathLike, write: Callable[[Path], None], owned: Iterable[str],
                     keep: Iterable[str] = ()) -> Path:
    """``write(tmp)`` builds the new content; then it is swapped in (see ``swap_in``)."""
    path = check_target(target)
    recover_interrupted(path)
    tmp = temp_beside(path)
    try:
        write(tmp)
        swap_in(tmp, path, owned, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; holds only our files otherwise
    return path


def recover_interrupted(folder: os.PathLike) -> None:
    """Finish a swap that was killed between its two renames: the folder is missing and its previous content
    waits in ``.<name>.old-<pid>``; put that back."""
    folder = Path(folder)
    if folder.exists():
        return
    leftovers = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers:
        os.replace(leftovers[-1], folder)
