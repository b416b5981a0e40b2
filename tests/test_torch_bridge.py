"""The torch bridge: autograd Function, open_clip-compatible modules, DDP gradients.

References are independent of the code under test: the losses written densely in float64
torch and differentiated by autograd, and open_clip's own modules (loaded from the
installed ``open_clip/loss.py``) when open-clip-torch is installed.
"""

from __future__ import annotations

import copy
import math
from itertools import accumulate
from typing import Any

import pytest
from helpers import SCHEDULES

torch = pytest.importorskip("torch")

from portable_siglip.backends import torch as bridge  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

import portable_siglip as ps  # noqa: E402
from portable_siglip.comm import ThreadComm, ThreadGroup  # noqa: E402

F64 = torch.float64
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
#: Uneven shards of 11 rows, a one-row shard included.
SHARDS = {2: [7, 4], 3: [1, 6, 4], 4: [3, 1, 5, 2]}
MODULES = {"sigmoid": bridge.SigLipLoss, "softmax": bridge.ClipLoss}
FUNCTIONS = {"sigmoid": bridge.sigmoid_loss, "softmax": bridge.softmax_loss}


# --------------------------------------------------------------------------- references


def dense_loss(loss: str, img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """The loss written densely, for autograd: the independent reference."""
    logits = scale * img @ txt.T + (0.0 if bias is None else bias)
    n = img.shape[0]
    if loss == "sigmoid":
        labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
        return -functional.logsigmoid(labels * logits).sum() / n
    target = torch.arange(n, device=logits.device)
    return (
        functional.cross_entropy(logits, target) + functional.cross_entropy(logits.T, target)
    ) / 2


def features(n: int, d: int, *, seed: int = 0, dtype: Any = F64, device: str = "cpu") -> Any:
    gen = torch.Generator().manual_seed(seed)
    img = functional.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=-1)
    txt = functional.normalize(img + 0.6 * torch.randn(n, d, generator=gen, dtype=F64), dim=-1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def leaves(*tensors: Any) -> list[Any]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def open_clip_module(loss: str) -> Any:
    """open_clip's module for ``loss``, or skip when open-clip-torch is not installed."""
    try:
        from peers.open_clip_losses import load_loss_module
    except ImportError as error:
        pytest.skip(f"open-clip-torch is not installed: {error}")
    module = load_loss_module()
    return module.SigLipLoss() if loss == "sigmoid" else module.ClipLoss()


class TwoTowers(nn.Module):
    """A small CLIP: two linear towers, a learnt log-scale and a bias."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.image = nn.Linear(5, 4, dtype=F64)
        self.text = nn.Linear(6, 4, dtype=F64)
        with torch.no_grad():
            for p in (*self.image.parameters(), *self.text.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(8.0), dtype=F64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.5, dtype=F64))

    def forward(self, x_img: Any, x_txt: Any) -> tuple[Any, Any, Any, Any]:
        img = functional.normalize(self.image(x_img), dim=-1)
        txt = functional.normalize(self.text(x_txt), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


def batch(n: int, seed: int = 1) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randn(n, 6, generator=gen, dtype=F64)


def train_step(model: nn.Module, loss_fn: Any, x_img: Any, x_txt: Any) -> tuple[float, dict]:
    """One forward + backward; the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*model(x_img, x_txt))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.item(), grads


def assert_grads_close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    assert actual.keys() == expected.keys()
    # Relative to the largest gradient entry: the softmax bias gradient is a rounding zero.
    largest = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        err = (actual[name] - expected[name]).abs().max().item() / largest
        assert err <= rtol, f"{what}: gradient of {name} off by {err:.2e} (rtol {rtol})"


def bounds(sizes: list[int]) -> list[int]:
    return [0, *accumulate(sizes)]


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(loss: str, device: str) -> None:
    img, txt = features(5, 3, device=device)
    scale = torch.tensor(4.0, dtype=F64, device=device)
    bias = torch.tensor(-1.5, dtype=F64, device=device)
    inputs = tuple(leaves(img, txt, scale, bias))

    def f(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        return FUNCTIONS[loss](img, txt, scale, bias, block_size=2)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("n", "block_size"), [(1, None), (7, 3), (12, None)])
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_equal_dense_autograd(
    loss: str, n: int, block_size: int | None, device: str
) -> None:
    img, txt = features(n, 4, device=device)
    scale = torch.tensor(9.0, dtype=F64, device=device)
    bias = torch.tensor(-4.0, dtype=F64, device=device)
    ours = leaves(img, txt, scale, bias)
    ref = leaves(img, txt, scale, bias)
    value = MODULES[loss](block_size=block_size)(*ours)
    value.backward()
    expected = dense_loss(loss, *ref)
    expected.backward()
    assert value.dtype == F64
    assert value.device == img.device
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    for name, a, b in zip(("img", "txt", "scale", "bias"), ours, ref, strict=True):
        assert a.grad.shape == b.grad.shape, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_grad_output_scales_every_gradient(loss: str) -> None:
    img, txt = features(6, 3)
    a = leaves(img, txt, torch.tensor(5.0, dtype=F64), torch.tensor(-2.0, dtype=F64))
    b = leaves(img, txt, torch.tensor(5.0, dtype=F64), torch.tensor(-2.0, dtype=F64))
    (3.0 * FUNCTIONS[loss](*a, block_size=4)).backward()
    (3.0 * dense_loss(loss, *b)).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-13)


