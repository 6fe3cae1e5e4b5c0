"""What ``modelreg up --regions`` would run: flags, command lines and topology files, checked
against the real parsers without starting anything.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from modelreg.server.regions_plan import (
    MODELREG,
    Endpoints,
    parse_latency,
    parse_regions,
    replicator_command,
    server_command,
    table,
    topology_toml,
)
from tests.command_lines import check_modelreg_command


class TestLatencyFlag:
    @pytest.mark.parametrize(("text", "seconds"), [
        ("40ms", 0.04), ("0.04s", 0.04), ("40", 0.04), ("0", 0.0), ("2.5ms", 0.0025),
        (" 40 ms ", 0.04), ("1s", 1.0), ("40MS", 0.04),
    ])
    def test_accepted_spellings(self, text: str, seconds: float) -> None:
        """Milliseconds with or without `ms`, and seconds with `s`, all mean the same delay."""
        assert parse_latency(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["", "fast", "-5ms", "40us", "ms", "40 m", "nan", "1e400"])
    def test_anything_else_is_refused_with_the_accepted_forms(self, text: str) -> None:
        """A delay that is not a number of ms or a number with ms/s is refused, naming the
        flag and the forms it accepts.
        """
        with pytest.raises(ValueError, match=r"--latency: .*40ms, 0\.04s or 40"):
            parse_latency(text)

    def test_an_absurd_delay_is_refused(self) -> None:
        """A one-way delay over ten seconds (40s for 40ms) is refused as a likely typo."""
        with pytest.raises(ValueError, match="more than 10 s"):
            parse_latency("40s")


class TestRegionsFlag:
    def test_names_in_order_primary_first(self) -> None:
        """The names come back in the order given; the first is the primary."""
        assert parse_regions("us,eu,ap") == ("us", "eu", "ap")
        assert parse_regions(" us , eu-west-1 ") == ("us", "eu-west-1")

    @pytest.mark.parametrize(("text", "complaint"), [
        ("", "at least one"), ("us,,eu", "''"), ("US", "a-z0-9-"), ("us,eu,us", "us named twice"),
        ("-us", "a-z0-9-"), ("a" * 33, "1-32"),
    ])
    def test_bad_lists_are_refused(self, text: str, complaint: str) -> None:
        """Empty lists, empty or invalid names and repeated names are refused, naming the flag."""
        with pytest.raises(ValueError, match="--regions") as err:
            parse_regions(text)
        assert complaint in str(err.value)


class TestTopologyFile:
    def test_is_toml_with_the_primary_and_every_region(self) -> None:
        """The file names the primary and, per region, its etcd endpoints and servers."""
        text = topology_toml("us", {
            "us": Endpoints(("127.0.0.1:1",), ("127.0.0.1:2",)),
            "eu": Endpoints(("127.0.0.1:3",), ("127.0.0.1:4",)),
        }, seen_from="eu")
        assert tomllib.loads(text) == {
            "primary": "us",
            "regions": {"us": {"etcd": ["127.0.0.1:1"], "servers": ["127.0.0.1:2"]},
                        "eu": {"etcd": ["127.0.0.1:3"], "servers": ["127.0.0.1:4"]}},
        }


class TestCommandLines:
    def test_replicator_command_is_accepted_by_modelreg_replicate(self) -> None:
        """The replicator's command line is `modelreg replicate` with flags its parser takes."""
        argv = replicator_command("eu", primary_etcd="127.0.0.1:1", region_etcd="127.0.0.1:2",
                                  metrics="127.0.0.1:3", prefix="/p/", log_level="info")
        assert argv[:len(MODELREG)] == list(MODELREG)
        args = check_modelreg_command(["modelreg", *argv[len(MODELREG):]])
        assert (args.primary, args.region_etcd, args.region) == ("127.0.0.1:1", "127.0.0.1:2",
                                                                  "eu")

    def test_server_command_is_accepted_by_modelreg_serve(self, tmp_path: Path) -> None:
        """A region's server command line is `modelreg serve` with flags its parser takes, and
        its config accepts the topology file the launcher writes.
        """
        topology = tmp_path / "topology.toml"
        topology.write_text(topology_toml("us", {
            "us": Endpoints(("127.0.0.1:1",), ("127.0.0.1:2",)),
            "eu": Endpoints(("127.0.0.1:3",), ("127.0.0.1:4",)),
        }, seen_from="eu"))
        argv = server_command("eu", listen="127.0.0.1:4",
                              metrics="127.0.0.1:5", topology=topology, prefix="/p/",
                              grace=1.0, log_level="info")
        check_modelreg_command(["modelreg", *argv[len(MODELREG):]])


class TestTable:
    def test_columns_line_up(self) -> None:
        """Every row's details start in the same column, under the header's."""
        out = table([("us", "server (primary)", "127.0.0.1:50051", "pid 1"),
                     ("eu->us", "link (etcd)", "127.0.0.1:4", "to 127.0.0.1:5")]).splitlines()
        assert out[0].split() == ["REGION", "ROLE", "ADDRESS", "DETAILS"]
        column = out[0].index("DETAILS")
        assert [line[column:] for line in out[1:]] == ["pid 1", "to 127.0.0.1:5"]
