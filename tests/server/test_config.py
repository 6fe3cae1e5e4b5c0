"""ServerConfig: flags over environment over file over defaults, and clear errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from modelreg.server import main
from modelreg.server.config import ServerConfig


class TestServerConfig:
    def test_precedence(self, tmp_path: Path):
        """A flag beats the environment, which beats the file, which beats the default."""
        path = tmp_path / "modelreg.toml"
        path.write_text('listen = "127.0.0.1:1111"\nprefix = "/file/"\netcd_timeout = 7\n'
                        'etcd = ["127.0.0.1:2379", "127.0.0.1:22379"]\n')
        config = ServerConfig.from_sources(
            {"listen": "127.0.0.1:3333", "prefix": None},
            {"MODELREG_PREFIX": "/env/", "MODELREG_LOG_LEVEL": "debug"},
            path,
        )
        assert config.listen == "127.0.0.1:3333"
        assert config.prefix == "/env/"
        assert config.etcd_timeout == 7.0
        assert config.etcd == ("127.0.0.1:2379", "127.0.0.1:22379")
        assert config.log_level == "debug"
        assert config.grace == ServerConfig().grace

    def test_env_endpoint_list(self):
        """MODELREG_ETCD takes a comma-separated endpoint list."""
        config = ServerConfig.from_sources({}, {"MODELREG_ETCD": "a:1, b:2"})
        assert config.etcd == ("a:1", "b:2")

    def test_embedded_etcd_address_from_env(self):
        """MODELREG_ETCD_LISTEN sets the embedded etcd's loopback client address and port."""
        config = ServerConfig.from_sources({}, {"MODELREG_ETCD_LISTEN": "[::1]:2379"})
        assert (config.etcd_listen_host, config.etcd_listen_port) == ("::1", 2379)

    @pytest.mark.parametrize(
        ("flags", "message"),
        [
            ({"listen": "nowhere"}, "listen"),
            ({"prefix": "no-slashes"}, "prefix"),
            ({"log_level": "loud"}, "log_level"),
            ({"etcd": "host-without-port"}, "etcd"),
            ({"etcd_listen": "0.0.0.0:2379"}, "etcd_listen.*loopback"),
            ({"etcd_listen": "localhost"}, "etcd_listen"),
            ({"coordinator": "sometimes"}, "coordinator: 'sometimes' is not one of auto, on"),
            ({"rollout_interval": "0"}, "rollout_interval: 0.0 must be positive"),
            ({"coordinator_lease": "1"}, "coordinator_lease: 1 must be at least 2 seconds"),
        ],
    )
    def test_invalid_settings_name_themselves(self, flags, message):
        """A bad setting is refused with its name in the message."""
        with pytest.raises(ValueError, match=message):
            ServerConfig.from_sources(flags, {})

    def test_unknown_file_setting(self, tmp_path: Path):
        """A misspelt setting in the file is an error, not silently ignored."""
        path = tmp_path / "bad.toml"
        path.write_text('lisen = "127.0.0.1:1"\n')
        with pytest.raises(ValueError, match="lisen"):
            ServerConfig.from_sources({}, {}, path)


class TestDerivedNames:
    def test_every_setting_has_an_env_variable_named_after_it(self):
        """Each field is set by MODELREG_<FIELD> (no table to forget a new setting in)."""
        env = {ServerConfig.env_var(f.name): "9" for f in fields(ServerConfig)
               if f.type in ("float", "int")}
        config = ServerConfig.from_sources({}, env)
        assert config.health_interval == 9.0 and config.watch_queue == 9
        assert ServerConfig.env_var("metrics_listen") == "MODELREG_METRICS_LISTEN"

    @pytest.mark.parametrize("command", ["serve", "up"])
    def test_every_setting_has_a_flag(self, command: str):
        """`modelreg serve`/`up` take one flag per field, named after it, with the field's
        type; `up` has no --etcd, --topology, --region or --region-reads: it always runs its
        own etcd as one region.
        """
        parser = main.build_parser(command)
        flags = {a.dest: a for a in parser._actions}
        serve_only = {"etcd", "topology", "region", "region_reads"}
        expected = {f.name for f in fields(ServerConfig)} - (serve_only if command == "up"
                                                              else set())
        assert expected <= set(flags)
        assert not serve_only & set(flags) if command == "up" else serve_only <= set(flags)
        args = vars(parser.parse_args(["--health-interval", "0.5", "--watch-queue", "8"]))
        assert args["health_interval"] == 0.5 and args["watch_queue"] == 8
        assert args["listen"] is None  # unset: the environment and the file show through

    def test_bad_number_names_the_setting(self):
        """A value of the wrong type is refused naming the setting and where it came from."""
        with pytest.raises(ValueError, match="environment: watch_queue: 'lots'"):
            ServerConfig.from_sources({}, {"MODELREG_WATCH_QUEUE": "lots"})
