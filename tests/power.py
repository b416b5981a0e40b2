"""The conformance suite's power, measured on its own catalogue of wrong and right losses.

Scored the way correctness-tool benchmarks score a checker (MPI-BugBench): over the
implementations known to be wrong, the *recall* (share rejected); over those known to be
right, the *false alarms* (share rejected); and over the wrong ones rejected, the share
whose diagnosis codes include the expected one (*named*). Each entry is judged exactly as
its own test judges it: ``tests/test_conformance_teeth.py`` (``wrong_impls.WRONG``,
``right_impls.RIGHT`` and ``LOSS_ONLY``), ``tests/test_conformance_ids.py``
(``wrong_ids_impls``, with ``ids=True``), ``tests/test_open_clip_peer.py`` and
``tests/test_conformance_half_adapters.py`` (third-party losses). Entries whose library
(torch, jax, open-clip-torch) is missing are left out and listed.

Run ``python tests/power.py`` (from the repository root) for the markdown table of
docs/conformance.md, "Measured power".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import half_adapters
import right_impls
import wrong_ids_impls
import wrong_impls
from portable_siglip.conformance import check

# The ids mistakes, the loss each claims and the code it must be given, from
# wrong_ids_impls.EXPECTED (as test_conformance_ids.py reads them), with the backend it
# runs on: numpy, but the loss that takes no ids, judged on torch.
IDS_WRONG: dict[str, tuple[str, str, str]] = {
    impl: (loss, "torch" if impl == "sigmoid_without_ids" else "numpy", code)
    for impl, (loss, code) in wrong_ids_impls.EXPECTED.items()
}


class Entry(NamedTuple):
    """One implementation of the catalogue, how it is judged, and what it is."""

    catalogue: str
    name: str
    func: Callable[..., Any]
    loss: str
    backend: str
    dtype: str
    code: str | None  # the expected diagnosis code; None for a right implementation
    ids: bool = False
    scalar_dtype: str | None = None


class Verdict(NamedTuple):
    """What the suite said of one entry."""

    entry: Entry
    rejected: bool
    codes: frozenset[str]


def _open_clip_entries() -> list[Entry]:
    """open_clip's SigLipLoss and ClipLoss (right in float64 and float32), if installed."""
    from peers import open_clip_losses as peer

    chunked = [("siglip_chunked", peer.siglip_chunked, "sigmoid")]
    losses = [("siglip", peer.siglip, "sigmoid"), ("clip", peer.clip, "softmax")]
    losses += chunked if peer.has_chunked_siglip() else []
    return [
        Entry("third-party", f"open_clip {name}-{dtype}", func, loss, "torch", dtype, None)
        for name, func, loss in losses
        for dtype in ("float64", "float32")
    ]


def catalogue() -> tuple[list[Entry], list[str]]:
    """Every entry whose libraries are installed, and a line for each group left out."""
    entries = [
        Entry("wrong_impls", name, w.func, w.loss, w.backend, w.dtype, w.code)
        for name, w in sorted(wrong_impls.WRONG.items())
    ]
    right = {**right_impls.RIGHT, **right_impls.LOSS_ONLY}
    entries += [
        Entry("right_impls", name, r.func, r.loss, r.backend, r.dtype, None)
        for name, r in sorted(right.items())
    ]
    entries += [
        Entry(
            "wrong_ids_impls",
            name,
            getattr(wrong_ids_impls, name),
            loss,
            backend,
            "float64",
            code,
            ids=True,
        )
        for name, (loss, backend, code) in IDS_WRONG.items()
    ]
    entries += [
        Entry(
            "wrong_ids_impls",
            f"right_{loss}",
            getattr(wrong_ids_impls, f"right_{loss}"),
            loss,
            "numpy",
            "float64",
            None,
            ids=True,
        )
        for loss in ("sigmoid", "softmax")
    ]
    half = "half-precision-logits"
    entries += [
        Entry(
            "third-party",
            "HF CLIP-bfloat16",
            half_adapters.hf_clip_loss,
            "softmax",
            "torch",
            "bfloat16",
            half,
        ),
        Entry(
            "third-party",
            "torchmultimodal-bfloat16",
            half_adapters.torchmultimodal_contrastive_loss,
            "softmax",
            "torch",
            "bfloat16",
            half,
        ),
        Entry(
            "third-party",
            "big_vision-bfloat16",
            half_adapters.big_vision_sigmoid_loss,
            "sigmoid",
            "jax",
            "bfloat16",
            half,
        ),
        Entry(
            "third-party",
            "big_vision-bfloat16, float32 scalars",
            half_adapters.big_vision_sigmoid_loss,
            "sigmoid",
            "jax",
            "bfloat16",
            None,
            scalar_dtype="float32",
        ),
    ]
    # The same three in float16 (test_conformance_half_adapters.py).
    entries += [
        Entry("third-party", f"{name}-float16", function, loss, backend, "float16", half)
        for name, function, loss, backend in (
            ("HF CLIP", half_adapters.hf_clip_loss, "softmax", "torch"),
            ("torchmultimodal", half_adapters.torchmultimodal_contrastive_loss, "softmax", "torch"),
            ("big_vision", half_adapters.big_vision_sigmoid_loss, "sigmoid", "jax"),
        )
    ]
    skipped: list[str] = []
    try:
        importlib.metadata.version("open-clip-torch")
        entries += _open_clip_entries()
    except importlib.metadata.PackageNotFoundError:
        skipped.append("open_clip losses (open-clip-torch not installed)")
    for module in ("torch", "jax"):
        if importlib.util.find_spec(module) is None:
            left = [e for e in entries if e.backend == module]
            entries = [e for e in entries if e.backend != module]
            skipped.append(f"{len(left)} {module} entries ({module} not installed)")
    return entries, skipped


