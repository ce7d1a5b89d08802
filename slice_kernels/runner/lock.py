"""An exclusive lock on a run directory, held for the life of the run that uses it.

The lock is an ``flock`` on ``<out>/.slice-kernels.lock``. The kernel releases it when its process exits in any
way (an exception, Ctrl-C, SIGKILL, a crash), so a lock file left behind by a dead run blocks nothing: the
next run takes it over and says so. The file records the holder (pid, host, start time) for the message a
refused run prints. On release the holder removes the file while still holding the lock; a run that opened
the old file just before checks after locking that its file is still the one at the path, and retries if not.
"""

from __future__ import annotations

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
            # O_NOFOLLOW: a symlink planted at the lock path must not make us truncate its target
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                raise ResumeError(
                    f"cannot open the lock file {self.path} ({e.strerror}); it must be a plain file a run can create "
                    f"(not a link, writable): remove it if no run is using {self.directory!r}. Nothing was changed."
                ) from None
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
            except BaseException:
                os.close(fd)
                raise
            if self._is_ours(fd):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
        try:
            self.stale_holder = _read_holder(fd)
            record = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)  # closing drops the flock: nothing is held after a failed acquire
            raise
        self.fd = fd
        return self

    def _is_ours(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._is_ours(self.fd):  # a file put at the path by someone else is not ours to remove
                os.remove(self.path)
        except FileNotFoundError:
            pass
        finally:
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
