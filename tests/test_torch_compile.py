"""``torch.compile`` of the torch bridge, ``fullgraph=True``.

The loss enters torch as the custom operators ``portable_siglip::loss_and_grad`` and
``portable_siglip::loss`` (``backends/torch.py``), so Dynamo sees one opaque node with a
fake implementation for shapes and AOTAutograd a registered backward. Every test compiles
with ``backend="aot_eager"``: Dynamo and AOTAutograd trace the forward and backward graphs
as for inductor, without inductor's C++ build, which takes minutes on a 2-core machine.

The compiled loss and gradients must equal eager's (the same operator runs, so to rounding
of the incoming gradient's product: rtol 1e-15) and the long-double oracle of
``tests/oracle.py`` (rtol 1e-12, float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from oracle import IDS_REFERENCES, REFERENCES

torch = pytest.importorskip("torch")

from portable_siglip.backends import torch as bridge  # noqa: E402
from torch.nn import functional  # noqa: E402

from portable_siglip.comm import SelfComm, ThreadComm, ThreadGroup  # noqa: E402

F64 = torch.float64
BACKEND = "aot_eager"
MODULES = {"sigmoid": bridge.SigLipLoss, "softmax": bridge.ClipLoss}
#: Several captions per image, an image without a caption of its own, m != k.
IMG_IDS = [0, 1, 2, 2, 3, 4, 5]
TXT_IDS = [0, 0, 1, 2, 3, 4, 4, 5]
#: Exact agreement of compiled and eager, up to the rounding of one product.
SAME = {"rtol": 1e-15, "atol": 1e-300}
ORACLE = {"rtol": 1e-12, "atol": 1e-14}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    """Forget earlier tests' graphs: each test's new modules would count as recompilations."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def features(m: int, k: int, d: int, seed: int = 0) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    img = functional.normalize(torch.randn(m, d, generator=gen, dtype=F64), dim=-1)
    txt = functional.normalize(torch.randn(k, d, generator=gen, dtype=F64), dim=-1)
    return img, txt


def leaves(*values: Any) -> list[Any]:
    return [torch.as_tensor(v, dtype=F64).detach().clone().requires_grad_(True) for v in values]


def loss_and_grads(fn: Any, ids: bool, seed: int = 0) -> tuple[Any, list[Any]]:
    """Call ``fn`` on fresh leaves (img, txt, scale, bias) and backpropagate 1.5 x the loss."""
    m, k = (len(IMG_IDS), len(TXT_IDS)) if ids else (7, 7)
    img, txt, scale, bias = leaves(*features(m, k, 5, seed), 6.0, -2.0)
    extra = {"img_ids": torch.tensor(IMG_IDS), "txt_ids": torch.tensor(TXT_IDS)} if ids else {}
    value = fn(img, txt, scale, bias, **extra)
    (1.5 * value).backward()  # an incoming gradient other than 1
    return value.detach(), [x.grad for x in (img, txt, scale, bias)]


def oracle(loss: str, ids: bool, seed: int = 0) -> list[Any]:
    """The long-double loss and its gradients (times 1.5), as float64 tensors."""
    m, k = (len(IMG_IDS), len(TXT_IDS)) if ids else (7, 7)
    img, txt = (x.numpy() for x in features(m, k, 5, seed))
    if ids:
        ref = IDS_REFERENCES[loss](img, txt, np.array(IMG_IDS), np.array(TXT_IDS), 6.0, -2.0)
    else:
        ref = REFERENCES[loss](img, txt, 6.0, -2.0)
    grads = (ref.img, ref.txt, ref.scale, ref.bias)
    return [torch.tensor(np.asarray(ref.loss, dtype=np.float64))] + [
        torch.tensor(1.5 * np.asarray(g, dtype=np.float64)) for g in grads
    ]


def assert_all_close(actual: list[Any], expected: list[Any], tolerance: dict) -> None:
    names = ("loss", "img", "txt", "logit_scale", "logit_bias")
    for name, a, e in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("ids", [False, True], ids=["diagonal", "ids"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_module_equals_eager_and_the_oracle(loss: str, ids: bool) -> None:
    module = MODULES[loss](block_size=3)
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)
    value, grads = loss_and_grads(compiled, ids)
    eager_value, eager_grads = loss_and_grads(module, ids)
    assert_all_close([value, *grads], [eager_value, *eager_grads], SAME)
    assert_all_close([value, *grads], oracle(loss, ids), ORACLE)
    # A second batch reuses the compiled graph and is still right.
    value, grads = loss_and_grads(compiled, ids, seed=1)
    assert_all_close([value, *grads], oracle(loss, ids, seed=1), ORACLE)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_training_step_with_the_model_in_one_graph(loss: str) -> None:
    # The towers, the normalisation, logit_scale.exp() and the loss: one graph, one backward.
    gen = torch.Generator().manual_seed(3)
    tower = torch.nn.Linear(5, 4, dtype=F64)
    with torch.no_grad():
        tower.weight.copy_(torch.randn(4, 5, generator=gen, dtype=F64))
    log_scale, bias = leaves(np.log(6.0), -2.0)
    x_img, x_txt = torch.randn(7, 5, generator=gen, dtype=F64), torch.randn(7, 5, generator=gen)
    module = MODULES[loss](block_size=4)

    def step(x_img: Any, x_txt: Any) -> Any:
        img = functional.normalize(tower(x_img), dim=-1)
        txt = functional.normalize(tower(x_txt.to(F64)), dim=-1)
        return module(img, txt, log_scale.exp(), bias)

    def grads_of(fn: Any) -> list[Any]:
        for p in (tower.weight, tower.bias, log_scale, bias):
            p.grad = None
        value = fn(x_img, x_txt)
        value.backward()
        return [value.detach()] + [p.grad.clone() for p in (tower.weight, log_scale, bias)]

    compiled = grads_of(torch.compile(step, fullgraph=True, backend=BACKEND))
    eager = grads_of(step)
    for a, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_without_autograd_and_with_python_scalars(loss: str) -> None:
    img, txt = features(6, 6, 5)
    expected = REFERENCES[loss](img.numpy(), txt.numpy(), 6.0, -2.0).loss
    compiled = torch.compile(MODULES[loss](), fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        inside = compiled(img, txt, 6.0, -2.0)  # the value-only operator
    (img_leaf,) = leaves(img)
    outside = compiled(img_leaf, txt, 6.0, -2.0)
    outside.backward()
    assert not inside.requires_grad
    for value in (inside, outside.detach()):
        assert abs(float(value) - float(expected)) <= 1e-12 * abs(float(expected))
    assert img_leaf.grad is not None


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_function_with_a_new_communicator_breaks_the_graph_once(loss: str) -> None:
    # The function forms enter a communicator they have not seen outside the graph (one
    # graph break, docs/frameworks.md); a seen one is traced, as the modules' own are.
    fn = bridge.sigmoid_loss if loss == "sigmoid" else bridge.softmax_loss

    def call(comm: Any) -> Any:
        def loss_fn(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
            return fn(img, txt, scale, bias, comm=comm, block_size=4, ddp=True)

        return loss_fn

    with pytest.raises(Exception, match=r"torch\.compiler\.disable"):
        loss_and_grads(torch.compile(call(SelfComm()), fullgraph=True, backend=BACKEND), False)
    comm = SelfComm()
    value, grads = loss_and_grads(torch.compile(call(comm), backend=BACKEND), False)
    assert_all_close([value, *grads], oracle(loss, False), ORACLE)
    value, grads = loss_and_grads(torch.compile(call(comm), fullgraph=True, backend=BACKEND), False)
    assert_all_close([value, *grads], oracle(loss, False), ORACLE)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_ddp_over_two_ranks_equals_one_process(loss: str) -> None:
    img, txt = features(7, 7, 5)
    rows = [slice(0, 4), slice(4, 7)]
    expected = oracle(loss, False)

    def rank_step(comm: ThreadComm) -> list[Any]:
        module = torch.compile(
            MODULES[loss](comm=comm, block_size=2, ddp=True), fullgraph=True, backend=BACKEND
        )
        mine = leaves(img[rows[comm.rank]], txt[rows[comm.rank]], 6.0, -2.0)
        value = module(*mine)
        (1.5 * value).backward()
        return [value.detach()] + [x.grad for x in mine]

    results = ThreadGroup(2, timeout=120).run(rank_step)
    for result in results:  # the global loss on every rank
        torch.testing.assert_close(result[0], expected[0], **ORACLE)
        torch.testing.assert_close(result[3:], expected[3:], **ORACLE)
    # DDP's average of the shard gradients (each pre-multiplied by W = 2) is the global one.
    for index in (1, 2):
        joined = torch.cat([r[index] for r in results]) / 2
        torch.testing.assert_close(joined, expected[index], **ORACLE)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_compiled_double_backward_is_refused(loss: str) -> None:
    # A second derivative through the precomputed gradient would be silently wrong: eager
    # mode refuses it (tests/test_torch_bridge.py), compiled code too, by torch's own error.
    compiled = torch.compile(MODULES[loss](), fullgraph=True, backend=BACKEND)
    (img,) = leaves(features(5, 5, 3)[0])
    value = compiled(img, features(5, 5, 3)[1], 6.0, -2.0)
    (grad,) = torch.autograd.grad(value, img, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize(
    ("dtype", "scale", "bias", "ids"),
    [
        (F64, "tensor", "tensor", True),
        (torch.float32, "number", None, False),
        (torch.bfloat16, "tensor", "number", False),
    ],
)
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_operators_pass_torch_opcheck(
    loss: str, dtype: Any, scale: str, bias: str | None, ids: bool
) -> None:
    # torch's own checks of a custom operator: schema (no aliasing, no mutation), the fake
    # implementation's shapes and dtypes against the real ones, the autograd registration
    # and AOTAutograd with dynamic shapes.
    m, k = (len(IMG_IDS), len(TXT_IDS)) if ids else (6, 6)
    img, txt = (x.to(dtype).requires_grad_() for x in features(m, k, 4))
    scale_parts = (
        (torch.tensor(6.0, requires_grad=True), None) if scale == "tensor" else (None, 6.0)
    )
    bias_parts = {
        "tensor": (torch.tensor(-2.0, dtype=F64, requires_grad=True), None),
        "number": (None, -2.0),
        None: (None, None),
    }[bias]
    id_parts = (torch.tensor(IMG_IDS), torch.tensor(TXT_IDS)) if ids else (None, None)
    common = (img, txt, *scale_parts, *bias_parts, *id_parts, loss, 4, None)
    schedule = "bidir" if loss == "sigmoid" else "ring"
    ops = torch.ops.portable_siglip
    torch.library.opcheck(ops.loss_and_grad.default, (*common, schedule, None, 1.0))
    # The value alone is what runs where nothing needs a gradient: inputs without autograd.
    plain = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in common)
    torch.library.opcheck(ops.loss.default, (*plain, schedule, None))
