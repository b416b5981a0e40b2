"""The reference of ``run --verify``: the dense float64 formulas, evaluated by row blocks.

``run --verify`` compares a run with the textbook formulas in float64 NumPy. Evaluated on the
whole m x k matrix (:func:`portable_siglip._reference.dense_loss_and_grad`), that reference
holds several m x k float64 matrices at once, about ten times the memory of the blockwise
run it checks (4.1 GB against 0.43 GB at n = 8192). :func:`reference_loss_and_grad` computes
the same formulas on a few rows of images at a time, so its memory is the features, the
gradients and a few (rows, k) blocks, each about a quarter of the features' bytes
(:func:`block_rows`); it never forms the m x k matrix.

It stays independent of the library's kernels: plain NumPy, float64, the formulas of
docs/math.md written out again here (no tiles, no workspace, no ``_tilemath``). Which formula
a loss uses is read from the dense reference it registers (:mod:`portable_siglip._registry`):
the sigmoid and softmax formulas of :mod:`portable_siglip._reference` are evaluated by row
blocks; a loss registering another formula is evaluated densely by that formula.

:func:`compare` judges a run's value against the reference: the normwise relative error,
measured against no magnitude below the smallest normal number of the run's dtype, where the
dtype's relative precision ends (a float32 gradient of 1e-302 is correctly 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .. import _reference
from .. import _registry as registry

__all__ = ["MIN_ROWS", "block_rows", "compare", "reference_loss_and_grad", "smallest_normal"]

#: The fewest rows of a block: below this the loop and the (k, d) update of the text
#: gradient that each block makes cost more than its arithmetic.
MIN_ROWS = 16


def block_rows(m: int, k: int, d: int) -> int:
    """Rows of images per block: a (rows, k) float64 block is a quarter of the features.

    A block of ``rows = (m + k) d / (4 k)`` rows takes a quarter of the bytes of the float64
    features ((m + k) d values), so the reference needs memory in proportion to the features
    and gradients, as the run does, never to m k; at least :data:`MIN_ROWS` rows, at most m.
    With m = k that is d / 2 rows, enough for the products to run at the speed of one GEMM.

    Examples
    --------
    >>> block_rows(8192, 8192, 512)  # 256 rows x 8192 texts x 8 bytes = 16 MiB of 64 MiB
    256
    >>> block_rows(2048, 2048, 8)  # at least MIN_ROWS
    16
    >>> block_rows(10, 10, 512)  # a small batch is one block
    10
    """
    return max(1, min(m, max(MIN_ROWS, (m + k) * d // (4 * max(k, 1)))))


class _Problem:
    """The float64 features, the ids and the row blocks of one reference evaluation."""

    def __init__(self, img: Any, txt: Any, img_ids: Any, txt_ids: Any, rows: int | None) -> None:
        import numpy as np

        self.np = np
        self.img = np.asarray(img, dtype=np.float64)
        self.txt = np.asarray(txt, dtype=np.float64)
        self.m, self.k = self.img.shape[0], self.txt.shape[0]
        self.img_ids = None if img_ids is None else np.asarray(img_ids)
        self.txt_ids = None if txt_ids is None else np.asarray(txt_ids)
        default = block_rows(self.m, self.k, self.img.shape[1])
        self.rows = default if rows is None else max(1, int(rows))

    def blocks(self) -> Iterator[tuple[slice, Any, Any]]:
        """Each row block: its rows, ``S = img[rows] @ txt.T`` and its 0/1 positives."""
        np = self.np
        img_ids, txt_ids = self.img_ids, self.txt_ids
        if img_ids is None or txt_ids is None:  # the diagonal: pair (i, i)
            img_ids, txt_ids = np.arange(self.m), np.arange(self.k)
        for start in range(0, self.m, self.rows):
            rows = slice(start, min(start + self.rows, self.m))
            sims = self.img[rows] @ self.txt.T
            positive = (img_ids[rows, None] == txt_ids[None, :]).astype(np.float64)
            yield rows, sims, positive


class _Gradients:
    """Sums of the chain rule over the row blocks: dX = t G Y, dY = t G^T X, dt, db."""

    def __init__(self, problem: _Problem, scale: float) -> None:
        np = problem.np
        self.problem = problem
        self.scale = scale
        self.img = np.zeros_like(problem.img)
        self.txt = np.zeros_like(problem.txt)
        self.d_scale = 0.0
        self.d_bias = 0.0

    def add(self, rows: slice, sims: Any, dlogits: Any) -> None:
        """Add the part of the row block `rows` whose ``G = dL/dZ`` is `dlogits`."""
        problem = self.problem
        self.img[rows] = self.scale * (dlogits @ problem.txt)
        self.txt += self.scale * (dlogits.T @ problem.img[rows])
        self.d_scale += float((dlogits * sims).sum())
        self.d_bias += float(dlogits.sum())


def _sigmoid(problem: _Problem, scale: float, bias: float) -> tuple[float, _Gradients]:
    """Evaluate ``L = (1/m) sum softplus(-l Z)``, ``G = (sigmoid(Z) - P) / m`` in one pass."""
    np = problem.np
    grads = _Gradients(problem, scale)
    total = 0.0
    for rows, sims, positive in problem.blocks():
        logits = scale * sims
        logits += bias
        terms = 2.0 * positive - 1.0  # the labels l = 2P - 1, then softplus(-l Z)
        terms *= logits
        total += float(np.logaddexp(0.0, np.negative(terms, out=terms), out=terms).sum())
        del terms
        # sigmoid(Z) = exp(-softplus(-Z)), in the logits' block; then G = (sigmoid(Z) - P) / m.
        dlogits = np.negative(np.logaddexp(0.0, np.negative(logits, out=logits), out=logits))
        np.exp(dlogits, out=dlogits)
        dlogits -= positive
        dlogits /= problem.m
        del logits, positive
        grads.add(rows, sims, dlogits)
    return total / problem.m, grads


def _softmax(problem: _Problem, scale: float, bias: float) -> tuple[float, _Gradients]:
    """Evaluate the symmetric CLIP loss (no bias): a pass for the columns, then the rows.

    The first pass gathers each column's log-sum-exp (a running maximum and the sum of
    exponentials rescaled to it) and its number of positives; the second forms each row
    block's row and column log-softmax, its loss terms and ``G``.
    """
    np = problem.np
    top = np.full(problem.k, -np.inf)
    total = np.zeros(problem.k)
    positives = np.zeros(problem.k)
    for _, sims, positive in problem.blocks():
        logits = scale * sims
        new = np.maximum(top, logits.max(axis=0))
        total = total * np.exp(top - new) + np.exp(logits - new).sum(axis=0)
        top = new
        positives += positive.sum(axis=0)
    column_lse = top + np.log(total)
    grads = _Gradients(problem, scale)
    row_terms = column_terms = 0.0
    for rows, sims, positive in problem.blocks():
        # In place where a block can be reused: the reference holds a few blocks, not ten.
        by_column = scale * sims
        by_row = by_column - by_column.max(axis=1, keepdims=True)
        by_row -= np.log(np.exp(by_row).sum(axis=1, keepdims=True))
        by_column -= column_lse
        row_mean = positive / positive.sum(axis=1, keepdims=True)
        positive /= positives  # now the column means
        row_terms += float(np.vdot(row_mean, by_row))
        column_terms += float(np.vdot(positive, by_column))
        dlogits = np.exp(by_row, out=by_row)
        dlogits -= row_mean
        dlogits /= 2 * problem.m
        column = np.exp(by_column, out=by_column)
        column -= positive
        column /= 2 * problem.k
        dlogits += column
        del by_column, column, row_mean, positive
        grads.add(rows, sims, dlogits)
    return -(row_terms / problem.m + column_terms / problem.k) / 2, grads


#: The dense formulas of :mod:`portable_siglip._reference` this module evaluates by row blocks.
_BY_ROWS: dict[Callable[..., Any], Callable[..., tuple[float, _Gradients]]] = {
    _reference.dense_sigmoid: _sigmoid,
    _reference.dense_softmax: _softmax,
}


def reference_loss_and_grad(
    loss: str,
    img: Any,
    txt: Any,
    scale: float,
    bias: float,
    img_ids: Any = None,
    txt_ids: Any = None,
    *,
    rows: int | None = None,
) -> tuple[float, Any, Any, float, float]:
    """Loss and the four gradients of `loss` in float64, by row blocks of the dense formula.

    The same values as :func:`portable_siglip._reference.dense_loss_and_grad` (to rounding),
    without ever holding the m x k matrix: each block of `rows` images meets every text.

    Parameters
    ----------
    loss : str
        The name of a registered loss.
    img, txt : numpy.ndarray, shape (m, d) and (k, d)
        Features (converted to float64); m == k without ids.
    scale, bias : float
        ``t`` and ``b``.
    img_ids, txt_ids : numpy.ndarray, optional
        Ids of the rows (several positives per row); without them the diagonal.
    rows : int, optional
        Images per block; by default :func:`block_rows` (a block is about a quarter of
        the features' bytes).

    Returns
    -------
    tuple
        ``(loss, d_img, d_txt, d_scale, d_bias)``, ``d_bias`` 0 for a loss the bias does
        not change.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip  # registers the losses
    >>> value, *_ = reference_loss_and_grad("softmax", np.eye(2), np.eye(2), 1.0, 0.0, rows=1)
    >>> round(value, 6)
    0.313262
    """
    spec = registry.get(loss)
    by_rows = _BY_ROWS.get(spec.dense)
    if by_rows is None:  # a formula of its own: only the whole matrix is known to work
        return _reference.dense_loss_and_grad(loss, img, txt, scale, bias, img_ids, txt_ids)
    problem = _Problem(img, txt, img_ids, txt_ids, rows)
    value, grads = by_rows(problem, float(scale), float(bias))
    d_bias = grads.d_bias if spec.uses_bias else 0.0
    return value, grads.img, grads.txt, grads.d_scale, d_bias


def smallest_normal(dtype: Any) -> float:
    """Return the smallest positive normal number of a floating dtype, or of its name.

    NumPy's dtypes and names, and ``"bfloat16"`` (ml_dtypes' type, which NumPy lacks).

    Examples
    --------
    >>> import numpy as np
    >>> smallest_normal(np.float16)
    6.103515625e-05
    >>> smallest_normal("bfloat16") == smallest_normal("float32")
    True
    """
    import numpy as np

    if isinstance(dtype, str) and dtype == "bfloat16":
        return 2.0**-126  # 8 exponent bits, as float32
    try:
        return float(np.finfo(dtype).tiny)
    except ValueError:  # ml_dtypes' bfloat16: NumPy has no finfo of it
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).tiny)  # type: ignore[no-untyped-call]


def compare(
    got: Any, want: Any, rtol: float, *, dtype: Any = None, size: float = 0.0
) -> tuple[float, bool]:
    """Judge a run's value `got` against the float64 reference `want`.

    The error is normwise, ``max |got - want|``, relative to the largest of ``max |want|``,
    `size` and the smallest normal number of the run's `dtype`. Below that number the dtype
    has only absolute precision: a reference that underflows there (gradients of a scale of
    1e-300 in float32) is met by the correctly rounded result, often 0, which a purely
    relative error would call 100% wrong. Above it the rule is the plain relative error.

    Parameters
    ----------
    got : array_like
        The run's value (as a NumPy array or scalar of any floating dtype).
    want : array_like
        The reference, float64.
    rtol : float
        The largest relative error accepted.
    dtype : dtype or str, optional
        The dtype the run computed in; by default `got`'s.
    size : float, optional
        Another magnitude to measure the error against (the loss, for its scalar
        gradients, which are sums of terms that cancel).

    Returns
    -------
    rel, ok : (float, bool)
        The relative error, and whether it is within `rtol` and every value finite.

    Examples
    --------
    >>> import numpy as np
    >>> compare(np.zeros(2), np.full(2, 1e-302), 1e-4, dtype="float32")[1]
    True
    >>> compare(np.zeros(2), np.full(2, 1e-302), 1e-4, dtype="float64")[1]
    False
    >>> compare(np.float32(1.5), 1.0, 1e-4)[1]
    False
    """
    import numpy as np

    got_np = np.asarray(got)
    want_np = np.asarray(want, dtype=np.float64)
    floor = smallest_normal(got_np.dtype if dtype is None else dtype)
    reference = max(float(np.max(np.abs(want_np))), size, floor)
    error = float(np.max(np.abs(got_np.astype(np.float64) - want_np)))
    rel = error / reference
    return rel, bool(np.all(np.isfinite(got_np.astype(np.float64)))) and rel <= rtol
