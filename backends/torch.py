"""PyTorch bridge: autograd-aware losses and ``nn.Module`` drop-ins for open_clip's.

:func:`sigmoid_loss` and :func:`softmax_loss` take torch tensors and return a loss that
``backward()`` differentiates. Their forward computes the loss and its analytic gradients
in one blockwise pass (:func:`portable_siglip.sigmoid_loss_and_grad`) and keeps only the
gradients, O(n d); backward multiplies them by the incoming gradient. No autograd graph
is built over the n x n logits, so backward needs no more memory than forward:
O(n d + block_size^2) beyond the inputs, whatever n is.

:class:`SigLipLoss` and :class:`ClipLoss` are ``nn.Module`` s with the constructor and
``forward`` of open_clip's modules of the same names: ``logit_scale`` is the multiplier
itself (the model's ``logit_scale.exp()``), ``logit_bias`` is optional, and
``output_dict=True`` returns ``{"contrastive_loss": loss}``.

Distributed training
--------------------
With ``comm`` (a :class:`~portable_siglip.comm.Communicator` of W ranks, e.g.
:class:`~portable_siglip.backends.mpi.MPIComm`), each rank passes its shard of the
global batch and gets the **global** loss, identical on every rank. Its gradients then
come in one of two conventions:

``ddp=False`` (the functions' default)
    The exact gradients of the global loss with respect to this rank's shard and the
    shared ``logit_scale``/``logit_bias``: what a caller that sums gradients over ranks
    (or keeps them per rank) needs.
``ddp=True`` (the modules' default)
    Gradients ready for DistributedDataParallel (or FSDP, Horovod), which *average* the
    parameter gradients over the W ranks: the shard's gradients are multiplied by W, the
    ``logit_scale``/``logit_bias`` gradients (already complete on every rank) are not.
    After DDP's averaging every parameter holds the exact gradient of the global loss,
    as with open_clip's ``SigLipLoss`` and its ``ClipLoss(gather_with_grad=True)``.

With W = 1 (or ``comm=None``) the two conventions coincide.

Precision
---------
float64, float32, bfloat16 and float16 features are accepted; half precision is
accumulated in float32 and the loss is float32. Autocast is switched off inside the
loss, so an enclosing ``torch.autocast`` region does not lower the precision of its
matrix products; gradients come back in each input's dtype.

torch.compile
-------------
The loss is one custom operator, ``torch.ops.portable_siglip.loss_and_grad`` (the value
alone: ``torch.ops.portable_siglip.loss``), with a fake implementation and an autograd
formula registered, so the modules and functions compile with ``fullgraph=True``. The
blockwise loops, the checks and the communication run inside the operator, outside any
graph. A communicator reaches the operator as a handle: the modules register theirs at
construction; the functions register a new one in a step kept out of the graph by
``torch.compiler.disable`` (a graph break on its first compiled call).

Double backward is not supported: the backward is the precomputed analytic gradient.
A backward pass with ``create_graph=True`` (the first step of a gradient penalty, a
Hessian-vector product or ``gradgradcheck``) raises a ``RuntimeError`` rather than
return gradients that autograd would then treat as constants.

Examples
--------
>>> import torch
>>> from portable_siglip.backends.torch import SigLipLoss
>>> from torch.nn.functional import normalize
>>> img = normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1).requires_grad_()
>>> txt = normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
>>> logit_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)  # t' = log t
>>> logit_bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
>>> loss = SigLipLoss(block_size=4)(img, txt, logit_scale.exp(), logit_bias)
>>> loss.backward()
>>> img.grad.shape, logit_scale.grad.shape, logit_bias.grad.shape
(torch.Size([6, 4]), torch.Size([]), torch.Size([]))
"""

from __future__ import annotations

import numbers
import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
from torch import nn

from portable_siglip import _checks, _registry
from portable_siglip.comm import BaseComm, Communicator, Request, check_communicator

from ._torch_cached import cached_step
from ._torch_common import as_scalar as _as_scalar
from ._torch_common import detached as _detached
from ._torch_common import loss_functions as _loss_functions
from ._torch_common import without_autocast as _without_autocast

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "TorchDistComm",
    "cached_step",
    "sigmoid_loss",
    "softmax_loss",
]

Scalar: TypeAlias = "float | torch.Tensor"
#: The name of a registered loss (portable_siglip._registry).
LossName: TypeAlias = str


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, factor: float) -> torch.Tensor:
    # Scalar first, so the (n, d) gradient is touched once; back to the primal's dtype.
    return (grad * (grad_output * factor)).to(grad.dtype)


