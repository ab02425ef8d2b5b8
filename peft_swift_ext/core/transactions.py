"""Replacing entries of a checkpoint folder so that a crash at any instant leaves the old or the new entries.

An update stages its new entries in a hidden ``.swift-save-*`` folder inside the checkpoint folder (so every move
is a rename), flushes them, commits by renaming a journal (``.swift-save.journal``) into the folder, then switches
each entry by renames; content it does not stage is kept. Every reader and writer first finishes a committed
journal (:func:`recover`). Writers ``flock`` the folder exclusively while they commit and switch, readers shared; a
writer ``flock``-s its staging folder, which tells a dead writer's leftovers from live work. A failure inside this
process while switching moves everything back. The full sequence: "How a save works" in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: saves stay atomic, but concurrent writers are not serialised
    fcntl = None

JOURNAL_NAME = ".swift-save.journal"
STAGING_PREFIX = ".swift-save-"
_NEW, _OLD = "new", "old"


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's content (a folder: its entries) to the disk; a no-op where unsupported."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with suppress(OSError):  # some file systems cannot fsync folders; the rename order still holds there
            os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """The entries of one update, written inside the checkpoint folder before they replace the old ones.

    Args:
        folder: where the new entries go (inside the staging folder).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = []

    def new_folder(self, name: str) -> Path:
        """Create and return the staged folder that will become ``<checkpoint>/<name>``."""
        path = self._claim(name)
        path.mkdir()
        return path

    def new_file(self, name: str) -> Path:
        """The staged path of the file that will become ``<checkpoint>/<name>`` (the caller writes it)."""
        return self._claim(name)

    def adopt(self, name: str) -> Path:
        """Claim an entry ``name`` the caller already wrote into :attr:`folder` (a writer that picks its own names)."""
        _check_entry_name(name)
        if not os.path.lexists(self.folder / name):
            raise FileNotFoundError(f"{self.folder / name} was not written before being adopted into the update")
        return self._claim(name)

    def _claim(self, name: str) -> Path:
        _check_entry_name(name)
        if name in self.names:
            raise ValueError(f"{name!r} is staged twice in one checkpoint update")
        self.names.append(name)
        return self.folder / name


@contextmanager
def update(root: str | os.PathLike) -> Iterator[Staging]:
    """Stage entries of ``root`` inside the block; they replace the existing ones when it ends, crash-safely.

    Content of ``root`` not staged is kept. If the block or the switch fails, ``root`` is as before (a
    ``root`` this call created is removed again); if the process dies, the next :func:`recover` (every load
    and save runs one) finishes a committed update or sweeps an uncommitted one. ``root`` is created if needed.
    """
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with locked(root, exclusive=True):  # finish an interrupted update first; sweepers wait for the hold
            _recover_locked(root)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
            owner = _hold(staging)  # while held, sweepers leave this folder alone
    except BaseException:
        if created:
            _remove_if_empty(root)
        raise
    try:
        (staging / _OLD).mkdir()
        (staging / _NEW).mkdir()
        staged = Staging(staging / _NEW)
        yield staged
        _flush_tree(staging / _NEW)
        with locked(root, exclusive=True):
            _recover_locked(root, keep=staging)
            _commit(root, staging, staged.names)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            _remove_if_empty(root)
        raise
    finally:
        if owner is not None:
            os.close(owner)
    shutil.rmtree(staging, ignore_errors=True)


def recover(root: str | os.PathLike) -> None:
    """Finish an update of ``root`` that a crash interrupted after its commit; sweep dead writers' staging.

    Raises ``ValueError`` naming the journal when the folder cannot be repaired (read-only, or a damaged
    journal): loading such a folder would mix the old and the new checkpoint.
    """
    root = Path(root)
    if not root.is_dir():
        return
    with locked(root, exclusive=True):
        _recover_locked(root)


@contextmanager
def reading(root: str | os.PathLike) -> Iterator[None]:
    """Hold ``root`` steady for reading: no update switches entries inside the block (one that a crash
    interrupted is finished first, and dead writers' staging folders are swept)."""
    root = Path(root)
    recovered = False
    while True:
        with locked(root, exclusive=False):
            leftovers = not recovered and any(p.name.startswith(STAGING_PREFIX) for p in root.iterdir())
            if not (root / JOURNAL_NAME).exists() and not leftovers:
                yield
                return
        recover(root)  # outside the shared lock: recovery needs it exclusively (it also sweeps dead staging)
        recovered = True


