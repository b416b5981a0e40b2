"""jax-native distribution and compilation: ``AxisComm`` under ``jit(shard_map)``, jax loops.

The ring tests run ``tests/jax_scripts/axis_ring.py`` once, in a subprocess with 4 CPU
devices (``XLA_FLAGS`` must be set before jax starts), and check what it reports: every
schedule of both losses, through the core and through the bridge's ``jax.grad``, equals the
one-process evaluation of the same global batch to 1e-12 in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import SCHEDULE_IDS

jax = pytest.importorskip("jax")

SCRIPT = Path(__file__).with_name("jax_scripts") / "axis_ring.py"


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] >= 4
    return result


@pytest.mark.parametrize("kind", ["core", "ids", "bridge"])
@pytest.mark.parametrize("schedule", SCHEDULE_IDS)
def test_axis_comm_equals_one_process(report: dict[str, Any], kind: str, schedule: str) -> None:
    errors = report[f"{kind}-{schedule}"]
    for quantity, error in errors.items():
        assert error <= 1e-12, f"{kind} {schedule} {quantity}: relative error {error:.2e}"


def test_axis_comm_outside_shard_map_is_an_error(report: dict[str, Any]) -> None:
    message = report["errors"]["outside"]
    assert "AxisComm('data') must be used inside jax.shard_map" in message


def test_axis_comm_with_an_axis_the_mesh_lacks(report: dict[str, Any]) -> None:
    assert "AxisComm('model')" in report["errors"]["unbound"]
    assert "mesh axis 'model', which is not bound here" in report["errors"]["unbound"]


def test_memory_per_device_grows_with_the_shard_not_its_square(report: dict[str, Any]) -> None:
    """Compiled temporaries at 1024 and 4096 rows per device (d = 64, b = 256, float32).

    O(n_local d + b^2) grows 4x for 4x the rows; a per-device n_local x n matrix would grow 16x.
    """
    small, large = report["memory"]["1024"], report["memory"]["4096"]
    assert small > 0
    assert large / small < 6, f"temporaries {small} -> {large} bytes"


def test_axis_comm_refuses_bad_axis_names() -> None:
    from portable_siglip.backends.jax import AxisComm

    with pytest.raises(TypeError, match="`axis_name` must be a non-empty str"):
        AxisComm(3)  # type: ignore[arg-type]


# --- compile time: the program does not grow with the batch -----------------------------


def _program_size(loss: str, n: int, block: int = 256) -> int:
    """Equations of the jaxpr of jit(grad(loss)) at batch n (loops counted once)."""
    import jax.numpy as jnp
    from portable_siglip.backends import jax as psj

    function = getattr(psj, f"{loss}_loss")
    x = jax.ShapeDtypeStruct((n, 32), jnp.float32)

    def value(a: Any, b: Any) -> Any:
        return function(a, b, 10.0, -10.0, block_size=block)

    jaxpr = jax.make_jaxpr(jax.grad(value, argnums=(0, 1)))(x, x)
    return len(str(jaxpr))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_traced_program_size_does_not_grow_with_the_batch(loss: str) -> None:
    """n = 2048 is 64 tiles of 256, n = 16384 is 4096 tiles: the same program either way.

    The Python tile loop unrolled every tile into the program (compile 0.7 s -> 44 s); the
    jax loop holds one tile. Only the shapes in the text differ, so the sizes are close.
    """
    small, large = _program_size(loss, 2048), _program_size(loss, 16384)
    assert large <= 1.05 * small, f"jaxpr {small} -> {large} characters"


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("n", "block"), [(10, 3), (9, 9), (12, 4), (7, 20)])
def test_jit_loops_equal_eager_loops(loss: str, n: int, block: int) -> None:
    """Under jit (jax loops, padded tail tiles) and eagerly (array-API loops) the same numbers."""
    import jax.numpy as jnp

    import portable_siglip as ps

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(n)
    img, txt = jnp.asarray(rng.standard_normal((n, 4))), jnp.asarray(rng.standard_normal((n, 4)))
    function = getattr(ps, f"{loss}_loss_and_grad")

    def call(a: Any, b: Any) -> Any:
        value, grads = function(a, b, 4.0, -1.0, block_size=block)
        return value, grads.img, grads.txt, grads.scale, grads.bias

    eager = call(img, txt)
    jitted = jax.jit(call)(img, txt)
    for got, want in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)
