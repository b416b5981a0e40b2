"""JAX bridge: the losses as JAX-differentiable functions, through ``jax.custom_vjp``.

:func:`sigmoid_loss` and :func:`softmax_loss` take the arguments of
:func:`portable_siglip.sigmoid_loss` and :func:`portable_siglip.softmax_loss` and return
the same loss, but ``jax.grad``, ``jax.value_and_grad`` and ``jax.vjp`` differentiate
them with respect to ``img``, ``txt`` and any ``scale``/``bias`` given as arrays. The
forward pass of a differentiation calls :func:`portable_siglip.sigmoid_loss_and_grad`
(or the softmax one) once and keeps its analytic gradients, O(n d), as residuals; the
backward pass multiplies them by the cotangent, so the n x n logit matrix is never held
and never differentiated through. A call whose value alone is needed runs the loss
without any gradient work.

``scale`` and ``bias`` given as Python numbers (or ``bias=None``) are constants of the
call, checked as the core checks them (``scale`` must be positive, ...); as arrays (JAX
or NumPy, 0-d) they are inputs with a gradient. NumPy arrays are converted with
``jax.numpy.asarray``. Anything that is not a JAX or NumPy array in place of ``img`` or
``txt`` is handed to the core function unchanged, which raises its ``TypeError`` for a
non-array (on every rank, with a ``comm``).

Under ``jax.jit`` (one process) everything works: the value, ``jax.grad`` and
``jax.jit(jax.grad(...))``, with ``scale``/``bias`` traced, static or closed over;
``jax.vmap`` works too. Traced arrays take the core's jax loops (one ``lax.fori_loop`` over
the tiles), so the compiled program and its compile time do not grow with the batch. Inside
``jax.shard_map``, ``comm=AxisComm(axis_name)`` runs the ring over jax collectives, under
``jit`` and ``jax.grad``. The host transports (``MPIComm``, ``ThreadGroup``, ...) work outside
``jit``, eager ``jax.grad`` included, but not inside ``jax.jit``, ``jax.vmap`` or any other
transformation that hands the loss tracers instead of arrays: those ranks exchange concrete
arrays. Such a call raises a ``TypeError``; call the loss eagerly and ``jit`` the parts of the
model that produce ``img`` and ``txt``, or use ``AxisComm`` inside ``shard_map``.

Forward mode applied to the loss itself (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is
refused by ``custom_vjp`` with JAX's ``TypeError`` ("can't apply forward-mode autodiff (jvp)
to a custom_vjp function"). Second derivatives work and are exact: under ``jax.hessian``
(forward over reverse), ``jax.jvp`` of ``jax.grad`` or ``jax.grad`` of ``jax.grad``, JAX
differentiates the forward rule of the ``custom_vjp`` (the core's blockwise gradient code,
in ``jnp`` operations), and the backward rule is linear in the gradients it stored. The
result is the derivative of the analytic gradients, equal to dense float64 autodiff up to
round-off; reverse over reverse keeps every tile's intermediates (n x n in all). With
``comm`` they raise the ``TypeError`` above, since the forward rule then sees tracers.

Examples
--------
>>> import jax
>>> import jax.numpy as jnp
>>> from portable_siglip.backends import jax as psj
>>> img = jnp.eye(3)
>>> loss, (d_img, d_scale) = jax.value_and_grad(psj.sigmoid_loss, argnums=(0, 2))(
...     img, img, jnp.asarray(10.0), -5.0, block_size=2
... )
>>> print(f"{float(loss):.6f}")  # every pair scores 5 the right way: 3 softplus(-5)
0.020146
>>> d_img.shape, d_scale.shape
((3, 3), ())
>>> jitted = jax.jit(jax.grad(psj.softmax_loss, argnums=(0, 1, 2)))
>>> [g.shape for g in jitted(img, img, jnp.asarray(2.0))]
[(3, 3), (3, 3), ()]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import portable_siglip as _core
from portable_siglip import _distributed, _losses, _registry
from portable_siglip.comm import BaseComm, Communicator

from ._jax_cached import cached_value_and_grad

__all__ = ["AxisComm", "cached_value_and_grad", "sigmoid_loss", "softmax_loss"]

Array = Any
Extras = tuple[jax.Array, ...]
Residuals = tuple[jax.Array, jax.Array, Extras]


def _is_array(value: object) -> bool:
    """Whether ``value`` is a JAX array (a tracer included) or a plain NumPy array.

    A NumPy masked array is not: ``jnp.asarray`` would drop its mask, so it goes to the
    core unchanged, which refuses it naming the argument.
    """
    return isinstance(value, jax.Array | np.ndarray) and not isinstance(value, np.ma.MaskedArray)


#: jax.lax, untyped: its collectives have no annotations.
_lax: Any = jax.lax


class _Done:
    """A finished exchange: collectives inside one traced program complete in place."""

    def __init__(self, value: jax.Array) -> None:
        self._value = value

    def wait(self) -> jax.Array:
        return self._value


class AxisComm(BaseComm):
    """A communicator over a named mesh axis, for the ring inside ``jax.shard_map``.

    Every device of the axis is a rank and runs the same traced program (SPMD), so the
    losses take their schedules through jax collectives: text blocks travel round the ring
    by ``lax.ppermute`` (a collective shift), sums by ``lax.psum``, gathers by
    ``lax.all_gather``; the rank is ``lax.axis_index``, a traced value, and the size the
    axis size. It works only while tracing inside ``shard_map`` (or ``pmap``) over
    ``axis_name``; anywhere else using it raises ``ValueError``. Shards must be equal (what
    ``shard_map`` gives); uneven shards would need padding to a common size and masking.

    Parameters
    ----------
    axis_name : str
        The mesh axis the batch is sharded over.

    Notes
    -----
    The handshake of a distributed call has nothing to compare here: one program cannot
    disagree with itself on d, dtype or strategy, and the values of ``scale``, ``bias`` and
    the ids are traced, so they are not checked (with the softmax loss a row without a
    positive gives a NaN loss, as under ``jit``; the sigmoid loss counts its pairs as
    negatives, as everywhere). docs/frameworks.md has a sharded train step.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> import portable_siglip as ps
    >>> from portable_siglip.backends.jax import AxisComm
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> def local(img, txt):
    ...     return ps.sigmoid_loss(img, txt, 10.0, -10.0, comm=AxisComm("data"))
    >>> step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P()))
    >>> x = jnp.eye(4)
    >>> bool(jnp.isclose(step(x, x), ps.sigmoid_loss(x, x, 10.0, -10.0)))
    True
    """

    #: One traced program on every rank: see :func:`portable_siglip._distributed.spmd`.
    spmd = True

    def __init__(self, axis_name: str) -> None:
        if not isinstance(axis_name, str) or not axis_name:
            msg = f"`axis_name` must be a non-empty str naming a mesh axis, got {axis_name!r}"
            raise TypeError(msg)
        super().__init__()
        self.axis_name = axis_name

    def _unbound(self, error: Exception) -> ValueError:
        msg = (
            f"AxisComm({self.axis_name!r}) must be used inside jax.shard_map (or pmap) over "
            f"the mesh axis {self.axis_name!r}, which is not bound here ({error})"
        )
        return ValueError(msg)

    @property
    def rank(self) -> Any:  # type: ignore[override]
        """Return the device's index along the axis: a traced int32."""
        try:
            return _lax.axis_index(self.axis_name)
        except NameError as error:
            raise self._unbound(error) from None

    @property
    def size(self) -> int:  # type: ignore[override]
        """The number of devices along the axis (static)."""
        try:
            return int(_lax.psum(1, self.axis_name))
        except NameError as error:
            raise self._unbound(error) from None

    def ishift(self, x: jax.Array, offset: int) -> _Done:
        """Every rank sends ``x`` to rank ``+offset`` and receives from ``-offset`` (ppermute)."""
        size = self.size
        self._count(x)
        perm = [(source, (source + offset) % size) for source in range(size)]
        return _Done(_lax.ppermute(x, self.axis_name, perm))

    def isendrecv(
        self, send: Any, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Any:
        """Not offered: under SPMD every exchange is a collective shift (:meth:`ishift`)."""
        msg = (
            "AxisComm exchanges by collective shifts (ishift) only: every rank of one "
            "traced program must send the same way"
        )
        raise NotImplementedError(msg)

    def allreduce(self, x: jax.Array) -> jax.Array:
        """Sum over the axis (``lax.psum``)."""
        self._count(x)
        total: jax.Array = _lax.psum(x, self.axis_name)
        return total

    def allgather(self, x: jax.Array) -> list[jax.Array]:
        """Every rank's ``x`` in rank order (``lax.all_gather``)."""
        self._count(x)
        gathered = _lax.all_gather(x, self.axis_name)
        return [gathered[rank] for rank in range(self.size)]

    def bcast(self, x: jax.Array, root: int = 0) -> jax.Array:
        """Return the root's ``x`` on every rank (a ``psum`` of it and zeros elsewhere)."""
        self._count(x)
        kept = jnp.where(self.rank == root, x, jnp.zeros_like(x))
        total: jax.Array = _lax.psum(kept, self.axis_name)
        return total

    def allgather_object(self, obj: object) -> list[Any]:
        """``[obj] * size``: every rank traced the same program, so holds the same object."""
        return [obj] * self.size

    def __repr__(self) -> str:
        return f"AxisComm({self.axis_name!r})"


def _refuse_traced_comm(comm: Communicator | None, *arrays: object) -> None:
    """Raise if the call is distributed and any of ``arrays`` is a tracer."""
    if comm is None or isinstance(comm, AxisComm):
        return
    if not any(isinstance(x, jax.core.Tracer) for x in arrays):
        return
    msg = (
        "`comm` cannot be used under jax.jit, jax.vmap or another JAX transformation that "
        "traces the loss: the ranks exchange concrete arrays. Call the loss outside jit "
        "(eager jax.grad / jax.value_and_grad of it work) and jit the parts of the model "
        "that produce `img` and `txt`."
    )
    raise TypeError(msg)


def _check_ids_fit(name: str, ids: Any, comm: Communicator | None) -> None:
    """Refuse NumPy ids whose values the dtype jax converts them to cannot hold.

    With ``jax_enable_x64`` off (jax's default) ``jnp.asarray`` turns int64 ids into int32
    and uint64 into uint32, wrapping what does not fit: 2**32 would become 0, the id of
    another row, and the loss would be silently wrong. Ids whose values fit convert exactly
    and pass. With a host communicator the error reaches every rank through the handshake.
    """
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.size == 0:
        return
    target = np.dtype(jax.dtypes.canonicalize_dtype(ids.dtype))
    if target.itemsize >= ids.dtype.itemsize:
        return
    bounds = np.iinfo(target)
    outside = ids[(ids < bounds.min) | (ids > bounds.max)]
    if outside.size == 0:
        return
    value = int(outside[0])
    wrapped = int(np.asarray(value).astype(ids.dtype).astype(target))
    msg = (
        f"`{name}` holds {value}, which {target} cannot hold: jax converts {ids.dtype} ids to "
        f"{target} while `jax_enable_x64` is off, and {value} would become {wrapped}, another "
        f"id ({outside.size} of {ids.size} ids do not fit). Enable 64-bit jax "
        "(jax.config.update('jax_enable_x64', True)) or pass ids in "
        f"[{bounds.min}, {bounds.max}], e.g. each id's index among the batch's distinct ids"
    )
    _distributed.raise_everywhere(comm, ValueError(msg))


def _times(cotangent: jax.Array, grad: jax.Array) -> jax.Array:
    """``cotangent * grad`` in the dtype of ``grad`` (that of the primal it belongs to)."""
    return (cotangent * grad).astype(grad.dtype)


def _bridge(
    loss: str,
    img: Any,
    txt: Any,
    scale: object,
    bias: object,
    *,
    block_size: object,
    comm: Communicator | None,
    strategy: object,
    img_ids: object = None,
    txt_ids: object = None,
    precision: object = None,
    unmatched_txt: object = "error",
) -> jax.Array:
    """Evaluate one loss through a ``custom_vjp`` built for this call's static arguments."""
    # Looked up at call time, so the core functions are the ones of the package now.
    loss_only, loss_and_grad = _losses.loss_functions(_registry.get(loss), _core)
    options: dict[str, Any] = {
        "block_size": block_size,
        "comm": comm,
        "strategy": strategy,
        "precision": precision,
    }
    if not (isinstance(unmatched_txt, str) and unmatched_txt == "error"):
        options["unmatched_txt"] = unmatched_txt  # only the softmax loss takes it
    labelled = not (img_ids is None and txt_ids is None)
    if not (_is_array(img) and _is_array(txt)) or (
        labelled and not (_is_array(img_ids) and _is_array(txt_ids))
    ):
        # Nothing to differentiate, or invalid ids: the core raises its TypeError.
        direct: jax.Array = loss_only(
            img, txt, scale, bias, img_ids=img_ids, txt_ids=txt_ids, **options
        )
        return direct
    if labelled:
        for name, value in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            _check_ids_fit(name, value, comm)
    # The ids are arguments of the custom_vjp function (not closed over: under jit they
    # are tracers), with no cotangent (they are integers).
    ids: tuple[jax.Array, ...] = (jnp.asarray(img_ids), jnp.asarray(txt_ids)) if labelled else ()

    def labels(given: tuple[jax.Array, ...]) -> dict[str, Any]:
        return {"img_ids": given[0], "txt_ids": given[1]} if given else {}

    dynamic = (_is_array(scale), _is_array(bias))
    extras: Extras = tuple(
        jnp.asarray(value)
        for value, is_dynamic in zip((scale, bias), dynamic, strict=True)
        if is_dynamic
    )

    def scalars(values: Extras) -> tuple[object, object]:
        given = iter(values)
        return (
            next(given) if dynamic[0] else scale,
            next(given) if dynamic[1] else bias,
        )

    def evaluate(
        img: jax.Array, txt: jax.Array, values: Extras, given: tuple[jax.Array, ...]
    ) -> jax.Array:
        t, b = scalars(values)
        out: jax.Array = loss_only(img, txt, t, b, **options, **labels(given))
        return out

    def evaluate_with_grads(
        img: jax.Array, txt: jax.Array, values: Extras, given: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, Residuals]:
        t, b = scalars(values)
        out, grads = loss_and_grad(img, txt, t, b, **options, **labels(given))
        kept = tuple(
            grad
            for grad, is_dynamic in zip((grads.scale, grads.bias), dynamic, strict=True)
            if is_dynamic
        )
        return out, (grads.img, grads.txt, kept)

    def primal(
        img: jax.Array, txt: jax.Array, values: Extras, given: tuple[jax.Array, ...]
    ) -> jax.Array:
        _refuse_traced_comm(comm, img, txt, *values, *given)
        return evaluate(img, txt, values, given)

    def forward(
        img: jax.Array, txt: jax.Array, values: Extras, given: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, Residuals]:
        _refuse_traced_comm(comm, img, txt, *values, *given)
        return evaluate_with_grads(img, txt, values, given)

    def backward(residuals: Residuals, cotangent: jax.Array) -> tuple[Any, ...]:
        d_img, d_txt, kept = residuals
        return (
            _times(cotangent, d_img),
            _times(cotangent, d_txt),
            tuple(_times(cotangent, grad) for grad in kept),
            tuple(None for _ in ids),  # integer ids: no cotangent
        )

    function = jax.custom_vjp(primal)
    function.defvjp(forward, backward)
    result: jax.Array = function(jnp.asarray(img), jnp.asarray(txt), extras, ids)
    return result


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
) -> jax.Array:
    """SigLIP sigmoid loss, differentiable by JAX through its analytic gradients.

    The loss of :func:`portable_siglip.sigmoid_loss`; under ``jax.grad`` its forward pass
    runs :func:`portable_siglip.sigmoid_loss_and_grad` once, the backward pass scales the
    stored gradients by the cotangent.

    Parameters
    ----------
    img, txt : jax.Array or numpy.ndarray, shape (n, d)
        Image and text features; row i of each is a matched pair. Differentiable.
    scale : float or 0-d array
        The multiplier ``t > 0``. A Python number is a constant of the call (checked to be
        positive); a 0-d JAX or NumPy array is differentiable.
    bias : float, 0-d array or None
        The logit bias ``b`` (None means 0); differentiable when an array.
    block_size : int, optional
        Tile edge; None picks the default (1024). Under ``jax.jit`` the tiles run in one
        ``lax.fori_loop``, so the compile time does not depend on it.
    comm : Communicator, optional
        As for :func:`portable_siglip.sigmoid_loss`: ``img``/``txt`` are this rank's
        shard and the result is the loss of the global batch; the gradient of each rank
        is that of the global loss with respect to its own rows (and the shared ``scale``
        and ``bias``). Not under ``jax.jit`` or other tracing.
    strategy : {"bidir", "shift", "reduce", "gather"}
        Distributed schedule, ignored without ``comm``.
    img_ids, txt_ids : jax.Array or numpy.ndarray, optional
        Integer ids of the image rows (m,) and text rows (k,), as in
        :func:`portable_siglip.sigmoid_loss`: pairs with equal ids are positives and m may
        differ from k. Not differentiated. An image or text whose id has no match on the
        other side has no positive: all its pairs are negatives, eagerly and under
        ``jax.jit`` alike (the sigmoid loss is defined for any ids).
        NumPy ids are converted by ``jnp.asarray``: with ``jax_enable_x64`` off (jax's
        default) int64 becomes int32 and uint64 uint32, and ids these cannot hold (a 64-bit
        text hash) raise a ``ValueError`` naming the argument instead of wrapping onto
        other ids. Ids that are jax arrays already, or that ``jax.jit`` converted as
        arguments, are taken as they are.
    precision : {"fast", "exact"}, optional
        GEMM operands for bfloat16/float16 features, as in
        :func:`portable_siglip.sigmoid_loss`: "fast" (default) multiplies them in the
        features' dtype with ``preferred_element_type=float32``. float32 features always
        run at ``precision=HIGHEST`` (no TF32 on GPUs).

    Returns
    -------
    jax.Array, 0-d
        The loss, float64 for float64 inputs and float32 otherwise. Its gradients have the
        dtypes of the inputs they belong to (bfloat16 for bfloat16 ``img``, ...).

    Raises
    ------
    TypeError, ValueError
        On invalid input, as :func:`portable_siglip.sigmoid_loss` does; ``TypeError`` when
        ``comm`` is given under ``jax.jit`` or another tracing transformation.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from portable_siglip.backends.jax import sigmoid_loss
    >>> img = jnp.eye(3)
    >>> print(f"{float(sigmoid_loss(img, img, 10.0, -5.0)):.6f}")
    0.020146
    >>> grad = jax.jit(jax.grad(sigmoid_loss, argnums=(0, 1, 2, 3)))
    >>> d_img, d_txt, d_scale, d_bias = grad(img, img, jnp.asarray(10.0), jnp.asarray(-5.0))
    >>> print(f"{float(d_bias):.6f}")  # sum of (sigmoid(Z) - I) / n
    0.006693
    """
    return _bridge(
        "sigmoid",
        img,
        txt,
        scale,
        bias,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
    )


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
) -> jax.Array:
    """CLIP softmax loss, differentiable by JAX through its analytic gradients.

    The loss of :func:`portable_siglip.softmax_loss`; under ``jax.grad`` its forward pass
    runs :func:`portable_siglip.softmax_loss_and_grad` once (two blockwise passes), the
    backward pass scales the stored gradients by the cotangent.

    Parameters
    ----------
    img, txt : jax.Array or numpy.ndarray, shape (n, d)
        Image and text features; row i of each is a matched pair. Differentiable.
    scale : float or 0-d array
        The multiplier ``t > 0``: a constant when a Python number, differentiable when a
        0-d JAX or NumPy array.
    bias : float, 0-d array or None, optional
        Accepted and validated; it cancels out of the loss (its gradient is zero).
    block_size : int, optional
        Tile edge; None picks the default (1024).
    comm : Communicator, optional
        As for :func:`sigmoid_loss`; not under ``jax.jit`` or other tracing.
    strategy : {"ring", "gather"}
        Distributed schedule, ignored without ``comm``.
    img_ids, txt_ids : jax.Array or numpy.ndarray, optional
        Integer ids of the rows, as in :func:`sigmoid_loss`, except that every id must
        appear on both sides (a row's target is a distribution over its positives): a
        ``ValueError`` eagerly; under ``jax.jit``, where their values cannot be checked, a
        row without a positive gives a NaN loss (the gradients stay finite and leave out
        that row's target term).
    precision : {"fast", "exact"}, optional
        As for :func:`sigmoid_loss`.
    unmatched_txt : {"error", "negatives"}
        With ids, a text row whose id no image has: refused ("error", the default) or a
        negative of every image ("negatives", hard negatives), as in
        :func:`portable_siglip.softmax_loss`. "negatives" holds under ``jax.jit`` too: the
        texts without a positive are found from the traced ids.

    Returns
    -------
    jax.Array, 0-d
        The loss, float64 for float64 inputs and float32 otherwise.

    Raises
    ------
    TypeError, ValueError
        On invalid input, as :func:`portable_siglip.softmax_loss` does; ``TypeError`` when
        ``comm`` is given under ``jax.jit`` or another tracing transformation.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from portable_siglip.backends.jax import softmax_loss
    >>> img = jnp.eye(2)
    >>> print(f"{float(softmax_loss(img, img, 1.0)):.6f}")  # log(1 + e^-1)
    0.313262
    >>> d_scale = jax.grad(softmax_loss, argnums=2)(img, img, jnp.asarray(1.0))
    >>> print(f"{float(d_scale):.6f}")  # -e^-1 / (1 + e^-1)
    -0.268941
    """
    return _bridge(
        "softmax",
        img,
        txt,
        scale,
        bias,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
        unmatched_txt=unmatched_txt,
    )