@contextmanager
def locked(root: Path, exclusive: bool) -> Iterator[None]:
    """``flock`` the existing folder ``root`` inside the block (writers ``exclusive``, readers shared); threads and
    processes alike wait."""
    if fcntl is None:
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:  # a file system without locks: still atomic, but writers may interleave
            warnings.warn(f"cannot lock {root} ({error}); concurrent saves into it are not serialised", stacklevel=3)
        yield
    finally:
        os.close(fd)  # releases the lock


def _commit(root: Path, staging: Path, names: list[str]) -> None:
    journal = root / JOURNAL_NAME
    pending = staging / JOURNAL_NAME
    pending.write_text(json.dumps({"staging": staging.name, "entries": names}))
    fsync_path(pending)
    os.replace(pending, journal)
    fsync_path(root)
    try:
        _roll_forward(root, staging, names)
    except BaseException:
        with suppress(BaseException):  # undo in this process; if that fails, the journal stays for the next recover
            _roll_back(root, staging, names)
            journal.unlink()
            fsync_path(root)
        raise
    journal.unlink()
    fsync_path(root)


def _roll_forward(root: Path, staging: Path, names: list[str]) -> None:
    """Move each staged entry into ``root``, parking the entry it replaces; resumable from any crash."""
    for name in names:
        new, old, target = staging / _NEW / name, staging / _OLD / name, root / name
        if not os.path.lexists(new):
            continue  # already moved in
        if os.path.lexists(target):
            if os.path.lexists(old):
                raise ValueError(f"{root}: cannot finish an interrupted save: both {target} and {old} exist")
            os.replace(target, old)
        os.replace(new, target)
    fsync_path(root)


def _roll_back(root: Path, staging: Path, names: list[str]) -> None:
    """Undo :func:`_roll_forward`: the new entries go back to staging, the parked ones to their place."""
    for name in reversed(names):
        new, old, target = staging / _NEW / name, staging / _OLD / name, root / name
        if not os.path.lexists(new) and os.path.lexists(target):
            os.replace(target, new)
        if os.path.lexists(old):
            os.replace(old, target)
    fsync_path(root)


def _recover_locked(root: Path, keep: Path | None = None) -> None:
    journal = root / JOURNAL_NAME
    if os.path.lexists(journal):
        staging, names = _read_journal(root, journal)
        try:
            _roll_forward(root, staging, names)
            journal.unlink()
            fsync_path(root)
        except OSError as error:
            raise ValueError(
                f"{root} holds a save that was interrupted while switching files ({journal}), and it cannot be "
                f"finished here ({error}); make the folder writable and load it again to complete it"
            ) from None
    _sweep(root, keep)


def _read_journal(root: Path, journal: Path) -> tuple[Path, list[str]]:
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
        staging_name, names = data["staging"], data["entries"]
        if not isinstance(staging_name, str) or not staging_name.startswith(STAGING_PREFIX):
            raise ValueError(f"staging folder {staging_name!r}")
        _check_entry_name(staging_name)
        if not isinstance(names, list):
            raise ValueError(f"entries {names!r}")
        for name in names:
            _check_entry_name(name)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{journal} records an interrupted save but cannot be read ({error}); the checkpoint in {root} may mix "
            "two saves"
        ) from None
    return root / staging_name, names


def _sweep(root: Path, keep: Path | None) -> None:
    """Remove staging folders whose writer is gone (their lock is free)."""
    if fcntl is None:
        return
    for child in root.iterdir():
        if not child.name.startswith(STAGING_PREFIX) or child == keep or child.is_symlink() or not child.is_dir():
            continue
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            shutil.rmtree(child, ignore_errors=True)
        finally:
            os.close(fd)


def _hold(folder: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    with suppress(OSError):  # no locks on this file system: the folder may be swept only by a later save's recover
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _flush_tree(folder: Path) -> None:
    """fsync every staged file and folder, so that a committed journal never points at unwritten data."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)


def _check_entry_name(name: object) -> None:
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(sep in name for sep in separators)
        or "\0" in name
        or name == JOURNAL_NAME
    ):
        raise ValueError(f"{name!r} cannot name an entry of a checkpoint folder")


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):
        folder.rmdir()
