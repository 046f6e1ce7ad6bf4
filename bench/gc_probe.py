"""Run ``consoleproxy`` with a probe of its cycle collector (for bench/churn.py).

    python bench/gc_probe.py serve --config FILE

Everything after the script's name goes to ``consoleproxy``'s command line unchanged. A thread
reads commands on stdin and answers each with one JSON line on the file descriptor named by
``GC_PROBE_FD`` (the proxy's own output stays its own):

- ``objects``: how many objects the cycle collector tracks (without collecting), Python's
  allocated blocks and the C allocator's bytes in use;
- ``collect``: one full collection, timed (the pause every console waits through).

The thread takes the GIL like any other: while it collects the event loop stands still, exactly
as it would if the collector ran on its own.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
from typing import TextIO


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost",
    )]


def _malloc_in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc's mallinfo2): OpenSSL's and
    the event loop's memory, which RSS mixes with freed pages the allocator keeps."""
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    mallinfo2.restype = _MallInfo2
    m = mallinfo2()
    return int(m.uordblks + m.hblkhd)


def _state() -> dict[str, object]:
    return {"tracked": len(gc.get_objects()), "py_blocks": sys.getallocatedblocks(),
            "malloc_in_use": _malloc_in_use()}


def _serve_commands(out: TextIO) -> None:
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "objects":
            answer = _state()
        elif cmd == "collect":
            t0 = time.perf_counter()
            found = gc.collect()
            answer = {"seconds": time.perf_counter() - t0, "unreachable": found, **_state()}
        elif cmd == "trim":
            t0 = time.perf_counter()
            released = ctypes.CDLL(None).malloc_trim(0)
            answer = {"seconds": time.perf_counter() - t0, "released": released}
        else:
            answer = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(answer), file=out, flush=True)


def main() -> int:
    from consoleproxy.tools.cli import main as consoleproxy

    out = open(int(os.environ["GC_PROBE_FD"]), "w")  # open for the process's life
    threading.Thread(target=_serve_commands, args=(out,), name="gc-probe", daemon=True).start()
    return consoleproxy(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
