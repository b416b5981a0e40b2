"""Bindings of portable_siglip to external libraries, one module per library.

Each module imports only its own library, and only when it is itself imported, so
``import portable_siglip`` never pulls in a framework.

- :mod:`portable_siglip.backends.mpi`: ``MPIComm``, the mpi4py communicator.
- :mod:`portable_siglip.backends.torch`: autograd-aware ``sigmoid_loss``/``softmax_loss``,
  the ``SigLipLoss``/``ClipLoss`` modules that drop in for open_clip's, and
  ``TorchDistComm``, a communicator over ``torch.distributed``.
- :mod:`portable_siglip.backends.jax`: ``sigmoid_loss``/``softmax_loss`` as
  ``jax.custom_vjp`` functions.
- :mod:`portable_siglip.backends.nccl`: ``NCCLComm``, the NCCL communicator over CuPy.
  Experimental: tested against a fake of the binding, not yet run on a GPU (docs/gpu.md).

Each module's ``__all__`` is its public surface, and each public name has an Examples
section; the extension points are listed in docs/distributed.md ("Extension points").
"""