def test_python_float_scale_and_bias_and_partial_requires_grad() -> None:
    img, txt = features(5, 3)
    (img_leaf,) = leaves(img)
    value = bridge.sigmoid_loss(img_leaf, txt, 6.0, -2.0, block_size=2)
    value.backward()
    (ref_img,) = leaves(img)
    dense_loss("sigmoid", ref_img, txt, 6.0, -2.0).backward()
    torch.testing.assert_close(img_leaf.grad, ref_img.grad, rtol=1e-10, atol=0)
    assert txt.grad is None


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_scale_parameters(shape: tuple[int, ...]) -> None:
    img, txt = features(5, 3)
    scale, bias = leaves(torch.full(shape, 5.0, dtype=F64), torch.full(shape, -1.0, dtype=F64))
    bridge.SigLipLoss()(img, txt, scale, bias).backward()
    ref_scale, ref_bias = leaves(torch.tensor(5.0, dtype=F64), torch.tensor(-1.0, dtype=F64))
    dense_loss("sigmoid", img, txt, ref_scale, ref_bias).backward()
    assert scale.grad.shape == shape
    assert bias.grad.shape == shape
    torch.testing.assert_close(scale.grad.reshape(()), ref_scale.grad, rtol=1e-10, atol=0)
    torch.testing.assert_close(bias.grad.reshape(()), ref_bias.grad, rtol=1e-10, atol=0)


