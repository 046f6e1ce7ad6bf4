"""The one way consoleproxy replaces a file: whole or not at all, with its mode from the first byte.

A reader (another worker, the CLI, the proxy after a crash) sees the old file or the new one,
never a torn one: the bytes go to a temporary file in the same directory (a rename across file
systems would not be atomic) under a unique name (two writers never share one), created with
``O_EXCL`` and the final mode (a secret is never briefly world-readable), optionally fsynced, then
``os.replace``d over the target. On any error the temporary file is removed and the target is
untouched.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``. ``fsync``: the bytes are on disk before the rename (a
    crash leaves the old file or the complete new one); without it, only a reader's view is atomic.
    The directory itself is not fsynced: callers that need the rename durable do that."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
