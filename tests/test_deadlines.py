"""
L{resticd.deadlines.Deadline}: one re-armable timeout that makes a timer only
when it must go off sooner than the one it has.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from resticd.deadlines import Deadline


def pending(clock: Clock) -> list[float]:
    """The times of the clock's timers that are still to go off."""
    return sorted(call.getTime() for call in clock.getDelayedCalls() if call.active())


def test_an_armed_deadline_calls_its_action_once_at_its_time() -> None:
    """
    The action runs when its time has come, not a moment before, with its
    arguments, and only once.
    """
    clock = Clock()
    calls: list[str] = []
    deadline = Deadline(clock)
    deadline.arm(5.0, calls.append, "late")
    clock.advance(4.9)
    assert calls == []
    clock.advance(0.1)
    assert calls == ["late"]
    clock.advance(100)
    assert calls == ["late"]
    assert not deadline.armed_with(calls.append)


def test_moving_a_deadline_later_makes_no_timer() -> None:
    """
    Arming again for later (what every request on a keep-alive connection
    does) keeps the one timer; when it goes off early it waits for the rest,
    and the action runs at the later time.
    """
    clock = Clock()
    calls: list[str] = []
    deadline = Deadline(clock)
    deadline.arm(60.0, calls.append, "first")
    for _ in range(100):
        clock.advance(0.5)
        deadline.arm(60.0, calls.append, "moved")
    assert pending(clock) == [60.0]
    clock.advance(60.0 - 50.0)
    assert calls == [], "ran at the first time, not the moved one"
    assert pending(clock) == [110.0]
    clock.advance(50.0)
    assert calls == ["moved"]
    assert pending(clock) == []


def test_moving_a_deadline_sooner_replaces_its_timer() -> None:
    """
    A deadline armed for sooner than its timer cancels that timer and runs
    the action at the sooner time; nothing is left pending afterwards.
    """
    clock = Clock()
    calls: list[str] = []
    deadline = Deadline(clock)
    deadline.arm(180.0, calls.append, "idle")
    deadline.arm(5.0, calls.append, "headers")
    assert pending(clock) == [5.0]
    clock.advance(5.0)
    assert calls == ["headers"]
    clock.advance(200.0)
    assert calls == ["headers"]
    assert pending(clock) == []


def test_a_disarmed_deadline_calls_nothing_and_its_timer_goes_away() -> None:
    """
    Disarming stops the action; the timer is kept for the next arming, and
    goes away without doing anything when it goes off unarmed.
    """
    clock = Clock()
    calls: list[str] = []
    deadline = Deadline(clock)
    deadline.arm(5.0, calls.append, "x")
    deadline.disarm()
    assert pending(clock) == [5.0]
    clock.advance(10.0)
    assert calls == []
    assert pending(clock) == []
    deadline.arm(1.0, calls.append, "again")
    clock.advance(1.0)
    assert calls == ["again"]


def test_disarming_another_action_leaves_the_armed_one() -> None:
    """
    Disarming with an action disarms only if that action is the armed one,
    so that a request ending late cannot stop the connection's idle timeout;
    the same bound method of the same object counts as the same action.
    """

    class User:
        def __init__(self) -> None:
            self.expired = 0

        def too_slow(self) -> None:
            self.expired += 1

    clock = Clock()
    one, other = User(), User()
    deadline = Deadline(clock)
    deadline.arm(5.0, one.too_slow)
    assert deadline.armed_with(one.too_slow)
    assert not deadline.armed_with(other.too_slow)
    deadline.disarm(other.too_slow)
    clock.advance(5.0)
    assert (one.expired, other.expired) == (1, 0)
    deadline.arm(5.0, one.too_slow)
    deadline.disarm(one.too_slow)
    clock.advance(5.0)
    assert one.expired == 1


def test_stop_cancels_the_timer() -> None:
    """
    A stopped deadline (its connection is gone) leaves no timer behind and
    calls nothing.
    """
    clock = Clock()
    calls: list[str] = []
    deadline = Deadline(clock)
    deadline.arm(5.0, calls.append, "x")
    deadline.stop()
    assert pending(clock) == []
    clock.advance(10.0)
    assert calls == []


def test_an_action_may_arm_its_deadline_again() -> None:
    """
    The deadline is disarmed before its action runs, so the action can arm
    it anew (as a connection timing out may).
    """
    clock = Clock()
    calls: list[float] = []
    deadline = Deadline(clock)

    def again() -> None:
        calls.append(clock.seconds())
        if len(calls) < 3:
            deadline.arm(2.0, again)

    deadline.arm(2.0, again)
    clock.advance(2.0)
    clock.advance(2.0)
    clock.advance(2.0)
    clock.advance(2.0)
    assert calls == [2.0, 4.0, 6.0]
    assert pending(clock) == []