def test_softmax_bias_gradient_is_exact_zero() -> None:
    img, txt = features(6, 3)
    bias = torch.tensor(3.0, dtype=F64, requires_grad=True)
    bridge.ClipLoss()(img, txt, 5.0, bias).backward()
    assert bias.grad is not None
    assert float(bias.grad) == 0.0


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_double_backward_is_refused(loss: str) -> None:
    img, txt = features(4, 3)
    (img_leaf,) = leaves(img)
    value = FUNCTIONS[loss](img_leaf, txt, 5.0, -1.0)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(value, img_leaf, create_graph=True)
    # A plain backward of the same graph still works afterwards.
    (grad,) = torch.autograd.grad(value, img_leaf)
    assert grad.shape == img.shape


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_no_gradient_work_without_autograd(loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img, txt = features(6, 3)
    expected = dense_loss(loss, img, txt, 5.0, -1.0)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the gradient pass ran although nothing needs a gradient")

    monkeypatch.setattr(ps, f"{loss}_loss_and_grad", refuse)
    (img_leaf,) = leaves(img)
    with torch.no_grad():
        inside = FUNCTIONS[loss](img_leaf, txt, 5.0, -1.0)
    plain = FUNCTIONS[loss](img, txt, 5.0, -1.0)  # nothing requires grad
    for value in (inside, plain):
        assert not value.requires_grad
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    with pytest.raises(AssertionError, match="gradient pass ran"):
        FUNCTIONS[loss](img_leaf, txt, 5.0, -1.0)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_inputs(loss: str, dtype: Any, rtol: float, device: str) -> None:
    img64, txt64 = features(9, 8, device=device)
    img, txt = img64.to(dtype), txt64.to(dtype)
    # The reference sees exactly the rounded inputs, in float64.
    ref = leaves(img.to(F64), txt.to(F64), torch.tensor(7.0, dtype=F64, device=device))
    dense_loss(loss, *ref, -2.0).backward()
    ours = leaves(img, txt, torch.tensor(7.0, device=device))
    # float32 operands ("exact"); tests/test_precision.py judges "fast".
    value = FUNCTIONS[loss](*ours, -2.0, block_size=4, precision="exact")
    value.backward()
    assert value.dtype == torch.float32
    assert [x.grad.dtype for x in ours] == [dtype, dtype, torch.float32]
    expected = dense_loss(loss, *ref, -2.0)
    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())
    for x, y in zip(ours, ref, strict=True):
        err = float((x.grad.to(F64) - y.grad).abs().max() / y.grad.abs().max())
        assert err <= rtol, (dtype, err)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_autocast_does_not_lower_the_loss_precision(loss: str) -> None:
    gen = torch.Generator().manual_seed(5)
    tower = nn.Linear(16, 32)
    x = torch.randn(64, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = tower(x)
        assert feats.dtype == torch.bfloat16  # the towers do run in bfloat16
        img, txt = feats[:, :16], feats[:, 16:]
        img = img / 8.0
        value = FUNCTIONS[loss](img, txt, 3.0, -1.0, block_size=16, precision="exact")
    value.backward()
    assert tower.weight.grad is not None
    assert torch.isfinite(tower.weight.grad).all()
    # The same bfloat16 features, accumulated in float64 outside autocast: only float32
    # rounding apart. A loss whose GEMMs autocast had lowered to bfloat16 is ~1e-3 off.
    expected = dense_loss(loss, img.detach().to(F64), txt.detach().to(F64), 3.0, -1.0)
    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_training_step_equals_dense_and_open_clip(loss: str) -> None:
    x_img, x_txt = batch(11)
    model = TwoTowers()
    ours = train_step(model, MODULES[loss](block_size=4), x_img, x_txt)
    dense = train_step(model, lambda *a: dense_loss(loss, *a), x_img, x_txt)
    assert abs(ours[0] - dense[0]) <= 1e-12 * abs(dense[0])
    assert_grads_close(ours[1], dense[1], 1e-10, "ours vs dense autograd")
    if loss == "softmax":
        assert float(ours[1]["logit_bias"]) == 0.0

    peer = train_step(model, open_clip_module(loss), x_img, x_txt)
    assert abs(ours[0] - peer[0]) <= 1e-10 * abs(peer[0])
    assert_grads_close(ours[1], peer[1], 1e-10, "ours vs open_clip")


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_output_dict(loss: str) -> None:
    img, txt = features(5, 3)
    module = MODULES[loss]()
    out = module(img, txt, 5.0, -1.0, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    torch.testing.assert_close(out["contrastive_loss"], module(img, txt, 5.0, -1.0))


def test_open_clip_constructor_arguments_are_accepted() -> None:
    siglip = bridge.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="shift")
    assert siglip.strategy == "shift"
    assert (siglip.rank, siglip.world_size) == (0, 1)
    clip = bridge.ClipLoss(
        local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1
    )
    assert clip.strategy == "ring"
    assert "strategy='ring'" in repr(clip)
    # open_clip's SigLipLoss has no default for logit_bias; ours means 0 by None.
    img, txt = features(5, 3)
    torch.testing.assert_close(
        bridge.SigLipLoss()(img, txt, 5.0), bridge.SigLipLoss()(img, txt, 5.0, 0.0)
    )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: bridge.SigLipLoss(rank=1, world_size=4), ValueError, r"needs a communicator"),
        (lambda: bridge.ClipLoss(world_size=2), ValueError, r"needs a communicator"),
        (lambda: bridge.SigLipLoss(dist_impl="ring"), ValueError, r"`dist_impl` must be None"),
        (lambda: bridge.ClipLoss(strategy="bidir"), ValueError, r"`strategy` must be one of"),
        (lambda: bridge.SigLipLoss(block_size=0), ValueError, r"`block_size`.*got 0"),
        (lambda: bridge.ClipLoss(block_size="8"), TypeError, r"ClipLoss: `block_size`.*str '8'"),
        (lambda: bridge.ClipLoss(ddp="yes"), TypeError, r"`ddp` must be True or False"),
        (lambda: bridge.SigLipLoss(world_size=2.0), TypeError, r"`world_size` must be an int"),
        (lambda: bridge.SigLipLoss(comm=object()), TypeError, r"communicator"),
    ],
)
def test_constructor_errors(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_rank_must_agree_with_the_communicator() -> None:
    def run(comm: ThreadComm) -> str:
        with pytest.raises(ValueError, match=r"disagree with the communicator's rank"):
            bridge.SigLipLoss(rank=1 - comm.rank, world_size=2, comm=comm)
        return repr(bridge.SigLipLoss(rank=comm.rank, world_size=2, comm=comm))

    assert all("world_size=2" in text for text in ThreadGroup(2).run(run))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, i, t: f(i[0], t[0], 5.0, 0.0), ValueError, r"`img` must be 2-D"),
        (lambda f, i, t: f(i, t, -5.0, 0.0), ValueError, r"`scale` must be the positive"),
        (lambda f, i, t: f(i, t[:, :2], 5.0, 0.0), ValueError, r"same shape"),
        (lambda f, i, t: f(i.tolist(), t, 5.0, 0.0), TypeError, r"`img` must be an array"),
        (lambda f, i, t: f(i, t, torch.ones(2), 0.0), TypeError, r"`scale` must be a Python"),
        (lambda f, i, t: f(i, t, 5.0, 0.0, ddp=1), TypeError, r"`ddp` must be True or False"),
    ],
)
def test_bad_input(call: Any, error: type[Exception], match: str) -> None:
    img, txt = leaves(*features(4, 3))
    with pytest.raises(error, match=match):
        call(bridge.sigmoid_loss, img, txt)


