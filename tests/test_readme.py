"""The README's Python examples run as written (with the batch shrunk for speed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block: str) -> None:
    for library in ("torch", "jax"):
        if re.search(rf"^import {library}\b", block, flags=re.MULTILINE):
            pytest.importorskip(library)
    code = block.replace("4096", "300").replace("block_size=1024", "block_size=128")
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    # Blocks that compute a loss must get a positive one; the others assert for themselves.
    if "loss" in namespace:
        loss = namespace["loss"]
        loss = loss.detach() if hasattr(loss, "detach") else loss  # a torch loss with a graph
        assert float(loss) > 0  # type: ignore[arg-type]
    else:
        assert "assert " in block
