"""Two regions as real processes: ``modelreg serve`` per region from one topology file, the
region's ``modelreg replicate``, two etcd clusters, and the real CLI and watch.

The eu server runs on the regional store: it reads eu's own etcd, which only the replicator
writes, at the primary's revisions, and forwards mutations to the primary's server; its lag
figures come from eu's etcd too, where the replicator writes them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelreg.server.embedded_etcd import EmbeddedEtcd
from tests.helpers import MODEL, stage
from tests.server.forward_env import address, write_topology
from tests.up_process import MODELREG, wait_for, wait_serving

PREFIX = "/modelreg/"


class Serve:
    """A ``modelreg serve`` child process of one region, logging to a file."""

    def __init__(self, tmp: Path, topology: Path, region: str, listen: str, *extra: str) -> None:
        self.target = listen
        self.log = tmp / f"serve-{region}.log"
        self.argv = [MODELREG, "serve", "--topology", str(topology), "--region", region,
                     "--listen", listen, "--metrics-listen", "", "--grace", "0",
                     "--prefix", PREFIX, "--log-format", "json", *extra]
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    async def serving(self) -> None:
        await wait_serving(self.target, self.proc, self.logs)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.proc = self._start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``modelreg --target TARGET --json ARGS`` as ``ops``."""
    return subprocess.run([MODELREG, "--target", target, "--actor", "ops", "--json", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def ok(target: str, *args: str) -> dict:
    done = cli(target, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def replicate(log_path: Path, primary: EmbeddedEtcd, region: EmbeddedEtcd
              ) -> subprocess.Popen[bytes]:
    """``modelreg replicate`` of region eu (``python -m modelreg.replication``), short timers."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "modelreg.replication", "--primary", primary.endpoint,
             "--region-etcd", region.endpoint, "--region", "eu", "--prefix", PREFIX,
             "--replica-id", "r1", "--lease-ttl", "2", "--probe-interval", "0.2",
             "--status-interval", "0.3", "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def follow(target: str) -> subprocess.Popen[str]:
    """``modelreg watch MODEL staging --bookmarks --json`` through ``target``, lines on a pipe."""
    return subprocess.Popen(
        [MODELREG, "--target", target, "--json", "watch", MODEL, "staging", "--bookmarks"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    """The primary's etcd and eu's, on loopback."""
    primary, eu = EmbeddedEtcd(tmp_path / "etcd-us", name="us"), EmbeddedEtcd(
        tmp_path / "etcd-eu", name="eu")
    primary.start()
    try:
        eu.start()
        yield primary, eu
    finally:
        eu.stop()
        primary.stop()


@pytest.mark.slow
class TestTwoRegionsAsProcesses:
    async def test_promote_through_eu_and_survive_the_primary_crash(self, tmp_path, clusters):
        """A promotion through eu's server commits on the primary (same etag there); with the
        primary's server SIGKILLed, promotions through eu exit 3 PRIMARY_UNAVAILABLE while
        reads and a running `modelreg watch` through eu go on and `modelreg regions` shows us
        unreachable; once it is back, promotions through eu commit and reach the watch.
        """
        primary_etcd, eu_etcd = clusters
        us_addr, eu_addr = address(), address()
        topology = write_topology(tmp_path / "topology.toml", "us", {
            "us": ([primary_etcd.endpoint], [us_addr]), "eu": ([eu_etcd.endpoint], [eu_addr])})
        procs: list[Serve] = []
        watch: subprocess.Popen[str] | None = None
        replicator: subprocess.Popen[bytes] | None = None
        try:
            us = Serve(tmp_path, topology, "us", us_addr)
            procs.append(us)
            replicator = replicate(tmp_path / "replicate.log", primary_etcd, eu_etcd)
            eu = Serve(tmp_path, topology, "eu", eu_addr,
                       "--bookmark-interval", "0.3", "--forward-connect-timeout", "0.5")
            procs.append(eu)
            await us.serving()
            await eu.serving()

            ok(eu_addr, "models", "create", MODEL)
            for n in (1, 2):
                ok(eu_addr, "versions", "create", MODEL, "--artifact-uri", f"s3://m/{n}",
                   "--sha256", "ab" * 32, "--size-bytes", "10")
            promoted = ok(eu_addr, "promote", MODEL, "staging", "1", "--reason", "via eu")
            on_primary = ok(us_addr, "stages", "get", MODEL, "staging")
            assert on_primary["stage"]["etag"] == promoted["stage"]["etag"]
            assert on_primary["stage"]["updated_by"] == "ops"

            watch = follow(eu_addr)
            assert watch.stdout is not None
            lines = watch.stdout
            first = json.loads(await asyncio.to_thread(lines.readline))
            assert first["type"] == "snapshot"

            await wait_for(lambda: [r["health"] for r in ok(eu_addr, "regions")["regions"]]
                           == ["ok", "ok"], 60, "both regions healthy")

            us.kill()
            refused = cli(eu_addr, "promote", MODEL, "staging", "2")
            assert refused.returncode == 3, refused.stderr
            error = json.loads(refused.stderr)["error"]
            assert (error["reason"], error["metadata"]["primary"]) == ("PRIMARY_UNAVAILABLE",
                                                                       "us")
            listed = ok(eu_addr, "stages", "list", MODEL)
            assert {s["name"]: s["version"] for s in listed["stages"]}[stage("staging")] == 1
            while (line := json.loads(await asyncio.to_thread(lines.readline)))["type"] != (
                    "bookmark"):
                pass
            assert line["revision"] >= promoted["revision"]
            health = [r["health"] for r in ok(eu_addr, "regions")["regions"]]
            assert health == ["unreachable", "degraded"]

            us.restart()
            await us.serving()
            await wait_for(lambda: cli(eu_addr, "promote", MODEL, "staging", "2",
                                       ).returncode == 0, 60, "a promotion after the restart")
            moved = ok(us_addr, "stages", "get", MODEL, "staging")["stage"]
            assert moved["version"] == 2
            while (line := json.loads(await asyncio.to_thread(lines.readline)))["type"] != (
                    "changes"):
                pass
            assert line["revision"] == int(moved["etag"])
        finally:
            if watch is not None:
                watch.kill()
                watch.wait()
                if watch.stdout is not None:
                    watch.stdout.close()
            if replicator is not None:
                replicator.send_signal(signal.SIGTERM)
                try:
                    replicator.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    replicator.kill()
                    replicator.wait()
            for proc in procs:
                proc.close()
