"""``modelreg serve`` and ``modelreg up``: run one server process until Ctrl-C or SIGTERM.

``serve`` uses the etcd cluster given by ``--etcd`` (or starts an embedded one if none is
given); ``up`` always runs a private etcd child process on a persistent data directory. Either
way the gRPC health service says NOT_SERVING until etcd answers, and SERVING from then on,
following etcd's availability; shutdown drains RPCs for ``--grace`` seconds, then stops etcd.

An embedded etcd is supervised: if it exits, health says NOT_SERVING at once, and it is
restarted on the same address and data (``etcd_exited`` / ``etcd_restarted`` log lines, the
``modelreg_etcd_restarts`` counter). It dies with this process, and a leftover of a crashed
run is stopped at start (:mod:`modelreg.server.etcd_lifetime`).

Every failure to start is one line on stderr and an exit code of the CLI's table: 2 for a bad
setting, 4 when this machine is in the way (an address in use, the data dir held by another
modelreg, no etcd binary), 130 when a signal ends the start. A signal during the start (even
while etcd comes up) undoes what was started, its etcd child included.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

import structlog

from modelreg.server import logs
from modelreg.server.app import App, StartError
from modelreg.server.config import CONFIG_FILE_ENV, ServerConfig
from modelreg.server.embedded_etcd import EtcdNotFoundError, EtcdStartError

log = structlog.get_logger("modelreg.server")

EXIT_OK, EXIT_USAGE, EXIT_LOCAL, EXIT_INTERRUPTED = 0, 2, 4, 130
"""The exit codes of ``modelreg``'s table (``modelreg --help``) that a server process uses."""


def build_parser(command: str) -> argparse.ArgumentParser:
    """The flags of ``modelreg serve`` / ``modelreg up``: one per ``ServerConfig`` field.

    Unset flags are None, so the environment, the file and the defaults show through.
    """
    up = command == "up"
    parser = argparse.ArgumentParser(
        prog=f"modelreg {command}",
        description=(
            "Run a local modelreg server on an embedded etcd with a persistent data directory; "
            "Ctrl-C stops both." if up else
            "Run the modelreg gRPC server against an etcd cluster (--etcd host:port,...), or "
            "an embedded etcd if none is given."
        ),
        epilog=f"Every flag can also be set as {ServerConfig.env_var('<flag>')} in the "
               "environment or in the TOML file given by --config. Health: grpc.health.v1 says "
               "SERVING once etcd answers. Exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 bad "
               "setting, 4 cannot start here (address in use, data dir held, no etcd), 130 "
               "interrupted while starting." + (
                   " With --regions A,B,...: a local multi-region cluster (modelreg up "
                   "--regions us,eu --help)." if up else ""),
    )
    parser.add_argument("--config", type=Path,
                        help=f"TOML file with settings, same names (or ${CONFIG_FILE_ENV})")
    types = get_type_hints(ServerConfig)
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        if up and f.metadata["external_etcd"]:
            continue
        default = getattr(defaults, f.name)
        shown = (",".join(default) or "none") if isinstance(default, tuple) else (
            "none" if default is None else str(default) or "''")
        parser.add_argument(
            ServerConfig.flag(f.name), dest=f.name, default=None,
            type=types[f.name] if types[f.name] in (int, float) else str,
            choices=f.metadata["choices"] or None,
            help=f"{f.metadata['help']} (default {shown})",
        )
    return parser


def main(argv: list[str]) -> int:
    """Entry point for ``modelreg serve|up ARGS``; returns the process exit code."""
    command, rest = argv[0], argv[1:]
    if command == "up" and any(a == "--regions" or a.startswith("--regions=") for a in rest):
        from modelreg.server import regions_up  # a local multi-region cluster, its own flags

        return regions_up.main(rest)
    args = vars(build_parser(command).parse_args(rest))
    config_file = args.pop("config") or (
        Path(os.environ[CONFIG_FILE_ENV]) if os.environ.get(CONFIG_FILE_ENV) else None
    )
    try:
        config = ServerConfig.from_sources(args, os.environ, config_file)
    except (ValueError, OSError) as err:
        print(f"modelreg {command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    if command == "up":
        # `up` always runs its own etcd, as one region (`up --regions` runs one per region).
        config = replace(config, etcd=(), topology=None, region="")
        if args.get("log_format") is None and sys.stderr.isatty():
            # Usually a person at a terminal: readable lines unless asked for JSON.
            config = replace(config, log_format="console")
    logs.configure(config.log_level, config.log_format)
    try:
        return asyncio.run(run(config))
    except (StartError, EtcdNotFoundError, EtcdStartError, OSError) as err:
        print(f"modelreg {command}: {err}", file=sys.stderr)
        return EXIT_LOCAL
    except KeyboardInterrupt:  # before the signal handlers are in
        return EXIT_INTERRUPTED


def _tune_gc() -> None:
    """Moves what startup built out of the collector's way and makes full collections rarer.

    Measured with 10,000 watch streams: the cyclic collector took a third of the server's CPU,
    set off by the short-lived messages of each fan-out; these settings halved promotion
    latency under that load (bench/watch_fanout.py).
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


async def run(config: ServerConfig) -> int:
    """Runs the server (and its embedded etcd, if any) until SIGINT or SIGTERM.

    The signal handlers go in first: a signal while the server starts (etcd may take seconds)
    cancels the start, which undoes itself, instead of killing the process with its children.
    """
    stop = asyncio.Event()
    starting = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stop.set()
        if starting is not None and not serving:
            starting.cancel()

    serving = False
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with App.from_config(config) as app:
            serving = True
            _tune_gc()
            where = (f"embedded etcd at {app.etcd.client_url} (data in {config.data_dir})"
                     if app.etcd is not None else f"etcd at {','.join(app.endpoints)}")
            if app.topology is not None:
                where += f"; region {config.region} (primary {app.topology.primary})"
            print(f"modelreg serving gRPC on {app.address}; {where}", flush=True)
            await stop.wait()
    except asyncio.CancelledError:
        if serving or not stop.is_set():
            raise
        log.info("stopped", why="signal while starting")
        return EXIT_INTERRUPTED
    log.info("stopped")
    return EXIT_OK
