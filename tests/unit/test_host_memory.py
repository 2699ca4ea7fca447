"""Freed tensors' memory goes back to the system when the engine releases it (glibc only)."""

from __future__ import annotations

import pytest
import torch

from openelm_server.engine import host_memory

pytestmark = pytest.mark.skipif(host_memory._MALLOC_TRIM is None, reason="the C library has no malloc_trim")


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_free_pages_inside_the_heap_go_back():
    # 100 KB tensors come from malloc's heap (below its mmap threshold); keeping every tenth,
    # the last one included, leaves ~180 MB free inside the heap, which free() alone keeps.
    tensors = [torch.ones(25_000) for _ in range(2_000)]
    kept = tensors[9::10]
    del tensors
    before = resident_mib()
    host_memory.release_free_host_memory()
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert all(float(t[0]) == 1.0 for t in kept)
