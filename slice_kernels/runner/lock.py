"""An exclusive lock on a run directory, held for the life of the run that uses it.

The lock is an ``flock`` on ``<out>/.slice-kernels.lock``. The kernel releases it when its process exits in any
way (an exception, Ctrl-C, SIGKILL, a crash), so a lock file left behind by a dead run blocks nothing: the
next run takes it over and says so. The file records the holder (pid, host, start time) for the message a
refused run prints. On release the holder removes the file while still holding the lock; a run that opened
the old file just before checks after locking that its file is still the one at the path, and retries if not.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from .errors import ResumeError

LOCK_NAME = ".slice-kernels.lock"


class RunDirBusyError(ResumeError):
    """Another live run holds the directory's lock."""


class RunDirLock:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd: int | None = None
        self.stale_holder: dict | None = None  # what a dead run left in the lock file we took over

    def acquire(self) -> "RunDirLock":
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            raise ResumeError("the runner's run-directory lock needs POSIX flock (Linux or macOS)") from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = (
                    f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                    if holder
                    else "a process that is starting"
                )
                raise RunDirBusyError(
                    f"{self.directory!r} is in use by another run ({who}); wait for it to end, or choose another "
                    f"--out. Nothing was changed."
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
        self.stale_holder = _read_holder(fd)
        record = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
