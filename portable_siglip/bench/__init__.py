"""The benchmarks of ``python -m portable_siglip bench``.

Each module is imported by path; this package imports none of them, so importing one does not
bring in the others.

The ``bench`` command's options, and the dispatch to one of the benchmarks below, are
:mod:`portable_siglip.cli._bench`.

:mod:`~portable_siglip.bench.sweep`
    The default ``bench``: time and memory of the blockwise losses against the matmul
    roofline, over n, d, losses and backends.
:mod:`~portable_siglip.bench.frameworks`
    ``bench --frameworks``: the torch modules against open_clip and autograd losses; its
    worker runs each case in a fresh process (``python -m portable_siglip.bench.frameworks``).
:mod:`~portable_siglip.bench.distributed`
    ``bench --distributed``: the distributed schedules over MPI, W ranks against one; its
    worker is the MPI job (``python -m mpi4py -m portable_siglip.bench.distributed``).
:mod:`~portable_siglip.bench.profile`
    ``bench --profile``: the time of one call split into tile GEMMs and the rest.
:mod:`~portable_siglip.bench.precision`
    ``bench --compare-precision``: ``precision="fast"`` against ``"exact"`` on
    half-precision inputs, side by side, with each one's error against float64.
:mod:`~portable_siglip.bench.gpu`
    ``bench --device cuda``: forward + gradient on a GPU, ours (torch fast and exact, cupy)
    against the run's GEMM floor, a ``torch.compile``'d dense loss, dense autograd,
    open_clip and siglip-kernel, within a time budget.
:mod:`~portable_siglip.bench.memprobe`
    The peak extra memory of one sweep case, in a process of its own
    (``python -m portable_siglip.bench.memprobe``).
:mod:`~portable_siglip.bench.plots`
    Time and memory against n from a sweep report
    (``python -m portable_siglip.bench.plots bench.json DIR``).
:mod:`~portable_siglip.bench.baselines`
    The losses we compare against: dense and chunked autograd losses, open_clip's, and the
    prediction of their peak memory.
:mod:`~portable_siglip.bench.common`
    What every benchmark shares: constants, inputs, timing, machine notes, tables, progress,
    option checks, subprocesses and the JSON report.

Imports go one way: the command line (``portable_siglip.cli``) imports the benchmarks, and no
benchmark imports the command line; a benchmark imports ``common`` and
``baselines``, and those two import no benchmark. ``memprobe`` takes ``make_run`` from
``sweep``, which starts it only as a subprocess; ``sweep`` imports ``plots`` to draw.
"""
