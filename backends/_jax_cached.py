"""The two-pass step for jax: encoders run chunk by chunk, the loss on the whole batch.

:func:`cached_value_and_grad` is re-exported by :mod:`portable_siglip.backends.jax`, where
users find it. It lives in its own module so that the bridge stays one file per idea; it
imports the core only (never the bridge, which imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import portable_siglip as _core
from portable_siglip import _checks, _losses, _registry
from portable_siglip.comm import Communicator

__all__ = ["cached_value_and_grad"]

Params = Any
Encoder = Callable[[Params, Any], jax.Array]
ScaleAndBias = Callable[[Params], tuple[Any, Any]]

#: jax.lax, untyped: its map and scan have loose annotations.
_lax: Any = jax.lax


def _check_encoders(encode: object) -> tuple[Encoder, Encoder]:
    """``encode`` must be a pair ``(encode_img, encode_txt)`` of callables."""
    if (
        isinstance(encode, Sequence)
        and not isinstance(encode, str)
        and len(encode) == 2
        and all(callable(f) for f in encode)
    ):
        return encode[0], encode[1]
    msg = (
        "`encode` must be a pair (encode_img, encode_txt) of callables, each mapping "
        f"(params, chunk) to the chunk's (rows, d) features, got {encode!r}"
    )
    raise TypeError(msg)


def _check_scale_and_bias(scale_and_bias: object) -> None:
    if not callable(scale_and_bias):
        msg = f"`scale_and_bias` must be a callable params -> (t, b), got {scale_and_bias!r}"
        raise TypeError(msg)


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        msg = f"`chunk_size` must be a positive int, got {chunk_size!r}"
        raise TypeError(msg)
    if chunk_size < 1:
        msg = f"`chunk_size` must be a positive int, got {chunk_size}"
        raise ValueError(msg)
    return chunk_size


def _rows(name: str, inputs: Any) -> int:
    """Return the common length of the leading axis of every leaf of ``inputs``."""
    leaves = jax.tree.leaves(inputs)
    lengths = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) else -1 for leaf in leaves}
    if len(lengths) != 1 or -1 in lengths:
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        msg = (
            f"`{name}` must be an array, or a pytree of arrays, whose leaves all have the same "
            f"number of rows (leading axis), got leaves of shapes {shapes}"
        )
        raise ValueError(msg)
    (rows,) = lengths
    return rows


def _check_params(params: Params) -> None:
    """Every leaf of ``params`` must be floating (its gradient is accumulated chunk by chunk)."""
    for leaf in jax.tree.leaves(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            msg = (
                "`params` must hold floating leaves only (their gradients are accumulated "
                f"chunk by chunk), got a leaf of dtype {jnp.result_type(leaf)}"
            )
            raise TypeError(msg)


def _refuse_traced_host_comm(comm: Communicator | None, *trees: Any) -> None:
    """Refuse a host communicator under a transformation: it exchanges concrete arrays."""
    if comm is None or getattr(comm, "spmd", False):
        return
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees)):
        return
    msg = (
        f"`comm` {comm!r} cannot be used under jax.jit or another JAX transformation: its "
        "ranks exchange concrete arrays. Call cached_value_and_grad eagerly, or use "
        "AxisComm inside jax.shard_map"
    )
    raise TypeError(msg)


def _scalars(given: object) -> tuple[jax.Array, jax.Array | None]:
    """``scale_and_bias``'s ``(t, b)`` as 0-d arrays (``b`` may be None)."""
    if not (isinstance(given, tuple | list) and len(given) == 2):
        msg = f"`scale_and_bias` must return a pair (t, b), got {given!r}"
        raise TypeError(msg)
    t, b = given
    return jnp.asarray(t), None if b is None else jnp.asarray(b)


