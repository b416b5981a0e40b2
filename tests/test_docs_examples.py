"""The Python examples of the documentation pages run, and print what the page says they print.

A page's example states its output as a comment on the ``print`` line
(``print(f"{loss:.4f}")  # 1.2345``); each such line must print exactly that. Pages whose
examples need a launcher (mpirun, torchrun) or an optional peer are not listed here.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: Pages and which of their ```python blocks run on their own on a CPU: None for every block,
#: else the blocks that contain the string (the rest need a launcher or an optional peer).
PAGES: dict[str, str | None] = {
    "multi-positive.md": None,
    "frameworks.md": "AxisComm",
    "conformance.md": "UsageError",
    "adding-a-loss.md": None,
}
_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s?(.*)$")


def _blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    wanted = PAGES[page]
    return [block for block in blocks if wanted is None or wanted in block]


CASES = [(page, index) for page in PAGES for index in range(len(_blocks(page)))]


@pytest.mark.parametrize(("page", "index"), CASES, ids=[f"{p}-{i}" for p, i in CASES])
def test_example_runs_and_prints_what_it_claims(page: str, index: int) -> None:
    block = _blocks(page)[index]
    for library in ("torch", "jax"):
        if re.search(rf"^\s*(import|from) {library}\b", block, flags=re.MULTILINE):
            pytest.importorskip(library)
    claimed = [m.group(1) for line in block.splitlines() if (m := _PRINT.match(line))]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, f"{page}:block{index}", "exec"), {"__name__": f"docs_{index}"})
    printed = out.getvalue().splitlines()
    if claimed:  # every print line states its output
        assert len(printed) == len(claimed), f"printed {printed}, the page claims {claimed}"
        for got, want in zip(printed, claimed, strict=True):
            assert got == want or want.startswith(got + ":"), f"printed {got!r}, page says {want!r}"
