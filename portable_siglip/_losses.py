"""Public entry points: the sigmoid and softmax losses, alone or with their gradients.

Each loss is evaluated by one function of the form ``evaluate(loss, problem, ring, grad=...)``
(the passes over the tiles, alone or round the ring, the normaliser and the gradient
assembly) and described once by a :class:`._registry.Loss`, registered at the end of this
module, which every other layer reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import _reference
from ._checks import Problem
from ._distributed import Ring, circulate, global_sums, setup
from ._precision import full_precision
from ._registry import Loss, register
from ._sigmoid import sigmoid_sums
from ._softmax import (
    lse_excess,
    matched_excess,
    merge_lse_pairs,
    softmax_grad_sums,
    softmax_lse,
    weigh_columns,
)
from ._tilemath import sigmoid_tile, softmax_grad_tile
from ._tiles import Positives
from ._typing import Array
from .comm import Communicator, SelfComm

__all__ = [
    "SIGMOID",
    "SOFTMAX",
    "Gradients",
    "evaluate",
    "loss_functions",
    "sigmoid_loss",
    "sigmoid_loss_and_grad",
    "softmax_loss",
    "softmax_loss_and_grad",
]


class Gradients(NamedTuple):
    """Gradients of a loss with respect to each of its four inputs.

    Attributes
    ----------
    img : array, shape (n, d)
        ``dL/dimg``, in the dtype of ``img`` (n its rows: m with ids).
    txt : array, shape (n, d)
        ``dL/dtxt``, in the dtype of ``txt`` (k rows with ids, the rows of ``txt``).
    scale : 0-d array
        ``dL/dt`` for the multiplier ``t`` itself (not its log; multiply by ``t`` for
        ``dL/dlog t``), in the dtype of ``scale`` when it is an array, else in the
        accumulation dtype.
    bias : 0-d array
        ``dL/db``, dtype chosen as for ``scale``. Exactly zero for the softmax loss.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> img, txt = np.eye(3), np.eye(3)[::-1]
    >>> loss, grads = ps.sigmoid_loss_and_grad(img, txt, 10.0, -5.0)
    >>> grads.img.shape, grads.txt.shape
    ((3, 3), (3, 3))
    >>> float(grads.bias) < 0  # raising b lowers the loss: most pairs are negatives far below 0
    False
    """

    img: Array
    txt: Array
    scale: Array
    bias: Array


def _scaled_img(problem: Problem) -> Array:
    # Fold t into the image rows once (O(n d)) so every tile is one GEMM plus the bias. With
    # precision "fast" this is the one rounding of an operand the host loops see: the texts
    # are half values already (docs/conventions.md, "Precision").
    return problem.gemm.rounded(problem.img * problem.scale, owned=True)


def _finish(
    problem: Problem,
    img_acc: Array,
    txt_acc: Array,
    scale_sum: Array,
    bias_sum: Array,
    norm: float,
) -> Gradients:
    """Normalise the accumulated (global) sums by ``norm``; return them in the documented dtypes."""
    xp = problem.xp
    return Gradients(
        img=xp.astype(img_acc * (problem.scale / norm), problem.input_dtype, copy=False),
        txt=xp.astype(txt_acc / norm, problem.input_dtype, copy=False),
        scale=xp.astype(scale_sum / norm, problem.scale_dtype, copy=False),
        bias=xp.astype(bias_sum / norm, problem.bias_dtype, copy=False),
    )


def _scale_sum(problem: Problem, img_acc: Array) -> Array:
    # sum_ij G_ij (img_i . txt_j) = sum_i img_i . (G txt)_i, times norm: (n, d), (n, d) -> (n,)
    return problem.xp.sum(problem.xp.vecdot(problem.img, img_acc))


def _block_positives(problem: Problem, home: Any, block: tuple[Array, ...]) -> Positives:
    """Return the positives of this rank's images against a visiting text block.

    With ids the block's ids travel as its second array; without, only the home block
    holds positives (its diagonal).
    """
    if problem.labelled:
        assert problem.img_ids is not None
        return (problem.img_ids, block[1])
    return home


def _travelling(problem: Problem, *extra: Array) -> tuple[Array, ...]:
    """Return the text block as it travels: the texts, their ids (if any), then ``extra``."""
    if problem.labelled:
        assert problem.txt_ids is not None
        return (problem.txt, problem.txt_ids, *extra)
    return (problem.txt, *extra)


class _Sums:
    """Running per-rank sums of the visits of one distributed evaluation."""

    def __init__(self, problem: Problem) -> None:
        self.zero = problem.xp.zeros((), dtype=problem.compute_dtype, device=problem.device)
        self.loss = self.zero
        self.bias = self.zero
        self.img_acc: Array | None = None
        self.rows: Array | None = None

    def add_img(self, part: Array) -> None:
        self.img_acc = part if self.img_acc is None else self.img_acc + part


def _alone(problem: Problem) -> Ring:
    """Return the one-rank ring of a call without ``comm``: its one visit is the home block."""
    return Ring(SelfComm(), (problem.k,), "gather", (problem.n,))


def _sigmoid(
    loss: Loss, problem: Problem, ring: Ring | None, *, grad: bool
) -> tuple[Array, Gradients | None]:
    """Evaluate the sigmoid loss (and gradients) of the global batch in one pass over tiles.

    ``loss.tile`` is the tile formula: :func:`._tilemath.sigmoid_tile`, or that of another
    loss of the sigmoid family (the same labels, normaliser and gradient assembly).
    """
    xp = problem.xp
    ring = ring or _alone(problem)
    scaled_img = _scaled_img(problem)
    state = _Sums(problem)

    def visit(home: Any, block: tuple[Array, ...]) -> tuple[Array, ...]:
        part = sigmoid_sums(
            xp,
            scaled_img,
            block[0],
            problem.bias,
            positives=_block_positives(problem, home, block),
            block_size=problem.block_size,
            grad=grad,
            gemm=problem.gemm,
            tile=loss.tile,
        )
        state.loss = state.loss + part.loss
        if not grad:
            return ()
        state.add_img(part.img_acc)
        state.bias = state.bias + part.bias
        return (part.txt_acc,)

    tails = ((problem.d,),) if grad else ()
    accs = circulate(ring, xp, _travelling(problem), visit, acc_tails=tails, merge="sum")
    if not grad:
        (total,) = global_sums(ring, xp, [state.loss])
        return total / ring.img_total, None
    scale_sum = _scale_sum(problem, state.img_acc)
    total, scale_sum, bias_sum = global_sums(ring, xp, [state.loss, scale_sum, state.bias])
    return total / ring.img_total, _finish(
        problem, state.img_acc, accs[0], scale_sum, bias_sum, ring.img_total
    )


def _softmax(
    loss: Loss, problem: Problem, ring: Ring | None, *, grad: bool
) -> tuple[Array, Gradients | None]:
    """Evaluate the softmax loss (and gradients): a log-sum-exp pass, then a gradient pass.

    Without ids the loss is ``(excess(rows) + excess(cols)) / (2n)``; with ids each direction
    is a mean over its own rows, ``excess(rows) / M + excess(cols) / K``, written as
    ``(excess(rows) + w * excess(cols)) / (2M)`` with ``w = M / K`` so that both cases
    share one normaliser (``w = 1`` without ids). With ``unmatched_txt="negatives"`` the
    columns are averaged over the K' that have a positive (:func:`_matched_columns`).
    """
    xp = problem.xp
    scaled_img = _scaled_img(problem)
    labelled = problem.labelled
    # The diagonal logits Z_ii (without ids); with ids the first pass sums the positives.
    # (From the operands the GEMMs see, so that both passes agree on every logit.)
    diag = None if labelled else problem.gemm.vecdot(scaled_img, problem.txt)
    zero = xp.zeros((), dtype=problem.compute_dtype, device=problem.device)
    ring = ring or _alone(problem)
    state = _Sums(problem)
    weight = ring.img_total / ring.txt_total

    def first(home: Any, block: tuple[Array, ...]) -> tuple[Array, ...]:
        visiting = (problem.img_ids, block[1]) if labelled else None
        part = softmax_lse(
            xp,
            scaled_img,
            block[0],
            block_size=problem.block_size,
            positives=visiting,
            gemm=problem.gemm,
        )
        rows = state.rows
        state.rows = part.rows if rows is None else merge_lse_pairs(xp, rows, part.rows)
        return (part.cols,)

    # The column (M, s) pairs travel as one (n_q, 2) accumulator ((n_q, 4) with the positive
    # counts and sums); M is absolute, so the owner's diagonal logits need not travel.
    tail = ((4,),) if labelled else ((2,),)
    (cols,) = circulate(ring, xp, _travelling(problem), first, acc_tails=tail, merge="lse")
    row_lse = state.rows
    norm = 2.0 * ring.img_total
    local: Array | None = None
    if problem.txt_negatives:
        value, cols = _matched_columns(problem, ring, row_lse, cols)
        if not grad:
            return value, None
        weight = 1.0  # folded into the column pairs
    else:
        local = lse_excess(xp, row_lse, diag) + weight * lse_excess(xp, cols, diag)
        if not grad:
            (total,) = global_sums(ring, xp, [local])
            return total / norm, None

    def second(home: Any, block: tuple[Array, ...]) -> tuple[Array, ...]:
        txt, col_lse = block[0], block[-1]
        img_part, txt_part = softmax_grad_sums(
            xp,
            scaled_img,
            txt,
            row_lse,
            col_lse,
            positives=_block_positives(problem, home, block),
            block_size=problem.block_size,
            col_weight=weight,
            gemm=problem.gemm,
        )
        state.add_img(img_part)
        return (txt_part,)

    (txt_acc,) = circulate(
        ring, xp, _travelling(problem, cols), second, acc_tails=((problem.d,),), merge="sum"
    )
    scale_sum = _scale_sum(problem, state.img_acc)
    if local is None:
        (scale_sum,) = global_sums(ring, xp, [scale_sum])
    else:
        total, scale_sum = global_sums(ring, xp, [local, scale_sum])
        value = total / norm
    return value, _finish(problem, state.img_acc, txt_acc, scale_sum, zero, norm)


def _matched_columns(problem: Problem, ring: Ring, rows: Array, cols: Array) -> tuple[Array, Array]:
    """Return the loss of ``unmatched_txt="negatives"`` and the column pairs for pass two.

    The rows' term is a mean over all M image rows (whose log-sum-exp runs over every text,
    those without a positive included); the columns' term a mean over the K' text columns
    that have a positive, K' summed over the ranks (one extra allgather of three numbers).
    Returns ``(rows / M + cols / K') / 2`` and the column pairs with the weight ``M / K'``
    (0 for a column without a positive) folded in (:func:`._softmax.weigh_columns`).
    docs/math.md, section 9.
    """
    xp = problem.xp
    col_sum, matched = matched_excess(xp, cols)
    row_sum, col_sum, matched = global_sums(ring, xp, [lse_excess(xp, rows), col_sum, matched])
    value = (row_sum / ring.img_total + col_sum / matched) / 2.0
    return value, weigh_columns(xp, cols, ring.img_total / matched)


def sigmoid_loss(
    img: Array,
    txt: Array,
    scale: float | Array,
    bias: float | Array | None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "bidir",
    img_ids: Array | None = None,
    txt_ids: Array | None = None,
    precision: str | None = None,
) -> Array:
    r"""SigLIP sigmoid loss of n image-text pairs, evaluated blockwise.

    .. math::

        L = \frac{1}{n} \sum_{i,j} \operatorname{softplus}(-\ell_{ij} Z_{ij}),
        \qquad Z = t\, \mathrm{img}\, \mathrm{txt}^\top + b,

    with :math:`\ell_{ij} = +1` if :math:`i = j` and :math:`-1` otherwise (Zhai et al.,
    ICCV 2023, Sec. 3): the sum over all n^2 pairs divided by the number of rows, as in the
    paper, open_clip and big_vision.

    Parameters
    ----------
    img, txt : array, shape (n, d)
        Image and text features of one array-API library, same dtype and device; row i of
        each is a matched pair. Usually L2-normalised by the caller.
    scale : float or 0-d array
        The multiplier ``t > 0`` itself (already ``exp(t')`` if you learn ``t'``).
    bias : float, 0-d array or None
        The logit bias ``b``; None means 0.
    block_size : int, optional
        Edge of the square tiles of the n x n logit matrix; None picks a default for the
        device of the inputs: 1024 on the host, 4096 on a GPU (docs/blockwise.md).
        Extra memory is O(n d + block_size^2).
    comm : Communicator, optional
        None (default) evaluates on this process. With a communicator of W ranks
        (:class:`~portable_siglip.backends.mpi.MPIComm`, a
        :class:`~portable_siglip.comm.ThreadGroup` rank, ...), ``img``/``txt`` are this
        rank's shard of a global batch (shards may differ in size); the result is the
        loss of the whole batch, the same on every rank. Every rank must call with the
        same ``strategy``, ``scale``, ``bias``, d and dtype; otherwise every rank raises
        the same error before any data moves.
    strategy : {"bidir", "shift", "reduce", "gather"}
        Distributed schedule (ignored without ``comm``): text blocks travel both ways
        round the ring ("bidir"), one way ("shift"), by broadcast and allreduce
        ("reduce"), or all at once ("gather", O(global n * d) memory per rank).
    img_ids, txt_ids : array, optional
        Integer ids of the rows of ``img``, shape (m,), and of ``txt``, shape (k,), from
        the library and device of the features: pair (i, j) is positive iff
        ``img_ids[i] == txt_ids[j]``, and ``img`` (m, d) and ``txt`` (k, d) may then have
        different row counts (several captions per image, duplicate captions or images;
        docs/multi-positive.md). The loss is then divided by the number of image rows m
        (of the global batch with ``comm``; ids are global labels there). An image or text
        whose id has no match on the other side has no positive: all its pairs are
        negatives, eagerly, under ``jax.jit`` and with ``comm`` alike. Unique ids give the
        diagonal loss.
    precision : {"fast", "exact"}, optional
        For float16/bfloat16 features: "fast" (the default) feeds the GEMMs operands in
        the input dtype (``t * img`` rounded to it once; on a GPU also each tile's gradient
        factor) with float32 accumulation, so that a GPU runs them on tensor cores; "exact"
        feeds them float32 values. Elementwise work, sums and accumulators are float32 either way.
        float32 and float64 features ignore it: they always compute at full precision
        (no TF32). docs/conventions.md shows the errors of both.

    Returns
    -------
    array, 0-d
        The loss, float64 for float64 inputs and float32 otherwise.

    Raises
    ------
    TypeError, ValueError
        On invalid input; the message names the parameter and what was received.

    See Also
    --------
    sigmoid_loss_and_grad : the loss with its gradients, in the same pass.

    Notes
    -----
    The features are not checked for NaN or inf, as the array libraries do not check them
    either: one such entry in ``img`` or ``txt`` makes the loss NaN (or inf) without an error (on
    every rank, with ``comm``). To find the source, check ``xp.all(xp.isfinite(img))`` (and
    ``txt``) before the call, or let the framework stop at the first NaN
    (``torch.autograd.set_detect_anomaly(True)``, ``jax.config.update("jax_debug_nans", True)``).

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> img = np.eye(3)
    >>> loss = ps.sigmoid_loss(img, img, scale=10.0, bias=-5.0)
    >>> print(f"{float(loss):.6f}")  # every pair scores 5 the right way: 3 softplus(-5)
    0.020146

    Two captions per image (rows 0-1 describe image 0, rows 2-3 image 1):

    >>> img_ids, txt_ids = np.arange(2), np.array([0, 0, 1, 1])
    >>> txt = np.repeat(np.eye(2), 2, axis=0)  # (4, 2)
    >>> loss = ps.sigmoid_loss(np.eye(2), txt, 10.0, -5.0, img_ids=img_ids, txt_ids=txt_ids)
    >>> print(f"{float(loss):.6f}")  # 8 pairs, each softplus(-5), over 2 image rows
    0.026861
    """
    return evaluate(
        SIGMOID,
        img,
        txt,
        scale,
        bias,
        grad=False,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
    )[0]


def sigmoid_loss_and_grad(
    img: Array,
    txt: Array,
    scale: float | Array,
    bias: float | Array | None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "bidir",
    img_ids: Array | None = None,
    txt_ids: Array | None = None,
    precision: str | None = None,
) -> tuple[Array, Gradients]:
    r"""SigLIP sigmoid loss and its exact gradients, from one blockwise pass.

    The gradient of the loss of :func:`sigmoid_loss` with respect to the logits is
    :math:`G = (\sigma(Z) - I)/n`, and

    .. math::

        \partial_{\mathrm{img}} L = t\, G\, \mathrm{txt}, \quad
        \partial_{\mathrm{txt}} L = t\, G^\top \mathrm{img}, \quad
        \partial_t L = \textstyle\sum_{ij} G_{ij} (\mathrm{img}\,\mathrm{txt}^\top)_{ij}, \quad
        \partial_b L = \textstyle\sum_{ij} G_{ij}.

    Each tile contributes to the loss and all four gradients at once; the n x n matrices
    are never formed.

    Parameters
    ----------
    img, txt, scale, bias, block_size, comm, strategy, img_ids, txt_ids, precision
        As for :func:`sigmoid_loss`.

    Returns
    -------
    loss : array, 0-d
        As returned by :func:`sigmoid_loss`.
    grads : Gradients
        ``grads.img``/``grads.txt`` in the dtype of the features; ``grads.scale`` and
        ``grads.bias`` in the dtype of ``scale``/``bias`` when they are arrays. With a
        ``comm``, the exact gradients of the global loss with respect to this rank's
        rows (and the shared ``scale`` and ``bias``, the same on every rank).

    Raises
    ------
    TypeError, ValueError
        On invalid input; the message names the parameter and what was received.

    Notes
    -----
    The features are not checked for NaN or inf, as the array libraries do not check them
    either: one such entry in ``img`` or ``txt`` makes the loss NaN (or inf) without an error, and
    with it that row of ``grads.img``, every row of ``grads.txt``, ``grads.scale`` and
    ``grads.bias`` (on every rank, with ``comm``).
    To find the source, check ``xp.all(xp.isfinite(img))`` (and ``txt``) before the call, or
    let the framework stop at the first NaN (``torch.autograd.set_detect_anomaly(True)``,
    ``jax.config.update("jax_debug_nans", True)``).

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> rng = np.random.default_rng(0)
    >>> img = rng.standard_normal((5, 4))
    >>> txt = rng.standard_normal((5, 4))
    >>> loss, grads = ps.sigmoid_loss_and_grad(img, txt, 10.0, -10.0, block_size=2)
    >>> grads.img.shape, grads.txt.shape, grads.scale.shape
    ((5, 4), (5, 4), ())
    >>> bool(np.isclose(loss, ps.sigmoid_loss(img, txt, 10.0, -10.0)))
    True

    Two ranks (threads here; MPI ranks under ``mpirun`` alike), holding rows 0-1 and 2-4:

    >>> from portable_siglip.comm import ThreadGroup
    >>> rows = [slice(0, 2), slice(2, 5)]
    >>> results = ThreadGroup(2).run(
    ...     lambda comm: ps.sigmoid_loss_and_grad(
    ...         img[rows[comm.rank]], txt[rows[comm.rank]], 10.0, -10.0, comm=comm
    ...     )
    ... )
    >>> bool(np.isclose(results[0][0], loss) and np.isclose(results[1][0], loss))
    True
    >>> bool(np.allclose(results[1][1].img, grads.img[2:5]))
    True
    """
    loss, grads = evaluate(
        SIGMOID,
        img,
        txt,
        scale,
        bias,
        grad=True,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
    )
    assert grads is not None
    return loss, grads


def softmax_loss(
    img: Array,
    txt: Array,
    scale: float | Array,
    bias: float | Array | None = None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "ring",
    img_ids: Array | None = None,
    txt_ids: Array | None = None,
    precision: str | None = None,
    unmatched_txt: str = "error",
) -> Array:
    r"""CLIP softmax (InfoNCE) loss, symmetric over both directions, evaluated blockwise.

    .. math::

        L = \frac{1}{2n} \Big[ \sum_i \big(\operatorname{lse}_j Z_{ij} - Z_{ii}\big)
            + \sum_j \big(\operatorname{lse}_i Z_{ij} - Z_{jj}\big) \Big],
        \qquad Z = t\, \mathrm{img}\, \mathrm{txt}^\top + b,

    the mean of the image-to-text and text-to-image cross-entropies, as open_clip's
    ``ClipLoss`` computes them. ``b`` has no effect (softmax is shift invariant); it is
    accepted so both losses share one signature.

    Parameters
    ----------
    img, txt : array, shape (n, d)
        Image and text features of one array-API library, same dtype and device.
    scale : float or 0-d array
        The multiplier ``t > 0`` (CLIP learns ``t' = log t``, initialised to log(1/0.07)).
    bias : float, 0-d array or None, optional
        Accepted and validated; it cancels out of the loss.
    block_size : int, optional
        Edge of the square tiles; None picks a default for the device of the inputs
        (1024 on the host, 4096 on a GPU).
    comm : Communicator, optional
        As for :func:`sigmoid_loss`: with W ranks, the loss of the global batch.
    strategy : {"ring", "gather"}
        Distributed schedule (ignored without ``comm``): text blocks travel round the
        ring twice, once for the log-sum-exp and once for the gradient ("ring", as in
        Inf-CL), or are gathered at once ("gather").
    img_ids, txt_ids : array, optional
        Integer ids of the rows, as for :func:`sigmoid_loss`. With them each direction is a
        cross-entropy against the uniform distribution over the row's (column's) positives,
        averaged over its own rows: ``(1/m) sum_i (lse_j Z_ij - mean_{j in P_i} Z_ij)`` and
        ``(1/k) sum_j (lse_i Z_ij - mean_{i in Q_j} Z_ij)``, halved. Every id must appear on
        both sides (the mean over a row's positives needs one), else ``ValueError``; where
        the ids have no values to check (under ``jax.jit``, or ``AxisComm`` in
        ``shard_map``) such a row makes the loss NaN, while the gradients stay finite and
        leave out that row's target term.
    precision : {"fast", "exact"}, optional
        As for :func:`sigmoid_loss`: half-precision GEMM operands ("fast", the default for
        float16/bfloat16 features) or float32 ones ("exact").
    unmatched_txt : {"error", "negatives"}
        What to do, with ids, with a text row whose id no image row has (a mined hard
        negative, an extra caption): "error" (the default) raises the ``ValueError`` above;
        "negatives" makes it a negative of every image. It then joins every image row's
        log-sum-exp and has no column term, and the text-to-image term is a mean over the
        k' columns that have a positive: ``(1/k') sum_{j: r_j > 0} (...)``. It holds under
        ``jax.jit`` too (the columns are told apart by their positive counts). An image row
        without a positive is an error either way. Without ids every text has its image and
        "negatives" changes nothing. With ``comm`` every rank must pass the same value.
        docs/math.md, section 9.

    Returns
    -------
    array, 0-d
        The loss, float64 for float64 inputs and float32 otherwise.

    Raises
    ------
    TypeError, ValueError
        On invalid input; the message names the parameter and what was received.

    Notes
    -----
    The features are not checked for NaN or inf, as the array libraries do not check them
    either: one such entry in ``img`` or ``txt`` makes the loss NaN (or inf) without an error (on
    every rank, with ``comm``). To find the source, check ``xp.all(xp.isfinite(img))`` (and
    ``txt``) before the call, or let the framework stop at the first NaN
    (``torch.autograd.set_detect_anomaly(True)``, ``jax.config.update("jax_debug_nans", True)``).

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> img = np.eye(2)
    >>> loss = ps.softmax_loss(img, img, scale=1.0)
    >>> print(f"{float(loss):.6f}")  # log(1 + e^-1)
    0.313262

    A third caption that is nobody's positive, a hard negative of both images:

    >>> txt = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    >>> ids = dict(img_ids=np.arange(2), txt_ids=np.array([0, 1, -1]))
    >>> loss = ps.softmax_loss(img, txt, 1.0, unmatched_txt="negatives", **ids)
    >>> print(f"{float(loss):.6f}")  # mean of log(e + 1 + e^0.7) - 1 and log(1 + e^-1)
    0.529666
    """
    return evaluate(
        SOFTMAX,
        img,
        txt,
        scale,
        bias,
        grad=False,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
        unmatched_txt=unmatched_txt,
    )[0]


def softmax_loss_and_grad(
    img: Array,
    txt: Array,
    scale: float | Array,
    bias: float | Array | None = None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "ring",
    img_ids: Array | None = None,
    txt_ids: Array | None = None,
    precision: str | None = None,
    unmatched_txt: str = "error",
) -> tuple[Array, Gradients]:
    r"""CLIP softmax loss and its exact gradients, in two blockwise passes.

    The gradient with respect to the logits is
    :math:`G = (\operatorname{softmax}_\text{rows}(Z) + \operatorname{softmax}_\text{cols}(Z)
    - 2I) / (2n)`; the first pass finds every row and column log-sum-exp online, the second
    recomputes each tile and applies the same chain rule as :func:`sigmoid_loss_and_grad`.

    Parameters
    ----------
    img, txt, scale, bias, block_size, comm, strategy, img_ids, txt_ids, precision, unmatched_txt
        As for :func:`softmax_loss`.

    Returns
    -------
    loss : array, 0-d
        As returned by :func:`softmax_loss`.
    grads : Gradients
        As for :func:`sigmoid_loss_and_grad`; ``grads.bias`` is an exact zero.

    Raises
    ------
    TypeError, ValueError
        On invalid input; the message names the parameter and what was received.

    Notes
    -----
    The features are not checked for NaN or inf, as the array libraries do not check them
    either: one such entry in ``img`` or ``txt`` makes the loss NaN (or inf) without an error, and
    with it every row of ``grads.img`` and ``grads.txt`` (on every rank, with ``comm``).
    To find the source, check ``xp.all(xp.isfinite(img))`` (and ``txt``) before the call, or
    let the framework stop at the first NaN (``torch.autograd.set_detect_anomaly(True)``,
    ``jax.config.update("jax_debug_nans", True)``).

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> rng = np.random.default_rng(0)
    >>> img = rng.standard_normal((5, 4))
    >>> loss, grads = ps.softmax_loss_and_grad(img, rng.standard_normal((5, 4)), 3.0)
    >>> float(grads.bias)
    0.0
    """
    loss, grads = evaluate(
        SOFTMAX,
        img,
        txt,
        scale,
        bias,
        grad=True,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
        unmatched_txt=unmatched_txt,
    )
    assert grads is not None
    return loss, grads


#: ``strategy`` not given to :func:`evaluate` (None is a value, which validation refuses).
_DEFAULT: Any = object()


def evaluate(
    loss: Loss,
    img: Array,
    txt: Array,
    scale: float | Array,
    bias: float | Array | None,
    *,
    grad: bool,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: object = _DEFAULT,
    img_ids: Array | None = None,
    txt_ids: Array | None = None,
    precision: str | None = None,
    unmatched_txt: str = "error",
) -> tuple[Array, Gradients | None]:
    """Evaluate any registered ``loss``: validate (agreeing with the other ranks), then run it.

    What the public functions call; the command line and the benchmarks call it with the
    loss the user named (:func:`._registry.get`). The keywords are the public functions';
    without ``strategy``, the loss's first schedule. ``unmatched_txt`` is validated for every
    loss and acts only on a loss with ``needs_positives`` (for the others a text without a
    positive is all negatives already). Returns the loss and, with ``grad``, its
    :class:`Gradients` (else None).

    Examples
    --------
    >>> import numpy as np
    >>> from portable_siglip import _registry
    >>> softmax = _registry.get("softmax")
    >>> value, grads = evaluate(softmax, np.eye(2), np.eye(2), 1.0, None, grad=False)
    >>> round(float(value), 6), grads
    (0.313262, None)
    """
    problem, ring = setup(
        img,
        txt,
        scale,
        bias,
        block_size=block_size,
        comm=comm,
        strategy=loss.default_schedule if strategy is _DEFAULT else strategy,
        loss=loss.name,
        grad=grad,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
        needs_positives=loss.needs_positives,
        unmatched_txt=unmatched_txt,
    )
    with full_precision(problem.xp, problem.img):
        return loss.evaluate(loss, problem, ring, grad=grad)  # type: ignore[no-any-return]


def loss_functions(loss: Loss, namespace: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Return the loss alone and with its gradients, as the public functions' signatures.

    The functions ``loss.functions`` names, looked up in ``namespace`` (the bridges pass the
    package, so that they call what the package holds now); for a loss without public
    functions, :func:`evaluate` bound to it.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_siglip as ps
    >>> alone, with_grad = loss_functions(SIGMOID, ps)
    >>> alone is ps.sigmoid_loss
    True
    """
    if loss.functions:
        alone, with_grad = (getattr(namespace, name) for name in loss.functions)
        return alone, with_grad

    def value(*args: Any, **options: Any) -> Array:
        return evaluate(loss, *args, grad=False, **options)[0]

    def value_and_grad(*args: Any, **options: Any) -> tuple[Array, Gradients | None]:
        return evaluate(loss, *args, grad=True, **options)

    return value, value_and_grad


#: The SigLIP sigmoid loss (docs/math.md, section 1).
SIGMOID = register(
    Loss(
        name="sigmoid",
        title="SigLIP sigmoid loss",
        schedules=("bidir", "shift", "reduce", "gather"),
        evaluate=_sigmoid,
        tile=sigmoid_tile,
        dense=_reference.dense_sigmoid,
        uses_bias=True,
        functions=("sigmoid_loss", "sigmoid_loss_and_grad"),
    )
)

#: The CLIP softmax (InfoNCE) loss, symmetric over both directions (docs/math.md, section 2).
SOFTMAX = register(
    Loss(
        name="softmax",
        title="CLIP softmax loss",
        schedules=("ring", "gather"),
        evaluate=_softmax,
        tile=softmax_grad_tile,
        dense=_reference.dense_softmax,
        uses_bias=False,
        functions=("softmax_loss", "softmax_loss_and_grad"),
        gemms_per_tile=4,
        needs_positives=True,
    )
)
