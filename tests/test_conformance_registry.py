"""The conformance suite judges the registered losses that have golden cases, and no other.

A loss is judged against the expected outputs the data files hold for it, so a loss
registered at runtime (here a copy of the sigmoid loss under another name) is refused with a
``ValueError`` naming ``loss`` and the losses the suite can judge, by :func:`check`, the
distributed judge and the command line alike. What the suite knows of one loss's mistakes
(its dense formulas, its naive half-precision reference, its mistakes with ids) is a table
keyed by the loss's name: a loss without an entry gets none of them, never the other loss's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
from portable_siglip.conformance import (
    UsageError,
    _diagnose,
    _ids,
    _judged,
    _naive,
    check,
    load_cases,
)
from portable_siglip.conformance import __main__ as cli
from portable_siglip.conformance._distributed import judge, judge_mpi

import portable_siglip as ps
from portable_siglip import _registry as registry

COPY = "sigmoid-copy"
JUDGED = "'sigmoid', 'softmax'"


@pytest.fixture
def sigmoid_copy() -> Iterator[registry.Loss]:
    """The sigmoid loss registered as ``sigmoid-copy``: no golden case holds it."""
    loss = dataclasses.replace(registry.get("sigmoid"), name=COPY, functions=())
    registry.register(loss)
    try:
        yield loss
    finally:
        registry.unregister(COPY)


def test_the_judged_losses_are_the_registered_ones_with_goldens(
    sigmoid_copy: registry.Loss,
) -> None:
    assert _judged.golden_losses() == ("sigmoid", "softmax")
    assert _judged.golden_losses(ids=True) == ("sigmoid", "softmax")
    assert set(load_cases()[0].goldens) == {"sigmoid", "softmax"}


def test_a_registered_loss_without_goldens_is_refused(sigmoid_copy: registry.Loss) -> None:
    message = (
        rf"`loss` '{COPY}' is a registered loss, but the golden cases hold no expected "
        rf"outputs of it: the suite judges {JUDGED}"
    )
    with pytest.raises(ValueError, match=message):
        check(ps.sigmoid_loss_and_grad, loss=COPY)
    with pytest.raises(ValueError, match=message):
        check(ps.sigmoid_loss_and_grad, loss=COPY, ids=True)
    with pytest.raises(UsageError, match=message):
        judge("nowhere_xyz:f", loss=COPY, world_size=2)
    with pytest.raises(UsageError, match=message):
        judge_mpi("nowhere_xyz:f", loss=COPY, comm=object())


def test_an_unknown_loss_is_refused_listing_the_judged_ones() -> None:
    with pytest.raises(ValueError, match=rf"`loss` must be one of {JUDGED}, got 'hinge'"):
        check(ps.sigmoid_loss_and_grad, loss="hinge")
    with pytest.raises(UsageError, match=rf"`loss` must be one of {JUDGED}, got 3"):
        judge("nowhere_xyz:f", loss=3, world_size=2)  # type: ignore[arg-type]


def test_the_command_line_offers_the_judged_losses(
    sigmoid_copy: registry.Loss, capsys: pytest.CaptureFixture[str]
) -> None:
    action = next(a for a in cli.build_parser()._actions if a.dest == "loss")
    assert list(action.choices or ()) == ["sigmoid", "softmax"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--loss", COPY])
    assert exit_info.value.code == 2
    assert COPY in capsys.readouterr().err


def test_every_judged_loss_has_the_suite_s_formulas() -> None:
    judged = set(_judged.golden_losses())
    assert judged <= set(_diagnose._LOGIT_LOSSES)
    assert judged <= set(_diagnose._LOSS_MISTAKES)
    assert judged <= set(_naive.NAIVE_LOSSES)
    assert judged <= set(_ids._IDS_LOSSES)


def _codes(loss: str) -> set[str]:
    return {code for code, _, _ in _diagnose._loss_hypotheses(loss)}


def test_a_loss_without_formulas_gets_no_loss_specific_diagnosis() -> None:
    # Each loss's own mistakes, and not the other's.
    assert {"bias-sign", "labels"} <= _codes("sigmoid")
    assert not {"one-direction", "sum-of-directions"} & _codes("sigmoid")
    assert {"one-direction", "sum-of-directions"} <= _codes("softmax")
    assert not {"bias-sign", "labels"} & _codes("softmax")
    # A loss the module has no formula for: only what the golden itself predicts.
    assert _codes(COPY) == {"mean-over-pairs", "unnormalised-sum"}
    case = next(c for c in _ids.load_ids_cases() if c.n == c.k)
    assert math.isfinite(_ids._dense("sigmoid", case, "ids-ignored"))
    assert math.isnan(_ids._dense(COPY, case, "ids-ignored"))  # no mistake is predicted
    np: Any = pytest.importorskip("numpy")
    eye = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"`loss` must be one of {JUDGED} \(those with"):
        _naive.naive_loss_and_grad(
            np, eye, eye, eye[0, 0], eye[0, 1], loss=COPY, rounding=_naive.host_rounding("float16")
        )
