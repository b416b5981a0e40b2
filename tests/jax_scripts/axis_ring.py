"""Every schedule of both losses through ``AxisComm`` under ``jit(shard_map)`` on 4 CPU devices.

Run by tests/test_jax_axis_comm.py in a subprocess, because the device count must be set
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before jax starts. Prints one JSON
object: per case, the largest relative error against the one-process NumPy evaluation of the
same global batch, and the outcome of the error cases and of the memory analysis.
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
WORLD = 4
SCHEDULES = [("sigmoid", s) for s in ("bidir", "shift", "reduce", "gather")] + [
    ("softmax", s) for s in ("ring", "gather")
]
SCALE, BIAS, BLOCK = 5.0, -2.0, 3  # 7 rows per device: the block does not divide them
MESH = Mesh(np.array(jax.devices()[:WORLD]), ("data",))


def relative(got: Any, want: Any) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) or 1.0
    return float(np.max(np.abs(got - want))) / scale


def batch(seed: int, n: int = 7 * WORLD, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d)) / np.sqrt(d)
    return img, img + 0.5 * rng.standard_normal((n, d)) / np.sqrt(d)


def core_case(loss: str, strategy: str, ids: bool) -> dict[str, float]:
    """``ps.*_loss_and_grad(..., comm=AxisComm)`` inside jit(shard_map) vs one process."""
    img, txt = batch(1)
    extra: dict[str, Any] = {}
    specs: tuple[Any, ...] = (P("data"), P("data"), P(), P())
    if ids:  # duplicates that cross devices: image i and text j positive iff i // 3 == j // 3
        extra = {"img_ids": np.arange(img.shape[0]) // 3, "txt_ids": np.arange(img.shape[0]) // 3}
    function = getattr(ps, f"{loss}_loss_and_grad")
    want_loss, want = function(img, txt, SCALE, BIAS, block_size=BLOCK, **extra)

    def local(a: Any, b: Any, t: Any, c: Any, *labels: Any) -> Any:
        named = dict(zip(("img_ids", "txt_ids"), labels, strict=False))
        value, grads = function(
            a, b, t, c, block_size=BLOCK, comm=AxisComm("data"), strategy=strategy, **named
        )
        return value, grads.img, grads.txt, grads.scale, grads.bias

    in_specs = specs + ((P("data"), P("data")) if ids else ())
    out_specs = (P(), P("data"), P("data"), P(), P())
    step = jax.jit(jax.shard_map(local, mesh=MESH, in_specs=in_specs, out_specs=out_specs))
    args = [jnp.asarray(img), jnp.asarray(txt), jnp.asarray(SCALE), jnp.asarray(BIAS)]
    args += [jnp.asarray(v) for v in extra.values()]
    value, d_img, d_txt, d_scale, d_bias = step(*args)
    return {
        "loss": relative(value, want_loss),
        "img": relative(d_img, want.img),
        "txt": relative(d_txt, want.txt),
        "scale": relative(d_scale, want.scale),
        "bias": relative(d_bias, want.bias) if loss == "sigmoid" else float(abs(d_bias)),
    }


def bridge_case(loss: str, strategy: str) -> dict[str, float]:
    """``jax.grad`` of the bridge's loss with ``comm=AxisComm`` inside jit(shard_map)."""
    img, txt = batch(2)
    want_loss, want = getattr(ps, f"{loss}_loss_and_grad")(img, txt, SCALE, BIAS, block_size=BLOCK)
    function = getattr(psj, f"{loss}_loss")

    def local(a: Any, b: Any, t: Any, c: Any) -> Any:
        comm = AxisComm("data")
        return function(a, b, t, c, block_size=BLOCK, comm=comm, strategy=strategy)

    sharded = jax.shard_map(
        local, mesh=MESH, in_specs=(P("data"), P("data"), P(), P()), out_specs=P()
    )
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(
        jnp.asarray(img), jnp.asarray(txt), jnp.asarray(SCALE), jnp.asarray(BIAS)
    )
    return {
        "loss": relative(value, want_loss),
        "img": relative(grads[0], want.img),
        "txt": relative(grads[1], want.txt),
        "scale": relative(grads[2], want.scale),
    }


def errors() -> dict[str, str]:
    img, txt = batch(3)
    found = {}
    try:  # outside shard_map
        ps.sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), SCALE, BIAS, comm=AxisComm("data"))
    except ValueError as error:
        found["outside"] = str(error)

    def wrong_axis(a: Any, b: Any) -> Any:
        return ps.sigmoid_loss(a, b, SCALE, BIAS, comm=AxisComm("model"))

    try:  # an axis name the mesh does not have
        jax.jit(jax.shard_map(wrong_axis, mesh=MESH, in_specs=P("data"), out_specs=P()))(
            jnp.asarray(img), jnp.asarray(txt)
        )
    except ValueError as error:
        found["unbound"] = str(error)
    return found


def memory() -> dict[str, int]:
    """Temporary bytes of the compiled sharded loss-and-gradient at two batch sizes."""
    out = {}
    for local_rows in (1024, 4096):
        n, d = local_rows * WORLD, 64
        x = jax.ShapeDtypeStruct((n, d), jnp.float32)

        def local(a: Any, b: Any) -> Any:
            value, grads = ps.sigmoid_loss_and_grad(
                a, b, 10.0, -10.0, block_size=256, comm=AxisComm("data")
            )
            return value, grads.img, grads.txt

        step = jax.jit(
            jax.shard_map(
                local, mesh=MESH, in_specs=P("data"), out_specs=(P(), P("data"), P("data"))
            )
        )
        analysis = step.lower(x, x).compile().memory_analysis()
        out[str(local_rows)] = int(analysis.temp_size_in_bytes) if analysis else -1
    return out


def main() -> int:
    report: dict[str, Any] = {"devices": len(jax.devices())}
    for loss, strategy in SCHEDULES:
        report[f"core-{loss}-{strategy}"] = core_case(loss, strategy, ids=False)
        report[f"ids-{loss}-{strategy}"] = core_case(loss, strategy, ids=True)
        report[f"bridge-{loss}-{strategy}"] = bridge_case(loss, strategy)
    report["errors"] = errors()
    report["memory"] = memory()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
