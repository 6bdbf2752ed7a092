"""Atomic folder writes (``_fs``) after a kill: every on-disk state a writer killed inside ``atomic_write_dir`` can
leave is built by hand (real folders and renames, the steps of the ``_fs`` docstring replayed up to the kill), then
recovered, then written over; no file of the user's, and no carried-over file of ours, may be lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning_onnx._fs import WRITING, atomic_write_dir, recover_interrupted
from ptuning_onnx.errors import ConfigError

OWNED = ("model.bin", "meta.json", "extra.bin", "state")  # what the writes below make (state: kept, like a checkpoint)
KEEP = ("state",)
USER = {"notes.txt": "mine", "data/deep/file.txt": "deep"}  # entries this writer never made
KEPT = {"state/s.json": "step 1"}


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited: the writer killed in each state."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def writer(version: int, extra: bool = False):
    """``write(tmp)`` for ``atomic_write_dir``: version ``version`` of our two files (+ extra.bin, a name the old
    content lacks)."""
    def write(tmp: Path) -> None:
        (tmp / "model.bin").write_text(f"model v{version}")
        (tmp / "meta.json").write_text(f'{{"version": {version}}}')
        if extra:
            (tmp / "extra.bin").write_text(f"extra v{version}")
    return write


def content(version: int, extra: bool = False) -> dict:
    files = {"model.bin": f"model v{version}", "meta.json": f'{{"version": {version}}}'}
    return dict(files, **({"extra.bin": f"extra v{version}"} if extra else {}))


def files(folder: Path) -> dict:
    """Every file under ``folder`` -> its text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out."))


def populate(folder: Path, entries: dict) -> None:
    for name, text in entries.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@pytest.fixture
def out(tmp_path) -> Path:
    """A folder holding version 1 of our files, a kept entry of ours (state/) and the user's files."""
    target = tmp_path / "out"
    atomic_write_dir(target, writer(1), owned=OWNED, keep=KEEP)
    populate(target, {**USER, **KEPT})
    return target


def temp(target: Path, pid: int, *, writing: bool) -> Path:
    """A writer's temporary folder, named as ``temp_beside`` names it (``writing``) or as ``swap_in`` renames it
    before carrying."""
    folder = target.with_name(f".{target.name}.tmp-{pid}-k1ll" + (WRITING if writing else ""))
    folder.mkdir()
    return folder


def kill_during_swap(target: Path, pid: int, *, carry: int, rename_old: bool = False, swapped: bool = False,
                     old_removed: bool = False) -> None:
    """Replay version 2's write (with extra.bin) by hand and stop: after carrying ``carry`` of the entries to keep
    (-1: all, 0: renamed for carrying, none moved yet), after renaming ``target`` to ``.old-<pid>``, after renaming
    the temporary folder to ``target``, part-way through removing ``.old-<pid>``."""
    tmp = temp(target, pid, writing=False)
    writer(2, extra=True)(tmp)
    to_carry = sorted(p.name for p in target.iterdir() if p.name not in OWNED or p.name in KEEP)
    for name in to_carry[:len(to_carry) if carry < 0 else carry]:
        os.replace(target / name, tmp / name)
    old = target.with_name(f".{target.name}.old-{pid}")
    if rename_old or swapped:
        os.replace(target, old)
    if swapped:
        os.replace(tmp, target)
    if old_removed:
        (old / "model.bin").unlink()


OLD = {**content(1), **USER, **KEPT}  # what ``out`` holds before the killed write
NEW = {**content(2, extra=True), **USER, **KEPT}  # what it holds once that write is done


@pytest.mark.parametrize("state,build,recovered", [
    # A: still building; the partial new content is ours alone
    ("building", lambda t, p: (temp(t, p, writing=True) / "model.bin").write_text("model v2, half of it"), OLD),
    # B: the folder lost its .writing mark, then the kill came before/while/after carrying entries out of target
    ("renamed-for-carrying", lambda t, p: kill_during_swap(t, p, carry=0), {**OLD, "extra.bin": "extra v2"}),
    ("carrying", lambda t, p: kill_during_swap(t, p, carry=1), {**OLD, "extra.bin": "extra v2"}),
    ("carried", lambda t, p: kill_during_swap(t, p, carry=-1), {**OLD, "extra.bin": "extra v2"}),
    # C: target missing, waiting as .old-<pid>; the carried entries in the temporary folder
    ("between-renames", lambda t, p: kill_during_swap(t, p, carry=-1, rename_old=True),
     {**OLD, "extra.bin": "extra v2"}),
    # D: the swap is done, the old folder not (completely) removed
    ("swapped", lambda t, p: kill_during_swap(t, p, carry=-1, swapped=True), NEW),
    ("removing-old", lambda t, p: kill_during_swap(t, p, carry=-1, swapped=True, old_removed=True), NEW),
])
def test_every_kill_state_is_recovered_and_nothing_is_lost(out, dead_pid, state, build, recovered):
    build(out, dead_pid)
    assert leftovers(out.parent), "the state should leave something beside the folder"

    recover_interrupted(out)
    assert files(out) == recovered
    assert leftovers(out.parent) == []

    recover_interrupted(out)  # idempotent
    atomic_write_dir(out, writer(3), owned=OWNED, keep=KEEP)  # the next write: extra.bin is ours, so it may go
    assert files(out) == {**content(3), **USER, **KEPT}
    assert leftovers(out.parent) == []


