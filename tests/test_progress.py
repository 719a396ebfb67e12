"""Progress inside a round: on a terminal a bar per phase, nothing when stderr is not one."""

import io
import sys
from collections.abc import Callable

import pytest

from conftest import QUICK

FAST = (*QUICK, "federation.rounds=1", "federation.local_epochs=1", "generator.training_epochs=1",
        "checkpoint.every=0")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("executor", "generators"), [
    ("sequential", "generators: "), ("batched", "generators (5 nodes stacked)")])
def test_a_terminal_shows_each_phase_of_a_round(run_config: Callable[..., dict],
                                                monkeypatch: pytest.MonkeyPatch, executor: str,
                                                generators: str) -> None:
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    run_config(*FAST, f"executor={executor}")
    shown = stream.getvalue()
    for bar in ("round 1 clients", generators, "round 1 server"):
        assert bar in shown, shown


def test_nothing_is_shown_when_stderr_is_not_a_terminal(run_config: Callable[..., dict],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    run_config(*FAST)
    assert "round 1" not in stream.getvalue()
