"""
The pool HTTP/2 connections' windows for uploads are lent from, with
stand-ins for the connections.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resticd.windows import (
    BASE_WINDOW,
    CONNECTION_WINDOW,
    FLOOR,
    GAIN,
    HELD_BACK_FLOOR,
    RATE_DECAY,
    UPLOAD_WINDOWS,
    RoundTrips,
    UploadWindows,
    grant,
)

MiB = 1 << 20


class Connection:
    """
    A connection that wants C{wanted} bytes, whose client can use a window
    of C{reach} (or the floor it is given, if higher), and notes what it
    was lent.
    """

    def __init__(self, wanted: int = 0, reach: int = CONNECTION_WINDOW) -> None:
        self._wanted = wanted
        self._reach = reach
        self.widened: list[int] = []

    def wanted(self) -> int:
        return self._wanted

    def widen(self, size: int) -> None:
        self.widened.append(size)

    def reach(self, floor: int) -> int:
        return max(floor, self._reach)

    def sends(self, pool: UploadWindows, size: int) -> None:
        """
        Its client sends C{size} bytes, which are taken in.
        """
        self._wanted -= size
        pool.taken(self, size)


@given(
    held=st.integers(0, 64 * MiB),
    wanted=st.integers(0, 256 * MiB),
    share=st.integers(0, 32 * MiB),
    room=st.integers(0, 64 * MiB),
)
def test_a_grant_stays_within_the_aim_and_the_room(held: int, wanted: int, share: int, room: int) -> None:
    """
    A connection is never lent beyond what it wants, its share or what the
    pool has room for; it is lent nothing while it lacks less than half of
    its aim, and otherwise all it lacks when the pool has room for it.
    """
    size = grant(held, wanted, share, room)
    aim = min(wanted, share)
    assert size >= 0
    if size:
        assert held + size <= min(aim, room)
    if 2 * (aim - held) < aim:
        assert size == 0
    elif room >= aim > held:
        assert held + size == aim


def test_an_upload_is_lent_what_it_announced_up_to_16_mib() -> None:
    """
    A lone connection is lent what its uploads announced, up to 16 MiB (its
    window starts at HTTP/2's 64 KiB), and nothing while it uploads nothing.
    """
    pool = UploadWindows()
    idle, small, large = Connection(0), Connection(3 * MiB), Connection(100 * MiB)
    for connection in (idle, small, large):
        pool.join(connection)
    pool.update(idle)
    assert idle.widened == []
    pool.update(small)
    assert sum(small.widened) == 3 * MiB - BASE_WINDOW
    pool.update(large)
    assert pool.held(large) == CONNECTION_WINDOW == 16 * MiB


def test_connections_uploading_at_once_share_the_pool() -> None:
    """
    However many connections upload at once, all together are lent no more
    than the pool (32 MiB) beyond HTTP/2's 64 KiB each; those that came
    first keep what they were lent, but as their bytes are taken in, each is
    lent no more than its share: two get 16 MiB each, eight a quarter of it.
    """
    for count, each in ((2, 16 * MiB), (8, 4 * MiB), (64, MiB // 2)):
        pool = UploadWindows()
        connections = [Connection(256 * MiB) for _ in range(count)]
        for connection in connections:
            pool.join(connection)
        for connection in connections:
            pool.update(connection)
        for _ in range(2):
            assert sum(pool.held(connection) for connection in connections) <= UPLOAD_WINDOWS + count * BASE_WINDOW
            assert pool.used <= pool.limit
            for connection in connections:
                connection.sends(pool, pool.held(connection))
        assert max(pool.held(connection) for connection in connections) <= each


def test_credit_taken_in_goes_to_connections_waiting_in_turn() -> None:
    """
    A connection that found the pool lent out waits; as another's bytes are
    taken in, their credit goes to the waiting connections, the first to
    wait first, and none goes past its share.
    """
    pool = UploadWindows(limit=8 * MiB, per_connection=8 * MiB)
    first = Connection(64 * MiB)
    pool.join(first)
    pool.update(first)
    assert pool.held(first) == 8 * MiB
    second, third = Connection(64 * MiB), Connection(64 * MiB)
    for connection in (second, third):
        pool.join(connection)
        pool.update(connection)
    assert pool.held(second) + pool.held(third) <= 3 * BASE_WINDOW
    first.sends(pool, 2 * MiB)
    assert pool.held(second) >= 2 * MiB > pool.held(third), "the first to wait is served first"
    first.sends(pool, 6 * MiB)
    assert pool.held(third) >= 2 * MiB
    for connection in (first, second, third):
        assert pool.held(connection) <= pool.share()
    assert pool.used <= pool.limit


def test_a_closed_connection_gives_back_all_it_held() -> None:
    """
    Whatever a connection held when it closed goes back to the pool, to a
    connection waiting for it.
    """
    pool = UploadWindows(limit=4 * MiB, per_connection=4 * MiB)
    gone, waiting = Connection(64 * MiB), Connection(64 * MiB)
    pool.join(gone)
    pool.join(waiting)
    pool.update(gone)
    pool.update(waiting)
    assert pool.held(waiting) <= 2 * BASE_WINDOW
    pool.leave(gone)
    assert pool.held(gone) == 0
    assert pool.held(waiting) == 4 * MiB and pool.used <= pool.limit
    pool.leave(waiting)
    assert pool.used == 0


def brought(trips: RoundTrips, size: int, every: float, times: int, start: float = 0.0) -> float:
    """
    Have C{trips} take in C{size} bytes every C{every} seconds, C{times}
    times from C{start}: the time after the last.
    """
    now = start
    for _ in range(times):
        trips.taken(size, now)
        now += every
    return now


def test_a_client_whose_round_trip_is_not_timed_yet_can_use_the_floor() -> None:
    """
    Until a round trip of its connection has been timed, a client is aimed
    at the floor (1 MiB, what Go's HTTP/2 server lends), however fast its
    bytes come.
    """
    trips = RoundTrips()
    assert trips.reach() == FLOOR == MiB
    brought(trips, 4 * MiB, 0.01, 100)
    assert trips.rate > 100 * MiB
    assert trips.reach() == FLOOR
    assert trips.reach(HELD_BACK_FLOOR) == HELD_BACK_FLOOR


def test_a_client_is_aimed_at_four_round_trips_of_what_it_brings() -> None:
    """
    A client 125 ms away whose bytes are taken in at 16 MiB/s can use a
    window of 8 MiB (four round trips' worth); one nearby (0.2 ms) at
    256 MiB/s, or one far away whose uploads wait for a slow disk
    (1 MiB/s), the floor (1 MiB). With the floor of a quarter MiB (while
    uploads wait for room), the nearby one gets that and the far one half a
    MiB, four round trips of its 1 MiB/s.
    """
    assert GAIN == 4
    for rtt, size, every, reach, held_back in (
        (0.125, 2 * MiB, 0.125, 8 * MiB, 8 * MiB),
        (0.0002, 4 * MiB, 1 / 64, FLOOR, HELD_BACK_FLOOR),
        (0.125, MiB, 1.0, FLOOR, MiB // 2),
    ):
        trips = RoundTrips()
        trips.measured(rtt)
        brought(trips, size, every, 20)
        assert trips.rtt == rtt
        assert trips.reach() == max(FLOOR, int(GAIN * rtt * size / every)) == reach
        assert trips.reach(HELD_BACK_FLOOR) == max(HELD_BACK_FLOOR, int(GAIN * rtt * size / every)) == held_back


def test_round_trips_are_smoothed_and_rates_follow_the_highest_recent_measure() -> None:
    """
    A round trip's time moves by an eighth towards each new measure (one
    slow PING answer does not double the window); when a client's bytes
    come slower, its window shrinks over a few measures of its rate, not at
    the first: uploads come in bursts.
    """
    trips = RoundTrips()
    trips.measured(0.1)
    trips.measured(0.9)
    assert trips.rtt == 0.1 + 0.8 / 8
    trips = RoundTrips()
    trips.measured(0.125)
    now = brought(trips, 8 * MiB, 0.125, 20)
    assert trips.rate == 64 * MiB
    now = brought(trips, MiB, 0.125, 1, start=now)
    assert trips.rate == 64 * MiB * RATE_DECAY
    brought(trips, MiB, 0.125, 20, start=now)
    assert trips.rate == 8 * MiB


def test_a_connection_is_lent_no_more_than_its_client_can_use() -> None:
    """
    A lone connection whose uploads announced 64 MiB is lent no further
    than its client can use (its reach), and more once that grows.
    """
    pool = UploadWindows()
    connection = Connection(64 * MiB, reach=FLOOR)
    pool.join(connection)
    pool.update(connection)
    assert pool.held(connection) == FLOOR
    connection._reach = 8 * MiB
    pool.update(connection)
    assert pool.held(connection) == 8 * MiB


def test_while_uploads_wait_for_the_disk_a_client_nearby_is_lent_a_quarter_mib() -> None:
    """
    While uploads wait for room (the disk slower than the clients), a
    connection whose client brings little per round trip is lent a quarter
    MiB rather than the floor of a MiB: what it sent beyond would only wait
    in memory. Once nothing waits, the next bytes taken in bring it back to
    the MiB. A client far away is lent what it can use either way.
    """
    waiting = [True]
    pool = UploadWindows(held_back=lambda: waiting[0])
    nearby, far = Connection(64 * MiB, reach=0), Connection(64 * MiB, reach=8 * MiB)
    for connection in (nearby, far):
        pool.join(connection)
        pool.update(connection)
    assert HELD_BACK_FLOOR == MiB // 4
    assert pool.held(nearby) == HELD_BACK_FLOOR
    assert pool.held(far) == 8 * MiB
    nearby.sends(pool, 64 << 10)
    assert pool.held(nearby) == HELD_BACK_FLOOR - (64 << 10)  # less than half lacking: no update
    waiting[0] = False
    nearby.sends(pool, 64 << 10)
    assert pool.held(nearby) == FLOOR
    far.sends(pool, 4 * MiB)
    assert pool.held(far) == 8 * MiB
