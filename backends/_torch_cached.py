"""A two-pass training step for batches whose encoder activations do not fit in memory.

:func:`cached_step` is re-exported by :mod:`portable_siglip.backends.torch`; see its
docstring. The technique is GradCache's (Gao et al., 2021): embed every chunk without a
graph, compute the loss and its gradient with respect to the embeddings, then re-embed
each chunk with a graph and back-propagate that chunk's embedding gradient. Here the
gradient with respect to the embeddings comes from the blockwise core, so no step ever
holds the n x n logits, and a communicator spreads the batch over ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeAlias

import torch

from portable_siglip import _checks, _registry
from portable_siglip.comm import Communicator, check_communicator

from ._torch_common import as_scalar, detached, loss_functions, without_autocast

#: A batch of encoder inputs: a tensor, or a dict, tuple or list of them (nested alike),
#: whose tensors share their first dimension, the rows.
Inputs: TypeAlias = Any
#: Maps a chunk of inputs (sliced like the batch) to its (rows, d) features.
Encoder: TypeAlias = Callable[[Any], torch.Tensor]
#: The global RNG states: CPU, and every CUDA device's where CUDA is initialised.
RngState: TypeAlias = "tuple[torch.Tensor, list[torch.Tensor] | None]"


class _Tower(NamedTuple):
    """One side of the batch: its encoder, inputs and row count, named for messages."""

    name: str  # "images" or "texts"
    encoder: str  # "encode_img" or "encode_txt"
    encode: object  # the caller's encoder, checked to be an Encoder
    inputs: Inputs
    rows: int


# ------------------------------------------------------------------------- validation


def _rows(inputs: Inputs, name: str) -> int:
    """Return the common first dimension of the tensors in `inputs` (ValueError if none)."""
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in _tensors(inputs, name)}
    if not sizes:
        msg = f"`{name}` holds no tensor"
        raise ValueError(msg)
    if len(sizes) > 1 or -1 in sizes:
        shown = ", ".join(str(s) if s >= 0 else "0-d" for s in sorted(sizes))
        msg = f"`{name}`: every tensor must have the same number of rows (dim 0), got {shown}"
        raise ValueError(msg)
    rows = sizes.pop()
    if rows < 1:
        msg = f"`{name}` has no rows"
        raise ValueError(msg)
    return int(rows)


def _tensors(inputs: Inputs, name: str) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
    elif isinstance(inputs, Mapping):
        for value in inputs.values():
            yield from _tensors(value, name)
    elif isinstance(inputs, tuple | list):
        for value in inputs:
            yield from _tensors(value, name)
    else:
        msg = (
            f"`{name}` must be a tensor, or a dict, tuple or list of tensors, got "
            f"{type(inputs).__name__}"
        )
        raise TypeError(msg)


def _chunk(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Rows start:stop of every tensor in `inputs`, in the same structure."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {key: _chunk(value, start, stop) for key, value in inputs.items()}
    parts = [_chunk(value, start, stop) for value in inputs]
    if isinstance(inputs, list):
        return parts
    return type(inputs)(*parts) if hasattr(inputs, "_fields") else tuple(parts)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"`{name}` must be a positive int, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if value < 1:
        msg = f"`{name}` must be a positive int, got {value!r}"
        raise ValueError(msg)
    return value


def _check_scalar(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            msg = f"`{name}` must be a 0-d tensor or a number, got shape {tuple(value.shape)}"
            raise ValueError(msg)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        kinds = "a 0-d tensor, a number or None" if optional else "a 0-d tensor or a number"
        msg = f"`{name}` must be {kinds}, got {type(value).__name__} {value!r}"
        raise TypeError(msg)


def _check_ids(img_ids: object, txt_ids: object, n_img: int, n_txt: int) -> None:
    if (img_ids is None) != (txt_ids is None):
        msg = "pass both `img_ids` and `txt_ids`, or neither"
        raise ValueError(msg)
    if img_ids is None:
        if n_img != n_txt:
            msg = (
                f"`images` has {n_img} rows and `texts` {n_txt}: without ids row i of each is "
                "a pair, so they must match (pass img_ids/txt_ids for other layouts)"
            )
            raise ValueError(msg)
        return
    for name, ids, rows, inputs in (
        ("img_ids", img_ids, n_img, "images"),
        ("txt_ids", txt_ids, n_txt, "texts"),
    ):
        if not isinstance(ids, torch.Tensor):
            msg = f"`{name}` must be a torch.Tensor of integer ids, got {type(ids).__name__}"
            raise TypeError(msg)
        if tuple(ids.shape) != (rows,):
            msg = f"`{name}` must have shape ({rows},), one id per row of `{inputs}`, got {tuple(ids.shape)}"  # noqa: E501
            raise ValueError(msg)


def _check_strategy(spec: _registry.Loss, strategy: object) -> str:
    if strategy is None:
        return spec.default_schedule
    if not isinstance(strategy, str) or strategy not in spec.schedules:
        msg = f"`strategy` must be None or one of {spec.schedules}, got {strategy!r}"
        raise ValueError(msg)
    return strategy


def _check_call(
    towers: tuple[_Tower, _Tower], scale: object, bias: object, options: dict[str, Any]
) -> None:
    """Refuse what the step cannot run, before any encoder runs."""
    for tower in towers:
        if not callable(tower.encode):
            msg = f"`{tower.encoder}` must be callable, got {type(tower.encode).__name__}"
            raise TypeError(msg)
    _check_scalar("logit_scale", scale, optional=False)
    _check_scalar("logit_bias", bias, optional=True)
    _check_ids(options["img_ids"], options["txt_ids"], towers[0].rows, towers[1].rows)
    if options["block_size"] is not None:
        _checks._check_block_size(options["block_size"], sys.maxsize)
    _checks._check_precision(options["precision"])
    if not isinstance(options["sync_grads"], bool):
        value = options["sync_grads"]
        msg = f"`sync_grads` must be True or False, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not torch.is_grad_enabled():
        msg = (
            "cached_step back-propagates into the encoders: call it with gradients enabled "
            "(not under torch.no_grad() or torch.inference_mode())"
        )
        raise RuntimeError(msg)


# ------------------------------------------------------------------------------ passes


def _rng_state() -> RngState:
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = torch.cuda.get_rng_state_all() if initialised else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class _RngStates:
    """The global RNG states before each of `count` chunks, in storage allocated once.

    Not one tensor per chunk: on glibc a small allocation that outlives a chunk's large
    temporaries splits the hole they leave, and the heap then grows by about one chunk's
    activations per chunk (measured: 250 MiB for 128 chunks of 512 rows).
    """

    def __init__(self, count: int) -> None:
        self.cpu = torch.empty((count, torch.get_rng_state().numel()), dtype=torch.uint8)
        self.cuda: torch.Tensor | None = None
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            states = torch.cuda.get_rng_state_all()
            self.cuda = torch.empty((count, len(states), states[0].numel()), dtype=torch.uint8)

    def record(self, index: int) -> None:
        self.cpu[index].copy_(torch.get_rng_state())
        if self.cuda is not None:
            self.cuda[index].copy_(torch.stack(torch.cuda.get_rng_state_all()))

    def restore(self, index: int) -> None:
        # A copy: set_rng_state of a row view past the first crashes (torch 2.13).
        torch.set_rng_state(self.cpu[index].clone())
        if self.cuda is not None:
            torch.cuda.set_rng_state_all([state.clone() for state in self.cuda[index]])


def _spans(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def _checked_features(tower: _Tower, out: object, rows: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != rows:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        msg = (
            f"`{tower.encoder}` must return a "
            f"(rows, d) tensor, one row per input row; got {shape} for a chunk of {rows} rows"
        )
        raise ValueError(msg)
    return out


def _encode(tower: _Tower, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of the tower's features, checked."""
    encode: Encoder = tower.encode  # type: ignore[assignment]  # callable: _check_call
    return _checked_features(tower, encode(_chunk(tower.inputs, start, stop)), stop - start)