# --------------------------------------------------------------------------- custom ops
#
# The loss enters torch as two operators of the library `portable_siglip`, so that
# torch.compile (Dynamo, AOTAutograd) treats it as one opaque node, fullgraph=True
# included: the blockwise loops, the checks and the communication run inside the operator,
# outside any graph, and a registered fake implementation gives Dynamo the outputs' shapes
# and dtypes. `loss_and_grad` returns the loss and its analytic gradients; its registered
# autograd formula multiplies those by the incoming gradient. `loss` is the value alone.
#
# An operator takes tensors, numbers and strings only: a Python scale or bias travels as a
# float next to an absent tensor, and the communicator as an integer handle (`_comm_handle`).

_SIGNATURE = (
    "Tensor img, Tensor txt, Tensor? scale, float? scale_number, Tensor? bias, "
    "float? bias_number, Tensor? img_ids, Tensor? txt_ids, str loss, int? block_size, "
    "int? comm, str strategy, str? precision"
)
# `unmatched_txt` (the softmax loss's) comes last, with its default, so that the operators
# keep their positional arguments.
_LOSS_AND_GRAD_SCHEMA = (
    f'({_SIGNATURE}, float shard_factor, str unmatched_txt="error") '
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LOSS_SCHEMA = f'({_SIGNATURE}, str unmatched_txt="error") -> Tensor'
#: Where `shard_factor` is among the inputs of `loss_and_grad`: after the signature's.
_SHARD_FACTOR = _SIGNATURE.count(",") + 1

#: The communicators passed to the operators, by handle (`id`): a weak reference whose
#: callback drops the entry when the communicator dies (so a live entry's id is never
#: reused), or the communicator itself where it cannot be weakly referenced.
_COMMS: dict[int, Any] = {}


def _enter_comm(comm: Communicator) -> int:
    """Enter `comm` in `_COMMS` and return its handle."""
    handle = id(comm)

    def forget(_: object) -> None:
        _COMMS.pop(handle, None)

    try:
        _COMMS[handle] = weakref.ref(comm, forget)
    except TypeError:  # not weakly referenceable: keep it, and with it its id
        _COMMS[handle] = comm
    return handle


#: `_enter_comm` outside any graph: Dynamo cannot trace weak references (a graph break).
_register_comm: Callable[[Communicator], int] = torch.compiler.disable(_enter_comm)  # type: ignore[no-untyped-call]


def _comm_handle(comm: Communicator | None) -> int | None:
    """Return the integer that stands for `comm` in an operator call (None for None).

    A communicator seen before (the modules enter theirs at construction) is looked up,
    which Dynamo traces; a new one is entered by `_register_comm`, a graph break.
    """
    if comm is None:
        return None
    handle = id(comm)
    return handle if handle in _COMMS else _register_comm(comm)


def _comm_of(handle: int | None) -> Communicator | None:
    if handle is None:
        return None
    entry = _COMMS[handle]
    return entry() if isinstance(entry, weakref.ref) else entry


def _core_call(
    loss: LossName,
    with_grad: bool,
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor | None,
    scale_number: float | None,
    bias: torch.Tensor | None,
    bias_number: float | None,
    img_ids: torch.Tensor | None,
    txt_ids: torch.Tensor | None,
    block_size: int | None,
    comm: int | None,
    strategy: str,
    precision: str | None,
    unmatched_txt: str = "error",
) -> Any:
    """Run the core's loss (with its gradients if `with_grad`) on plain tensors."""
    value, loss_and_grad = _loss_functions(loss)
    # Only a loss that takes it (the softmax loss) is given `unmatched_txt`; "error" is its
    # default, so a call that leaves it alone passes nothing.
    extra = {} if unmatched_txt == "error" else {"unmatched_txt": unmatched_txt}
    return (loss_and_grad if with_grad else value)(
        _detached(img),
        _detached(txt),
        _detached(scale) if scale is not None else scale_number,
        _detached(bias) if bias is not None else bias_number,
        block_size=block_size,
        comm=_comm_of(comm),
        strategy=strategy,
        img_ids=_detached(img_ids),
        txt_ids=_detached(txt_ids),
        precision=precision,
        **extra,
    )


def _fresh(tensor: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
    """`tensor`, or a copy where it shares memory with an input (an operator must not alias)."""
    for other in inputs:
        if isinstance(other, torch.Tensor) and tensor.untyped_storage().data_ptr() == (
            other.untyped_storage().data_ptr()
        ):
            return tensor.clone()
    return tensor


@torch.library.custom_op(
    "portable_siglip::loss_and_grad", mutates_args=(), schema=_LOSS_AND_GRAD_SCHEMA
)
def _loss_and_grad_op(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor | None,
    scale_number: float | None,
    bias: torch.Tensor | None,
    bias_number: float | None,
    img_ids: torch.Tensor | None,
    txt_ids: torch.Tensor | None,
    loss: str,
    block_size: int | None,
    comm: int | None,
    strategy: str,
    precision: str | None,
    shard_factor: float,
    unmatched_txt: str = "error",
) -> tuple[torch.Tensor, ...]:
    """Return the loss and its gradients (img, txt, scale, bias), the factor is for backward."""
    del shard_factor
    inputs = (img, txt, scale, bias, img_ids, txt_ids)
    value, grads = _core_call(
        loss, True, img, txt, scale, scale_number, bias, bias_number, img_ids, txt_ids,
        block_size, comm, strategy, precision, unmatched_txt,
    )  # fmt: skip
    outputs = (value, grads.img, grads.txt, grads.scale, grads.bias)
    return tuple(_fresh(out, inputs) for out in outputs)


@torch.library.custom_op("portable_siglip::loss", mutates_args=(), schema=_LOSS_SCHEMA)
def _loss_op(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor | None,
    scale_number: float | None,
    bias: torch.Tensor | None,
    bias_number: float | None,
    img_ids: torch.Tensor | None,
    txt_ids: torch.Tensor | None,
    loss: str,
    block_size: int | None,
    comm: int | None,
    strategy: str,
    precision: str | None,
    unmatched_txt: str = "error",
) -> torch.Tensor:
    """Return the loss alone: no gradient pass."""
    value = _core_call(
        loss, False, img, txt, scale, scale_number, bias, bias_number, img_ids, txt_ids,
        block_size, comm, strategy, precision, unmatched_txt,
    )  # fmt: skip
    return _fresh(value, (img, txt, scale, bias, img_ids, txt_ids))


def _accumulator(img: torch.Tensor) -> torch.dtype:
    """Return the loss's dtype: float64 for float64 features, else float32."""
    return torch.float64 if img.dtype == torch.float64 else torch.float32


@_loss_and_grad_op.register_fake
def _loss_and_grad_fake(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor | None,
    scale_number: float | None,
    bias: torch.Tensor | None,
    bias_number: float | None,
    *args: Any,
) -> tuple[torch.Tensor, ...]:
    # The shapes and dtypes of the core's results (a Python scale's or bias's gradient is
    # in the accumulation dtype); the values come only from the real call.
    compute = _accumulator(img)
    return (
        img.new_empty((), dtype=compute),
        torch.empty_like(img),
        torch.empty_like(txt),
        img.new_empty((), dtype=scale.dtype if scale is not None else compute),
        img.new_empty((), dtype=bias.dtype if bias is not None else compute),
    )


@_loss_op.register_fake
def _loss_fake(img: torch.Tensor, *args: Any) -> torch.Tensor:
    return img.new_empty((), dtype=_accumulator(img))


def _setup_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.save_for_backward(*output[1:])
    # DDP averages over W ranks: pre-multiply what only this rank holds (its shard).
    ctx.shard_factor = inputs[_SHARD_FACTOR]


def _backward(ctx: Any, grad_output: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # backward(create_graph=True) or autograd.grad(..., create_graph=True)
        msg = (
            "portable_siglip: double backward is not supported: the loss's backward is "
            "its precomputed analytic gradient, which autograd cannot differentiate "
            "again. Do not pass create_graph=True through this loss (a gradient "
            "penalty on it, gradgradcheck or a Hessian-vector product would be wrong)."
        )
        raise RuntimeError(msg)
    g_img, g_txt, g_scale, g_bias = ctx.saved_tensors
    factor = ctx.shard_factor
    needs = ctx.needs_input_grad
    return (
        _scaled(g_img, grad_output, factor) if needs[0] else None,
        _scaled(g_txt, grad_output, factor) if needs[1] else None,
        _scaled(g_scale, grad_output, 1.0) if needs[2] else None,
        None,
        _scaled(g_bias, grad_output, 1.0) if needs[4] else None,
        *([None] * 10),
    )


torch.library.register_autograd(
    "portable_siglip::loss_and_grad", _backward, setup_context=_setup_backward
)


def _needs_graph(*values: Any) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values
    )


def _check_ddp(ddp: object) -> bool:
    if not isinstance(ddp, bool):
        msg = f"`ddp` must be True or False, got {type(ddp).__name__} {ddp!r}"
        raise TypeError(msg)
    return ddp


def _split_scalar(value: Any) -> tuple[torch.Tensor | None, float | None] | None:
    """Split a scale or bias into (tensor, None), (None, number) or (None, None).

    None where the value is neither a tensor, a Python real nor None: the core refuses it.
    """
    if value is None or isinstance(value, torch.Tensor):
        return value, None
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        try:
            return None, float(value)
        except (OverflowError, ValueError):
            return None
    return None


def _op_arguments(
    loss: LossName, img: Any, txt: Any, scale: Any, bias: Any, core: dict[str, Any]
) -> tuple[Any, ...] | None:
    """Return the operators' arguments, or None where one has a type they cannot take.

    Such arguments (arrays of another library, a bool scale, a string block size...) go to
    the core directly, whose checks refuse them with its usual messages.
    """
    scale_parts, bias_parts = _split_scalar(scale), _split_scalar(bias)
    block_size, precision, comm = core["block_size"], core["precision"], core["comm"]
    ids = (core["img_ids"], core["txt_ids"])
    if (
        not (isinstance(img, torch.Tensor) and isinstance(txt, torch.Tensor))
        or scale_parts is None
        or scale_parts == (None, None)
        or bias_parts is None
        or not all(i is None or isinstance(i, torch.Tensor) for i in ids)
        or not (block_size is None or (type(block_size) is int and abs(block_size) < 2**62))
        or not isinstance(core["strategy"], str)
        or not (precision is None or isinstance(precision, str))
        or not isinstance(core.get("unmatched_txt", "error"), str)
        or not (comm is None or type(getattr(comm, "size", None)) is int)
    ):
        return None
    return (
        img,
        txt,
        *scale_parts,
        *bias_parts,
        *ids,
        loss,
        block_size,
        _comm_handle(comm),
        core["strategy"],
        precision,
    )


def _evaluate(
    loss: LossName,
    img: Any,
    txt: Any,
    scale: Any,
    bias: Any,
    *,
    block_size: int | None,
    comm: Communicator | None,
    strategy: str,
    ddp: bool,
    img_ids: Any = None,
    txt_ids: Any = None,
    precision: str | None = None,
    unmatched_txt: Any = "error",
) -> torch.Tensor:
    ddp = _check_ddp(ddp)
    scale = _as_scalar(scale)
    bias = _as_scalar(bias)
    core = {
        "block_size": block_size,
        "comm": comm,
        "strategy": strategy,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "precision": precision,
    }
    if not (isinstance(unmatched_txt, str) and unmatched_txt == "error"):
        core["unmatched_txt"] = unmatched_txt  # only the softmax loss takes it
    arguments = _op_arguments(loss, img, txt, scale, bias, core)
    if arguments is None:  # refused by the core's checks (or arrays of another library)
        value, _ = _loss_functions(loss)
        return value(  # type: ignore[no-any-return]
            _detached(img), _detached(txt), _detached(scale), _detached(bias), **core
        )
    unmatched = core.get("unmatched_txt", "error")
    # The loss runs its own precision policy (half inputs accumulate in float32, `precision`
    # chooses the GEMM operands): an enclosing autocast must not change its GEMMs.
    with _without_autocast(img.device.type):
        if _needs_graph(img, txt, scale, bias):
            # DDP averages over W ranks: backward pre-multiplies the shard's gradients by W.
            factor = float(comm.size) if ddp and comm is not None else 1.0
            outputs = _loss_and_grad_op(*arguments, factor, unmatched)
            return outputs[0]  # type: ignore[no-any-return]
        return _loss_op(*arguments, unmatched)  # type: ignore[no-any-return]


def sigmoid_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: Scalar,
    bias: Scalar | None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "bidir",
    ddp: bool = False,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """SigLIP sigmoid loss that torch autograd differentiates, with flat memory in backward.

    The arguments and the value are those of :func:`portable_siglip.sigmoid_loss`; in
    addition, ``loss.backward()`` delivers the analytic gradients computed in the same
    blockwise pass as the loss (the module docstring says how).

    Parameters
    ----------
    img, txt : torch.Tensor, shape (n, d)
        Image and text features (this rank's shard with ``comm``); float64, float32,
        bfloat16 or float16, same dtype and device.
    scale : float or torch.Tensor
        The logit multiplier ``t > 0`` itself, 0-d (or one element).
    bias : float, torch.Tensor or None
        The logit bias ``b``, 0-d (or one element); None means 0.
    block_size : int, optional
        Tile edge; None picks the library default.
    comm : Communicator, optional
        Communicator of the ranks sharing the batch; None for one process.
    strategy : {"bidir", "shift", "reduce", "gather"}
        Distributed schedule (ignored without ``comm``).
    ddp : bool
        False: exact gradients of the global loss. True: the shard's gradients are
        multiplied by the number of ranks, so that DDP's gradient averaging yields the
        exact gradients (see the module docstring).
    img_ids, txt_ids : torch.Tensor, optional
        Integer ids of the image rows (m,) and text rows (k,), as in
        :func:`portable_siglip.sigmoid_loss`: pairs with equal ids are positives, and
        ``img`` and ``txt`` may then have different row counts.
    precision : {"fast", "exact"}, optional
        GEMM operands for bfloat16/float16 features, as in
        :func:`portable_siglip.sigmoid_loss`: "fast" (default) runs them on tensor cores.

    Returns
    -------
    torch.Tensor, 0-d
        The (global) loss; float64 for float64 features, else float32.

    Raises
    ------
    TypeError, ValueError
        On invalid input, naming the parameter (with ``comm``: on every rank).
    RuntimeError
        On double backward, which is not supported.

    Examples
    --------
    >>> import torch
    >>> from portable_siglip.backends.torch import sigmoid_loss
    >>> img = torch.eye(3, requires_grad=True)
    >>> loss = sigmoid_loss(img, torch.eye(3), 10.0, -5.0)
    >>> loss.backward()
    >>> print(f"{loss.item():.6f}", tuple(img.grad.shape))
    0.020146 (3, 3)
    """
    return _evaluate(
        "sigmoid",
        img,
        txt,
        scale,
        bias,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        ddp=ddp,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
    )


def softmax_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: Scalar,
    bias: Scalar | None = None,
    *,
    block_size: int | None = None,
    comm: Communicator | None = None,
    strategy: str = "ring",
    ddp: bool = False,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    precision: str | None = None,
    unmatched_txt: str = "error",
) -> torch.Tensor:
    """CLIP softmax loss that torch autograd differentiates, with flat memory in backward.

    The arguments and the value are those of :func:`portable_siglip.softmax_loss`; the
    gradient of ``bias`` is an exact zero (the loss is shift invariant).

    Parameters
    ----------
    img, txt : torch.Tensor, shape (n, d)
        Image and text features (this rank's shard with ``comm``).
    scale : float or torch.Tensor
        The logit multiplier ``t > 0`` itself, 0-d (or one element).
    bias : float, torch.Tensor or None
        A logit bias (no effect on the value); None means 0.
    block_size : int, optional
        Tile edge; None picks the library default.
    comm : Communicator, optional
        Communicator of the ranks sharing the batch; None for one process.
    strategy : {"ring", "gather"}
        Distributed schedule (ignored without ``comm``).
    ddp : bool
        Gradient convention with ``comm``, as in :func:`sigmoid_loss`.
    img_ids, txt_ids : torch.Tensor, optional
        Integer ids of the rows, as in :func:`sigmoid_loss`.
    precision : {"fast", "exact"}, optional
        GEMM operands for half-precision features, as in :func:`sigmoid_loss`.
    unmatched_txt : {"error", "negatives"}
        With ids, a text row whose id no image has: refused ("error", the default) or a
        negative of every image ("negatives", hard negatives), as in
        :func:`portable_siglip.softmax_loss`.

    Returns
    -------
    torch.Tensor, 0-d
        The (global) loss; float64 for float64 features, else float32.

    Raises
    ------
    TypeError, ValueError
        On invalid input, naming the parameter (with ``comm``: on every rank).
    RuntimeError
        On double backward, which is not supported.

    Examples
    --------
    >>> import torch
    >>> from portable_siglip.backends.torch import softmax_loss
    >>> scale = torch.tensor(10.0, requires_grad=True)
    >>> loss = softmax_loss(torch.eye(3), torch.eye(3), scale)
    >>> loss.backward()
    >>> print(f"{loss.item():.6f} {scale.grad.item():.6f}")
    0.000091 -0.000091
    """
    return _evaluate(
        "softmax",
        img,
        txt,
        scale,
        bias,
        block_size=block_size,
        comm=comm,
        strategy=strategy,
        ddp=ddp,
        img_ids=img_ids,
        txt_ids=txt_ids,
        precision=precision,
        unmatched_txt=unmatched_txt,
    )


class _TorchRequest:
    """Keeps a posted exchange's buffers alive until ``wait()``; ``device``: where it lands."""

    def __init__(
        self,
        works: list[Any],
        recv: torch.Tensor,
        send: torch.Tensor,
        device: torch.device | None = None,
    ) -> None:
        self._works = works
        self._recv = recv
        self._send: torch.Tensor | None = send
        self._device = device

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._send = None
        return self._recv if self._device is None else self._recv.to(self._device)


def _is_half(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float16, torch.bfloat16)


class TorchDistComm(BaseComm):
    """A :class:`portable_siglip.comm.Communicator` over ``torch.distributed``.

    Use it in a job started by ``torchrun`` (or anything that calls
    ``torch.distributed.init_process_group``): gloo for CPU tensors, NCCL for CUDA
    tensors. :class:`SigLipLoss` and :class:`ClipLoss` create one by themselves when
    given open_clip's ``rank``/``world_size`` in an initialised process group.

    Ring exchanges are ``batch_isend_irecv`` pairs; ``allgather`` pads uneven shards to
    the longest, and the handshake uses ``all_gather_object``.

    On a gloo group, CUDA tensors travel through host memory (gloo has no GPU send, receive
    or all-gather): each one is copied to the host, exchanged, and copied back to its
    device, so several ranks can share one GPU. float16 and bfloat16 travel as they are;
    ``allreduce`` sums them in float32 and rounds the sum to their dtype once.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks to use; the default (world) group if None.

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is not available or not initialised.

    Examples
    --------
    >>> import torch.distributed as dist
    >>> from portable_siglip.backends.torch import TorchDistComm
    >>> dist.init_process_group(  # what torchrun does, here for one process
    ...     "gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1
    ... )
    >>> comm = TorchDistComm()
    >>> comm.rank, comm.size
    (0, 1)
    >>> dist.destroy_process_group()
    """

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            msg = (
                "TorchDistComm needs an initialised torch.distributed process group: start "
                "the job with torchrun, or call torch.distributed.init_process_group first"
            )
            raise RuntimeError(msg)
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.size = int(dist.get_world_size(group))
        #: gloo moves host tensors only: device tensors are staged through the host.
        self.host_staging = str(dist.get_backend(group)) == "gloo"

    def _global(self, rank: int) -> int:
        return rank if self.group is None else int(dist.get_global_rank(self.group, rank))

    def _staged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.device | None]:
        """Return ``x`` as the group can move it, and the device to bring results back to."""
        if self.host_staging and x.device.type != "cpu":
            return x.detach().to("cpu"), x.device
        return x, None

    def isendrecv(
        self, send: Any, dest: int, source: int, shape: tuple[int, ...], *, tag: int = 0
    ) -> Request:
        """Post a paired send to ``dest`` and receive from ``source``; ``wait()`` gives the data."""
        self._count(send)
        send = send.contiguous()
        if dest == source == self.rank:
            # To itself: gloo has no connection to its own rank ("Pair is not connected"),
            # and none is needed: the message is a copy, ready at once.
            if tuple(send.shape) != tuple(shape):
                msg = f"expected shape {tuple(shape)}, received {tuple(send.shape)} from itself"
                raise ValueError(msg)
            return _TorchRequest([], send.clone(), send)
        send, home = self._staged(send)
        recv = torch.empty(tuple(shape), dtype=send.dtype, device=send.device)
        ops = [
            dist.P2POp(dist.irecv, recv, self._global(source), self.group, tag),
            dist.P2POp(dist.isend, send, self._global(dest), self.group, tag),
        ]
        return _TorchRequest(dist.batch_isend_irecv(ops), recv, send, home)

    def allreduce(self, x: Any) -> Any:
        """Return the elementwise sum over ranks (``all_reduce``).

        float16 and bfloat16 tensors are summed in float32 and the sum is rounded to their
        dtype once, as :class:`~portable_siglip.backends.mpi.MPIComm` does.
        """
        self._count(x)
        staged, home = self._staged(x)
        out = staged.to(torch.float32) if _is_half(x) else staged.clone()
        out = out.contiguous()
        dist.all_reduce(out, group=self.group)
        out = out.to(x.dtype)
        return out if home is None else out.to(home)

    def allgather(self, x: Any) -> list[Any]:
        """Return every rank's ``x`` in rank order (leading dims may differ)."""
        self._count(x)
        shapes = self.allgather_object(tuple(x.shape))
        if any(shape[1:] != tuple(x.shape[1:]) for shape in shapes):
            msg = f"allgather: the ranks' arrays differ beyond the first axis: {shapes}"
            raise ValueError(msg)
        longest = max(shape[0] if shape else 1 for shape in shapes)
        staged, home = self._staged(x)
        padded = staged.new_zeros((longest, *x.shape[1:])) if x.ndim else staged.clone()
        if x.ndim:
            padded[: x.shape[0]] = staged
        parts = [torch.empty_like(padded) for _ in shapes]
        dist.all_gather(parts, padded, group=self.group)
        if home is not None:
            parts = [part.to(home) for part in parts]
        return [
            part[: shape[0]] if shape else part for part, shape in zip(parts, shapes, strict=True)
        ]

    def bcast(self, x: Any, root: int = 0) -> Any:
        """Return the root's ``x`` (``broadcast``); other ranks pass one of its shape and dtype."""
        if self.rank == root:
            self._count(x)
        staged, home = self._staged(x)
        out = staged.clone().contiguous()
        dist.broadcast(out, src=self._global(root), group=self.group)
        return out if home is None else out.to(home)

    def allgather_object(self, obj: object) -> list[Any]:
        """Return every rank's picklable ``obj`` in rank order (``all_gather_object``)."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _check_options(
    owner: str,
    comm: Communicator | None,
    rank: object,
    world_size: object,
    strategy: object,
    allowed: tuple[str, ...],
) -> Communicator | None:
    """Validate a module's constructor arguments; return the communicator."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            msg = f"{owner}: `{name}` must be an int, got {type(value).__name__} {value!r}"
            raise TypeError(msg)
    if comm is None and (rank, world_size) != (0, 1):
        if dist.is_available() and dist.is_initialized():
            comm = TorchDistComm()  # open_clip's way: the default process group
        else:
            msg = (
                f"{owner}(rank={rank}, world_size={world_size}) needs a communicator to reach "
                "the other ranks: initialise torch.distributed (torchrun) or pass comm=, e.g. "
                "portable_siglip.backends.mpi.MPIComm(MPI.COMM_WORLD) under mpirun"
            )
            raise ValueError(msg)
    if comm is None:
        checked = None
    else:
        checked = check_communicator(comm)
        if (rank, world_size) != (0, 1) and (rank, world_size) != (checked.rank, checked.size):
            msg = (
                f"{owner}: rank={rank}, world_size={world_size} disagree with the "
                f"communicator's rank {checked.rank} of {checked.size}; leave them out when "
                "passing comm="
            )
            raise ValueError(msg)
    if not isinstance(strategy, str) or strategy not in allowed:
        msg = f"{owner}: `strategy` must be one of {allowed}, got {strategy!r}"
        raise ValueError(msg)
    return checked


