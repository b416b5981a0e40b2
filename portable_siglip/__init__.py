"""portable-siglip: reference SigLIP and CLIP contrastive losses for any array library.

The sigmoid loss of SigLIP and the softmax loss of CLIP, with exact analytic gradients,
evaluated blockwise so the n x n logit matrix is never held whole, written once against
the Python array API standard (numpy, torch, jax, cupy, array_api_strict, ...).

Examples
--------
>>> import numpy as np
>>> import portable_siglip as ps
>>> rng = np.random.default_rng(0)
>>> img = rng.standard_normal((8, 4))
>>> txt = rng.standard_normal((8, 4))
>>> loss, grads = ps.sigmoid_loss_and_grad(img, txt, 10.0, -10.0, block_size=3)
>>> grads.img.shape
(8, 4)
"""

from ._losses import (
    Gradients,
    sigmoid_loss,
    sigmoid_loss_and_grad,
    softmax_loss,
    softmax_loss_and_grad,
)

__all__ = [
    "Gradients",
    "__version__",
    "sigmoid_loss",
    "sigmoid_loss_and_grad",
    "softmax_loss",
    "softmax_loss_and_grad",
]

__version__ = "0.1.0.dev0"
