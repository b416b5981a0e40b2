"""Golden cases with ids: several positives per row, duplicates and rectangular batches.

An implementation that supports ``img_ids``/``txt_ids`` (docs/multi-positive.md) is judged
on these cases with ``check(..., ids=True)`` or ``--ids``: it is called as
``f(img, txt, scale, bias, img_ids=..., txt_ids=...)`` with ``img`` (m, d), ``txt`` (k, d)
and integer ids, pair (i, j) positive iff ``img_ids[i] == txt_ids[j]``.

The cases ship in ``goldens_ids.json.gz``, written by
``python -m portable_siglip.conformance._ids`` from fixed seeds: inputs on the bfloat16 grid
(exact in every dtype), outputs from mpmath at 50 significant digits following the formulas
of docs/math.md ("Several positives per row"), never from the code under test. The same
bytes on every run.

:func:`diagnose_ids` names the usual mistakes of a multi-positive loss, each predicted
densely in float64 from the case's inputs: the ids ignored (diagonal labels), the log inside
the sum over positives, only the first positive of each row counted, the positives
summed instead of averaged, the sigmoid sum divided by k instead of m, and the loss divided
by the number of positive pairs instead of by the rows.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from ._cases import Case, Golden, normalise, to_grid

__all__ = [
    "IDS_GOLDENS_PATH",
    "bind_ids",
    "diagnose_ids",
    "ids_cases",
    "load_ids_cases",
    "main",
]

IDS_GOLDENS_PATH = Path(__file__).with_name("goldens_ids.json.gz")

#: Working precision of mpmath, in significant decimal digits.
DIGITS = 50

Finding = tuple[str, str]


# --------------------------------------------------------------------------- the cases


def _spec() -> list[dict[str, Any]]:
    """Name, seed, shapes, ids and scale/bias of every case (ids as lists of ints)."""
    import numpy as np

    specs: list[dict[str, Any]] = []

    def add(name: str, seed: int, d: int, img_ids: Any, txt_ids: Any, t: float, b: float) -> None:
        specs.append(
            {
                "name": name,
                "seed": seed,
                "d": d,
                "img_ids": [int(v) for v in img_ids],
                "txt_ids": [int(v) for v in txt_ids],
                "scale": t,
                "bias": b,
            }
        )

    rng = np.random.default_rng(1700)
    # COCO-like: 4 images, 3 captions each, shuffled.
    add(
        "ids-captions-m4-k12-d8",
        1,
        8,
        range(4),
        rng.permutation(np.repeat(range(4), 3)),
        10.0,
        -10.0,
    )
    # Square with duplicates on both sides (an implementation ignoring the ids can run).
    add(
        "ids-duplicates-n9-d16",
        2,
        16,
        [0, 0, 1, 2, 3, 3, 4, 5, 6],
        rng.permutation([0, 1, 1, 2, 3, 4, 5, 5, 6]),
        5.0,
        -3.0,
    )
    # More images than texts: duplicate images.
    add("ids-images-m7-k5-d4", 3, 4, [0, 1, 1, 2, 3, 3, 4], [4, 3, 2, 1, 0], 8.0, -4.0)
    # Unique ids, texts permuted: the diagonal loss of the matched pairs.
    add("ids-unique-n6-d8", 4, 8, range(6), rng.permutation(6), 10.0, -10.0)
    # A tile's edge inside groups: 33 images, 65 captions (1 to 3 each), ids not sorted.
    counts = 1 + np.arange(33) % 3
    counts[-1] += 65 - int(counts.sum())
    add(
        "ids-tiles-m33-k65-d32",
        5,
        32,
        rng.permutation(33),
        rng.permutation(np.repeat(np.arange(33), counts)),
        20.0,
        -5.0,
    )
    # A trained SigLIP's scale and bias: logits in the hundreds.
    add(
        "ids-trained-m8-k10-d8",
        6,
        8,
        [0, 1, 2, 2, 3, 4, 5, 6],
        [6, 5, 4, 3, 2, 2, 1, 0, 0, 4],
        118.0,
        -13.0,
    )
    return specs


def _inputs(spec: dict[str, Any]) -> tuple[Any, Any]:
    """Image rows, and caption rows near their image's, on the bfloat16 grid."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    img_ids, txt_ids = spec["img_ids"], spec["txt_ids"]
    d = spec["d"]
    img = normalise(rng.standard_normal((len(img_ids), d)))
    first = {value: i for i, value in reversed(list(enumerate(img_ids)))}
    near = img[[first[value] for value in txt_ids]]
    txt = normalise(near + 0.7 * rng.standard_normal((len(txt_ids), d)) / math.sqrt(d))
    return to_grid(img), to_grid(txt)