def test_the_next_write_alone_recovers(out, dead_pid):
    """No explicit recovery: ``atomic_write_dir`` itself must not let its clean-up delete the carried entries."""
    kill_during_swap(out, dead_pid, carry=-1, rename_old=True)
    assert not out.exists()
    atomic_write_dir(out, writer(3), owned=OWNED, keep=KEEP)
    assert files(out) == {**content(3), **USER, **KEPT}
    assert leftovers(out.parent) == []


def test_kill_between_renames_with_nothing_to_carry(tmp_path, dead_pid):
    """A folder of only our replaceable files: nothing is carried, the temporary folder keeps its .writing mark."""
    target = tmp_path / "out"
    atomic_write_dir(target, writer(1), owned=OWNED)
    tmp = temp(target, dead_pid, writing=True)
    writer(2)(tmp)
    os.replace(target, target.with_name(f".out.old-{dead_pid}"))

    recover_interrupted(target)
    assert files(target) == content(1)
    assert leftovers(tmp_path) == []


def test_recovery_killed_part_way_is_finished(out, dead_pid):
    """The recovery itself killed after restoring target and moving one entry back."""
    kill_during_swap(out, dead_pid, carry=-1, rename_old=True)
    os.replace(out.with_name(f".out.old-{dead_pid}"), out)
    os.replace(out.with_name(f".out.tmp-{dead_pid}-k1ll") / "notes.txt", out / "notes.txt")

    recover_interrupted(out)
    assert files(out) == {**OLD, "extra.bin": "extra v2"}
    assert leftovers(out.parent) == []


def test_an_entry_the_folder_has_is_never_overwritten(out, dead_pid):
    tmp = temp(out, dead_pid, writing=False)
    populate(tmp, {"notes.txt": "an older copy", "data/deep/file.txt": "an older copy", "new.txt": "carried"})

    recover_interrupted(out)
    assert files(out) == {**OLD, "new.txt": "carried"}
    assert leftovers(out.parent) == []


def test_without_folder_or_old_copy_dead_temporaries_are_removed(tmp_path, dead_pid):
    """Nothing can have been carried out of a folder that does not exist: a killed first write leaves no trace."""
    target = tmp_path / "out"
    populate(temp(target, dead_pid, writing=True), {"model.bin": "half"})
    populate(target.with_name(f".out.tmp-{dead_pid}-x2"), {"model.bin": "whole"})

    recover_interrupted(target)
    assert not target.exists() and leftovers(tmp_path) == []


def test_a_live_writers_folders_are_left_alone(out):
    """Our own pid is alive: its temporary and old folders belong to a write in progress."""
    tmp = temp(out, os.getpid(), writing=False)
    populate(tmp, {"carried.txt": "in flight"})
    old = out.with_name(f".out.old-{os.getpid()}")
    populate(old, {"model.bin": "model v0"})
    before = files(out)

    recover_interrupted(out)
    assert files(out) == before and files(tmp) == {"carried.txt": "in flight"} and old.is_dir()


def test_a_swap_that_fails_after_carrying_puts_everything_back(out):
    """A real failure between carrying and the renames (``.old-<pid>`` is taken, so renaming target fails)."""
    blocker = out.with_name(f".out.old-{os.getpid()}")
    populate(blocker, {"in-the-way": "x"})
    with pytest.raises(OSError):
        atomic_write_dir(out, writer(2, extra=True), owned=OWNED, keep=KEEP)
    assert files(out) == OLD
    assert leftovers(out.parent) == [blocker.name]


def test_a_users_file_that_would_be_replaced_is_refused_before_anything_moves(tmp_path):
    target = tmp_path / "out"
    populate(target, {"model.bin": "the user's own", **USER})
    with pytest.raises(ConfigError, match="model.bin, which this write did not make"):
        atomic_write_dir(target, writer(1), owned=())
    assert files(target) == {"model.bin": "the user's own", **USER}
    assert leftovers(tmp_path) == []