def _embed_without_graph(tower: _Tower, chunk_size: int) -> tuple[torch.Tensor, _RngStates]:
    """Pass 1: the features of every chunk, without a graph, and each chunk's RNG state."""
    spans = _spans(tower.rows, chunk_size)
    states = _RngStates(len(spans))
    features: torch.Tensor | None = None
    for index, (start, stop) in enumerate(spans):
        states.record(index)
        with torch.no_grad():
            out = _encode(tower, start, stop)
        if features is None:
            features = out.new_empty((tower.rows, out.shape[1]))
        elif out.shape[1] != features.shape[1] or out.dtype != features.dtype:
            msg = (
                f"`{tower.encoder}` returned "
                f"{out.dtype} features of width {out.shape[1]} for rows {start}:{stop}, and "
                f"{features.dtype} of width {features.shape[1]} for the first chunk"
            )
            raise ValueError(msg)
        features[start:stop] = out
    assert features is not None  # rows >= 1
    return features, states


def _leaves(roots: list[torch.Tensor], found: dict[int, torch.Tensor]) -> None:
    """Add to `found` the leaf tensors that a backward from `roots` accumulates into."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions if child is not None)


def _backward_with_graph(
    tower: _Tower,
    chunk_size: int,
    states: _RngStates,
    grad: torch.Tensor,
    factor: float,
    found: dict[int, torch.Tensor] | None,
) -> None:
    """Pass 2: re-embed each chunk with a graph, its RNG state restored; back-propagate.

    Each chunk gets its rows of `grad` times `factor` (the number of ranks: DDP's convention).
    """
    for index, (start, stop) in enumerate(_spans(tower.rows, chunk_size)):
        states.restore(index)
        with torch.enable_grad():
            out = _encode(tower, start, stop)
        if not out.requires_grad:  # a frozen tower (LiT): nothing to back-propagate
            return
        if found is not None:
            _leaves([out], found)
        rows = grad[start:stop] * factor if factor != 1.0 else grad[start:stop]
        torch.autograd.backward(out, rows.to(out.dtype))


def _average(comm: Communicator, leaves: list[torch.Tensor]) -> None:
    """Average the leaves' gradients over the ranks: one all-reduce per dtype and device."""
    layout = [(tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves]
    if any(other != layout for other in comm.allgather_object(layout)):
        msg = (
            "cached_step: the ranks' encoders reached different parameters, so their "
            "gradients cannot be averaged; every rank must run the same model"
        )
        raise RuntimeError(msg)
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    for leaf in leaves:
        groups.setdefault((str(leaf.device), str(leaf.dtype)), []).append(leaf)
    for group in groups.values():
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in group]
        total = comm.allreduce(torch.cat([g.reshape(-1) for g in grads]))
        mean = total / comm.size
        offset = 0
        for leaf in group:
            size = leaf.numel()
            part = mean[offset : offset + size].reshape(leaf.shape)
            if leaf.grad is None:
                leaf.grad = part.clone()
            else:
                leaf.grad.copy_(part)  # in place: views of .grad (optimisers') stay valid
            offset += size


def _scalar_backward(
    pairs: list[tuple[Any, torch.Tensor]], found: dict[int, torch.Tensor] | None
) -> None:
    """Back-propagate the scale's and bias's gradients through the caller's graphs."""
    roots, grads = [], []
    for value, grad in pairs:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            roots.append(value)
            grads.append(grad.reshape(value.shape).to(value.dtype))
    if not roots:
        return
    if found is not None:
        _leaves(roots, found)
        found.update({id(r): r for r in roots if r.grad_fn is None})  # the leaves themselves
    torch.autograd.backward(roots, grads)


def cached_step(
    encode_img: Encoder,
    encode_txt: Encoder,
    images: Inputs,
    texts: Inputs,
    *,
    loss: str = "sigmoid",
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    chunk_size: int,
    comm: Communicator | None = None,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    precision: str | None = None,
    strategy: str | None = None,
    sync_grads: bool = True,
    unmatched_txt: str = "error",
) -> torch.Tensor:
    """Back-propagate the loss of a whole batch while the encoders see one chunk at a time.

    Two passes over the batch (GradCache's technique), so that peak memory is one chunk's
    activations plus the O(n d) features, whatever the batch size n:

    1. every chunk of ``chunk_size`` rows is embedded under ``torch.no_grad()`` (the image
       chunks in order, then the text chunks), and the global RNG state (CPU, and every
       CUDA device's where CUDA is initialised) is recorded before each;
    2. the loss and its analytic gradients with respect to all features, ``logit_scale``
       and ``logit_bias`` come from the blockwise core
       (:func:`portable_siglip.sigmoid_loss_and_grad`, ...); the scale's and bias's are
       back-propagated through their graphs at once;
    3. every chunk is embedded again, with a graph and its RNG state restored (so dropout
       draws the same numbers), and ``backward`` is called on it with its rows of the
       feature gradient.

    Parameter ``.grad`` then accumulate exactly what one ``backward()`` of the loss of
    the whole batch would give them, the features embedded chunk by chunk in the order
    above. Gradients already in ``.grad`` are added to, as by ``backward()``; the RNG is
    left as after one pass.

    Parameters
    ----------
    encode_img, encode_txt : callable
        Map a chunk of ``images`` (``texts``), sliced along dim 0 like the batch, to its
        (rows, d) features, normalised as the model does. Each is called twice per chunk
        and must draw randomness only from torch's global generators.
    images, texts : torch.Tensor, or a dict, tuple or list of them
        This rank's batch: every tensor's dim 0 is the rows (e.g. ``pixel_values``, or
        ``{"input_ids": ..., "attention_mask": ...}``).
    loss : {"sigmoid", "softmax"}
        The loss: SigLIP's sigmoid or CLIP's softmax (or another registered loss).
    logit_scale : torch.Tensor or float
        The multiplier ``t > 0`` itself, as the loss modules take it, e.g.
        ``model.logit_scale.exp()``: its graph is back-propagated, so whatever
        parameterisation the model learns gets its gradient.
    logit_bias : torch.Tensor, float or None
        The logit bias ``b``; None means 0.
    chunk_size : int
        Rows per encoder call; the last chunk may be shorter.
    comm : Communicator, optional
        The ranks sharing the global batch (e.g. ``TorchDistComm()``); None for one
        process. The loss is then the global one, the same on every rank.
    img_ids, txt_ids : torch.Tensor, optional
        Integer ids of the image and text rows: pairs with equal ids are positives, and
        the two sides may have different row counts (docs/multi-positive.md).
    block_size, precision : optional
        The core's tile edge and half-precision GEMM policy, as in
        :func:`portable_siglip.sigmoid_loss`.
    strategy : str, optional
        The distributed schedule; None picks the loss's default.
    sync_grads : bool
        Only with ``comm`` of W > 1 ranks. The features' gradients are back-propagated
        multiplied by W (DDP's convention: the scale's and bias's are complete on every
        rank and are not). True (default): at the end, the gradients of every tensor the
        step back-propagated into are **averaged over the ranks with one all-reduce** per
        dtype and device, what DDP does, so every rank holds the exact gradient of the
        global loss. False: leave them for the caller's own averaging.
    unmatched_txt : {"error", "negatives"}
        The softmax loss's: what a text whose id matches no image is ("negatives": a hard
        negative of every image, docs/multi-positive.md); the sigmoid loss takes every
        such pair as a negative anyway and ignores it.

    Returns
    -------
    torch.Tensor, 0-d
        The (global) loss, detached; float64 for float64 features, else float32.

    Raises
    ------
    TypeError, ValueError
        On invalid input, naming the parameter, before any encoder runs (an encoder's
        output is checked as it comes).
    RuntimeError
        If called with gradients disabled.

    Notes
    -----
    **DDP.** The step does the averaging itself (``sync_grads``): give it encoders that
    call the wrapped module (``ddp_model.module``), not the ``DistributedDataParallel``
    wrapper, whose per-forward buffer broadcast and per-backward all-reduce would need
    the same number of chunks on every rank. Ranks may hold different numbers of rows.

    **Autocast.** Run the step inside ``torch.autocast``: both passes run under it, and
    the loss switches it off and accumulates half-precision features in float32.

    **Layers that see the whole chunk.** Batch norm in training mode normalises by each
    chunk's statistics, not the batch's, and updates its running statistics in both
    passes; in eval mode (or with layer norm) the step is exact.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from portable_siglip.backends.torch import cached_step
    >>> _ = torch.manual_seed(0)
    >>> image_tower = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.1))
    >>> text_tower = nn.Linear(6, 4)
    >>> log_scale = nn.Parameter(torch.tensor(2.3))
    >>> images, texts = torch.randn(10, 8), torch.randn(10, 6)
    >>> loss = cached_step(
    ...     lambda x: nn.functional.normalize(image_tower(x), dim=-1),
    ...     lambda x: nn.functional.normalize(text_tower(x), dim=-1),
    ...     images,
    ...     texts,
    ...     logit_scale=log_scale.exp(),
    ...     logit_bias=-10.0,
    ...     chunk_size=4,  # the towers see at most 4 rows at a time
    ... )
    >>> loss.shape, image_tower[0].weight.grad.shape, log_scale.grad.shape
    (torch.Size([]), torch.Size([4, 8]), torch.Size([]))
    """
    spec = _registry.get(loss)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    towers = (
        _Tower("images", "encode_img", encode_img, images, _rows(images, "images")),
        _Tower("texts", "encode_txt", encode_txt, texts, _rows(texts, "texts")),
    )
    options = {
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "block_size": block_size,
        "precision": precision,
        "sync_grads": sync_grads,
    }
    _check_call(towers, logit_scale, logit_bias, options)
    strategy = _check_strategy(spec, strategy)
    unmatched = _checks.check_unmatched_txt(unmatched_txt)
    extra = {"unmatched_txt": unmatched} if spec.needs_positives else {}
    comm = check_communicator(comm) if comm is not None else None
    scale = as_scalar(logit_scale)
    bias = as_scalar(logit_bias)

    # Pass 1: the features, without a graph.
    img, img_states = _embed_without_graph(towers[0], chunk_size)
    txt, txt_states = _embed_without_graph(towers[1], chunk_size)
    after_pass_1 = _rng_state()

    # The loss and its gradients, blockwise, in the core's own precision.
    _, loss_and_grad = loss_functions(spec.name)
    with without_autocast(img.device.type):
        value, grads = loss_and_grad(
            img,
            txt,
            detached(scale),
            detached(bias),
            block_size=block_size,
            comm=comm,
            strategy=strategy,
            img_ids=detached(img_ids),
            txt_ids=detached(txt_ids),
            precision=precision,
            **extra,
        )
    del img, txt
    found: dict[int, torch.Tensor] | None = (
        {} if comm is not None and comm.size > 1 and sync_grads else None
    )
    _scalar_backward([(scale, grads.scale), (bias, grads.bias)], found)

    # Pass 2: each chunk again, with a graph, and its share of the feature gradient.
    factor = float(comm.size) if comm is not None else 1.0
    try:
        _backward_with_graph(towers[0], chunk_size, img_states, grads.img, factor, found)
        _backward_with_graph(towers[1], chunk_size, txt_states, grads.txt, factor, found)
    finally:
        _set_rng_state(after_pass_1)
    if found is not None:
        assert comm is not None
        _average(comm, list(found.values()))
    return value.detach()  # type: ignore[no-any-return]
