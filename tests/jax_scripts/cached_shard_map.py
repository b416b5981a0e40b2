"""``cached_value_and_grad`` inside ``jit(shard_map)`` with ``AxisComm`` on 4 CPU devices.

Run by tests/test_jax_cached.py in a subprocess, because the device count must be set
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before jax starts. Each device returns
its own loss and parameter gradient (stacked along a device axis, so that every device's copy
is compared, not one); the golden is ``jax.grad`` of the dense float64 loss of the whole batch
through the encoders, in this one process. Prints one JSON object: per case, the largest
relative error over the devices, for the loss and for every parameter leaf.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from portable_siglip.backends.jax import AxisComm, cached_value_and_grad

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_jax_cached import (  # noqa: E402  (the model and dense losses of the test file)
    DENSE,
    ENCODE,
    batch,
    encode_img,
    encode_txt,
    make_params,
    positives,
    relative,
    scale_and_bias,
)

WORLD = 4
MESH = Mesh(np.array(jax.devices()[:WORLD]), ("data",))


def golden(loss: str, params: Any, images: Any, texts: Any, ids: tuple[Any, Any] | None) -> Any:
    def whole(p: Any) -> Any:
        img, txt = encode_img(p, images), encode_txt(p, texts)
        t, b = scale_and_bias(p)
        e = positives(len(img), len(txt), *(ids or (None, None)))
        return DENSE[loss](img, txt, t, b, e)

    return jax.value_and_grad(whole)(params)


def case(
    loss: str,
    chunk: int,
    ids: bool,
    check_vma: bool = True,
    strategy: str | None = None,
    unmatched: bool = False,
) -> dict[str, float]:
    params = make_params(8)
    m, k = (36, 48) if ids else (40, 40)  # 9 and 12, or 10 and 10 rows per device
    images, texts = batch(m, k, seed=9)
    # Positives across devices; with `unmatched`, texts of ids 12..15 match no image.
    labels = (jnp.arange(m) % 12, jnp.arange(k) % (16 if unmatched else 12)) if ids else None

    def local(p: Any, x: Any, y: Any, *given: Any) -> Any:
        named = dict(zip(("img_ids", "txt_ids"), given, strict=False))
        value, grads = cached_value_and_grad(
            ENCODE,
            p,
            x,
            y,
            loss=loss,
            chunk_size=chunk,
            scale_and_bias=scale_and_bias,
            comm=AxisComm("data"),
            block_size=4,
            strategy=strategy,
            unmatched_txt="negatives" if unmatched else "error",
            **named,
        )
        return jax.tree.map(lambda a: a[None], (value, grads))  # one copy per device

    in_specs = (P(), P("data"), P("data")) + ((P("data"), P("data")) if ids else ())
    sharded = jax.shard_map(
        local, mesh=MESH, in_specs=in_specs, out_specs=P("data"), check_vma=check_vma
    )
    step = jax.jit(sharded)
    values, grads = step(params, images, texts, *(labels or ()))
    want_value, want_grads = golden(loss, params, images, texts, labels)
    errors = {"loss": max(relative(v, want_value) for v in values)}
    flat = jax.tree.flatten_with_path(grads)[0]
    for (path, leaf), want in zip(flat, jax.tree.leaves(want_grads), strict=True):
        assert leaf.shape == (WORLD, *want.shape), (path, leaf.shape)
        errors[jax.tree_util.keystr(path)] = max(relative(copy, want) for copy in leaf)
    return errors


def main() -> None:
    report: dict[str, Any] = {"devices": len(jax.devices())}
    report["sigmoid-5"] = case("sigmoid", 5, ids=False)  # divides the 10 rows per device
    for loss in ("sigmoid", "softmax"):
        report[f"{loss}-ids"] = case(loss, 4, ids=True)  # 4 divides 12 texts, not 9 images
    report["softmax-negatives"] = case("softmax", 4, ids=True, unmatched=True)
    report["sigmoid-3-reduce"] = case("sigmoid", 3, ids=False, strategy="reduce")
    report["softmax-3-gather"] = case("softmax", 3, ids=False, strategy="gather")
    # Without the varying-axis types, jax's vjp does not sum over the devices by itself.
    report["sigmoid-3-unchecked"] = case("sigmoid", 3, ids=False, check_vma=False)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
