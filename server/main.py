"""``modelreg serve`` and ``modelreg up``: run one server process until Ctrl-C or SIGTERM.

``serve`` uses the etcd cluster given by ``--etcd`` (or starts an embedded one if none is
given); ``up`` always runs a private etcd child process on a persistent data directory. Either
way the gRPC health service says NOT_SERVING until etcd answers, and SERVING from then on,
following etcd's availability; shutdown drains RPCs for ``--grace`` seconds, then stops etcd.

An embedded etcd is supervised: if it exits, health says NOT_SERVING at once, and it is
restarted on the same address and data (``etcd_exited`` / ``etcd_restarted`` log lines, the
``modelreg_etcd_restarts`` counter). It dies with this process, and a leftover of a crashed
run is stopped at start (:mod:`modelreg.server.etcd_lifetime`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog
from prometheus_client import Counter, start_http_server

from modelreg.server import etcd_versions, logs
from modelreg.server.api.grpc import Metrics
from modelreg.server.app import App
from modelreg.server.config import ServerConfig
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.embedded_etcd import EmbeddedEtcd, EtcdNotFoundError, EtcdStartError
from modelreg.server.etcd_supervisor import EtcdSupervisor

log = structlog.get_logger("modelreg.server")

HEALTH_INTERVAL = 2.0
"""Seconds between etcd pings that keep the health status true."""


def host_of(address: str) -> str:
    """The host part of HOST:PORT."""
    return address.rpartition(":")[0]


def build_parser(command: str) -> argparse.ArgumentParser:
    """The flags of ``modelreg serve`` / ``modelreg up``; unset flags fall back to env/file."""
    up = command == "up"
    parser = argparse.ArgumentParser(
        prog=f"modelreg {command}",
        description=(
            "Run a local modelreg server on an embedded etcd with a persistent data directory; "
            "Ctrl-C stops both." if up else
            "Run the modelreg gRPC server against an etcd cluster (--etcd host:port,...), or "
            "an embedded etcd if none is given."
        ),
        epilog="Every flag can also be set as MODELREG_<FLAG> in the environment or in the "
               "TOML file given by --config. Health: grpc.health.v1 says SERVING once etcd "
               "answers.",
    )
    parser.add_argument("--config", type=Path, help="TOML file with settings (same names)")
    parser.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:50051)")
    if not up:
        parser.add_argument("--etcd", help="etcd endpoints HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--data-dir", dest="data_dir",
                        help="embedded etcd data directory (default ~/.local/share/modelreg)")
    parser.add_argument("--etcd-listen", dest="etcd_listen",
                        help="embedded etcd client address, loopback HOST:PORT (default "
                             "127.0.0.1:0, a free port); `modelreg serve --etcd` and etcdctl "
                             "can join it there")
    parser.add_argument("--prefix", help="etcd key prefix of this deployment (default /modelreg/)")
    parser.add_argument("--etcd-timeout", dest="etcd_timeout", type=float,
                        help="deadline of each etcd call in seconds (default 5)")
    parser.add_argument("--metrics-listen", dest="metrics_listen",
                        help="Prometheus endpoint HOST:PORT, '' to disable (default "
                             "127.0.0.1:9464)")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", dest="log_format", choices=["json", "console"])
    parser.add_argument("--grace", type=float, help="seconds to drain RPCs on shutdown")
    parser.add_argument("--bookmark-interval", dest="bookmark_interval", type=float,
                        help="seconds between bookmarks on idle watch streams (default 10)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point for ``modelreg serve|up ARGS``; returns the process exit code."""
    command, rest = argv[0], argv[1:]
    args = vars(build_parser(command).parse_args(rest))
    config_file = args.pop("config") or (
        Path(os.environ["MODELREG_CONFIG"]) if os.environ.get("MODELREG_CONFIG") else None
    )
    try:
        config = ServerConfig.from_sources(args, os.environ, config_file)
    except (ValueError, OSError) as err:
        print(f"modelreg {command}: {err}", file=sys.stderr)
        return 2
    if command == "up" and args.get("log_format") is None and sys.stderr.isatty():
        # `modelreg up` is usually a person at a terminal: readable lines unless asked for JSON.
        config = replace(config, log_format="console")
    logs.configure(config.log_level, config.log_format)
    try:
        return asyncio.run(run(config, embedded=command == "up" or not config.etcd))
    except (EtcdNotFoundError, EtcdStartError, OSError) as err:
        print(f"modelreg {command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _watch_health(
    app: App, wake: asyncio.Event, etcd_alive: Callable[[], bool] = lambda: True
) -> None:
    """Keeps the health status in step with etcd: SERVING while it answers.

    ``wake`` makes it look again at once (the supervisor sets it when the embedded etcd exits
    or is back), so a crash shows as NOT_SERVING without waiting for the next ping.
    """
    serving: bool | None = None
    while True:
        wake.clear()
        ok = etcd_alive()
        if ok:
            try:
                await app.store.read([], fresh=True)
            except UnavailableError:
                ok = False
        if ok != serving:
            await app.set_serving(ok)
            log.info("health", serving=ok, etcd=app.store.endpoint)
            serving = ok
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), HEALTH_INTERVAL)


