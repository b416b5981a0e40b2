"""The Python examples of the documentation pages run, and print what the page says they print.

A page's example states its output as a comment on the ``print`` line
(``print(f"{loss:.4f}")  # 1.2345``); each such line must print exactly that. Pages whose
examples need a launcher (mpirun, torchrun) or an optional peer are not listed here.

The ``shard_map`` example of docs/frameworks.md sets ``XLA_FLAGS`` for 4 CPU devices before it
imports jax, so it runs in a fresh interpreter (``tests/jax_scripts/docs_shard_map.py``), not
in this process, where jax may already be started and the variable would leak to other tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: Pages and which of their ```python blocks run on their own on a CPU: None for every block,
#: else the blocks that contain the string (the rest need a launcher or an optional peer).
PAGES: dict[str, str | None] = {
    "multi-positive.md": None,
    "conformance.md": "UsageError",
    "adding-a-loss.md": None,
}
_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s?(.*)$")
SHARD_MAP_SCRIPT = Path(__file__).with_name("jax_scripts") / "docs_shard_map.py"


def _page(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def _blocks(page: str) -> list[str]:
    text = _page(page)
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


def test_shard_map_example_runs_a_ring_of_four_cpu_devices() -> None:
    """The page's sharded train step, run as a user runs it: no ``XLA_FLAGS`` from outside.

    The example gets its 4 CPU devices itself, prints what the page claims, and its ring over
    the 4 devices gives the loss of the whole batch: in float64 the long-double oracle's and
    the one-process loss's, to 1e-12.
    """
    pytest.importorskip("jax")
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, str(SHARD_MAP_SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["devices"], report["mesh"]) == (4, 4), report
    blocks = re.findall(r"```python\n(.*?)```", _page("frameworks.md"), flags=re.DOTALL)
    (block,) = [b for b in blocks if "AxisComm" in b]
    claimed = [m.group(1) for line in block.splitlines() if (m := _PRINT.match(line))]
    assert report["printed"] == claimed == ["4 devices", "True", "True"]
    assert report["ring_dtype"] == "float64"
    assert report["ring_vs_oracle"] <= 1e-12, report
    assert report["ring_vs_one_process"] <= 1e-12, report
