"""`portable_siglip.backends.torch.cached_step`: the two-pass step equals one full backward.

The reference is independent of the code under test: the towers embed the same chunks in the
same order from the same seed, with a graph, the features are concatenated, and a dense float64
loss written here (as in docs/math.md and docs/multi-positive.md) is differentiated by autograd
in one ``backward()``. Every parameter gradient of the model (both towers, the learnt log-scale
and the bias) must agree to 1e-10, relative to the largest entry.

The towers have dropout in training mode (so pass 2 must replay pass 1's random draws) and batch
norm in eval mode with non-trivial running statistics; the text tower takes a dict of tensors.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import io
import json
import math
import re
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import portable_siglip.backends._torch_cached as cached_module  # noqa: E402
from portable_siglip.backends.torch import cached_step  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

from portable_siglip.comm import ThreadGroup  # noqa: E402

F64 = torch.float64
LOSSES = ["sigmoid", "softmax"]
RTOL = 1e-10
DIST_SCRIPT = Path(__file__).parent / "torch_dist_scripts" / "cached_step.py"


class Towers(nn.Module):
    """A small CLIP with dropout and (eval-mode) batch norm; texts come as a dict."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.image = nn.Sequential(
            nn.Linear(5, 8, dtype=F64),
            nn.BatchNorm1d(8, dtype=F64),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(8, 4, dtype=F64),
        )
        self.text = nn.Sequential(
            nn.Linear(6, 8, dtype=F64), nn.Dropout(dropout), nn.Tanh(), nn.Linear(8, 4, dtype=F64)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
            norm = self.image[1]
            norm.running_mean.copy_(torch.randn(8, generator=gen, dtype=F64))
            norm.running_var.copy_(torch.rand(8, generator=gen, dtype=F64) + 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(6.0), dtype=F64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0, dtype=F64))
        self.train()
        self.image[1].eval()  # batch norm from its running statistics

    def encode_img(self, x: Any) -> Any:
        return functional.normalize(self.image(x), dim=-1)

    def encode_txt(self, batch: dict[str, Any]) -> Any:
        return functional.normalize(self.text(batch["tokens"] * batch["weight"]), dim=-1)


def inputs(m: int, k: int, seed: int = 1) -> tuple[Any, dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(m, 5, generator=gen, dtype=F64)
    texts = {
        "tokens": torch.randn(k, 6, generator=gen, dtype=F64),
        "weight": torch.rand(k, 1, generator=gen, dtype=F64) + 0.5,
    }
    return images, texts


def rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, dict):
        return {key: value[start:stop] for key, value in batch.items()}
    return batch[start:stop]


def dense_loss(loss: str, img: Any, txt: Any, scale: Any, bias: Any, ids: Any = None) -> Any:
    """The loss written densely in float64, with several positives where ids are given."""
    logits = scale * img @ txt.T + (0.0 if bias is None else bias)
    m = logits.shape[0]
    if ids is None:
        positive = torch.eye(m, dtype=F64)
    else:
        positive = (ids[0][:, None] == ids[1][None, :]).to(F64)
    if loss == "sigmoid":
        return functional.softplus(-(2 * positive - 1) * logits).sum() / m
    rows_term = torch.logsumexp(logits, 1) - (positive * logits).sum(1) / positive.sum(1)
    # A text that is nobody's positive (a hard negative, unmatched_txt="negatives") joins
    # the rows' denominators and has no column term: the mean is over matched columns.
    matched = positive.sum(0) > 0
    per_column = positive.sum(0).clamp(min=1)  # no 0/0 (whose gradient is NaN) off `matched`
    cols_term = torch.logsumexp(logits, 0) - (positive * logits).sum(0) / per_column
    return (rows_term.mean() + cols_term[matched].mean()) / 2


def spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def embed_like_the_step(model: Towers, images: Any, texts: Any, chunk: int) -> tuple[Any, Any]:
    """The features with a graph, chunk by chunk, image chunks first: the step's RNG order."""
    m, k = images.shape[0], texts["tokens"].shape[0]
    img = torch.cat([model.encode_img(rows(images, a, b)) for a, b in spans(m, chunk)])
    txt = torch.cat([model.encode_txt(rows(texts, a, b)) for a, b in spans(k, chunk)])
    return img, txt


