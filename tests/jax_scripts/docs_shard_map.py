"""Run the ``shard_map`` example of docs/frameworks.md as a user would, in a fresh interpreter.

Run by tests/test_docs_examples.py in a subprocess without ``XLA_FLAGS``: the example itself
must ask for its 4 CPU devices before jax is imported. After it has run, its own
``sharded_loss`` (the ring over ``AxisComm``) is evaluated once more in float64 on its final
parameters and batch, and compared with the long-double oracle of ``tests/oracle.py`` on the
same features, and with its ``loss_fn`` in one process (``comm=None``). Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
PAGE = TESTS.parent / "docs" / "frameworks.md"
sys.path.insert(0, str(TESTS))

from oracle import sigmoid_reference  # noqa: E402


def example() -> str:
    """The page's ```python block that uses ``AxisComm``: the sharded train step."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [b for b in blocks if "AxisComm" in b]
    return block


def relative(got: Any, want: Any) -> float:
    return abs(float(got) - float(want)) / abs(float(want))


def main() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_shard_map"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example(), f"{PAGE.name}:shard_map", "exec"), namespace)

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    as64 = {
        name: np.asarray(value, dtype=np.float64) for name, value in namespace["params"].items()
    }
    images = np.asarray(namespace["images"], dtype=np.float64)
    texts = np.asarray(namespace["texts"], dtype=np.float64)
    params = {name: jnp.asarray(value) for name, value in as64.items()}
    ring = jax.jit(namespace["sharded_loss"])(params, jnp.asarray(images), jnp.asarray(texts))
    one = namespace["loss_fn"](params, jnp.asarray(images), jnp.asarray(texts))

    img, txt = images @ as64["img"], texts @ as64["txt"]
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    oracle = sigmoid_reference(img, txt, float(np.exp(as64["log_scale"])), float(as64["bias"]))
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "mesh": int(namespace["mesh"].size),
                "rows": int(images.shape[0]),
                "printed": out.getvalue().splitlines(),
                "ring_dtype": str(ring.dtype),
                "ring_vs_oracle": relative(ring, oracle.loss),
                "ring_vs_one_process": relative(ring, one),
            }
        )
    )


if __name__ == "__main__":
    main()
