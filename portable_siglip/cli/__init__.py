"""The command-line tools behind ``python -m portable_siglip run|bench|doctor``.

Not a Python API: nothing here is public, and ``import portable_siglip`` imports none of it.
The commands are documented in docs/: ``run`` in quickstart.md and distributed.md, ``bench``
in benchmarks.md, ``doctor`` in gpu.md.

- :mod:`._commands`: the argument parser and ``run``; dispatches ``bench`` and ``doctor``.
- :mod:`._devices`: ``--device``: parsing it, finding GPUs, placing arrays.
- :mod:`._launch`: ``--comm``: the launcher that started the job, the transport, its group.
- :mod:`._doctor`: ``doctor``, and the worker that checks one transport in its own process.

The benchmarks behind ``bench`` live in :mod:`portable_siglip.bench`.
"""