def _mp_goldens(
    img: Any, txt: Any, img_ids: list[int], txt_ids: list[int], t: float, b: float
) -> dict[str, dict[str, Any]]:
    """Both losses and their gradients with ids, in mpmath, rounded to float64."""
    mpmath: Any = importlib.import_module("mpmath")  # untyped
    mp = mpmath.mp
    mp.dps = DIGITS
    m, k, d = len(img_ids), len(txt_ids), img.shape[1]
    A = [[mp.mpf(float(v)) for v in row] for row in img]
    B = [[mp.mpf(float(v)) for v in row] for row in txt]
    S = [[mp.fdot(a, c) for c in B] for a in A]
    tt, bb = mp.mpf(t), mp.mpf(b)
    Z = [[tt * S[i][j] + bb for j in range(k)] for i in range(m)]
    P = [[img_ids[i] == txt_ids[j] for j in range(k)] for i in range(m)]

    # Sigmoid: L = (1/m) sum softplus(-l Z), G = (sigmoid(Z) - P) / m, each entry exact.
    terms, G_sig = [], []
    for i in range(m):
        row = []
        for j in range(k):
            z = Z[i][j]
            if P[i][j]:
                terms.append(mp.log1p(mp.exp(-z)))
                row.append(-1 / (1 + mp.exp(z)) / m)
            else:
                terms.append(mp.log1p(mp.exp(z)))
                row.append(1 / (1 + mp.exp(-z)) / m)
        G_sig.append(row)
    sigmoid_loss = mp.fsum(terms) / m

    # Softmax: each direction a cross-entropy against the uniform target on its positives.
    def direction(rows: list[list[Any]], mask: list[list[bool]]) -> tuple[Any, list[list[Any]]]:
        total, grad = [], []
        for z, positive in zip(rows, mask, strict=True):
            count = sum(positive)
            top = max(z)
            lse = top + mp.log(mp.fsum(mp.exp(v - top) for v in z))
            mean = mp.fsum(v for v, p in zip(z, positive, strict=True) if p) / count
            total.append(lse - mean)
            grad.append(
                [
                    mp.exp(v - lse) - (mp.mpf(1) / count if p else 0)
                    for v, p in zip(z, positive, strict=True)
                ]
            )
        return mp.fsum(total) / len(rows), grad

    columns = [[Z[i][j] for i in range(m)] for j in range(k)]
    col_mask = [[P[i][j] for i in range(m)] for j in range(k)]
    image_to_text, R = direction(Z, P)
    text_to_image, C = direction(columns, col_mask)
    softmax_loss = (image_to_text + text_to_image) / 2
    G_soft = [[(R[i][j] / m + C[j][i] / k) / 2 for j in range(k)] for i in range(m)]

    def chain(G: list[list[Any]]) -> dict[str, Any]:
        cols = [[G[i][j] for i in range(m)] for j in range(k)]
        return {
            "img": [
                [float(tt * mp.fdot(G[i], [B[j][c] for j in range(k)])) + 0.0 for c in range(d)]
                for i in range(m)
            ],
            "txt": [
                [float(tt * mp.fdot(cols[j], [A[i][c] for i in range(m)])) + 0.0 for c in range(d)]
                for j in range(k)
            ],
            "scale": float(mp.fsum(mp.fdot(G[i], S[i]) for i in range(m))) + 0.0,
            "bias": float(mp.fsum(mp.fsum(row) for row in G)) + 0.0,
        }

    sigmoid = {"loss": float(sigmoid_loss), **chain(G_sig)}
    softmax = {
        "loss": float(softmax_loss),
        **chain(G_soft),
        "extra": {"image_to_text": float(image_to_text), "text_to_image": float(text_to_image)},
    }
    softmax["bias"] = 0.0  # exactly: each direction's G sums to zero
    return {"sigmoid": sigmoid, "softmax": softmax}