def _check_dist_impl(dist_impl: object) -> None:
    """open_clip's name for the schedule: None (the default, "bidir") or a sigmoid strategy."""
    if dist_impl is None:
        return
    allowed = _registry.get("sigmoid").schedules
    if not isinstance(dist_impl, str):
        msg = (
            f"SigLipLoss: `dist_impl` must be None or one of {allowed}, got "
            f"{type(dist_impl).__name__} {dist_impl!r}"
        )
        raise TypeError(msg)
    if dist_impl not in allowed:
        msg = f"SigLipLoss: `dist_impl` must be None or one of {allowed}, got {dist_impl!r}"
        raise ValueError(msg)


def _check_block_size(owner: str, block_size: object) -> int | None:
    """Run the core's check of ``block_size`` at construction, the module named in front."""
    if block_size is None:
        return None  # the core picks the default for each call's n
    try:
        return _checks._check_block_size(block_size, sys.maxsize)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: {error}") from None


def _check_precision(owner: str, precision: object) -> str | None:
    """Run the core's check of ``precision`` at construction, the module named in front."""
    try:
        return _checks._check_precision(precision)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: {error}") from None


class _ContrastiveLoss(nn.Module):
    """What the two modules share: their options, ``forward`` and ``repr``."""

    _loss: LossName

    @classmethod
    def _spec(cls) -> _registry.Loss:
        """Return the registered description of this module's loss."""
        return _registry.get(cls._loss)

    def __init__(
        self,
        owner: str,
        comm: Communicator | None,
        rank: int,
        world_size: int,
        strategy: str,
        allowed: tuple[str, ...],
        block_size: int | None,
        ddp: bool,
        precision: str | None = None,
    ) -> None:
        super().__init__()
        self.comm = _check_options(owner, comm, rank, world_size, strategy, allowed)
        _comm_handle(self.comm)  # known to the operators before any compiled forward
        self.strategy = strategy
        self.block_size = _check_block_size(owner, block_size)
        self.ddp = _check_ddp(ddp)
        self.precision = _check_precision(owner, precision)
        self.rank = self.comm.rank if self.comm is not None else 0
        self.world_size = self.comm.size if self.comm is not None else 1

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
        *,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return the loss of the (global) batch.

        Parameters
        ----------
        image_features, text_features : torch.Tensor, shape (n, d)
            This rank's features; row i of each is a pair.
        logit_scale : float or torch.Tensor
            The multiplier itself (open_clip models return ``logit_scale.exp()``).
        logit_bias : float, torch.Tensor or None
            The logit bias; None means 0. (It does not change the softmax loss, and its
            gradient there is zero.)
        output_dict : bool
            Return ``{"contrastive_loss": loss}`` instead of the loss.
        img_ids, txt_ids : torch.Tensor, optional
            Integer ids of this rank's image rows (m,) and text rows (k,): pair (i, j) is
            positive iff the ids are equal, and m may differ from k (several captions per
            image, duplicates; docs/multi-positive.md). Ids are global labels: equal ids on
            two ranks make a positive pair.

        Returns
        -------
        torch.Tensor or dict
            The 0-d loss, or the dict.
        """
        loss = _evaluate(
            self._loss,
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            block_size=self.block_size,
            comm=self.comm,
            strategy=self.strategy,
            ddp=self.ddp,
            img_ids=img_ids,
            txt_ids=txt_ids,
            precision=self.precision,
            unmatched_txt=getattr(self, "unmatched_txt", "error"),
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        """Say how the module is configured."""
        return (
            f"world_size={self.world_size}, strategy={self.strategy!r}, "
            f"block_size={self.block_size}, ddp={self.ddp}, precision={self.precision!r}"
        )


class SigLipLoss(_ContrastiveLoss):
    """SigLIP sigmoid loss as a drop-in for ``open_clip.loss.SigLipLoss``.

    Same constructor and ``forward`` as open_clip's; the loss is evaluated blockwise with
    analytic gradients (see the module docstring), so neither forward nor backward ever
    holds the n x n logits.

    Parameters
    ----------
    cache_labels : bool
        Accepted for compatibility; there are no labels to cache.
    rank, world_size : int
        Accepted for compatibility. With ``comm`` they are read from it (any value given
        must agree); without ``comm`` they must be 0 and 1.
    dist_impl : {"bidir", "shift", "reduce", "gather"}, optional
        open_clip's name for ``strategy``; None means "bidir".
    comm : Communicator, optional
        Communicator of the ranks sharing the global batch; None for one process.
    strategy : str, optional
        The distributed schedule; overrides ``dist_impl``.
    block_size : int, optional
        Tile edge; None picks the library default.
    ddp : bool
        True (default): gradients for DDP's gradient averaging; False: exact gradients of
        the global loss on every rank. Only matters with W > 1 ranks.
    precision : {"fast", "exact"}, optional
        GEMM operands for bfloat16/float16 features: "fast" (None, the default) feeds
        them in the features' dtype with float32 accumulation (tensor cores), "exact" in
        float32 (:func:`portable_siglip.sigmoid_loss`). float32/float64 ignore it.

    Examples
    --------
    >>> import torch
    >>> from portable_siglip.backends.torch import SigLipLoss
    >>> loss_fn = SigLipLoss()
    >>> out = loss_fn(torch.eye(3), torch.eye(3), 10.0, -5.0, output_dict=True)
    >>> print(f"{out['contrastive_loss'].item():.6f}")
    0.020146
    """

    _loss = "sigmoid"

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        comm: Communicator | None = None,
        strategy: str | None = None,
        block_size: int | None = None,
        ddp: bool = True,
        precision: str | None = None,
    ) -> None:
        _check_dist_impl(dist_impl)
        super().__init__(
            "SigLipLoss",
            comm,
            rank,
            world_size,
            strategy if strategy is not None else (dist_impl or self._spec().default_schedule),
            self._spec().schedules,
            block_size,
            ddp,
            precision,
        )
        self.cache_labels = cache_labels


class ClipLoss(_ContrastiveLoss):
    """CLIP softmax loss as a drop-in for ``open_clip.loss.ClipLoss``.

    Same constructor and ``forward`` as open_clip's; evaluated blockwise with analytic
    gradients (see the module docstring).

    Parameters
    ----------
    local_loss, gather_with_grad, cache_labels, use_horovod : bool
        Accepted for compatibility. They choose how open_clip gathers features; here the
        loss is always the global one, and with ``ddp=True`` the averaged gradients are
        exact, as open_clip's with ``gather_with_grad=True``.
    rank, world_size : int
        Accepted for compatibility. With ``comm`` they are read from it (any value given
        must agree); without ``comm`` they must be 0 and 1.
    comm : Communicator, optional
        Communicator of the ranks sharing the global batch; None for one process.
    strategy : {"ring", "gather"}
        The distributed schedule.
    block_size : int, optional
        Tile edge; None picks the library default.
    ddp : bool
        True (default): gradients for DDP's gradient averaging; False: exact gradients of
        the global loss on every rank. Only matters with W > 1 ranks.
    precision : {"fast", "exact"}, optional
        GEMM operands for bfloat16/float16 features: "fast" (None, the default) feeds
        them in the features' dtype with float32 accumulation (tensor cores), "exact" in
        float32 (:func:`portable_siglip.sigmoid_loss`). float32/float64 ignore it.
    unmatched_txt : {"error", "negatives"}
        With ids, what a text row whose id no image has is: refused ("error", the default)
        or a negative of every image ("negatives": mined hard negatives, extra captions),
        as in :func:`portable_siglip.softmax_loss`.

    Examples
    --------
    >>> import torch
    >>> from portable_siglip.backends.torch import ClipLoss
    >>> print(f"{ClipLoss()(torch.eye(3), torch.eye(3), 10.0).item():.6f}")
    0.000091
    """

    _loss = "softmax"

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        comm: Communicator | None = None,
        strategy: str = "ring",
        block_size: int | None = None,
        ddp: bool = True,
        precision: str | None = None,
        unmatched_txt: str = "error",
    ) -> None:
        super().__init__(
            "ClipLoss",
            comm,
            rank,
            world_size,
            strategy,
            self._spec().schedules,
            block_size,
            ddp,
            precision,
        )
        try:
            self.unmatched_txt = _checks.check_unmatched_txt(unmatched_txt)
        except (TypeError, ValueError) as error:
            raise type(error)(f"ClipLoss: {error}") from None
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.use_horovod = use_horovod

    def extra_repr(self) -> str:
        """Say how the module is configured."""
        return f"{super().extra_repr()}, unmatched_txt={self.unmatched_txt!r}"
