"""Extra memory stays O(n d + block_size^2): the n x n logits are never materialised.

NumPy reports its allocations to tracemalloc, so the peak of everything the call
allocates is measured exactly (no timing involved).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import pairs

import portable_siglip as ps

FUNCTIONS = [ps.sigmoid_loss, ps.sigmoid_loss_and_grad, ps.softmax_loss, ps.softmax_loss_and_grad]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_peak_memory_is_linear_in_n(function: object) -> None:
    n, d, block = 3000, 16, 200
    rng = np.random.default_rng(0)
    img, txt = pairs(rng, n, d)
    # Warm up first: the first call imports array_api_compat's numpy wrappers lazily, and
    # tracemalloc would count those modules' code objects (several MiB) as the call's.
    function(img[:8], txt[:8], 10.0, -10.0)  # type: ignore[operator]
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        function(img, txt, 10.0, -10.0, block_size=block)  # type: ignore[operator]
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    itemsize = 8
    dense = n * n * itemsize  # one float64 n x n matrix: 72 MB
    # Allowance: a handful of (n, d) accumulators and copies, a handful of tiles.
    bound = (8 * n * d + 8 * block * block + 16 * n) * itemsize
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert peak < dense / 20
