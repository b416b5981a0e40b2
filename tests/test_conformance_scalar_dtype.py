"""``scalar_dtype="float32"`` / ``--scalar-dtype float32``: float32 scale and bias, half features.

big_vision and most mixed-precision training keep the temperature and bias parameters
float32 while the features are bfloat16 (or float16): ``img @ txt.T`` is computed in half
precision and ``* t + b`` promotes the logits to float32. By default the suite hands scale and
bias in the run's dtype; with ``scalar_dtype="float32"`` it hands them as float32, so such a
loss is judged the way it runs in training. The naive reference of FlashAttention's rule
stays the all-half-precision loss (docs/conformance.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from portable_siglip.conformance import UsageError, check, load_cases
from portable_siglip.conformance.__main__ import build_parser, main

CASES = {case.name: case for case in load_cases()}
# A few small cases with large and small scales and biases (a full run takes minutes on CPU).
SOME = tuple(
    CASES[name]
    for name in ("n1-d5", "random-n7-d3", "random-n16-d8", "range-n11-d6-t0.5-b20", "stress-huge")
)


def big_vision_sigmoid(seen: list[tuple[Any, ...]]) -> Any:
    """big_vision's sigmoid loss in torch, recording the dtypes it receives.

    ``logits = img @ txt.T * t + b``: with float32 ``t`` and ``b`` jax promotes the bfloat16
    product to float32 and the loss is computed in float32, as in big_vision's bf16 training.
    torch does not promote a 2-d tensor by a 0-d one of the same kind, so the promotion jax
    makes is written out.
    """
    import torch

    def loss(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        seen.append((img.dtype, txt.dtype, scale.dtype, bias.dtype))
        promoted = torch.promote_types(img.dtype, scale.dtype)
        logits = (img @ txt.T).to(promoted) * scale + bias
        labels = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
        return -torch.nn.functional.logsigmoid(labels * logits).sum() / img.shape[0]

    return loss


def _worst(report: Any, quantity: str) -> float:
    return max(r.error for r in report.results if r.check == "golden" and r.quantity == quantity)


def test_scale_and_bias_arrive_as_float32_with_bfloat16_features() -> None:
    """Default: all four inputs bfloat16. ``scalar_dtype="float32"``: scale and bias float32."""
    torch = pytest.importorskip("torch")
    same: list[tuple[Any, ...]] = []
    check(big_vision_sigmoid(same), loss="sigmoid", backend="torch", dtype="bfloat16", cases=SOME)
    assert set(same) == {(torch.bfloat16,) * 4}
    kept: list[tuple[Any, ...]] = []
    report = check(
        big_vision_sigmoid(kept),
        loss="sigmoid",
        backend="torch",
        dtype="bfloat16",
        cases=SOME,
        scalar_dtype="float32",
    )
    assert set(kept) == {(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)}
    # Float32 logits: the loss and the scale's gradient are more accurate than with bfloat16
    # scalars, judged against the float64 goldens (the scalars' gradients come back float32).
    bf16 = check(
        big_vision_sigmoid([]), loss="sigmoid", backend="torch", dtype="bfloat16", cases=SOME
    )
    for quantity in ("loss", "scale"):
        assert _worst(report, quantity) < 0.6 * _worst(bf16, quantity), quantity
    assert report.passed, [(r.case, r.quantity, r.error, r.tolerance) for r in report.failed]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_library_passes_with_float32_scalars(dtype: str) -> None:
    """portable_siglip (torch CPU) with float32 scale and bias and half features passes."""
    pytest.importorskip("torch")
    import portable_siglip as ps

    report = check(
        ps.sigmoid_loss_and_grad,
        loss="sigmoid",
        backend="torch",
        dtype=dtype,
        cases=SOME,
        scalar_dtype="float32",
    )
    assert report.passed, [(r.case, r.quantity, r.error, r.tolerance) for r in report.failed]


def test_scalar_dtype_arrays_on_numpy() -> None:
    """The xp.asarray path: numpy float32 features with float32 scalars (a no-op) pass."""
    seen: list[tuple[Any, ...]] = []

    def loss(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        seen.append((img.dtype, scale.dtype, bias.dtype))
        z = (img.astype(np.float64) @ txt.T.astype(np.float64)) * float(scale) + float(bias)
        labels = 2 * np.eye(img.shape[0]) - 1
        return np.logaddexp(0, -labels * z).sum() / img.shape[0]

    check(loss, loss="sigmoid", dtype="float32", cases=SOME[:2], scalar_dtype="float32")
    assert set(seen) == {(np.dtype(np.float32),) * 3}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "bfloat16", "scalar_dtype": "float16"}, "`scalar_dtype` must be"),
        ({"dtype": "bfloat16", "scalar_dtype": "same"}, "`scalar_dtype` must be"),
        ({"dtype": "float64", "scalar_dtype": "float32"}, "`scalar_dtype='float32'` needs"),
    ],
)
def test_a_bad_scalar_dtype_is_a_named_value_error(kwargs: dict[str, Any], match: str) -> None:
    """A value other than None or "float32", or float32 scalars in a float64 run, is refused."""
    import portable_siglip as ps

    with pytest.raises(ValueError, match=match):
        check(ps.sigmoid_loss_and_grad, loss="sigmoid", cases=SOME[:1], **kwargs)


def test_the_cli_option_parses_and_is_refused_when_bad(capsys: Any) -> None:
    """``--scalar-dtype`` takes same (the default) or float32; anything else is a usage error."""
    parser = build_parser()
    assert parser.parse_args(["--loss", "sigmoid"]).scalar_dtype == "same"
    assert parser.parse_args(["--loss", "sigmoid", "--scalar-dtype", "float32"]).scalar_dtype == (
        "float32"
    )
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--loss", "sigmoid", "--scalar-dtype", "bfloat16"])
    assert exit_info.value.code == 2
    assert "--scalar-dtype: invalid choice: 'bfloat16'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--dtype", "float64", "--scalar-dtype", "float32"], "`--scalar-dtype float32` needs"),
        (
            ["--dtype", "bfloat16", "--scalar-dtype", "float32", "--comm", "mpi"],
            "`--scalar-dtype float32` is not taken by `--comm mpi`",
        ),
    ],
)
def test_the_cli_refuses_what_it_cannot_judge(argv: list[str], match: str, capsys: Any) -> None:
    """float32 scalars in a float64 run, or with the MPI judge: status 2, named."""
    assert main(["--loss", "sigmoid", *argv]) == 2
    assert match in capsys.readouterr().err


def test_the_cli_passes_float32_scalars_to_check(monkeypatch: Any) -> None:
    """``--scalar-dtype float32`` reaches :func:`check`; ``same`` (the default) passes None."""
    import portable_siglip.conformance.__main__ as cli

    seen: list[Any] = []

    def recording(function: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("scalar_dtype", "missing"))
        return check(function, **{**kwargs, "cases": SOME[:1]})

    monkeypatch.setattr(cli, "check", recording)
    argv = ["--loss", "sigmoid", "--dtype", "float32"]
    assert main(argv) == 0
    assert main([*argv, "--scalar-dtype", "float32"]) == 0
    assert seen == [None, "float32"]


def test_the_report_notes_float32_scalars() -> None:
    """A run with float32 scalars says so in its notes; a default run does not."""
    import portable_siglip as ps

    kwargs: dict[str, Any] = {"loss": "sigmoid", "dtype": "float32", "cases": SOME[:1]}
    kept = check(ps.sigmoid_loss_and_grad, scalar_dtype="float32", **kwargs)
    assert any("scale and bias float32" in note for note in kept.notes), kept.notes
    same = check(ps.sigmoid_loss_and_grad, **kwargs)
    assert not any("scale and bias float32" in note for note in same.notes)


def test_jax_big_vision_formula_promotes_to_float32() -> None:
    """jax (big_vision's backend): float32 scalars reach it and promote its logits to float32."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    seen: list[tuple[Any, ...]] = []

    def loss(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        logits = img @ txt.T * scale + bias
        seen.append((img.dtype, scale.dtype, bias.dtype, logits.dtype))
        labels = 2 * jnp.eye(img.shape[0], dtype=logits.dtype) - 1
        return -jax.nn.log_sigmoid(labels * logits).sum() / img.shape[0]

    kwargs: dict[str, Any] = {"loss": "sigmoid", "backend": "jax", "cases": SOME[:3]}
    report = check(loss, dtype="bfloat16", scalar_dtype="float32", **kwargs)
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert set(seen) == {(bf16, f32, f32, f32)}
    assert report.passed, [(r.case, r.quantity, r.error, r.tolerance) for r in report.failed]
    seen.clear()
    check(loss, dtype="bfloat16", **kwargs)
    assert set(seen) == {(bf16,) * 4}


def test_big_vision_bfloat16_fails_only_on_its_scalars_dtype() -> None:
    """Every golden case, jax bfloat16: with bfloat16 scalars (the default) the big_vision
    formula fails some checks (its logits are then bfloat16, unlike in training); with float32
    scalars, as big_vision keeps them, it passes every check (about 10 s per run on CPU).
    """
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
        logits = img @ txt.T * scale + bias
        labels = 2 * jnp.eye(img.shape[0], dtype=logits.dtype) - 1
        return -jax.nn.log_sigmoid(labels * logits).sum() / img.shape[0]

    kept = check(loss, loss="sigmoid", backend="jax", dtype="bfloat16", scalar_dtype="float32")
    assert kept.passed, [(r.case, r.quantity, r.error, r.tolerance) for r in kept.failed]
    assert check(loss, loss="sigmoid", backend="jax", dtype="bfloat16").failed


#: A gloo factory whose ranks refuse scale and bias that are not float32: it passes the
#: distributed judge only if the judge hands them float32, as --scalar-dtype float32 asks.
_FLOAT32_SCALARS_ONLY = """
import torch

from portable_siglip.backends.torch import SigLipLoss


def siglip(rank, world_size):
    inner = SigLipLoss(rank=rank, world_size=world_size)

    def loss(img, txt, scale, bias):
        if scale.dtype != torch.float32 or bias.dtype != torch.float32:
            raise TypeError(f"scale and bias must stay float32, got {scale.dtype}")
        return inner(img, txt, scale, bias)

    return loss
"""


def test_the_gloo_judge_passes_float32_scalars(tmp_path: Any) -> None:
    """``judge(..., scalar_dtype="float32")``: every rank gets float32 scale and bias."""
    pytest.importorskip("torch")
    from portable_siglip.conformance._distributed import judge

    path = tmp_path / "float32_scalars.py"
    path.write_text(_FLOAT32_SCALARS_ONLY)
    spec = f"{path}:siglip"
    kept = judge(spec, loss="sigmoid", world_size=2, dtype="bfloat16", scalar_dtype="float32")
    assert kept.passed, kept.table()
    assert any("scale and bias float32" in note for note in kept.notes), kept.notes
    same = judge(spec, loss="sigmoid", world_size=2, dtype="bfloat16", timeout=30)
    assert not same.passed
    assert "scale and bias must stay float32" in same.table()
    with pytest.raises(UsageError, match=r"`scalar_dtype='float32'` needs"):
        judge(spec, loss="sigmoid", world_size=2, dtype="float64", scalar_dtype="float32")