def _split(inputs: Any, rows: int, chunk: int) -> tuple[Any, Any]:
    """Split the first ``q * chunk`` rows into (q, chunk, ...) leaves; the tail (or None)."""
    whole = rows // chunk
    body = None
    if whole:
        body = jax.tree.map(
            lambda a: jnp.reshape(a[: whole * chunk], (whole, chunk, *jnp.shape(a)[1:])), inputs
        )
    tail = None if rows == whole * chunk else jax.tree.map(lambda a: a[whole * chunk :], inputs)
    return body, tail


def _features(name: str, out: Any, rows: int) -> jax.Array:
    if not isinstance(out, jax.Array) or out.ndim != 2 or out.shape[0] != rows:
        shape = getattr(out, "shape", type(out).__name__)
        msg = (
            f"`encode` ({name}) must map a chunk of {rows} rows to a ({rows}, d) array of "
            f"features, got {shape}"
        )
        raise ValueError(msg)
    return out


def _embed(name: str, f: Encoder, params: Params, inputs: Any, chunk: int) -> jax.Array:
    """Pass 1: the features of every row, one chunk at a time, without a graph."""
    rows = _rows(name, inputs)
    body, tail = _split(inputs, rows, chunk)
    parts = []
    if body is not None:
        mapped = _lax.map(lambda x: _features(name, f(params, x), chunk), body)
        parts.append(jnp.reshape(mapped, (-1, mapped.shape[-1])))
    if tail is not None:
        parts.append(_features(name, f(params, tail), rows % chunk))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _per_rank(params: Params, comm: Communicator | None) -> Params:
    """``params`` typed as varying over a collective axis, so each rank's vjp is its own share.

    Inside ``shard_map`` (with its default ``check_vma``), the vjp with respect to a
    replicated value sums the cotangents over the axis itself (the transpose of the
    implicit broadcast is a ``psum``); the share of one rank is what an explicit
    ``allreduce`` can then add up, with or without ``check_vma``. Leaves that vary already
    stay as they are.
    """
    axis = getattr(comm, "axis_name", None) if getattr(comm, "spmd", False) else None
    if axis is None:
        return params

    def cast(leaf: Any) -> Any:
        try:
            return _lax.pcast(leaf, axis, to="varying")
        except ValueError:  # varying over the axis already
            return leaf

    return jax.tree.map(cast, params)


def _accumulate(total: Params, grad: Params) -> Params:
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), total, grad)


def _pull(f: Encoder, params: Params, inputs: Any, cotangent: jax.Array, chunk: int) -> Params:
    """Pass 2: the sum over chunks of the vjp of the chunk's encoder with its cotangent."""
    rows = cotangent.shape[0]
    body, tail = _split(inputs, rows, chunk)
    d_body, d_tail = _split(cotangent, rows, chunk)

    def vjp(x: Any, g: jax.Array) -> Params:
        out, pull = jax.vjp(lambda p: f(p, x), params)
        (grad,) = pull(g.astype(out.dtype))
        return grad

    total = jax.tree.map(jnp.zeros_like, params)
    if body is not None:

        def step(acc: Params, item: tuple[Any, jax.Array]) -> tuple[Params, None]:
            return _accumulate(acc, vjp(*item)), None

        total, _ = _lax.scan(step, total, (body, d_body))
    if tail is not None:
        total = _accumulate(total, vjp(tail, d_tail))
    return total


