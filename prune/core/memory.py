"""This process's memory: handing freed heap back to the operating system, and its peak resident size.

glibc keeps freed buffers in its arenas for reuse, so a process that frees one block-sized buffer after another
(a layer-by-layer pass over a large model) holds on to them and its RSS creeps up block after block.
"""

from __future__ import annotations

import ctypes
import sys

try:
    import resource  # POSIX only
except ImportError:  # Windows: no getrusage
    resource = None


def release_freed_memory() -> None:
    """Return glibc's freed arena memory to the system (`malloc_trim`); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """The peak resident memory of this process so far, in MB (getrusage's ru_maxrss: KiB on Linux, bytes on
    macOS); None where the operating system has no getrusage (Windows)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
