"""The recording writer's kernel cost per GiB: O_DIRECT writes from 4 KiB pages against 2 MiB pages.

Writes 1 GiB in 3 MiB O_DIRECT writes from four 4 MiB buffers (as the writer does, fsync every
64 MiB) and prints the writing thread's CPU seconds, for each kind of buffer:

- ``shared``: ``mmap.mmap(-1, n)``, Python's default (shmem);
- ``private``: a private anonymous map (4 KiB pages);
- ``huge``: ``recording_writer.page_buffer`` (private, MADV_HUGEPAGE).

Usage: ``python bench/recording_writes.py [directory] [--runs N]`` (default: the temporary
directory; it must be on a file system with O_DIRECT, such as ext4 or xfs, not tmpfs).
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

from consoleproxy.recordings.recording_writer import page_buffer

GIB = 1 << 30
BUF = 4 << 20
WRITE = 3 << 20


def buffers(kind: str) -> list[mmap.mmap]:
    out = []
    for _ in range(4):
        if kind == "huge":
            m = page_buffer(BUF)
        elif kind == "private":
            m = mmap.mmap(-1, BUF, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            m = mmap.mmap(-1, BUF)
        m.write(b"x" * BUF)  # faulted in before the clock starts, as the pool's buffers are
        out.append(m)
    return out


def one(directory: str, kind: str) -> tuple[float, float]:
    bufs = buffers(kind)
    path = os.path.join(directory, f"recording-writes-{os.getpid()}.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        t0, w0, unsynced = time.thread_time(), time.monotonic(), 0
        for i in range(GIB // WRITE):
            with memoryview(bufs[i % 4])[4096 : 4096 + WRITE] as block:
                os.write(fd, block)
            unsynced += WRITE
            if unsynced >= 64 << 20:
                os.fsync(fd)
                unsynced = 0
        os.fsync(fd)
        return time.thread_time() - t0, time.monotonic() - w0
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", nargs="?", default=tempfile.gettempdir())
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.runs):
        for kind in ("shared", "private", "huge"):
            cpu, wall = one(args.directory, kind)
            print(f"{kind:8s} CPU {cpu:.3f} s per GiB written, {1 / wall:.2f} GiB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
