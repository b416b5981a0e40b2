"""The loss registry: one description per loss, read by every layer, and its refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import portable_siglip as ps
from portable_siglip import _distributed, _registry
from portable_siglip.comm import ThreadGroup


def test_the_library_registers_its_two_losses() -> None:
    assert _registry.names() == ("sigmoid", "softmax")
    # The schedules every distributed test iterates over (docs/distributed.md).
    assert _registry.get("sigmoid").schedules == ("bidir", "shift", "reduce", "gather")
    assert _registry.get("softmax").schedules == ("ring", "gather")
    for loss in _registry.losses():
        for name in loss.functions:  # the public functions it names exist and are exported
            assert callable(getattr(ps, name)), name
        assert loss.default_schedule == loss.schedules[0]


def test_every_schedule_a_loss_lists_is_implemented() -> None:
    for loss in _registry.losses():
        assert set(loss.schedules) <= set(_distributed.SCHEDULES), loss.name


def test_an_unknown_loss_is_a_named_value_error() -> None:
    with pytest.raises(
        ValueError, match=r"`loss` must be one of 'sigmoid', 'softmax', got 'hinge'"
    ):
        _registry.get("hinge")
    with pytest.raises(ValueError, match=r"`--loss` must be one of"):
        _registry.get(None, parameter="--loss")


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered already"):
        _registry.register(_registry.get("sigmoid"))
    with pytest.raises(ValueError, match="at least one schedule"):
        _registry.register(replace(_registry.get("sigmoid"), name="none", schedules=()))
    assert "none" not in _registry.names()


def test_validation_reads_the_schedules_from_the_registry() -> None:
    """A registered variant with fewer schedules refuses the others, naming its own."""
    narrow = _registry.register(
        replace(_registry.get("sigmoid"), name="sigmoid-gather", schedules=("gather",))
    )
    try:
        from portable_siglip._losses import evaluate

        x = np.eye(3)
        value, _ = evaluate(narrow, x, x, 1.0, 0.0, grad=False)
        assert np.isclose(value, ps.sigmoid_loss(x, x, 1.0, 0.0))
        with pytest.raises(ValueError, match=r"sigmoid-gather loss must be one of \('gather',\)"):
            ThreadGroup(2).run(
                lambda comm: evaluate(
                    narrow, x, x, 1.0, 0.0, grad=False, comm=comm, strategy="bidir"
                )
            )
    finally:
        _registry.unregister("sigmoid-gather")


def test_the_registry_says_which_losses_need_a_positive_in_every_row() -> None:
    """Validation reads ``needs_positives`` from the loss, one process and over a ring."""
    assert not _registry.get("sigmoid").needs_positives
    assert _registry.get("softmax").needs_positives
    strict = _registry.register(
        replace(_registry.get("sigmoid"), name="sigmoid-strict", needs_positives=True)
    )
    try:
        from portable_siglip._losses import evaluate

        x = np.eye(3)
        ids = {"img_ids": np.array([0, 1, 2]), "txt_ids": np.array([0, 1, 7])}  # row 2 alone
        value, _ = evaluate(_registry.get("sigmoid"), x, x, 1.0, 0.0, grad=False, **ids)
        assert np.isfinite(value)
        with pytest.raises(ValueError, match="no positive"):
            evaluate(strict, x, x, 1.0, 0.0, grad=False, **ids)
        with pytest.raises(ValueError, match="no positive"):
            ThreadGroup(2).run(
                lambda comm: evaluate(
                    strict,
                    x[comm.rank :: 2],
                    x[comm.rank :: 2],
                    1.0,
                    0.0,
                    grad=False,
                    comm=comm,
                    img_ids=ids["img_ids"][comm.rank :: 2],
                    txt_ids=ids["txt_ids"][comm.rank :: 2],
                )
            )
    finally:
        _registry.unregister("sigmoid-strict")


def test_circulate_refuses_an_unknown_schedule() -> None:
    """Internal dispatch names the unknown schedule instead of falling through to gather."""
    group = ThreadGroup(2)

    def body(comm: object) -> None:
        ring = _distributed.Ring(comm, (1, 1), "spiral")  # type: ignore[arg-type]
        x = np.ones((1, 2))
        _distributed.circulate(ring, np, (x,), lambda home, block: (), acc_tails=(), merge="sum")

    with pytest.raises(ValueError, match="unknown schedule 'spiral'"):
        group.run(body)
