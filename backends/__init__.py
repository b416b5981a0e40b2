"""Bindings of portable_siglip to external libraries, one module per library.

Each module imports only its own library, and only when it is itself imported, so
``import portable_siglip`` never pulls in a framework. The torch and jax bridges and the
MPI and NCCL communicators arrive with the distributed and framework issues.
"""