def grads_of(model: nn.Module) -> dict[str, Any]:
    return {
        name: p.grad.detach().clone() if p.grad is not None else None
        for name, p in model.named_parameters()
    }


def assert_grads_close(actual: dict, expected: dict, what: str, rtol: float = RTOL) -> None:
    assert actual.keys() == expected.keys()
    largest = max(g.abs().max().item() for g in expected.values() if g is not None)
    for name, want in expected.items():
        if want is None:
            assert actual[name] is None, f"{what}: {name} got a gradient"
            continue
        err = (actual[name] - want).abs().max().item() / largest
        assert err <= rtol, f"{what}: gradient of {name} off by {err:.2e} (rtol {rtol})"


def reference(
    model: Towers,
    shards: list[tuple[Any, Any]],
    loss: str,
    chunk: int,
    seeds: list[int],
    ids: Any = None,
) -> tuple[float, dict[str, Any]]:
    """One backward of the dense loss of the whole batch, each shard embedded as its rank does."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    parts = []
    for (images, texts), seed in zip(shards, seeds, strict=True):
        torch.manual_seed(seed)
        parts.append(embed_like_the_step(model, images, texts, chunk))
    img = torch.cat([p[0] for p in parts])
    txt = torch.cat([p[1] for p in parts])
    bias = model.logit_bias if loss == "sigmoid" else None
    value = dense_loss(loss, img, txt, model.logit_scale.exp(), bias, ids)
    value.backward()
    return value.item(), grads_of(model)


def run_step(
    model: Towers, images: Any, texts: Any, loss: str, chunk: int, seed: int, **options: Any
) -> tuple[float, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = cached_step(
        model.encode_img,
        model.encode_txt,
        images,
        texts,
        loss=loss,
        logit_scale=model.logit_scale.exp(),
        logit_bias=model.logit_bias if loss == "sigmoid" else None,
        chunk_size=chunk,
        **options,
    )
    assert value.ndim == 0
    assert not value.requires_grad
    return value.item(), grads_of(model)


def multi_positive_ids(m: int) -> tuple[Any, Any]:
    """Image ids with a duplicate; 1 to 3 captions per distinct image (k = 2m - 2)."""
    img_ids = torch.arange(m)
    img_ids[1] = img_ids[0]  # two images of one id: they share their positives
    txt_ids = torch.cat([torch.arange(m), torch.arange(2, m)])
    txt_ids = txt_ids[torch.randperm(txt_ids.numel(), generator=torch.Generator().manual_seed(5))]
    return img_ids, txt_ids[txt_ids != 1]


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [1, 3, 4, 12, 50])  # 3 does not divide 12; 50 > n
def test_equals_one_full_backward(loss: str, chunk: int) -> None:
    model, (images, texts) = Towers(), inputs(12, 12)
    value, got = run_step(model, images, texts, loss, chunk, seed=11, block_size=5)
    want_value, want = reference(model, [(images, texts)], loss, chunk, [11])
    assert abs(value - want_value) <= 1e-12 * abs(want_value)
    assert all(g is not None for n, g in got.items() if n != "logit_bias" or loss == "sigmoid")
    assert_grads_close(got, want, f"{loss}, chunk {chunk}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [2, 5])
def test_equals_one_full_backward_with_ids(loss: str, chunk: int) -> None:
    img_ids, txt_ids = multi_positive_ids(9)
    model, (images, texts) = Towers(), inputs(9, txt_ids.numel())
    ids = {"img_ids": img_ids, "txt_ids": txt_ids}
    value, got = run_step(model, images, texts, loss, chunk, seed=3, **ids)
    want_value, want = reference(model, [(images, texts)], loss, chunk, [3], (img_ids, txt_ids))
    assert abs(value - want_value) <= 1e-12 * abs(want_value)
    assert_grads_close(got, want, f"{loss} with ids, chunk {chunk}")


@pytest.mark.parametrize("chunk", [3, 4])
def test_softmax_with_hard_negatives(chunk: int) -> None:
    """Texts whose ids no image has: refused by default, hard negatives with "negatives"."""
    img_ids = torch.arange(7)
    txt_ids = torch.tensor([3, 100, 0, 1, 2, 101, 4, 5, 6, 102])  # 100..102: no image
    model, (images, texts) = Towers(), inputs(7, txt_ids.numel())
    ids = {"img_ids": img_ids, "txt_ids": txt_ids}
    value, got = run_step(
        model, images, texts, "softmax", chunk, 4, unmatched_txt="negatives", **ids
    )
    want_value, want = reference(
        model, [(images, texts)], "softmax", chunk, [4], (img_ids, txt_ids)
    )
    assert abs(value - want_value) <= 1e-12 * abs(want_value)
    assert_grads_close(got, want, f"softmax with hard negatives, chunk {chunk}")
    with pytest.raises(ValueError, match="txt_ids"):
        run_step(model, images, texts, "softmax", chunk, 4, **ids)
    with pytest.raises(ValueError, match="`unmatched_txt` must be one of"):
        run_step(model, images, texts, "softmax", chunk, 4, unmatched_txt="ignore", **ids)


def test_dropout_matters_so_the_replay_is_tested() -> None:
    """Another seed gives other gradients: the agreement above needs pass 2 to replay pass 1."""
    model, (images, texts) = Towers(), inputs(12, 12)
    _, first = reference(model, [(images, texts)], "sigmoid", 4, [11])
    _, other = reference(model, [(images, texts)], "sigmoid", 4, [12])
    with pytest.raises(AssertionError, match="off by"):
        assert_grads_close(other, first, "another seed", rtol=1e-3)


def test_rng_left_as_after_one_pass_and_grads_accumulate() -> None:
    model, (images, texts) = Towers(), inputs(8, 8)
    torch.manual_seed(0)
    embed_like_the_step(copy.deepcopy(model), images, texts, 3)
    after_one_pass = torch.rand(3)
    _, once = run_step(model, images, texts, "sigmoid", 3, seed=0)
    assert torch.equal(torch.rand(3), after_one_pass)
    torch.manual_seed(0)
    cached_step(
        model.encode_img,
        model.encode_txt,
        images,
        texts,
        logit_scale=model.logit_scale.exp(),
        logit_bias=model.logit_bias,
        chunk_size=3,
    )  # on top of the gradients already there, as backward() adds
    twice = grads_of(model)
    assert_grads_close(twice, {name: 2 * g for name, g in once.items()}, "accumulated")


def test_frozen_tower_and_a_fixed_scale() -> None:
    """LiT: a text tower without trainable parameters, and Python numbers for t and b."""
    model, (images, texts) = Towers(dropout=0.0), inputs(7, 7)
    model.text.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    cached_step(
        model.encode_img,
        model.encode_txt,
        images,
        texts,
        logit_scale=5.0,
        logit_bias=-1.0,
        chunk_size=2,
    )
    got = grads_of(model)
    ref = copy.deepcopy(model)
    img, txt = embed_like_the_step(ref, images, texts, 2)
    dense_loss("sigmoid", img, txt, 5.0, -1.0).backward()
    want = grads_of(ref)
    assert got["text.0.weight"] is None
    assert got["logit_scale"] is None
    assert_grads_close(got, want, "frozen text tower")


def test_under_autocast_bfloat16() -> None:
    """Features come back in bfloat16; the loss is float32 and the gradients follow the graph."""
    model = Towers(dropout=0.0).float()
    images, texts = inputs(16, 16)
    images, texts = images.float(), {key: value.float() for key, value in texts.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = run_step(model, images, texts, "sigmoid", 5, seed=0)
        ref = copy.deepcopy(model)
        img, txt = embed_like_the_step(ref, images, texts, 5)
        assert img.dtype == torch.bfloat16
    value = dense_loss(
        "sigmoid",
        img.double(),
        txt.double(),
        ref.logit_scale.exp().double(),
        ref.logit_bias.double(),
    )
    value.backward()
    assert_grads_close(got, grads_of(ref), "autocast", rtol=2e-2)


# ------------------------------------------------------------------------------- ranks


def shard(batch: Any, sizes: list[int]) -> list[Any]:
    edges = [0, *accumulate(sizes)]
    return [rows(batch, a, b) for a, b in pairwise(edges)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sizes", [[7, 2], [7, 2, 5]], ids=str)
def test_thread_ranks_equal_one_process(loss: str, sizes: list[int]) -> None:
    """W ranks with uneven shards (and so different chunk counts): after the step's own
    averaging every rank holds the one-process gradient of the whole batch."""
    model = Towers(dropout=0.0)  # the ranks share torch's generator: no dropout in threads
    images, texts = inputs(sum(sizes), sum(sizes))
    shards = list(zip(shard(images, sizes), shard(texts, sizes), strict=True))
    _, want = reference(model, shards, loss, 3, [0] * len(sizes))

    def rank_call(comm: Any) -> dict[str, Any]:
        replica = copy.deepcopy(model)
        x_img, x_txt = shards[comm.rank]
        return run_step(replica, x_img, x_txt, loss, 3, seed=0, comm=comm, block_size=2)[1]

    for rank, got in enumerate(ThreadGroup(len(sizes), timeout=60.0).run(rank_call)):
        assert_grads_close(got, want, f"{loss}, rank {rank} of {sizes}")


def test_thread_ranks_with_ids_and_sync_left_to_the_caller() -> None:
    """Several positives across ranks; with sync_grads=False the mean over ranks is exact."""
    img_ids, txt_ids = multi_positive_ids(10)
    model = Towers(dropout=0.0)
    images, texts = inputs(10, txt_ids.numel())
    img_sizes, txt_sizes = [6, 1, 3], [4, 9, txt_ids.numel() - 13]
    shards = list(zip(shard(images, img_sizes), shard(texts, txt_sizes), strict=True))
    id_shards = list(zip(shard(img_ids, img_sizes), shard(txt_ids, txt_sizes), strict=True))
    _, want = reference(model, shards, "sigmoid", 2, [0, 0, 0], (img_ids, txt_ids))

    def rank_call(comm: Any) -> dict[str, Any]:
        replica = copy.deepcopy(model)
        (x_img, x_txt), (i_ids, t_ids) = shards[comm.rank], id_shards[comm.rank]
        options = {"img_ids": i_ids, "txt_ids": t_ids, "sync_grads": False}
        return run_step(replica, x_img, x_txt, "sigmoid", 2, seed=0, comm=comm, **options)[1]

    ranks = ThreadGroup(3, timeout=60.0).run(rank_call)
    mean = {name: sum(r[name] for r in ranks) / 3 for name in want}
    assert_grads_close(mean, want, "mean over ranks")
    with pytest.raises(AssertionError, match="off by"):  # each rank alone is not the gradient
        assert_grads_close(ranks[0], want, "rank 0 alone")


def test_ddp_on_gloo_equals_one_process(tmp_path: Path) -> None:
    """3 processes, DDP-wrapped model, dropout on, shards 7, 2, 5 (3, 1 and 2 chunks of 3):
    after the step every rank holds the one-process gradient of the whole batch."""
    from helpers import run_torch_ranks, torch_with_gloo

    torch_with_gloo()
    sizes, chunk = [7, 2, 5], 3
    out = tmp_path / "grads.json"
    env = {"SHARDS": ",".join(map(str, sizes)), "CHUNK": str(chunk)}
    run_torch_ranks(DIST_SCRIPT, len(sizes), str(out), env=env, timeout=240)
    results = json.loads(out.read_text())
    images, texts = inputs(sum(sizes), sum(sizes))
    shards = list(zip(shard(images, sizes), shard(texts, sizes), strict=True))
    seeds = [100 + rank for rank in range(len(sizes))]
    for loss in LOSSES:
        value, want = reference(Towers(), shards, loss, chunk, seeds)
        want = {name: g for name, g in want.items() if g is not None}
        got = {
            name: torch.tensor(results[loss]["grads"][name], dtype=F64).reshape(g.shape)
            for name, g in want.items()
        }
        assert set(results[loss]["grads"]) == set(want)
        assert abs(results[loss]["loss"] - value) <= 1e-12 * abs(value), loss
        assert_grads_close(got, want, f"DDP on gloo, {loss}")


# -------------------------------------------------------------------------- bad input


def _call(**changes: Any) -> Any:
    model, (images, texts) = Towers(), inputs(4, 4)
    arguments: dict[str, Any] = {
        "encode_img": model.encode_img,
        "encode_txt": model.encode_txt,
        "images": images,
        "texts": texts,
        "logit_scale": model.logit_scale.exp(),
        "chunk_size": 2,
    }
    arguments.update(changes)
    return cached_step(**arguments)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int, got 0"),
        ({"chunk_size": 2.0}, TypeError, "`chunk_size` must be a positive int, got float"),
        ({"chunk_size": True}, TypeError, "`chunk_size` must be a positive int, got bool"),
        ({"loss": "cosine"}, ValueError, "`loss` must be one of 'sigmoid', 'softmax'"),
        ({"encode_img": "model.image"}, TypeError, "`encode_img` must be callable, got str"),
        ({"encode_txt": None}, TypeError, "`encode_txt` must be callable, got NoneType"),
        ({"images": torch.zeros(5, 5, dtype=F64)}, ValueError, "`images` has 5 rows and `texts` 4"),
        ({"images": "pixels"}, TypeError, "`images` must be a tensor, or a dict"),
        ({"texts": {"tokens": torch.zeros(4, 6), "weight": torch.zeros(3, 1)}},
         ValueError, r"`texts`: every tensor must have the same number of rows .* got 3, 4"),
        ({"texts": {}}, ValueError, "`texts` holds no tensor"),
        ({"images": torch.zeros(0, 5)}, ValueError, "`images` has no rows"),
        ({"img_ids": torch.arange(4)}, ValueError, "pass both `img_ids` and `txt_ids`"),
        ({"img_ids": torch.arange(3), "txt_ids": torch.arange(4)}, ValueError,
         r"`img_ids` must have shape \(4,\)"),
        ({"img_ids": [0, 1, 2, 3], "txt_ids": torch.arange(4)}, TypeError,
         "`img_ids` must be a torch.Tensor"),
        ({"logit_scale": torch.ones(2)}, ValueError, "`logit_scale` must be a 0-d tensor"),
        ({"logit_scale": "10"}, TypeError, "`logit_scale` must be a 0-d tensor or a number"),
        ({"logit_bias": True}, TypeError, "`logit_bias` must be a 0-d tensor, a number or None"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"precision": "fastest"}, ValueError, "precision"),
        ({"strategy": "ring"}, ValueError, "`strategy` must be None or one of"),
        ({"sync_grads": 1}, TypeError, "`sync_grads` must be True or False, got int"),
        ({"comm": object()}, TypeError, "`comm` must be None or a communicator"),
        ({"encode_img": lambda x: x[:, :4].sum(1)}, ValueError,
         r"`encode_img` must return a \(rows, d\) tensor, one row per input row; got \(2,\)"),
        ({"encode_txt": lambda b: b["tokens"][:1]}, ValueError,
         r"`encode_txt` must return a \(rows, d\) tensor.*got \(1, 6\) for a chunk of 2 rows"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_naming_the_parameter(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _call(**changes)


def test_refused_before_any_encoder_runs_and_under_no_grad() -> None:
    calls = []

    def encode(x: Any) -> Any:
        calls.append(x.shape[0])
        return x

    with pytest.raises(ValueError, match="chunk_size"):
        _call(encode_img=encode, chunk_size=-1)
    with pytest.raises(ValueError, match="img_ids"):
        _call(encode_img=encode, img_ids=torch.arange(4))
    assert calls == []
    with torch.no_grad(), pytest.raises(RuntimeError, match="with gradients enabled"):
        _call()


def test_docstring_example_runs() -> None:
    result = doctest.testmod(cached_module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_docs_training_step_runs() -> None:
    """docs/frameworks.md, "torch: `cached_step`": its example runs and prints what it says."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "frameworks.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "cached_step(" in b]
    assert blocks, "docs/frameworks.md has no python example of cached_step"
    for block in blocks:
        claimed = re.findall(r"^print\(.*\)  # (.*)$", block, flags=re.MULTILINE)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "frameworks.md:cached_step", "exec"), {"__name__": "docs_cached"})
        assert claimed
        assert out.getvalue().splitlines() == claimed
