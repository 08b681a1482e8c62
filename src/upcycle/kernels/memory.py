"""Memory for the kernel's packed weight copies: 2 MiB-aligned and advised for transparent huge pages.

A decoding step reads a different 1/4 of every FFN's channels each token, three rows of H floats each,
scattered over the whole packed matrix: with 4 KiB pages nearly every kept channel costs TLB misses,
with 2 MiB pages a layer's packed weights are a handful of pages. Measured on smollm2-135m 16-of-64
(compiled decoding, 2 threads): 21.1 -> 20.8 ms a token. Linux only (madvise); where the advice is
refused or unsupported the copy is an ordinary one, and nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    return _madvise


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `tensor` starting on a 2 MiB boundary, its memory advised for huge pages
    before it is first written (the kernel backs pages at first touch)."""
    nbytes = tensor.numel() * tensor.element_size()
    madvise = _libc_madvise()
    if nbytes < HUGE_PAGE or not madvise:
        return tensor.contiguous().clone()
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: malloc maps fresh pages
    offset = (-raw.data_ptr()) % HUGE_PAGE
    madvise(raw.data_ptr() + offset, nbytes // 4096 * 4096, _MADV_HUGEPAGE)  # advice only: failure is harmless
    copy = raw[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)  # a view: keeps `raw` alive
    copy.copy_(tensor)
    return copy
