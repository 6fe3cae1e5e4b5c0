"""The watcher's estimate of the servers' clock, on made-up clocks (pure logic, no waiting)."""

from __future__ import annotations

import pytest

from modelreg.client._server_clock import ServerClock


class FakeClocks:
    """A node's monotonic and wall clocks, moved by hand."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.mono = monotonic
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def clock(self, **kw: float) -> ServerClock:
        return ServerClock(monotonic=lambda: self.mono, wall=lambda: self.wall, **kw)


class TestServerClock:
    def test_no_sample_trusts_the_local_clock(self) -> None:
        """Without a sample the server's time is this node's wall clock and the offset 0."""
        t = FakeClocks()
        clock = t.clock()
        assert clock.now() == t.wall and clock.offset == 0.0 and clock.samples == 0
        assert clock.until(t.wall + 2) == 2.0

    def test_largest_sample_wins_delay_only_makes_the_server_look_older(self) -> None:
        """The servers run 30 s ahead of the node; messages arrive 5-80 ms after they were
        stamped: the estimate is the least delayed sample, never ahead of the servers.
        """
        t = FakeClocks()
        clock = t.clock()
        true_offset = 30.0
        for delay in (0.080, 0.005, 0.040, 0.020):
            sent = t.wall + true_offset
            t.advance(delay)
            clock.observe(sent)
            t.advance(1.0)
        assert clock.offset == pytest.approx(true_offset - 0.005)
        assert clock.offset <= true_offset
        assert clock.now() == pytest.approx(t.wall + true_offset - 0.005)

    def test_activation_wait_follows_the_servers_clock(self) -> None:
        """A node whose clock is 1000 s ahead still waits for an activation 0.5 s ahead on the
        servers' clock, and one 1000 s behind does not wait 1000 s.
        """
        for node_ahead in (1000.0, -1000.0):
            t = FakeClocks()
            clock = t.clock()
            server_now = t.wall - node_ahead
            clock.observe(server_now)  # no delay
            assert clock.until(server_now + 0.5) == pytest.approx(0.5)
            assert clock.offset == pytest.approx(-node_ahead)
            t.advance(0.6)
            assert clock.until(server_now + 0.5) < 0

    def test_a_wall_clock_step_on_the_node_changes_nothing(self) -> None:
        """The estimate lives on the monotonic clock: stepping the node's wall clock (NTP)
        moves the reported offset but not when the node switches.
        """
        t = FakeClocks()
        clock = t.clock()
        clock.observe(t.wall + 10.0)
        before = clock.until(t.wall + 12.0)
        target = t.wall + 12.0
        t.wall += 3600.0  # stepped an hour forward
        assert clock.until(target) == pytest.approx(before)
        assert clock.offset == pytest.approx(10.0 - 3600.0)

    def test_old_samples_expire(self) -> None:
        """A server whose clock was set back (or another server after a reconnect) is
        followed once the window has passed; the count bound drops the oldest first.
        """
        t = FakeClocks()
        clock = t.clock(window=60.0, max_samples=3)
        clock.observe(t.wall + 5.0)
        t.advance(30.0)
        clock.observe(t.wall + 1.0)
        assert clock.offset == pytest.approx(5.0)  # the larger one still counts
        t.advance(31.0)
        clock.observe(t.wall + 1.0)
        assert clock.offset == pytest.approx(1.0) and clock.samples == 2
        for _ in range(3):
            clock.observe(t.wall + 0.5)
        assert clock.samples == 3 and clock.offset == pytest.approx(0.5)

    def test_explicit_receive_time(self) -> None:
        """A sample may name its receive time on the monotonic clock."""
        t = FakeClocks()
        clock = t.clock()
        clock.observe(t.wall + 7.0, received=t.mono - 1.0)  # it came a second ago
        assert clock.offset == pytest.approx(8.0)

    def test_bad_arguments(self) -> None:
        """A window or a sample count that could hold nothing is refused."""
        with pytest.raises(ValueError, match="window"):
            ServerClock(window=0)
        with pytest.raises(ValueError, match="max_samples"):
            ServerClock(max_samples=0)
