"""The topology file: regions, the primary, each region's etcd and servers; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelreg.server.config import ServerConfig
from modelreg.server.topology import Region, Topology

GOOD = """\
primary = "us"

[regions.us]
etcd = ["127.0.0.1:2379", "127.0.0.1:22379"]
servers = ["127.0.0.1:50051", "127.0.0.1:50052"]

[regions.eu]
etcd = ["127.0.0.1:2479"]
servers = ["127.0.0.1:50061"]
prefix = "/modelreg-eu/"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


class TestTopologyFile:
    def test_parses_regions_in_file_order(self, tmp_path: Path):
        """Every region's etcd endpoints, servers and prefix are read, in the file's order."""
        topology = Topology.from_file(write(tmp_path, GOOD))
        assert topology.primary == "us"
        assert topology.names == ("us", "eu")
        assert topology.primary_region == Region(
            "us", ("127.0.0.1:2379", "127.0.0.1:22379"), ("127.0.0.1:50051", "127.0.0.1:50052"))
        assert topology.region("eu").prefix == "/modelreg-eu/"

    def test_comma_separated_strings_are_lists(self, tmp_path: Path):
        """An address list may also be one comma-separated string, as the flags take them."""
        topology = Topology.from_file(write(tmp_path, (
            'primary = "us"\n[regions.us]\netcd = "a:1, b:2"\nservers = "c:3"\n')))
        assert topology.region("us").etcd == ("a:1", "b:2")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\n', "primary: must name"),
            ('primary = "us"\n', "regions: needs at least one"),
            ('primary = "ap"\n[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\n',
             "primary: 'ap' is not one of the regions"),
            ('primary = "us"\n[regions.us]\nservers = ["b:2"]\n', r"regions\.us\.etcd: at least"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1"]\nservers = ["nowhere"]\n',
             r"regions\.us\.servers: 'nowhere' must be HOST:PORT"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1"]\nservers = [1]\n',
             r"regions\.us\.servers: must be a list"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\nserver = "x"\n',
             r"regions\.us: unknown key\(s\) server"),
            ('primary = "US"\n[regions.US]\netcd = ["a:1"]\nservers = ["b:2"]\n',
             "primary: 'US' must be a region name"),
            ('primary = "us"\nregion = "us"\n[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\n',
             r"unknown key\(s\) region"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\n'
             '[regions.eu]\netcd = ["a:1"]\nservers = ["b:2"]\n',
             r"regions\.eu\.servers: 'b:2' is also a server of region us"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1"]\nservers = ["b:2"]\nprefix = "x"\n',
             r"regions\.us\.prefix: 'x' must start and end with '/'"),
            ('primary = "us"\n[regions.us]\netcd = ["a:1", "a:1"]\nservers = ["b:2"]\n',
             r"regions\.us\.etcd: lists an address twice"),
            ("primary = \n", "not valid TOML"),
        ],
    )
    def test_errors_name_the_key_and_the_file(self, tmp_path: Path, text: str, message: str):
        """A wrong topology is refused with the file and the key that is wrong in the message."""
        path = write(tmp_path, text)
        with pytest.raises(ValueError, match=message) as caught:
            Topology.from_file(path)
        assert str(path) in str(caught.value)


class TestTopologyInServerConfig:
    def test_flags_and_environment_name_the_topology_and_region(self, tmp_path: Path):
        """--topology/--region come as MODELREG_TOPOLOGY/MODELREG_REGION too, derived from the
        fields, and the config loads the file.
        """
        path = write(tmp_path, GOOD)
        config = ServerConfig.from_sources(
            {}, {"MODELREG_TOPOLOGY": str(path), "MODELREG_REGION": "eu"})
        assert (config.topology, config.region, config.region_name) == (path, "eu", "eu")
        topology = config.load_topology()
        assert topology is not None and topology.primary == "us"
        assert ServerConfig.flag("topology") == "--topology"

    def test_region_must_be_in_the_topology(self, tmp_path: Path):
        """A server's region that the topology does not list is refused, naming the regions."""
        path = write(tmp_path, GOOD)
        with pytest.raises(ValueError, match=r"region: 'ap' is not a region of .*\(us, eu\)"):
            ServerConfig.from_sources({"topology": str(path), "region": "ap"}, {})

    def test_topology_needs_a_region(self, tmp_path: Path):
        """A topology without --region is refused: the server would not know which it is."""
        with pytest.raises(ValueError, match="needs --region, one of us, eu"):
            ServerConfig.from_sources({"topology": str(write(tmp_path, GOOD))}, {})

    def test_bad_topology_file_fails_the_config(self, tmp_path: Path):
        """A broken topology file fails the config (modelreg serve exits 2), naming the key."""
        path = write(tmp_path, 'primary = "us"\n[regions.us]\netcd = ["a:1"]\n')
        with pytest.raises(ValueError, match=r"regions\.us\.servers"):
            ServerConfig.from_sources({"topology": str(path), "region": "us"}, {})

    def test_without_a_topology_one_default_region(self):
        """Without a topology the server is the one region of its deployment, `default`."""
        config = ServerConfig.from_sources({}, {})
        assert config.load_topology() is None and config.region_name == "default"

    @pytest.mark.parametrize("name", ["forward_timeout", "forward_connect_timeout",
                                      "min_revision_wait"])
    def test_region_timeouts_must_be_positive(self, name: str):
        """The forwarding and minimum-revision bounds are refused unless positive."""
        with pytest.raises(ValueError, match=name):
            ServerConfig.from_sources({name: "0"}, {})
