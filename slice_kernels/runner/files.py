"""Writing the runner's files so that a kill, a crash or a full disk never leaves a torn file behind.

Every file is written to ``<name>.tmp<pid>`` in its own directory, flushed, fsynced and renamed over the
target (a rename within one directory is atomic), then the directory is fsynced so the rename survives a
power cut. The temporary file is removed on every exit path of the writer; one left by a process killed with
SIGKILL is removed by the next run that takes the directory's lock (``remove_stale_temps``). A full disk (or
quota, or file-size limit) becomes a ``StorageError`` naming the directory instead of the library's own
message (torch's was "unexpected pos").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re

from .errors import RunnerError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# the runner's own file names with a writer's temp suffix: cleanup never touches a file it did not write
_TEMP = re.compile(
    r"(ckpt_\d{4,}\.safetensors|latest\.json|run\.json|results\.json|predictions\.json|timings\.json"
    r"|summary\.md|[\w-]+\.png)\.tmp\d+"
)


class StorageError(RunnerError):
    """The run directory cannot take a write (disk full, quota, file-size limit)."""


def temp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def storage_errors(directory: str, what: str):
    """Turn a no-space ``OSError`` raised inside into a ``StorageError`` that names ``directory``."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        raise StorageError(
            f"no space left for the run in {directory!r} while writing {what} ({os.strerror(e.errno)}); no partial "
            f"file is left. Free space on that disk (or raise the quota)"
        ) from e


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    """The one place bytes reach the disk (tests patch it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str, data) -> None:
    """Write ``data`` (bytes, or a callable ``write(f)`` filling a file object) to ``path`` atomically."""
    if callable(data):
        import io

        buf = io.BytesIO()
        data(buf)
        data = buf.getvalue()
    directory = os.path.dirname(path) or "."
    tmp = temp_name(path)
    with storage_errors(directory, os.path.basename(path)):
        try:
            write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    _fsync_dir(directory)


def atomic_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the ``*.tmp<pid>`` files of writers that were killed; call only while holding the run's lock."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if _TEMP.fullmatch(name) and os.path.isfile(os.path.join(directory, name)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed
