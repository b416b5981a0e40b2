"""``precision="fast" | "exact"``: half-precision GEMM operands, and full float32 elsewhere.

"fast" (the default for float16/bfloat16 features) rounds the GEMM operands to the input
dtype: the features (exact already), ``t * img`` once, and, where the GEMM takes half operands
natively (jax here, torch on CUDA), each tile's gradient factor. The
goldens here come from the long-double oracle (tests/oracle.py), evaluated at the operands
"fast" is documented to use, so a test fails if anything else is rounded (a tile sum, an
accumulator, the logits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import (
    GRAD_RTOL,
    LOSS,
    LOSS_AND_GRAD,
    LOSS_RTOL,
    assert_close,
    on_backend,
    relative_error,
    seeded_pairs,
    to_numpy,
)
from oracle import REFERENCES

import portable_siglip as ps
from portable_siglip.comm import ThreadGroup

HALF = ("float16", "bfloat16")

#: (n, d, block_size): one row, n not divisible by the block, several tiles, one tile.
SHAPES = [(1, 5, 1), (7, 3, 3), (33, 17, 8), (40, 64, 64)]


def pairs(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.standard_normal((n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.5 * rng.standard_normal((n, d))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("n", "d", "block_size"), SHAPES)
def test_fast_is_exact_arithmetic_on_rounded_operands(
    xp: Any, loss_name: str, dtype: str, n: int, d: int, block_size: int
) -> None:
    img, txt, img_np, txt_np = seeded_pairs(xp, n, d, dtype, make=pairs)
    scale, bias = 10.0, -10.0
    loss, grads = LOSS_AND_GRAD[loss_name](
        img, txt, scale, bias, block_size=block_size, precision="fast"
    )
    # The logits "fast" forms: round(t * img) @ txt.T + b, the product exact in float32.
    _, scaled_np = on_backend(xp, scale * img_np, dtype)
    rounded = REFERENCES[loss_name](scaled_np, txt_np, 1.0, bias)
    assert_close(loss, rounded.loss, LOSS_RTOL[dtype], "loss at the rounded operands")
    # Against the true gradients the rounding of t * img and of G adds about one unit of
    # the half dtype to the rounding of the output: within twice the output's tolerance.
    truth = REFERENCES[loss_name](img_np, txt_np, scale, bias)
    assert_close(grads.img, truth.img, 2 * GRAD_RTOL[dtype], "grads.img")
    assert_close(grads.txt, truth.txt, 2 * GRAD_RTOL[dtype], "grads.txt")
    assert_close(grads.scale, truth.scale, 2 * GRAD_RTOL[dtype], "grads.scale")
    if loss_name == "sigmoid":
        assert_close(grads.bias, truth.bias, 2 * GRAD_RTOL[dtype], "grads.bias")
    only = LOSS[loss_name](img, txt, scale, bias, block_size=block_size, precision="fast")
    assert_close(only, to_numpy(loss), 1e-6, "loss without gradient")


@pytest.mark.parametrize("dtype", HALF)
def test_fast_is_the_default_for_half_features(xp: Any, loss_name: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    img, _ = on_backend(xp, pairs(rng, 9, 6)[0], dtype)
    txt, _ = on_backend(xp, pairs(rng, 9, 6)[1], dtype)
    default = to_numpy(LOSS[loss_name](img, txt, 7.3, -3.1, block_size=4))
    fast = to_numpy(LOSS[loss_name](img, txt, 7.3, -3.1, block_size=4, precision="fast"))
    exact = to_numpy(LOSS[loss_name](img, txt, 7.3, -3.1, block_size=4, precision="exact"))
    assert default == fast
    assert exact != fast  # t * img = 7.3 * img is not representable in the half dtype


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wide_features_ignore_precision(xp: Any, loss_name: str, dtype: str) -> None:
    rng = np.random.default_rng(4)
    img, _ = on_backend(xp, pairs(rng, 9, 6)[0], dtype)
    txt, _ = on_backend(xp, pairs(rng, 9, 6)[1], dtype)
    results = [
        LOSS_AND_GRAD[loss_name](img, txt, 7.3, -3.1, block_size=4, precision=precision)
        for precision in ("fast", "exact", None)
    ]
    for loss, grads in results[1:]:
        assert to_numpy(loss) == to_numpy(results[0][0])
        for field in ps.Gradients._fields:
            np.testing.assert_array_equal(
                to_numpy(getattr(grads, field)), to_numpy(getattr(results[0][1], field))
            )


@pytest.mark.parametrize(
    ("precision", "error"),
    [("Fast", ValueError), ("tf32", ValueError), (1, TypeError), (b"fast", TypeError)],
)
def test_bad_precision_is_named(loss_name: str, precision: object, error: type) -> None:
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(error, match=r"`precision` must be .*got"):
        LOSS[loss_name](img, img, 10.0, -10.0, precision=precision)


def test_ranks_must_agree_on_precision(loss_name: str) -> None:
    import torch

    img = torch.eye(4, dtype=torch.bfloat16)

    def call(comm: Any) -> Any:
        precision = "fast" if comm.rank == 0 else "exact"
        return LOSS[loss_name](img, img, 10.0, -10.0, comm=comm, precision=precision)

    with pytest.raises(ValueError, match=r"`precision` must be the same on every rank"):
        ThreadGroup(2, timeout=30.0).run(call)


@pytest.mark.parametrize("strategy", ["gather", None])
def test_fast_distributed_matches_one_process(loss_name: str, strategy: str | None) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    img_np, txt_np = pairs(rng, 11, 8)
    img = torch.tensor(img_np, dtype=torch.bfloat16)
    txt = torch.tensor(txt_np, dtype=torch.bfloat16)
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 10.0, -10.0, block_size=3)
    edges = [0, 4, 5, 11]  # uneven shards, one of a single row
    options = {} if strategy is None else {"strategy": strategy}

    def call(comm: Any) -> Any:
        rows = slice(edges[comm.rank], edges[comm.rank + 1])
        return LOSS_AND_GRAD[loss_name](
            img[rows], txt[rows], 10.0, -10.0, block_size=3, comm=comm, **options
        )

    results = ThreadGroup(3, timeout=60.0).run(call)
    for rank, (rank_loss, _) in enumerate(results):
        assert relative_error(rank_loss, to_numpy(loss)) <= 1e-6, f"rank {rank}"
    got_img = np.concatenate([to_numpy(g.img) for _, g in results])
    # The same roundings in another order: the bfloat16 outputs agree to a unit or two.
    assert relative_error(got_img, to_numpy(grads.img)) <= 2 * 2.0**-8


def test_numpy_with_ml_dtypes_bfloat16() -> None:
    # cupy 14 with ml_dtypes hands torch bfloat16 to the loss as an ml_dtypes bfloat16
    # array; numpy arrays of that dtype take the same path through the checks.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(9)
    img_np, txt_np = pairs(rng, 10, 6)
    img = img_np.astype(ml_dtypes.bfloat16)
    txt = txt_np.astype(ml_dtypes.bfloat16)
    exact_inputs = (img.astype(np.float64), txt.astype(np.float64))
    for loss_name, function in LOSS_AND_GRAD.items():
        loss, grads = function(img, txt, 10.0, -10.0, block_size=4, precision="exact")
        truth = REFERENCES[loss_name](*exact_inputs, 10.0, -10.0)
        assert str(grads.img.dtype) == "bfloat16"
        assert_close(loss, truth.loss, 1e-5, f"{loss_name} loss")
        assert_close(grads.img.astype(np.float64), truth.img, GRAD_RTOL["bfloat16"], "img")
        fast, _ = function(img, txt, 10.0, -10.0, block_size=4)
        scaled = (10.0 * exact_inputs[0]).astype(ml_dtypes.bfloat16).astype(np.float64)
        rounded = REFERENCES[loss_name](scaled, exact_inputs[1], 1.0, -10.0)
        assert_close(fast, rounded.loss, 1e-5, f"{loss_name} fast loss")


def _dots(jaxpr: Any) -> list[Any]:
    """Every dot_general equation of a jaxpr, nested ones (loop bodies) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                found += _dots(getattr(inner, "jaxpr", inner))
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_jax_gemms_are_full_float32_or_half_with_float32_results(
    loss_name: str, dtype: str, precision: str
) -> None:
    # On GPUs jax's default float32 matmul is TF32; the traced program says what each GEMM
    # asks for, on the CPU too.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    img = jnp.ones((6, 4), dtype=dtype)
    program = jax.make_jaxpr(
        lambda a, b: LOSS_AND_GRAD[loss_name](a, b, 2.0, -1.0, block_size=4, precision=precision)
    )(img, img)
    dots = _dots(program.jaxpr)
    half = [eqn for eqn in dots if {str(v.aval.dtype) for v in eqn.invars} == {"bfloat16"}]
    wide = [eqn for eqn in dots if {str(v.aval.dtype) for v in eqn.invars} == {"float32"}]
    assert len(half) + len(wide) == len(dots)
    assert all(str(eqn.outvars[0].aval.dtype) == "float32" for eqn in dots)
    # Every float32 product (the scale's gradient sum included) is full float32.
    for eqn in wide:
        assert str(eqn.params["precision"]) == "(Precision.HIGHEST, Precision.HIGHEST)"
    # The tile GEMMs (3 of the sigmoid loss, 1 + 3 of the softmax) take half operands
    # exactly when "fast" meets half features.
    tile_gemms = 3 if loss_name == "sigmoid" else 4
    assert len(half) >= (tile_gemms if dtype == "bfloat16" and precision == "fast" else 0)
    if not (dtype == "bfloat16" and precision == "fast"):
        assert half == []


def test_torch_float32_matmul_precision_is_highest_inside_and_restored() -> None:
    torch = pytest.importorskip("torch")
    seen: list[str] = []
    # The guard acts on CUDA tensors only (the host has no TF32); its logic is the same.
    from portable_siglip import _precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with _precision._torch_highest():
            seen.append(torch.get_float32_matmul_precision())
            with _precision._torch_highest():  # nested (another thread's call) keeps it
                seen.append(torch.get_float32_matmul_precision())
            seen.append(torch.get_float32_matmul_precision())
        assert seen == ["highest", "highest", "highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("module", ["SigLipLoss", "ClipLoss"])
def test_torch_modules_take_precision(module: str) -> None:
    torch = pytest.importorskip("torch")
    from portable_siglip.backends import torch as bridge

    cls = getattr(bridge, module)
    assert "precision='exact'" in repr(cls(precision="exact"))
    with pytest.raises(ValueError, match=rf"{module}: `precision` must be one of"):
        cls(precision="half")
    rng = np.random.default_rng(2)
    img_np, txt_np = pairs(rng, 6, 5)
    img = torch.tensor(img_np, dtype=torch.bfloat16, requires_grad=True)
    txt = torch.tensor(txt_np, dtype=torch.bfloat16)
    values = {}
    for precision in ("fast", "exact"):
        img.grad = None
        loss = cls(precision=precision)(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
        loss.backward()
        values[precision] = (loss.item(), img.grad.clone())
    core = LOSS_AND_GRAD["sigmoid" if module == "SigLipLoss" else "softmax"]
    for precision, (value, grad) in values.items():
        want, grads = core(img.detach(), txt, 10.0, -10.0, precision=precision)
        assert value == pytest.approx(float(want), rel=1e-6)
        assert torch.equal(grad, grads.img)
    assert values["fast"][0] != values["exact"][0]


def test_jax_bridge_takes_precision(loss_name: str) -> None:
    jax = pytest.importorskip("jax")
    from portable_siglip.backends import jax as bridge

    rng = np.random.default_rng(6)
    img_np, txt_np = pairs(rng, 7, 5)
    img = jax.numpy.asarray(img_np, dtype="bfloat16")
    txt = jax.numpy.asarray(txt_np, dtype="bfloat16")
    function = getattr(bridge, f"{loss_name}_loss")
    for precision in ("fast", "exact"):
        got = jax.jit(lambda a, b, p=precision: function(a, b, 10.0, -10.0, precision=p))(img, txt)
        want = LOSS[loss_name](img, txt, 10.0, -10.0, precision=precision)
        assert relative_error(got, to_numpy(want)) <= 1e-6, precision


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_run_verify_with_precision(capsys: pytest.CaptureFixture[str], precision: str) -> None:
    pytest.importorskip("torch")
    from portable_siglip.cli._commands import main

    argv = ["run", "--backend", "torch", "--dtype", "bfloat16", "--batch", "300", "--dim", "32"]
    status = main([*argv, "--block-size", "128", "--precision", precision, "--verify"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"precision={precision}" in out
    assert "verify: ok" in out
    assert ("rounded operand" in out) == (precision == "fast")


@pytest.mark.parametrize("loss_fn", ["sigmoid_loss", "softmax_loss"])
def test_autocast_leaves_fast_unchanged(loss_fn: str) -> None:
    # Autocast is off inside the loss: "fast" rounds exactly the operands it documents,
    # whatever region it is called from.
    torch = pytest.importorskip("torch")
    from portable_siglip.backends import torch as bridge

    gen = torch.Generator().manual_seed(5)
    img = torch.randn(24, 16, generator=gen, dtype=torch.bfloat16) / 4
    txt = torch.randn(24, 16, generator=gen, dtype=torch.bfloat16) / 4
    outside = getattr(bridge, loss_fn)(img, txt, 3.0, -1.0, block_size=8)
    with torch.autocast("cpu", dtype=torch.float16):
        inside = getattr(bridge, loss_fn)(img, txt, 3.0, -1.0, block_size=8)
    assert inside.item() == outside.item()


@pytest.mark.parametrize(("library", "dtype"), [("torch", "bfloat16"), ("numpy", "float16")])
def test_fast_in_place_kernels_equal_the_reference_loops(
    monkeypatch: pytest.MonkeyPatch, loss_name: str, library: str, dtype: str
) -> None:
    # The in-place numpy/torch kernels and the array-API loops see the same operands.
    module = pytest.importorskip(library)
    rng = np.random.default_rng(12)
    img_np, txt_np = pairs(rng, 13, 7)
    img = module.asarray(img_np.astype(np.float32))
    txt = module.asarray(txt_np.astype(np.float32))
    img = img.to(getattr(module, dtype)) if library == "torch" else img.astype(dtype)
    txt = txt.to(getattr(module, dtype)) if library == "torch" else txt.astype(dtype)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("PORTABLE_SIGLIP_FAST_PATHS", switch)
        results.append(LOSS_AND_GRAD[loss_name](img, txt, 9.0, -4.0, block_size=5))
    (loss, grads), (ref_loss, ref_grads) = results
    assert relative_error(loss, to_numpy(ref_loss)) <= 1e-6
    exact = LOSS[loss_name](img, txt, 9.0, -4.0, block_size=5, precision="exact")
    assert relative_error(exact, to_numpy(ref_loss)) >= 1e-6  # 9 * img was rounded
    for field in ps.Gradients._fields:
        got, want = to_numpy(getattr(grads, field)), to_numpy(getattr(ref_grads, field))
        # float32 sums in another order, then one rounding to the output dtype each.
        assert relative_error(got, want) <= 2.0**-8, field


def test_a_scale_that_requires_grad_is_checked_without_a_warning() -> None:
    # Reading the value of a tensor that requires grad warns; under warnings-as-errors the
    # check swallowed that and skipped itself, so a negative scale went through.
    torch = pytest.importorskip("torch")
    img = torch.eye(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`scale` must be the positive multiplier"):
        ps.sigmoid_loss(img, img, torch.tensor(-1.0, requires_grad=True), -5.0)
    loss = ps.sigmoid_loss(img, img, torch.tensor(10.0, requires_grad=True), -5.0)
    assert float(loss.detach()) == pytest.approx(3 * np.log1p(np.exp(-5.0)), rel=1e-6)


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_native_half_gemms_on_torch_meta_tensors(
    monkeypatch: pytest.MonkeyPatch, loss_name: str, precision: str
) -> None:
    # The CUDA path (half operands, torch.mm(..., out_dtype=float32) into float32 tiles and
    # accumulators) traced on torch's meta device, which has that kernel's shape rules: it
    # runs every call of the path without a GPU and checks shapes and dtypes.
    torch = pytest.importorskip("torch")
    calls: list[tuple[Any, ...]] = []
    original = torch.mm

    def spy(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((a.dtype, b.dtype, kwargs.get("out_dtype")))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    img = torch.empty(10, 8, dtype=torch.bfloat16, device="meta")
    txt = torch.empty(10, 8, dtype=torch.bfloat16, device="meta")
    loss, grads = LOSS_AND_GRAD[loss_name](img, txt, 10.0, -10.0, block_size=4, precision=precision)
    assert (loss.dtype, loss.device.type) == (torch.float32, "meta")
    assert (grads.img.dtype, grads.img.shape) == (torch.bfloat16, img.shape)
    assert (grads.txt.dtype, grads.txt.shape) == (torch.bfloat16, txt.shape)
    native = [call for call in calls if call[2] is not None]
    if precision == "exact":
        assert native == []
    else:  # 3 GEMMs a tile (sigmoid) or 1 + 3 (softmax), 3 x 3 tiles
        assert len(native) >= 9 * (3 if loss_name == "sigmoid" else 4)
        assert all(call == (torch.bfloat16, torch.bfloat16, torch.float32) for call in native)


def test_without_a_half_gemm_fast_falls_back_to_float32_gemms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A torch build or device without mm(..., out_dtype=) must not fail the first GPU run:
    # the probe finds out once, and the loops multiply float32 copies of the same values.
    torch = pytest.importorskip("torch")
    from portable_siglip import _precision

    original = torch.mm

    def no_out_dtype(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        if "out_dtype" in kwargs:
            raise NotImplementedError("aten::mm.dtype_out is not available here")
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(_precision, "_NATIVE", {})
    monkeypatch.setattr(torch, "mm", no_out_dtype)
    img = torch.empty(10, 8, dtype=torch.bfloat16, device="meta")
    loss, grads = ps.softmax_loss_and_grad(img, img, 10.0, block_size=4)
    assert (loss.dtype, grads.img.dtype) == (torch.float32, torch.bfloat16)
    assert _precision._NATIVE == {("meta", "torch.bfloat16"): False}