def ids_cases() -> list[dict[str, Any]]:
    """Every ids case as written to the data file (inputs, ids and goldens)."""
    import numpy as np

    out = []
    for spec in _spec():
        img, txt = _inputs(spec)
        logits = spec["scale"] * (img @ txt.T) + spec["bias"]
        out.append(
            {
                "name": spec["name"],
                "img": img.tolist(),
                "txt": txt.tolist(),
                "img_ids": spec["img_ids"],
                "txt_ids": spec["txt_ids"],
                "scale": spec["scale"],
                "bias": spec["bias"],
                "max_abs_logit": float(np.max(np.abs(logits))),
                "goldens": _mp_goldens(
                    img, txt, spec["img_ids"], spec["txt_ids"], spec["scale"], spec["bias"]
                ),
            }
        )
    return out


@cache
def load_ids_cases() -> tuple[Case, ...]:
    """Load the ids cases from ``goldens_ids.json.gz`` (cached; arrays read-only).

    Examples
    --------
    >>> cases = load_ids_cases()
    >>> case = cases[0]
    >>> case.img_ids.shape == (case.n,) and case.txt_ids.shape == (case.k,)
    True
    """
    import numpy as np

    def frozen(values: Any, dtype: Any) -> Any:
        array = np.array(values, dtype=dtype)
        array.setflags(write=False)
        return array

    with gzip.open(IDS_GOLDENS_PATH, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    cases = []
    for raw in data["cases"]:
        goldens = {
            loss: Golden(
                loss=float(g["loss"]),
                img=frozen(g["img"], np.float64),
                txt=frozen(g["txt"], np.float64),
                scale=float(g["scale"]),
                bias=float(g["bias"]),
                extra={key: float(v) for key, v in g.get("extra", {}).items()},
            )
            for loss, g in raw["goldens"].items()
        }
        cases.append(
            Case(
                name=raw["name"],
                img=frozen(raw["img"], np.float64),
                txt=frozen(raw["txt"], np.float64),
                scale=float(raw["scale"]),
                bias=float(raw["bias"]),
                tags=frozenset({"ids"}),
                max_abs_logit=float(raw["max_abs_logit"]),
                goldens=goldens,
                img_ids=frozen(raw["img_ids"], np.int64),
                txt_ids=frozen(raw["txt_ids"], np.int64),
            )
        )
    return tuple(cases)


def bind_ids(function: Callable[..., Any], case: Case, backend: str) -> Callable[..., Any]:
    """Return ``f(img, txt, scale, bias)`` calling `function` with the case's ids as keywords.

    The ids become integer arrays of the library and device of ``img`` at each call (int32
    for jax, whose int64 needs x64; int64 elsewhere); under ``jax.jit`` they are constants
    of the traced program.
    """
    import numpy as np

    kind = np.int32 if backend == "jax" else np.int64
    ids = [np.asarray(values, dtype=kind) for values in (case.img_ids, case.txt_ids)]

    def call(img: Any, txt: Any, scale: Any, bias: Any, **kwargs: Any) -> Any:
        import array_api_compat

        xp = array_api_compat.array_namespace(img)
        if array_api_compat.is_jax_namespace(xp):
            made = [xp.asarray(values) for values in ids]
        else:
            device = array_api_compat.device(img)
            made = [xp.asarray(values.copy(), device=device) for values in ids]
        return function(img, txt, scale, bias, img_ids=made[0], txt_ids=made[1], **kwargs)

    call.__module__ = getattr(function, "__module__", None) or "?"
    call.__qualname__ = getattr(function, "__qualname__", None) or type(function).__name__
    return call


# --------------------------------------------------------------------------- diagnoses


def _sigmoid_ids(logits: Any, rows: Any, cols: Any, variant: str) -> float:
    """Return the sigmoid loss of `logits` with the positives `rows`, as a mistake makes it."""
    import numpy as np

    if variant in ("log-inside", "positives-summed"):
        return math.nan  # softmax mistakes
    labels = np.where(rows, 1.0, -1.0)
    # The sum over the pairs divided by m (the images), or by mistake by k (the texts) or by
    # the number of positive pairs.
    counts = {"normalised-by-k": logits.shape[1], "normalised-by-positives": np.sum(rows)}
    count = counts.get(variant, logits.shape[0])
    if count == 0:
        return math.nan
    return float(np.logaddexp(0.0, -labels * logits).sum() / count)


def _softmax_ids(logits: Any, rows: Any, cols: Any, variant: str) -> float:
    """Return the softmax loss of `logits` with positives `rows` (`cols`: text to image)."""
    import numpy as np

    if variant == "normalised-by-k":
        return math.nan  # a sigmoid mistake: each softmax direction averages its own rows

    def direction(z: Any, mask: Any) -> float:
        lse = np.logaddexp.reduce(z, axis=1)
        if variant == "log-inside":  # -log of the softmax mass of the positives
            chosen = np.where(mask, z, -np.inf)
            return float(np.mean(lse - np.logaddexp.reduce(chosen, axis=1)))
        if variant == "positives-summed":  # every positive a full cross-entropy term
            return float(np.mean(np.sum(np.where(mask, lse[:, None] - z, 0.0), axis=1)))
        if variant == "normalised-by-positives":  # the mean over all positive pairs
            return float(np.sum(np.where(mask, lse[:, None] - z, 0.0)) / np.sum(mask))
        mean = np.sum(np.where(mask, z, 0.0), axis=1) / np.sum(mask, axis=1)
        return float(np.mean(lse - mean))

    return (direction(logits, rows) + direction(logits.T, cols.T)) / 2


#: Each loss's dense float64 formula with ids, as the mistakes of :data:`MISTAKES` compute it.
_IDS_LOSSES = {"sigmoid": _sigmoid_ids, "softmax": _softmax_ids}


def _dense(loss: str, case: Case, variant: str) -> float:
    """Return the loss a mistaken implementation gives on `case`, densely in float64.

    NaN where the mistake does not apply: to that loss, to that case, or to a loss the
    suite has no formula with ids for.
    """
    import numpy as np

    formula = _IDS_LOSSES.get(loss)
    if formula is None:
        return math.nan
    img, txt = np.asarray(case.img), np.asarray(case.txt)
    m, k = img.shape[0], txt.shape[0]
    logits = case.scale * (img @ txt.T) + case.bias
    positive = np.asarray(case.img_ids)[:, None] == np.asarray(case.txt_ids)[None, :]
    if variant == "ids-ignored":
        if m != k:
            return math.nan
        positive = np.eye(m, dtype=bool)
    if variant == "first-positive":  # each row (column) keeps only its first positive
        rows = np.zeros_like(positive)
        rows[np.arange(m), np.argmax(positive, axis=1)] = True
        cols = np.zeros_like(positive)
        cols[np.argmax(positive, axis=0), np.arange(k)] = True
    else:
        rows = cols = positive
    return formula(logits, rows, cols, variant)


#: Mistake code -> what it means, for the report.
MISTAKES = {
    "ids-ignored": (
        "the ids are ignored: the loss is the one with the diagonal labels (pair i with text "
        "i), as if `img_ids`/`txt_ids` were not passed; duplicates stay negatives"
    ),
    "log-inside": (
        "the log is inside the sum over positives: -log(sum of the softmax over a row's "
        "positives), the positives merged into one class (SupCon's L_in); this library "
        "averages -log softmax over the positives (L_out, docs/multi-positive.md)"
    ),
    "first-positive": (
        "only one positive per row counts (the first match, as integer class labels do); the "
        "other positives are treated as negatives"
    ),
    "positives-summed": (
        "the positives are summed, not averaged: a row with c positives weighs c times; "
        "divide each row's positive terms by its number of positives"
    ),
    "normalised-by-k": (
        "the sum over the m x k pairs is divided by k, the number of texts, instead of m, the "
        "number of images (the rows): the loss is off by m / k wherever m != k"
    ),
    "normalised-by-positives": (
        "the loss is divided by the number of positive pairs instead of by the rows: sigmoid, "
        "the sum over the m x k pairs divided by the P positive pairs instead of m (off by "
        "m / P); softmax, each direction's -log softmax summed over all its positive pairs "
        "and divided by their number ((mask * -log_prob).sum() / mask.sum()), so a row with "
        "c positives weighs c times; average each row over its own positives, then the rows"
    ),
}

#: The finding of a failed ids run that no mistake of :data:`MISTAKES` fits.
NONE_FITS = (
    "unknown",
    "none of the known mistakes of a multi-positive loss ("
    + ", ".join(MISTAKES)
    + ") fits these failures; the table lists every failed check",
)

#: The finding of an implementation that does not take the ids.
IDS_NOT_ACCEPTED = "ids-not-accepted"


def accepts_ids(function: Callable[..., Any]) -> bool | None:
    """Whether `function` can be called with the keywords ``img_ids`` and ``txt_ids``.

    None when its signature cannot be read (a builtin, some C extensions): then only the
    call tells.
    """
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in parameters if p.kind in keyword}
    return {"img_ids", "txt_ids"} <= names