def judge(entry: Entry) -> Verdict:
    """Run the suite on one entry as its own test does."""
    report = check(
        entry.func,
        loss=entry.loss,
        backend=entry.backend,
        dtype=entry.dtype,
        ids=entry.ids,
        scalar_dtype=entry.scalar_dtype,
    )
    return Verdict(entry, not report.passed, frozenset(report.codes))


class Score(NamedTuple):
    """Counts over a set of verdicts: wrong ones caught and named, right ones rejected."""

    wrong: int
    caught: int
    named: int
    right: int
    alarms: int

    @property
    def recall(self) -> float:
        """Share of the wrong implementations rejected."""
        return self.caught / self.wrong if self.wrong else 1.0

    @property
    def false_alarms(self) -> float:
        """Share of the right implementations rejected."""
        return self.alarms / self.right if self.right else 0.0

    @property
    def name_share(self) -> float:
        """Share of the rejected wrong implementations given their expected code."""
        return self.named / self.caught if self.caught else 1.0


def score(verdicts: Iterable[Verdict]) -> Score:
    """Score verdicts: recall, false alarms and named share, as counts."""
    verdicts = list(verdicts)
    wrong = [v for v in verdicts if v.entry.code is not None]
    caught = [v for v in wrong if v.rejected]
    named = [v for v in caught if v.entry.code in v.codes]
    right = [v for v in verdicts if v.entry.code is None]
    alarms = [v for v in right if v.rejected]
    return Score(len(wrong), len(caught), len(named), len(right), len(alarms))


def _share(part: int, whole: int) -> str:
    """``part/whole (pct)``, or a dash where there is nothing to count."""
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "-"


def _row(label: str, s: Score) -> str:
    cells = (_share(s.caught, s.wrong), _share(s.alarms, s.right), _share(s.named, s.caught))
    return f"| {label} | {' | '.join(cells)} |"


def table(verdicts: list[Verdict]) -> str:
    """The markdown table: one row per catalogue and one for all, then the misses."""
    lines = [
        "| catalogue | recall (wrong rejected) | false alarms (right rejected) "
        "| named (expected code) |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(v.entry.catalogue for v in verdicts):
        lines.append(_row(f"`{name}`", score(v for v in verdicts if v.entry.catalogue == name)))
    lines.append(_row("**all**", score(verdicts)))
    for v in verdicts:
        wrong = v.entry.code is not None
        if v.rejected != wrong or (wrong and v.entry.code not in v.codes):
            lines.append(
                f"\nmiss: {v.entry.name} ({v.entry.dtype}): rejected={v.rejected}, "
                f"expected {v.entry.code}, codes {sorted(v.codes)}"
            )
    return "\n".join(lines)


def main() -> int:
    """Judge the whole catalogue and print its table."""
    entries, skipped = catalogue()
    verdicts = [judge(entry) for entry in entries]
    print(table(verdicts))
    for line in skipped:
        print(f"\nleft out: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
