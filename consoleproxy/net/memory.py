"""Memory that ended consoles freed goes back to the operating system.

Once an ended console is freed (by reference counting, at once: see relay.py), its bytes are back
in the C allocator, but glibc's malloc keeps the pages when live allocations sit between them:
measured with ``bench/churn.py`` (five waves of 300 TLS consoles, uvloop), RSS grew 8.5-10 KiB per
ended console while the allocator's bytes in use grew 0.35 KiB. glibc's ``malloc_trim(0)`` (which
also returns the whole free pages inside the heap, not only its top) gives them back: 0.8 KiB per
ended console with a trim after each wave. One trim took ~1 ms after a wave of 300, 0.1 ms with 9,900
idle consoles open.

So the server trims after every ``TRIM_EVERY`` ended consoles, and once more when a burst of ends
is over (no console ended during one sweeper pass). On a C library without ``malloc_trim`` (musl,
macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["TRIM_EVERY", "Trimmer", "malloc_trim"]

# ~1 ms a trim after 300 ended TLS consoles: ~4 µs a console, against ~2 ms to open one.
TRIM_EVERY = 256


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        # The C library the interpreter already runs on (dlopen(NULL)); find_library("c") would
        # start `ldconfig -p` (a subprocess) at every server start.
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


class Trimmer:
    """When to give freed memory back: pure bookkeeping around a trim function.

    ``ended()`` for every console that ended, ``tick()`` once a sweeper pass.
    """

    def __init__(self, trim: Callable[[int], int] | None, every: int = TRIM_EVERY) -> None:
        self._trim = trim
        self.every = every
        self.pending = 0  # consoles ended since the last trim
        self._at_last_tick = 0
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def ended(self) -> None:
        if self._trim is None:
            return
        self.pending += 1
        if self.pending >= self.every:
            self.trim()

    def tick(self) -> None:
        """A burst of ends is over when none ended since the last tick: trim its tail."""
        if self.pending and self.pending == self._at_last_tick:
            self.trim()
        self._at_last_tick = self.pending

    def trim(self) -> None:
        self.pending = self._at_last_tick = 0
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
