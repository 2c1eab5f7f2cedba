"""Handing freed heap back to the operating system.

glibc keeps freed buffers in its arenas for reuse, so a process that frees one block-sized buffer after another
(a layer-by-layer pass over a large model) holds on to them and its RSS creeps up block after block.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Return glibc's freed arena memory to the system (`malloc_trim`); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
