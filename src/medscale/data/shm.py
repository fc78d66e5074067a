"""Shared-memory tensors for batches that cross from loader workers to the rank, faulted in ahead."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["new_shared", "SharedBuffers"]

_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault in a range's pages in one call (no GIL held)
_PAGE_BYTES = 4096  # madvise takes a page-aligned start
_LIBC: Any = None


def new_shared(shape: tuple[int, ...], populate: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor in shared memory (how torch's default_collate allocates)."""
    numel = 1
    for d in shape:
        numel *= d
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize, device="cpu")
    t = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    if populate and numel:
        global _LIBC
        try:
            if _LIBC is None:
                import ctypes

                _LIBC = ctypes.CDLL(None, use_errno=True)
                _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            start = t.data_ptr() & ~(_PAGE_BYTES - 1)
            _LIBC.madvise(start, numel * t.element_size() + t.data_ptr() - start,
                          _MADV_POPULATE_WRITE)  # failure is harmless
        except (OSError, AttributeError):
            pass  # no libc madvise: the pages fault in when the batch is written
    return t


class SharedBuffers:
    """Shared-memory image buffers for a worker's batches, prepared one batch ahead.

    A batch crosses to the main process in shared memory, which must be freshly allocated for
    every batch; faulting in its pages (a cost BENCHMARKS.md measures) is done by a helper thread
    while the worker decodes the next samples. Buffers are prepared by size (the largest so far):
    the gpu path's padded pixel batches change shape from batch to batch.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._next: Any = None
        self._dtype: torch.dtype | None = None
        self._numel = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if self._next is not None and self._dtype == dtype and numel <= self._numel:
            buf = self._next.result()[:numel].view(shape)
        else:
            buf = new_shared(shape, dtype=dtype)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="medscale-shm")
        self._numel = max(numel, self._numel if self._dtype == dtype else 0)
        self._dtype = dtype
        self._next = self._pool.submit(new_shared, (self._numel,), True, dtype)
        return buf

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
