"""open_clip's SigLipLoss and ClipLoss, judged by the conformance suite.

open_clip follows the same conventions as this library (sigmoid: sum over all pairs divided by
n; softmax: the mean of the two directional cross-entropies, each a mean over rows; the scale
passed as t itself), so both losses must pass every check in float64 and float32, gradients
included (taken by torch autograd). Skipped when open-clip-torch is not installed; CI installs
it with ``--no-deps`` (only ``open_clip/loss.py`` is loaded, see ``peers/open_clip_losses.py``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("torch", reason="the open_clip peers are torch modules")
try:
    importlib.metadata.version("open-clip-torch")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "open-clip-torch is not installed (python -m pip install --no-deps open-clip-torch)",
        allow_module_level=True,
    )

from peers.open_clip_losses import (
    clip,
    has_chunked_siglip,
    open_clip_version,
    siglip,
    siglip_chunked,
)
from portable_siglip.conformance import check

PEERS: dict[str, tuple[Callable[..., Any], str]] = {
    "siglip": (siglip, "sigmoid"),
    "clip": (clip, "softmax"),
    "siglip_chunked": (siglip_chunked, "sigmoid"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("peer", list(PEERS))
def test_open_clip_conforms(peer: str, dtype: str) -> None:
    if peer == "siglip_chunked" and not has_chunked_siglip():
        pytest.skip(f"SigLipLoss of open-clip-torch {open_clip_version()} has no chunk_size")
    function, loss = PEERS[peer]
    report = check(function, loss=loss, backend="torch", dtype=dtype)
    details = [(r.check, r.case, r.quantity, r.error, r.tolerance) for r in report.failed]
    assert report.passed, (details, report.diagnosis)
    assert report.gradients_checked
    assert report.codes == set()


def test_clip_bias_gradient_is_a_rounding_zero() -> None:
    # ClipLoss adds logit_bias to both logit matrices; softmax is shift invariant, so the
    # bias gradient autograd returns is a sum of n^2 terms that cancel to rounding level.
    import torch

    generator = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 9, 4, generator=generator, dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    clip(img, txt, scale, bias).backward()
    assert bias.grad is not None
    assert abs(float(bias.grad)) < 1e-14
