"""One read buffer per event-loop thread and use, shared by every connection on that thread.

A read callback sends, copies or parses what it needs before it returns, so the next read of any
connection on the thread may reuse the buffer: no allocation and no fresh pages per read, and
nothing per idle connection. The uses: ``relay`` (the relay's reads, both directions of a
console, and the browser's handshake), ``vnc`` (the VNC server's handshake), ``wire`` and
``plain`` (tlstransport's ciphertext and a plain protocol's plaintext). Each use has its own
buffer because one read can lead to another in the same callback (ciphertext in ``wire`` is
decrypted into ``relay``'s).

A transport that keeps a view of unsent bytes in a buffer takes it over (``let_go``): the
thread's next read of that use gets a new one.
"""

from __future__ import annotations

import threading

__all__ = ["let_go", "thread_buffer"]

_buffers: dict[tuple[int, str], memoryview] = {}


def thread_buffer(use: str, size: int) -> memoryview:
    """This thread's buffer for ``use`` (``size`` bytes, made on first use)."""
    key = (threading.get_ident(), use)
    view = _buffers.get(key)
    if view is None:
        view = _buffers[key] = memoryview(bytearray(size))
    return view


def let_go(use: str, buf: memoryview) -> None:
    """A transport keeps a view of ``buf``: if it is this thread's ``use`` buffer, the next
    ``thread_buffer`` call makes a new one and this one is the transport's."""
    key = (threading.get_ident(), use)
    if _buffers.get(key) is buf:
        del _buffers[key]
