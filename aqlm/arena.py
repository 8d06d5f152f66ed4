"""Storage on transparent huge pages for what a decoding step reads once per token: ``empty(nbytes)``.

A decoding step reads every layer's packed codes (and the int8 LM head) once, and nothing in
between keeps them in a core's caches, so each 4 KiB page costs a TLB miss, and in a virtual
machine each miss is a two-level page walk. These buffers are therefore carved, 64-byte aligned,
out of shared anonymous mappings of ``CHUNK_BYTES`` that are advised to the kernel as huge-page
memory (``madvise(MADV_HUGEPAGE)``; Linux backs them with 2 MiB pages where
/sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise"). A request larger than
``OWN_MAPPING_BYTES`` gets a mapping of its own.

Each returned tensor keeps its mapping alive, and a mapping is unmapped when the last tensor
carved out of it (and the arena, for the chunk being filled) lets go of it, so rebuilt packings
(codes changed during PV-Tuning) free the old ones' memory chunk by chunk. Measured on SmolLM2
2x8g8 decoding at 2 threads (a virtual machine): 576x576 lutq calls, 60 layers round robin,
50.7 -> 29.2 us each.

``AQLM_HUGE_PAGES=0`` turns this off: plain ``torch.empty`` storage (for comparison).
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Optional

import numpy as np
import torch

HUGE_PAGE_BYTES = 2 << 20
CHUNK_BYTES = 32 << 20
OWN_MAPPING_BYTES = CHUNK_BYTES // 4
ALIGNMENT = 64
HUGE_PAGES_ENV = "AQLM_HUGE_PAGES"


def huge_pages_requested() -> bool:
    """False when ``AQLM_HUGE_PAGES=0``."""
    return os.environ.get(HUGE_PAGES_ENV, "1") != "0"


def _mapping(nbytes: int) -> np.ndarray:
    """A zero-filled uint8 array of ``nbytes`` (a multiple of HUGE_PAGE_BYTES) that starts on a
    huge-page boundary, over a private anonymous mapping advised as huge-page memory."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE_BYTES
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice, start, nbytes)  # the aligned part only
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages, same results
            pass
    return whole[start : start + nbytes]


class PackedArena:
    """Bump allocation of 64-byte-aligned uint8 buffers out of huge-page chunks (thread-safe)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, own_mapping_bytes: int = OWN_MAPPING_BYTES):
        self.chunk_bytes, self.own_mapping_bytes = chunk_bytes, own_mapping_bytes
        self._chunk: Optional[np.ndarray] = None
        self._used = 0
        self._lock = threading.Lock()

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of ``nbytes`` on huge-page memory."""
        if nbytes > self.own_mapping_bytes:
            size = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
            return torch.from_numpy(_mapping(size)[:nbytes])
        with self._lock:
            start = -(-self._used // ALIGNMENT) * ALIGNMENT
            if self._chunk is None or start + nbytes > self._chunk.size:
                self._chunk, start = _mapping(self.chunk_bytes), 0
            self._used = start + nbytes
            return torch.from_numpy(self._chunk[start : start + nbytes])


_ARENA = PackedArena()


def empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``nbytes`` on huge-page memory shared with other layers'
    buffers, or from ``torch.empty`` when ``AQLM_HUGE_PAGES=0``."""
    if not huge_pages_requested():
        return torch.empty(nbytes, dtype=torch.uint8)
    return _ARENA.empty(nbytes)
