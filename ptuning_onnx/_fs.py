"""Folder writes that are atomic and never lose a file we did not write. Torch-free.

A write (``atomic_write_dir``, or ``temp_beside`` then ``swap_in``) takes these steps; ``<pid>`` is the writer's
process id, ``<r>`` a random tag::

    1. build   the new content in .<name>.tmp-<pid>-<r>.writing
    2. carry   only if ``target`` holds entries to keep: rename that folder to .<name>.tmp-<pid>-<r> (the lost
               ``.writing`` says "may hold carried entries"), then move those entries into it, one by one
    3. rename  target -> .<name>.old-<pid>                           (if ``target`` exists)
    4. rename  the temporary folder -> target
    5. remove  .<name>.old-<pid>

Entries of the old folder that the new content does not replace are carried over; a file of the user's that the
new content would replace is an error, raised before anything moves. If the swap fails, what was carried over is
moved back and ``target`` is as it was.

A kill can stop a writer at any point. ``recover_interrupted``, called before every read and every write, repairs
what a dead writer (its process is gone) left; what live writers have beside ``target`` is left alone. The states:

    A. Killed in 1, or between 3 and 4 with nothing carried: a ``.writing`` folder. It holds only our new content,
       never the user's, and is removed.
    B. Killed in 2: ``target`` lacks the entries already carried; they sit in the temporary folder. Every entry
       there that ``target`` lacks goes back into ``target``; a name ``target`` has is never overwritten (carried
       names were absent from it, so that copy is the new content, never committed). Then the folder is removed.
       An entry that the new content added, and that the old folder never had, goes back too: nothing is lost,
       and no journal is needed.
    C. Killed between 3 and 4: ``target`` is missing. It is restored from the (newest) dead writer's
       ``.old-<pid>``, which holds all but the carried entries; then the temporary folder is handled as in A or B.
    D. Killed in 5: ``target`` is the new, complete content, and ``.old-<pid>`` holds only replaced or dropped
       files of ours. It is removed, but only when ``target`` exists and every dead writer's temporary folder is
       gone (nothing still waits to go back).

With neither ``target`` nor an ``.old-<pid>`` to restore it from, nothing can have been carried (carrying needs
``target``, and between 3 and 4 it waits as ``.old-<pid>``), so a dead writer's temporary folders are removed.
A kill inside the recovery leaves one of these states again; the next recovery finishes it. A temporary folder
without the mark, such as one that an earlier version of this module left, is treated as in B: a partial write may
then come back, but nothing is lost. A reused pid makes a dead writer's folders look live, so they stay.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import ConfigError

WRITING = ".writing"  # suffix of a temporary folder that holds only new content (state A)


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
    """A fresh ``.writing`` folder next to ``target`` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=WRITING, dir=target.parent))


def swap_in(tmp: Path, target: Path, owned: Iterable[str], keep: Iterable[str] = ()) -> None:
    """Make ``tmp``'s content the content of ``target`` (steps 2-5 of the module docstring).

    ``tmp``: a folder from ``temp_beside``, complete. ``owned``: names we wrote into ``target`` earlier; the new
    content may replace or drop them. ``keep``: owned names carried over when the new content lacks them. Anything
    else in ``target`` is the user's: carried over, and never replaced. On failure ``tmp`` is where it was, with
    only the new content, and ``target`` is as it was.
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
    carry = sorted(e.name for e in entries
                   if not (tmp / e.name).exists() and (e.name not in owned or e.name in keep))
    # Losing the ".writing" mark is what tells a recovery that this folder may hold the user's entries (state B).
    folder = tmp.with_name(tmp.name[:-len(WRITING)]) if carry and tmp.name.endswith(WRITING) else tmp
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    carried = []
    try:
        if folder != tmp:
            os.replace(tmp, folder)
        for name in carry:
            os.replace(target / name, folder / name)
            carried.append(name)
        os.replace(target, old)
        os.replace(folder, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        for name in carried:
            if os.path.lexists(folder / name) and not os.path.lexists(target / name):
                os.replace(folder / name, target / name)
        if folder.exists() and folder != tmp:
            os.replace(folder, tmp)  # the caller removes the folder it was given
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_dir(target: os.PathLike, write: Callable[[Path], None], owned: Iterable[str],
                     keep: Iterable[str] = ()) -> Path:
    """``write(tmp)`` builds the new content; then it is swapped in (see ``swap_in``)."""
    path = check_target(target)
    tmp = temp_beside(path)  # recovers what a killed writer left first
    try:
        write(tmp)
        swap_in(tmp, path, owned, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; holds only our files otherwise
    return path


def recover_interrupted(folder: os.PathLike) -> None:
    """Put ``folder`` back from whatever a killed writer left beside it (states A-D of the module docstring).

    Idempotent, and a no-op when no dead writer left anything; never overwrites an entry ``folder`` holds."""
    target = Path(folder)
    if not target.parent.is_dir():
        return
    temps, olds = _dead_leftovers(target)
    if not target.exists() and olds:  # C
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, target)
        olds.remove(newest)
    for temp in temps:
        if target.is_dir() and not temp.name.endswith(WRITING):  # B: the entries target lacks were carried
            for entry in sorted(temp.iterdir()):
                if not os.path.lexists(target / entry.name):
                    os.replace(entry, target / entry.name)
        shutil.rmtree(temp, ignore_errors=True)  # A, or B once emptied of what target lacks
    if target.is_dir():  # D: target exists and nothing waits to go back into it (a failed move raised above)
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def _dead_leftovers(target: Path) -> tuple[list, list]:
    """Temporary folders and ``.old-<pid>`` folders for ``target`` whose writer process is gone."""
    temp_prefix, old_prefix = f".{target.name}.tmp-", f".{target.name}.old-"
    temps, olds = [], []
    for path in sorted(target.parent.iterdir()):
        if path.name.startswith(temp_prefix) and "-" in path.name[len(temp_prefix):]:
            pid, found = path.name[len(temp_prefix):].split("-", 1)[0], temps
        elif path.name.startswith(old_prefix):
            pid, found = path.name[len(old_prefix):], olds
        else:
            continue
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and not _alive(int(pid)):
            found.append(path)
    return temps, olds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