# --------------------------------------------------------------------------- distributed


def shard_step(
    loss: str, strategy: str, sizes: list[int], x_img: Any, x_txt: Any, *, ddp: bool
) -> list[tuple[float, dict, Any]]:
    """Every rank: its own replica of the model, its rows of the batch, one backward."""
    edges = bounds(sizes)
    template = TwoTowers()

    def rank_step(comm: ThreadComm) -> tuple[float, dict, Any]:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        replica = copy.deepcopy(template)
        module = MODULES[loss](comm=comm, strategy=strategy, block_size=2, ddp=ddp)
        img, txt, scale, bias = replica(x_img[rows], x_txt[rows])
        img.retain_grad()
        value = module(img, txt, scale, bias)
        value.backward()
        grads = {name: p.grad.detach().clone() for name, p in replica.named_parameters()}
        return value.item(), grads, img.grad.detach().clone()

    return ThreadGroup(len(sizes), timeout=60).run(rank_step)


@pytest.mark.parametrize(("loss", "strategy"), SCHEDULES)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_averaging_reproduces_one_process(loss: str, strategy: str, world: int) -> None:
    x_img, x_txt = batch(sum(SHARDS[world]))
    one_value, one_grads = train_step(TwoTowers(), MODULES[loss](), x_img, x_txt)
    results = shard_step(loss, strategy, SHARDS[world], x_img, x_txt, ddp=True)
    for value, _, _ in results:  # the global loss, identical on every rank
        assert value == results[0][0]
        assert abs(value - one_value) <= 1e-12 * abs(one_value)
    # What DDP does: average every parameter's gradient over the ranks.
    averaged = {name: sum(r[1][name] for r in results) / world for name in one_grads}
    assert_grads_close(averaged, one_grads, 1e-10, f"DDP average over {world} ranks")


@pytest.mark.parametrize(("loss", "strategy"), [("sigmoid", "bidir"), ("softmax", "ring")])
def test_exact_mode_gives_the_global_loss_gradient_of_each_shard(loss: str, strategy: str) -> None:
    sizes = SHARDS[3]
    x_img, x_txt = batch(sum(sizes))
    model = TwoTowers()
    img, txt, scale, bias = model(x_img, x_txt)
    img.retain_grad()
    MODULES[loss]()(img, txt, scale, bias).backward()
    edges = bounds(sizes)
    exact = shard_step(loss, strategy, sizes, x_img, x_txt, ddp=False)
    ddp = shard_step(loss, strategy, sizes, x_img, x_txt, ddp=True)
    for rank, (r_exact, r_ddp) in enumerate(zip(exact, ddp, strict=True)):
        rows = img.grad[edges[rank] : edges[rank + 1]]
        torch.testing.assert_close(r_exact[2], rows, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r_ddp[2], len(sizes) * rows, rtol=1e-10, atol=1e-14)
        # logit_scale and logit_bias are complete on every rank in both conventions.
        for name in ("logit_scale", "logit_bias"):
            full = getattr(model, name).grad
            torch.testing.assert_close(r_exact[1][name], full, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(r_ddp[1][name], full, rtol=1e-10, atol=1e-14)


def test_bad_shard_raises_on_every_rank() -> None:
    def rank_call(comm: ThreadComm) -> str:
        d = 3 if comm.rank == 0 else 4  # rank 0 disagrees on d
        img, txt = leaves(*features(4, d, seed=comm.rank))
        with pytest.raises(ValueError, match=r"feature dimension d must be the same") as info:
            bridge.SigLipLoss(comm=comm)(img, txt, 5.0, -1.0)
        return str(info.value)

    messages = ThreadGroup(3, timeout=30).run(rank_call)
    assert len(set(messages)) == 1


def test_one_rank_without_autograd_raises_on_every_rank() -> None:
    def rank_call(comm: ThreadComm) -> str:
        (img,) = leaves(features(5, 3, seed=comm.rank)[0])
        txt = features(5, 3, seed=comm.rank)[1]
        with (
            torch.set_grad_enabled(comm.rank != 0),
            pytest.raises(ValueError, match="whether gradients are computed") as info,
        ):
            bridge.ClipLoss(comm=comm)(img, txt, 5.0)
        return str(info.value)

    messages = ThreadGroup(2, timeout=30).run(rank_call)
    assert messages[0] == messages[1]


def test_torch_dist_comm_needs_an_initialised_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        bridge.TorchDistComm()
