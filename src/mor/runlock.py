"""One writer per output directory, and clean-up after a writer that died.

Every verb that writes a directory (``mor train`` its ``out_dir``, ``mor prepare`` its
``--out``, ``mor experiment`` its ``--out``) holds :class:`RunLock` on it while it runs::

    with RunLock(out_dir, "mor train"):
        ...  # only this process writes out_dir

The lock is ``fcntl.flock`` on ``DIR/.mor.lock``: the kernel releases it when the process
exits, however it exits (SIGKILL included), so a crash never leaves a stale lock behind. A
second process asking for a held lock fails at once with :class:`RunLockedError`, whose
message names the directory and the holder (pid, command, start time, read from the lock
file). The lock file itself stays (removing it would race with a new holder).

Temporaries a writer leaves when it is killed (``.tmp-*`` checkpoint directories, staged
``.*.tmp`` files) are removed by :func:`remove_stale_temporaries`, which is only called
while holding the lock: then no live writer can own them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

LOCK_FILE = ".mor.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"pid {info['pid']} on {info.get('host', '?')} ({info.get('what', '?')}: `{info.get('command', '?')}`, "
            f"since {since})")


class RunLock:
    """Exclusive, crash-safe lock on a directory (created if needed). A context manager;
    ``acquire()``/``release()`` for manual use. ``what`` names the holder in messages.
    ``name``: the lock file in ``directory`` (default ``.mor.lock``); see ``output_lock``."""

    def __init__(self, directory: str | os.PathLike, what: str = "mor", name: str = LOCK_FILE):
        self.directory = Path(directory).expanduser()
        self.what = what
        self.path = self.directory / name
        self.label = self.directory  # what the messages call the locked output
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise RunLockedError(f"{self.directory} is a file, not a directory; choose a directory path")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunLockedError(
                        f"{self.label} is in use by {_holder(self.path)}; a directory has one writer at a "
                        "time: wait for that process to finish (or stop it) or choose another directory") from None
                raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
                "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(out: str | os.PathLike, what: str) -> RunLock:
    """The one-writer lock of an output directory that is written whole and renamed into place
    (``mor export``, ``mor import-official``): the lock file cannot live inside ``out``, which
    is replaced, so it sits next to it as ``.NAME.mor.lock`` in the parent directory."""
    out = Path(out).expanduser().absolute()
    lock = RunLock(out.parent, what, name=f".{out.name}{LOCK_FILE}")
    lock.label = out
    return lock


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove what a killed writer left in ``directory`` (call it holding the directory's lock).

    * ``.tmp-*`` (a checkpoint being written; never a checkpoint) and ``.*.tmp`` (a staged
      file) are deleted;
    * ``.old-NAME-*`` is a complete checkpoint moved aside while ``NAME`` was being replaced:
      it is renamed back to ``NAME`` if ``NAME`` is missing (the kill fell between the two
      renames), deleted otherwise.

    Returns the names acted on (sorted)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    done = []
    for p in sorted(d.iterdir()):
        name = p.name
        if name.startswith(".old-"):
            target = d / name[len(".old-"):].rsplit("-", 2)[0]
            if not target.exists():
                os.replace(p, target)
            else:
                _remove(p)
        elif name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp")):
            _remove(p)
        else:
            continue
        done.append(name)
    return done


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def pause_for_tests(point: str) -> None:
    """Test hook: sleep ``$MOR_TEST_PAUSE_<POINT>`` seconds (unset: no-op). The kill tests use
    ``MOR_TEST_PAUSE_CHECKPOINT`` to widen the window in which a checkpoint is half written."""
    v = os.environ.get(f"MOR_TEST_PAUSE_{point.upper()}")
    if v:
        time.sleep(float(v))


def is_disk_full(e: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether a failed write ran out of space. Libraries report it differently: an OSError
    with ENOSPC (Python), "No space left on device (os error 28)" in a SafetensorError, and
    only "file write failed" from ``torch.save``, where the file system's free space (at
    ``where``, before the partial files are removed) decides."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    if "No space left on device" in msg or "os error 28" in msg or "Disk quota exceeded" in msg:
        return True
    if where is not None and isinstance(e, RuntimeError) and "write failed" in msg:
        try:
            st = os.statvfs(where)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def disk_full_message(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """One line for a save that ran out of space: what was being written, where, and which
    earlier checkpoint (a sibling ``step_N``) is intact."""
    import re

    path = Path(path)
    step = re.fullmatch(r"step_(\d+)", path.name)
    label = f"{what} step {int(step.group(1))}" if step else f"{what} {path.name}"
    prev = []
    if path.parent.is_dir():
        prev = sorted((int(m.group(1)), p.name) for p in path.parent.iterdir()
                      if (m := re.fullmatch(r"step_(\d+)", p.name)) and p != path and p.is_dir())
    tail = (f"the previous checkpoint step {prev[-1][0]} is intact" if prev
            else "no earlier checkpoint exists in that directory")
    return f"no space left on device while writing {label} to {path.parent}; {tail}"
