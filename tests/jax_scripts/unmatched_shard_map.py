"""``unmatched_txt="negatives"`` through ``AxisComm`` under ``jit(shard_map)`` on 4 CPU devices.

Run by tests/test_unmatched_txt.py in a subprocess (``XLA_FLAGS`` must be set before jax
starts). Prints one JSON line: the batch, and for each schedule the loss and gradients of
the core function and the bridge's ``jax.grad``, gathered from the devices; the test compares
them with its dense reference. Inside ``shard_map`` the ids are traced: the texts without a
positive are found from their counts, and K' is summed by the communicator's allreduce.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from portable_siglip.backends import jax as psj
from portable_siglip.backends.jax import AxisComm

import portable_siglip as ps

jax.config.update("jax_enable_x64", True)
WORLD, SCALE, BLOCK = 4, 5.0, 2
MESH = Mesh(np.array(jax.devices()[:WORLD]), ("data",))
#: 8 images (a duplicate id), 12 texts: 4 hard negatives (ids 100-103), 3 texts per device.
IMG_IDS = np.array([0, 1, 2, 3, 4, 4, 6, 7])
TXT_IDS = np.array([0, 100, 1, 2, 3, 101, 4, 6, 102, 7, 103, 4])


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    img = rng.standard_normal((IMG_IDS.size, 5)) / np.sqrt(5)
    txt = rng.standard_normal((TXT_IDS.size, 5)) / np.sqrt(5)
    txt[: IMG_IDS.size] += img  # texts near images, hard negatives included
    return img, txt


def run(strategy: str) -> dict[str, Any]:
    img, txt = batch()

    def core(a: Any, b: Any, i: Any, j: Any) -> Any:
        value, grads = ps.softmax_loss_and_grad(
            a,
            b,
            SCALE,
            block_size=BLOCK,
            comm=AxisComm("data"),
            strategy=strategy,
            img_ids=i,
            txt_ids=j,
            unmatched_txt="negatives",
        )
        return value, grads.img, grads.txt, grads.scale

    def bridged(a: Any, b: Any, t: Any, i: Any, j: Any) -> Any:
        def value(a: Any, b: Any, t: Any) -> Any:
            return psj.softmax_loss(
                a,
                b,
                t,
                block_size=BLOCK,
                comm=AxisComm("data"),
                strategy=strategy,
                img_ids=i,
                txt_ids=j,
                unmatched_txt="negatives",
            )

        loss, (d_img, d_txt, d_scale) = jax.value_and_grad(value, argnums=(0, 1, 2))(a, b, t)
        return loss, d_img, d_txt, jax.lax.psum(d_scale, "data") / WORLD

    rows = P("data")
    out = (P(), rows, rows, P())
    args = [jnp.asarray(img), jnp.asarray(txt)]
    ids = [jnp.asarray(IMG_IDS), jnp.asarray(TXT_IDS)]
    first = jax.jit(jax.shard_map(core, mesh=MESH, in_specs=(rows,) * 4, out_specs=out))
    second = jax.jit(
        jax.shard_map(bridged, mesh=MESH, in_specs=(rows, rows, P(), rows, rows), out_specs=out)
    )
    report = {}
    for name, results in (
        ("core", first(*args, *ids)),
        ("bridge", second(*args, jnp.asarray(SCALE), *ids)),
    ):
        report[name] = [np.asarray(r, dtype=np.float64).tolist() for r in results]
    return report


def main() -> int:
    img, txt = batch()
    report: dict[str, Any] = {
        "devices": len(jax.devices()),
        "img": img.tolist(),
        "txt": txt.tolist(),
        "img_ids": IMG_IDS.tolist(),
        "txt_ids": TXT_IDS.tolist(),
    }
    for strategy in ("ring", "gather"):
        report[strategy] = run(strategy)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