def refused_ids(error: str | None) -> bool:
    """Whether a call's error `error` is Python refusing the keywords ``img_ids``/``txt_ids``."""
    return bool(
        error
        and error.startswith("TypeError")
        and "keyword argument" in error
        and ("'img_ids'" in error or "'txt_ids'" in error)
    )


def ids_not_accepted(function: Callable[..., Any], errors: Sequence[str | None]) -> list[Finding]:
    """Return the finding of an implementation without ``img_ids``/``txt_ids``, if it is one.

    It is one when its signature has neither keyword (nor ``**kwargs``) and no call worked,
    or when every call failed with Python's TypeError about those keywords.
    """
    failed = all(error is not None for error in errors)
    refused = any(refused_ids(error) for error in errors)
    if not failed or not (refused or accepts_ids(function) is False):
        return []
    message = next((e for e in errors if refused_ids(e)), errors[0] if errors else "")
    return [
        (
            IDS_NOT_ACCEPTED,
            "the implementation does not accept the keyword arguments `img_ids` and "
            "`txt_ids`: with ids (--ids, check(..., ids=True)) it is called as "
            "f(img, txt, scale, bias, img_ids=..., txt_ids=...), and every call failed"
            f" ({str(message)[:200]}). Judge a loss with one positive per row without --ids, "
            "or give it those two parameters (docs/multi-positive.md)",
        )
    ]


