"""The cache folder ($TNK_CACHE_DIR, default ~/.cache/tnkernels): JSON files shared by every process on the machine.

Several processes often start at once on one machine (torchrun ranks, test workers, DataLoader workers at one
thread) and each measures what it finds missing. Three things keep that sane:

* Files are written to a temporary file and renamed: a reader never sees half a file.
* A read-modify-write of a file runs under an advisory lock on the cache folder (flock on the folder itself, so no
  lock file is left behind): without it two processes that each added an entry wrote back their own copy, and one
  entry was lost (4 processes putting 200 entries each kept 508 of 800).
* A measurement that another process may be making too runs under the same lock, and the file is read again once
  the lock is held (`MachineStore.get_or_measure`, the calibration): N processes starting together measured the
  same constants N times at once, each disturbed by the others, and each then planned with its own numbers.

The lock is a courtesy, never a requirement: a folder that cannot be created or locked (read-only, a file in the
way, a filesystem without flock), or a holder that keeps it past `LOCK_TIMEOUT_S`, means the caller goes on
unlocked. A folder that cannot be written keeps what was measured in memory for the process, with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; the cache works unlocked there (see the module docstring)
    fcntl = None

LOCK_TIMEOUT_S = 30.0  # a calibration takes 1-4 s; past this the holder is stuck (stopped), not measuring
_HELD = threading.local()  # this thread's lock depth: the lock is reentrant within a thread
_HELD_FDS: dict[int, int] = {}  # fd of each lock held now -> the holding thread (see _close_in_child)
_WARNED: set[str] = set()


def cache_dir() -> str:
    """Folder for calibration and other cached files: $TNK_CACHE_DIR, default ~/.cache/tnkernels."""
    return os.environ.get("TNK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tnkernels")


def read_json(path: str) -> dict:
    """A cache file's dict, or {} when it is missing or unreadable (it is then measured again)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: str, data: dict) -> None:
    """Atomic write: a temporary file in the same folder, then rename (readers never see half a file)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".json", dir=folder)
    try:
        # mkstemp makes the file 0600; a cache folder shared by several users (a team's shared filesystem) needs it
        # readable by all. A fixed mode, as save_compressed writes: reading the umask means setting it, which is
        # process-wide and races with other threads. Windows has no os.fchmod before Python 3.13 (nor POSIX modes
        # to share): calling it there raised AttributeError, which no caller catches, out of every first forward.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def warn_unwritable(folder: str, exc: OSError) -> None:
    """Say once per folder that nothing measured will be kept across processes (a read-only home, a file in the
    way): every process then measures again, which is the price the user should know about."""
    if folder in _WARNED:
        return
    _WARNED.add(folder)
    warnings.warn(
        f"tnkernels: cannot write the cache folder {folder} ({exc}); measurements (planner calibration, kernel "
        "choices) are kept in memory for this process only. Set TNK_CACHE_DIR to a writable folder to keep them.",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """Hold the cache folder's lock across processes (and threads: each acquisition is a new open file), reentrant
    within a thread. Without a usable lock the body runs unlocked."""
    depth = getattr(_HELD, "depth", 0)
    fd = None if depth else _acquire(folder)
    _HELD.depth = depth + 1
    try:
        yield
    finally:
        _HELD.depth = depth
        if fd is not None:
            _HELD_FDS.pop(fd, None)
            os.close(fd)  # releases the flock


def _acquire(folder: str) -> int | None:
    if fcntl is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            return None  # nothing measured here can be stored: waiting for another process would gain nothing
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _HELD_FDS[fd] = threading.get_ident()
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        except OSError:  # no flock on this filesystem
            break
    os.close(fd)
    return None


def _close_in_child() -> None:
    """A child forked while another thread held the lock inherits its open file, and flock is released only when
    every copy is closed: the parent's unlock would not release it and every process would wait LOCK_TIMEOUT_S.
    The holding threads do not exist in the child, so their copies are closed there (the forking thread's own, if it
    holds one, stays: its `locked` block goes on in the child and closes it)."""
    me = threading.get_ident()
    for fd, owner in list(_HELD_FDS.items()):
        if owner != me:
            _HELD_FDS.pop(fd, None)
            with contextlib.suppress(OSError):
                os.close(fd)


if hasattr(os, "register_at_fork"):  # POSIX only, like fork itself
    os.register_at_fork(after_in_child=_close_in_child)


def update_json(path: str, change: Callable[[dict], bool]) -> bool:
    """Read `path`, apply `change` (returns whether it changed anything) and write it back, under the folder's lock
    so that entries written by other processes meanwhile are kept. False when the file could not be written (the
    caller keeps the value in memory: a read-only home must not break the forward pass)."""
    folder = os.path.dirname(path)
    try:
        with locked(folder):
            data = read_json(path)
            if change(data):
                write_json_atomic(path, data)
        return True
    except OSError as exc:
        warn_unwritable(folder, exc)
        return False
