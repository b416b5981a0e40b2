"""``python -m portable_siglip run`` reads the loss registry: a loss registered at runtime runs.

The command line spells no loss name: its ``--loss`` choices, the strategies it allows, the
bias it hands over and the dense reference ``--verify`` compares with all come from the
loss's :class:`portable_siglip._registry.Loss`. A copy of the sigmoid loss under another
name, registered for one test, proves it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator

import pytest

from portable_siglip import _registry as registry
from portable_siglip.cli import _commands as _cli
from portable_siglip.comm import ThreadGroup

SMALL = ["--batch", "24", "--dim", "8", "--block-size", "8"]
COPY = "sigmoid-copy"


@pytest.fixture
def sigmoid_copy() -> Iterator[registry.Loss]:
    """The sigmoid loss registered as ``sigmoid-copy``, with no schedules but shift and gather."""
    loss = dataclasses.replace(
        registry.get("sigmoid"), name=COPY, schedules=("shift", "gather"), functions=()
    )
    registry.register(loss)
    try:
        yield loss
    finally:
        registry.unregister(COPY)


def _run_help() -> str:
    parser = _cli.build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    return " ".join(commands.choices["run"].format_help().split())


def test_a_registered_loss_runs_and_verifies(
    capsys: pytest.CaptureFixture[str], sigmoid_copy: registry.Loss
) -> None:
    assert _cli.main(["run", "--loss", COPY, *SMALL, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"loss={COPY} " in out
    assert "bias b = -10.0" in out  # it uses the bias, as the sigmoid loss does
    assert "verify: ok" in out


def test_a_registered_loss_verifies_with_ids(
    capsys: pytest.CaptureFixture[str], sigmoid_copy: registry.Loss
) -> None:
    argv = ["run", "--loss", COPY, *SMALL, "--captions-per-image", "2", "--verify"]
    assert _cli.main(argv) == 0
    assert "verify: ok" in capsys.readouterr().out


def test_a_registered_loss_runs_its_schedules_sharded(
    capsys: pytest.CaptureFixture[str], sigmoid_copy: registry.Loss
) -> None:
    # Its default schedule is its first, shift, not the sigmoid loss's bidir.
    statuses = ThreadGroup(2).run(
        lambda comm: _cli.main(["run", "--loss", COPY, *SMALL, "--verify"], comm=comm)
    )
    out = capsys.readouterr().out
    assert statuses == [0, 0], out
    assert "strategy shift;" in out
    assert "verify: ok" in out


def test_a_registered_loss_allows_only_its_schedules(
    capsys: pytest.CaptureFixture[str], sigmoid_copy: registry.Loss
) -> None:
    assert _cli.main(["run", "--loss", COPY, *SMALL, "--strategy", "bidir"]) == 2
    err = capsys.readouterr().err
    assert f"`strategy` for the {COPY} loss must be one of ('shift', 'gather'), got 'bidir'" in err


def test_help_lists_the_registered_losses(sigmoid_copy: registry.Loss) -> None:
    text = _run_help()
    assert "{sigmoid,softmax,sigmoid-copy}" in text
    assert f"{COPY} shift, gather" in text
    assert f"shift for {COPY}" in text


def test_an_unregistered_loss_is_no_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert COPY not in registry.names()
    assert COPY not in _run_help()
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["run", "--loss", COPY, *SMALL])
    assert exit_info.value.code == 2
    assert f"invalid choice: '{COPY}'" in capsys.readouterr().err