def diagnose_ids(
    loss: str,
    cases: Sequence[Case],
    losses: dict[str, float | None],
    failed: set[str],
    tolerance: Callable[[Case], float],
) -> list[Finding]:
    """Name the mistake whose predicted loss matches the implementation on every failed case.

    Parameters
    ----------
    loss : str
        The loss judged (a loss without a formula here gets no finding).
    cases : sequence of Case
        The ids cases run.
    losses : dict
        Case name -> the implementation's loss (None where it returned none).
    failed : set of str
        Names of the cases with a failed loss check.
    tolerance : callable
        Relative tolerance of a loss comparison on a case.

    Returns
    -------
    list of (code, message)
        At most one finding: a mistake is named only when its prediction differs from the
        golden and matches the implementation on every failed case where it is defined.
    """
    judged = [case for case in cases if case.name in failed and losses.get(case.name) is not None]
    if not judged:
        return []
    for code, meaning in MISTAKES.items():
        matched = 0
        for case in judged:
            predicted = _dense(loss, case, code)
            if math.isnan(predicted):
                continue
            golden = case.goldens[loss].loss
            value = losses[case.name]
            assert value is not None
            scale = max(abs(golden), 1e-300)
            if abs(predicted - golden) <= 10 * tolerance(case) * scale:
                continue  # the mistake does not show on this case
            if abs(value - predicted) > tolerance(case) * max(abs(predicted), 1e-300):
                break
            matched += 1
        else:
            if matched:
                return [(code, f"{meaning} (matches on {matched} failed ids cases)")]
    return []


# --------------------------------------------------------------------------- generation


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``goldens_ids.json.gz`` (or ``--out PATH``)."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_siglip.conformance._ids",
        description="Generate the golden cases with ids (mpmath, 50 digits).",
    )
    parser.add_argument("--out", type=Path, default=IDS_GOLDENS_PATH, help="output file")
    args = parser.parse_args(argv)
    cases = ids_cases()
    document = {"digits": DIGITS, "cases": cases}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    # No file name and no time in the gzip header: the same bytes on every run.
    with args.out.open("wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    print(f"wrote {len(cases)} cases to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
