from typing import Any

import pytest

from client import supernode
from client.supernode import _ShortPollClock


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []

    class Clock:
        def sleep(self, seconds: float) -> None:
            calls.append(seconds)

        def __getattr__(self, name: str) -> Any:
            raise AttributeError(name)

    monkeypatch.setattr(supernode, "time", Clock())
    return calls


def test_idle_polls_back_off_to_the_cap_and_restart_after_a_reply(slept: list[float]) -> None:
    clock = _ShortPollClock(cap=0.5)
    for _ in range(6):
        clock.sleep(3)  # Flower's sleep after an empty poll of the SuperLink
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    clock.answered()
    clock.sleep(3)
    assert slept[-1] == 0.05


def test_waits_on_the_local_clientapp_stay_short_and_do_not_count_as_idle(
    slept: list[float],
) -> None:
    clock = _ShortPollClock(cap=2.0)
    clock.sleep(0.5)  # Flower's wait for its ClientApp's reply
    clock.sleep(0.5)
    clock.sleep(3)
    assert slept == [0.05, 0.05, 0.05]


def test_a_poll_interval_below_the_first_step_is_kept(slept: list[float]) -> None:
    clock = _ShortPollClock(cap=0.02)
    clock.sleep(3)
    clock.sleep(3)
    assert slept == [0.02, 0.02]
