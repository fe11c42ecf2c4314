"""Shared setup of the CRF tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run the CRF tests single-threaded (restored afterwards).

    They check numerics, not speed; on a shared 2-core machine, OpenMP/MKL with 2 threads can stall
    for a scheduler slice at every parallel region when another process holds a core, which makes
    a CRF call tens of times slower. ``test_two_threads_match_one`` covers the threaded path.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
