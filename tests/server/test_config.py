"""ServerConfig: flags over environment over file over defaults, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