def _tune_gc() -> None:
    """Moves what startup built out of the collector's way and makes full collections rarer.

    Measured with 10,000 watch streams: the cyclic collector took a third of the server's CPU,
    set off by the short-lived messages of each fan-out; these settings halved promotion
    latency under that load (bench/watch_fanout.py).
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


async def _start_etcd(config: ServerConfig) -> EmbeddedEtcd:
    """Starts the embedded etcd (forking on this, the main, thread: see ``start_async``)."""
    etcd = EmbeddedEtcd(config.data_dir, host=config.etcd_listen_host,
                        client_port=config.etcd_listen_port)
    log.info("etcd_starting", data_dir=str(config.data_dir))
    await etcd.start_async()
    if etcd.stale_stopped is not None:
        log.warning("etcd_stale_stopped", pid=etcd.stale_stopped, data_dir=str(config.data_dir),
                    why="left running by a modelreg that did not stop it")
    log.info("etcd_started", endpoint=etcd.endpoint, pid=etcd.pid, log=str(etcd.log_path))
    return etcd


async def run(config: ServerConfig, *, embedded: bool) -> int:
    """Runs the server (and the embedded etcd, if any) until SIGINT or SIGTERM."""
    etcd: EmbeddedEtcd | None = None
    endpoints = list(config.etcd)
    if embedded:
        etcd = await _start_etcd(config)
        endpoints = [etcd.endpoint]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics.create()
    restarts = Counter("modelreg_etcd_restarts", "Restarts of the embedded etcd after it exited",
                       registry=metrics.registry)
    metrics_server = None
    app: App | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if config.metrics_listen:
            host, _, port = config.metrics_listen.rpartition(":")
            metrics_server, _ = start_http_server(int(port), addr=host, registry=metrics.registry)
        app = await App.start(endpoints, config.prefix, config.listen,
                              etcd_timeout=config.etcd_timeout,
                              bookmark_interval=config.bookmark_interval, metrics=metrics)
        metrics_at = (f"{host_of(config.metrics_listen)}:{metrics_server.server_port}"
                      if metrics_server is not None else None)
        _tune_gc()
        listen = f"{host_of(config.listen)}:{app.port}"
        version = await app.store.server_version()
        log.info("serving", listen=listen, etcd=",".join(endpoints), etcd_version=version,
                 prefix=config.prefix, metrics=metrics_at)
        bugs = etcd_versions.known_bugs(version)
        if bugs:
            log.warning("etcd_version_has_known_bugs", etcd_version=version, bugs=bugs,
                        advice=etcd_versions.ADVICE)
        wake = asyncio.Event()
        if etcd is not None:
            print(f"modelreg serving gRPC on {listen}; embedded etcd at {etcd.client_url} "
                  f"(data in {config.data_dir})", flush=True)

            async def changed(_: bool) -> None:
                wake.set()

            supervisor = EtcdSupervisor(etcd, on_change=changed, on_restart=restarts.inc)
            tasks.append(asyncio.create_task(supervisor.run(), name="etcd-supervisor"))
            tasks.append(asyncio.create_task(_watch_health(app, wake, lambda: supervisor.up)))
        else:
            print(f"modelreg serving gRPC on {listen}; etcd at {','.join(endpoints)}", flush=True)
            tasks.append(asyncio.create_task(_watch_health(app, wake)))
        await stop.wait()
        log.info("stopping", grace=config.grace)
    finally:
        # The supervisor goes first: it must not restart the etcd that shutdown stops.
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if app is not None:
            await app.stop(config.grace)
        if metrics_server is not None:
            metrics_server.shutdown()
        if etcd is not None:
            await asyncio.to_thread(etcd.stop)
            log.info("etcd_stopped")
    log.info("stopped")
    return 0