def cached_value_and_grad(
    encode: tuple[Encoder, Encoder],
    params: Params,
    images: Any,
    texts: Any,
    *,
    scale_and_bias: ScaleAndBias,
    loss: str = "sigmoid",
    chunk_size: int,
    comm: Communicator | None = None,
    img_ids: Any = None,
    txt_ids: Any = None,
    block_size: int | None = None,
    precision: str | None = None,
    strategy: str | None = None,
    unmatched_txt: str = "error",
) -> tuple[jax.Array, Params]:
    """Return the loss of a whole batch and its gradient with respect to ``params``, in two passes.

    A batch whose encoder activations do not fit in memory at once, exactly: pass 1 embeds
    the images and the texts ``chunk_size`` rows at a time (``lax.map``; nothing is kept
    but the (n, d) features); the loss and its analytic gradients with respect to every
    feature and to the scale and bias come from :func:`portable_siglip.sigmoid_loss_and_grad`
    or :func:`portable_siglip.softmax_loss_and_grad` (blockwise, O(n d)); pass 2 runs
    ``jax.vjp`` of each chunk's encoder again (``lax.scan``) and adds up its parameter
    gradient with that chunk's feature cotangent, plus the vjp of ``scale_and_bias``. Peak
    memory: one chunk's activations and their vjp, plus O(n d) features and their
    gradients. The result equals ``jax.value_and_grad`` of the loss of the whole batch,
    up to round-off, for one more forward pass of the encoders.

    A pure function: use it under ``jax.jit`` (every argument but ``encode``,
    ``scale_and_bias`` and the keyword options traced or not) and inside ``jax.shard_map``
    with ``comm=AxisComm(axis_name)``.

    Parameters
    ----------
    encode : (callable, callable)
        ``(encode_img, encode_txt)``: ``encode_img(params, images_chunk)`` returns the
        chunk's (rows, d) image features, ``encode_txt(params, texts_chunk)`` its text
        features (normalisation, if any, is the encoder's). Each is called twice on each
        chunk (once per pass) and must return the same features both times: it must be
        a pure function of its arguments. Dropout needs its key from the inputs (e.g. one
        key per row, as a leaf of ``images``), not from a counter.
    params : pytree
        Everything trained: the encoders' parameters and those ``scale_and_bias`` reads.
        Floating leaves only.
    images, texts : array or pytree of arrays
        The batch's inputs (this device's shard under ``shard_map``): every leaf has the
        m (images) or k (texts) rows along its leading axis, and a chunk is the same rows
        of every leaf. m and k may differ with ids.
    scale_and_bias : callable
        ``scale_and_bias(params) -> (t, b)``: the logit multiplier ``t > 0`` (e.g.
        ``jnp.exp(params["log_scale"])``) and bias ``b`` (or None), whose gradients reach
        ``params`` through its vjp, so any parameterisation is learned.
    loss : {"sigmoid", "softmax"}
        The loss, with its default schedule when distributed.
    chunk_size : int
        Rows per encoder call, positive. It need not divide m or k: the last chunk is
        shorter (one more trace of the encoders at its shape).
    comm : Communicator, optional
        ``AxisComm(axis_name)`` inside ``shard_map`` (or a host communicator, eagerly, with
        uneven shards allowed): ``images``/``texts`` are this rank's shard, the loss is that
        of the global batch.
    img_ids, txt_ids : array, optional
        Integer ids of the image and text rows (this rank's), as in
        :func:`portable_siglip.sigmoid_loss`: pairs with equal ids are positives.
    block_size : int, optional
        Tile edge of the loss; None picks the default.
    precision : {"fast", "exact"}, optional
        GEMM operands of the loss for half-precision features.
    strategy : str, optional
        The distributed schedule, as for :func:`portable_siglip.sigmoid_loss` (``"bidir"``,
        ``"shift"``, ``"reduce"``, ``"gather"``) or :func:`portable_siglip.softmax_loss`
        (``"ring"``, ``"gather"``); None takes the loss's default. Ignored without ``comm``.
    unmatched_txt : {"error", "negatives"}
        With ids, what the softmax loss does with a text whose id no image has (a mined hard
        negative, an extra caption), as for :func:`portable_siglip.softmax_loss`: "error"
        refuses it, "negatives" makes it a negative of every image. The sigmoid loss
        already counts such a text as a negative of every image; for it the value is
        checked and changes nothing.

    Returns
    -------
    loss : jax.Array, 0-d
        The loss of the global batch (the same on every rank).
    grads : pytree like ``params``
        The gradient of that loss with respect to ``params``. With ``comm`` it is the full
        gradient of the global loss, summed over the ranks (one ``allreduce`` per leaf of
        the encoders' part) and the same on every rank, as ``jax.grad`` of a sharded loss
        gives for replicated parameters: apply it as it is, without a further ``psum``.

    Raises
    ------
    TypeError, ValueError
        On invalid input, naming the argument: ``encode`` not a pair of callables,
        ``chunk_size`` not a positive int, ``loss`` unknown, inputs whose leaves differ in
        rows, an encoder output that is not (rows, d), integer leaves in ``params``; the
        loss's own checks as in :func:`portable_siglip.sigmoid_loss`. ``TypeError`` for a
        host communicator under ``jax.jit``.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from portable_siglip.backends.jax import cached_value_and_grad
    >>> def encode_img(p, x):
    ...     return jnp.tanh(x @ p["img"])
    >>> def encode_txt(p, x):
    ...     return jnp.tanh(x @ p["txt"])
    >>> def scale_and_bias(p):
    ...     return jnp.exp(p["log_t"]), p["b"]
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> params = {
    ...     "img": jax.random.normal(keys[0], (6, 4)),
    ...     "txt": jax.random.normal(keys[1], (5, 4)),
    ...     "log_t": jnp.asarray(1.0),
    ...     "b": jnp.asarray(-2.0),
    ... }
    >>> images = jax.random.normal(keys[2], (10, 6))
    >>> texts = jax.random.normal(keys[3], (10, 5))
    >>> step = jax.jit(
    ...     lambda p, x, y: cached_value_and_grad(
    ...         (encode_img, encode_txt), p, x, y, scale_and_bias=scale_and_bias, chunk_size=4
    ...     )
    ... )
    >>> loss, grads = step(params, images, texts)
    >>> def whole(p):  # the same loss, the encoders on the whole batch at once
    ...     from portable_siglip.backends.jax import sigmoid_loss
    ...     t, b = scale_and_bias(p)
    ...     return sigmoid_loss(encode_img(p, images), encode_txt(p, texts), t, b)
    >>> want, want_grads = jax.value_and_grad(whole)(params)
    >>> bool(jnp.allclose(loss, want, rtol=1e-5))
    True
    >>> all(jax.tree.leaves(jax.tree.map(
    ...     lambda a, b: bool(jnp.allclose(a, b, rtol=1e-4, atol=1e-6)), grads, want_grads)))
    True
    """
    encode_img, encode_txt = _check_encoders(encode)
    chunk = _check_chunk_size(chunk_size)
    described = _registry.get(loss, parameter="loss")
    loss_and_grad = _losses.loss_functions(described, _core)[1]
    unmatched = _checks.check_unmatched_txt(unmatched_txt)
    _check_scale_and_bias(scale_and_bias)
    _check_params(params)
    _refuse_traced_host_comm(comm, params, images, texts, img_ids, txt_ids)

    img = _embed("images", encode_img, params, images, chunk)
    txt = _embed("texts", encode_txt, params, texts, chunk)
    (t, b), pull_scalars = jax.vjp(lambda p: _scalars(scale_and_bias(p)), params)
    options: dict[str, Any] = {"block_size": block_size, "comm": comm, "precision": precision}
    if strategy is not None:
        options["strategy"] = strategy
    if not (img_ids is None and txt_ids is None):
        options.update(img_ids=img_ids, txt_ids=txt_ids)
    if described.needs_positives:  # the softmax loss: the only one that takes it
        options["unmatched_txt"] = unmatched
    value, grads = loss_and_grad(img, txt, t, b, **options)
    d_t = jnp.asarray(grads.scale).astype(t.dtype)
    d_b = None if b is None else jnp.asarray(grads.bias).astype(b.dtype)
    (from_scalars,) = pull_scalars((d_t, d_b))

    local = _per_rank(params, comm)
    from_encoders = _accumulate(
        _pull(encode_img, local, images, grads.img, chunk),
        _pull(encode_txt, local, texts, grads.txt, chunk),
    )
    if comm is not None:  # each rank's share: the vjp of its own rows
        from_encoders = jax.tree.map(comm.allreduce, from_encoders)
    # The scale and bias gradients of the core are already those of the global loss.
    return value, _accumulate(from_encoders, from_scalars)
