"""Bindings of portable_siglip to external libraries, one module per library.

Each module imports only its own library, and only when it is itself imported, so
``import portable_siglip`` never pulls in a framework.

- :mod:`portable_siglip.backends.mpi`: :class:`MPIComm`, the mpi4py communicator.

The torch and jax bridges and the NCCL communicator are planned.
"""
