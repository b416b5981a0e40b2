"""``run --captions-per-image K --duplicate-rate P``: several positives per row from the CLI.

The batch builder (:func:`portable_siglip.cli._commands.random_batch`) is checked for what its help
promises (shapes, ids on both sides, duplicated captions copied, shards that are rows of
the whole batch), and the loss on its batch against a dense float64 evaluation of the
multi-positive formulas written here, independently of the package: the losses by loops
over rows and columns, their derivatives by complex-step differentiation.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from helpers import beside_python, launcher_environment, run_captured, skip_without_mpi

import portable_siglip as ps
from portable_siglip.cli import _commands as _cli

SMALL = ["--batch", "120", "--dim", "16", "--block-size", "32"]


# --------------------------------------------------------------------------- dense oracle


def dense_loss(
    loss: str,
    img: np.ndarray,
    txt: np.ndarray,
    scale: Any,
    bias: Any,
    img_ids: np.ndarray,
    txt_ids: np.ndarray,
) -> Any:
    """The multi-positive loss, by loops; real or complex inputs (for the complex step).

    Sigmoid: ``(1/m) sum_ij softplus(-l_ij Z_ij)``, ``l = 2 P - 1``, ``Z = t S + b``.
    Softmax: ``1/2 [(1/m) sum_i (lse_j Z_ij - mean_{j in P_i} Z_ij)
    + (1/k) sum_j (lse_i Z_ij - mean_{i in Q_j} Z_ij)]``, ``Z = t S``.
    """
    m, k = img.shape[0], txt.shape[0]
    positive = img_ids[:, None] == txt_ids[None, :]
    if loss == "sigmoid":
        logits = scale * (img @ txt.T) + bias
        sign = np.where(positive, 1.0, -1.0)
        # softplus(x) = log(1 + e^x): |Z| <= |t| + |b| = 20 here, no overflow.
        return np.log1p(np.exp(-sign * logits)).sum() / m
    logits = scale * (img @ txt.T)

    def lse(values: Any) -> Any:
        top = np.max(values.real)
        return top + np.log(np.exp(values - top).sum())

    rows = sum(lse(logits[i]) - logits[i][positive[i]].mean() for i in range(m))
    cols = sum(lse(logits[:, j]) - logits[:, j][positive[:, j]].mean() for j in range(k))
    return (rows / m + cols / k) / 2


def complex_step(function: Any, h: float = 1e-30) -> float:
    """d/de function(e) at e = 0, exact to rounding: Im f(i h) / h."""
    return float(function(1j * h).imag / h)


def check_against_dense(
    loss: str, img: np.ndarray, txt: np.ndarray, img_ids: np.ndarray, txt_ids: np.ndarray
) -> None:
    scale, bias = 10.0, -10.0
    value_and_grad = ps.sigmoid_loss_and_grad if loss == "sigmoid" else ps.softmax_loss_and_grad
    value, grads = value_and_grad(
        img, txt, scale, bias, block_size=16, img_ids=img_ids, txt_ids=txt_ids
    )
    loss_bias = bias if loss == "sigmoid" else 0.0
    expected = dense_loss(loss, img, txt, scale, loss_bias, img_ids, txt_ids)
    assert abs(float(value) - expected) <= 1e-10 * abs(expected)
    # Plain value_and_grad must agree with the loss alone.
    plain = ps.sigmoid_loss if loss == "sigmoid" else ps.softmax_loss
    alone = plain(img, txt, scale, bias, block_size=16, img_ids=img_ids, txt_ids=txt_ids)
    assert abs(float(alone) - expected) <= 1e-10 * abs(expected)

    rng = np.random.default_rng(7)
    way_img = rng.standard_normal(img.shape)
    way_txt = rng.standard_normal(txt.shape)
    directional = {
        "img": complex_step(
            lambda e: dense_loss(loss, img + e * way_img, txt, scale, loss_bias, img_ids, txt_ids)
        ),
        "txt": complex_step(
            lambda e: dense_loss(loss, img, txt + e * way_txt, scale, loss_bias, img_ids, txt_ids)
        ),
        "scale": complex_step(
            lambda e: dense_loss(loss, img, txt, scale + e, loss_bias, img_ids, txt_ids)
        ),
    }
    got = {
        "img": float((np.asarray(grads.img) * way_img).sum()),
        "txt": float((np.asarray(grads.txt) * way_txt).sum()),
        "scale": float(grads.scale),
    }
    if loss == "sigmoid":
        directional["bias"] = complex_step(
            lambda e: dense_loss(loss, img, txt, scale, bias + e, img_ids, txt_ids)
        )
        got["bias"] = float(grads.bias)
    for name, want in directional.items():
        assert abs(got[name] - want) <= 1e-10 * max(abs(want), abs(expected)), name


def test_the_oracle_is_the_plain_loss_with_one_positive_per_row() -> None:
    from portable_siglip._reference import dense_loss_and_grad

    img, txt = _cli.random_pairs(np, 9, 5, seed=1)
    ids = np.arange(9)
    for loss in ("sigmoid", "softmax"):
        bias = -10.0 if loss == "sigmoid" else 0.0
        expected = dense_loss_and_grad(loss, img, txt, 10.0, bias)[0]
        assert dense_loss(loss, img, txt, 10.0, bias, ids, ids) == pytest.approx(expected, 1e-13)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    ("captions", "rate"), [(5, 0.0), (1, 0.1), (3, 0.3)], ids=["K5", "P0.1", "K3-P0.3"]
)
def test_loss_on_the_cli_batch_matches_the_dense_formulas(
    loss: str, captions: int, rate: float
) -> None:
    img, txt, img_ids, txt_ids = _cli.random_batch(np, 37, 6, 3, captions, rate)
    assert len(set(img_ids.tolist())) < 37 or captions > 1  # several positives somewhere
    check_against_dense(loss, img, txt, img_ids, txt_ids)


# --------------------------------------------------------------------------- the batch


def test_the_batch_is_what_the_help_says() -> None:
    n, captions = 50, 3
    img, txt, img_ids, txt_ids = _cli.random_batch(np, n, 8, 4, captions, 0.3)
    assert img.shape == (n, 8)
    assert txt.shape == (captions * n, 8)
    assert img_ids.shape == (n,)
    assert txt_ids.shape == (captions * n,)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0)
    # Caption j belongs to image j // K; every id is on both sides.
    np.testing.assert_array_equal(txt_ids, np.repeat(img_ids, captions))
    assert set(img_ids.tolist()) == set(txt_ids.tolist())
    # An image that joined a group has exact copies of its first image's captions.
    joined = np.flatnonzero(img_ids != np.arange(n))
    assert 5 <= joined.size <= 25  # about 0.3 of 49
    assert np.all(img_ids[joined] < joined)
    assert np.all(img_ids[img_ids] == img_ids)  # ids are the groups' first images
    groups = txt.reshape(n, captions, 8)
    for i in joined:
        np.testing.assert_array_equal(groups[i], groups[img_ids[i]])
    # ... and its own image features; the captions of a first image are near its image.
    firsts = np.flatnonzero(img_ids == np.arange(n))
    near = np.einsum("id,icd->ic", img[firsts], groups[firsts])
    assert near.min() > 0.3
    assert not np.allclose(img[joined], img[img_ids[joined]])


def test_one_caption_and_no_duplicates_is_the_plain_batch() -> None:
    img, txt, img_ids, txt_ids = _cli.random_batch(np, 11, 4, 5)
    plain = _cli.random_pairs(np, 11, 4, 5)
    np.testing.assert_array_equal(img, plain[0])
    np.testing.assert_array_equal(txt, plain[1])
    np.testing.assert_array_equal(img_ids, np.arange(11))
    np.testing.assert_array_equal(txt_ids, np.arange(11))
    # More captions keep caption 0 of every image.
    more = _cli.random_batch(np, 11, 4, 5, captions=3)
    np.testing.assert_array_equal(more[1][::3], plain[1])


def test_shards_are_rows_of_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "CHUNK_ROWS", 4)  # shards and groups cross chunk boundaries
    n, captions = 11, 3
    whole = _cli.random_batch(np, n, 3, 5, captions, 0.4)
    for world in (1, 2, 3, 5):
        pieces = [
            _cli.random_batch(
                np,
                n,
                3,
                5,
                captions,
                0.4,
                img_rows=_cli.shard(n, world, r),
                txt_rows=_cli.shard(captions * n, world, r),
            )
            for r in range(world)
        ]
        for part in range(4):
            np.testing.assert_array_equal(np.concatenate([p[part] for p in pieces]), whole[part])


def test_positive_pairs_counts_by_id() -> None:
    img_ids, txt_ids = _cli.batch_ids(np, 40, 2, 0.5, seed=3)
    dense = int((img_ids[:, None] == txt_ids[None, :]).sum())
    assert _cli.positive_pairs(np, img_ids, txt_ids) == dense


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    "extra",
    [["--captions-per-image", "5"], ["--duplicate-rate", "0.1"]],
    ids=["captions", "duplicates"],
)
def test_run_verify_with_several_positives(
    capsys: pytest.CaptureFixture[str], loss: str, extra: list[str]
) -> None:
    assert _cli.main(["run", "--loss", loss, *SMALL, *extra, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out
    captions = 600 if "--captions-per-image" in extra else 120
    assert f"m = 120 images, k = {captions} captions" in out
    assert "  positives       " in out
    if captions == 600:
        assert "600 pairs, 120 distinct ids (5 per image, 1 per caption)" in out


def test_plain_runs_pass_no_ids(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portable_siglip import _losses

    seen: list[dict[str, Any]] = []
    original = _losses.evaluate

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(_losses, "evaluate", spy)
    assert _cli.main(["run", *SMALL]) == 0
    assert _cli.main(["run", *SMALL, "--captions-per-image", "2"]) == 0
    assert "img_ids" not in seen[0]
    assert seen[1]["img_ids"].shape == (120,)
    assert seen[1]["txt_ids"].shape == (240,)
    assert "positives" not in capsys.readouterr().out.split("portable_siglip run:")[1]


def test_verify_with_ids_catches_a_wrong_loss(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portable_siglip import _losses

    original = _losses.evaluate

    def ids_ignored(*args: Any, **kwargs: Any) -> Any:
        # The loss as if every caption belonged to the image of the same index: wrong.
        img, txt = args[1], args[2]  # after the loss
        kwargs.update(img_ids=np.arange(img.shape[0]), txt_ids=np.arange(txt.shape[0]) % 120)
        return original(*args, **kwargs)

    monkeypatch.setattr(_losses, "evaluate", ids_ignored)
    argv = ["run", "--loss", "softmax", *SMALL, "--captions-per-image", "2", "--verify"]
    assert _cli.main(argv) == 1
    assert "verify: FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--captions-per-image", "0"], "--captions-per-image", "expected a positive integer"),
        (["--captions-per-image", "two"], "--captions-per-image", "expected a positive integer"),
        (["--duplicate-rate", "1"], "--duplicate-rate", "expected a number in [0, 1), got 1"),
        (["--duplicate-rate", "-0.1"], "--duplicate-rate", "expected a number in [0, 1)"),
        (["--duplicate-rate", "nan"], "--duplicate-rate", "expected a number in [0, 1)"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["run", *SMALL, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert message in err


@pytest.mark.parametrize(("loss", "strategy"), [("sigmoid", "bidir"), ("softmax", "ring")])
def test_run_sharded_over_a_thread_group(
    capsys: pytest.CaptureFixture[str], loss: str, strategy: str
) -> None:
    from portable_siglip.comm import ThreadGroup

    argv = ["run", "--loss", loss, "--strategy", strategy, "--batch", "100", "--dim", "16"]
    argv += ["--block-size", "16", "--captions-per-image", "3", "--duplicate-rate", "0.2"]
    statuses = ThreadGroup(3).run(lambda comm: _cli.main([*argv, "--verify"], comm=comm))
    out = capsys.readouterr().out
    assert statuses == [0, 0, 0], out
    assert "loss identical on every rank: yes" in out
    assert out.count("verify: ok") == 1
    # 100 images and 300 captions over 3 ranks, each side in its own contiguous slices.
    rows = [line.split() for line in out.splitlines() if line.startswith("       ")]
    assert [(int(row[1]), int(row[2])) for row in rows] == [(33, 100), (33, 100), (34, 100)]


def test_run_under_mpirun_with_captions() -> None:
    skip_without_mpi()  # mpi4py and an MPI library it can load
    mpirun = beside_python("mpirun")
    run = ["-m", "portable_siglip", "run", "--batch", "101", "--dim", "16", "--block-size", "17"]
    options = ["--dtype", "float64", "--captions-per-image", "3", "--verify"]
    command = [mpirun, "-n", "2", sys.executable, *run, *options]
    result = run_captured(command, timeout=120, env=launcher_environment())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ranks           2 (MPIComm)" in result.stdout
    assert "m = 101 images, k = 303 captions" in result.stdout
    assert result.stdout.count("verify: ok") == 1
