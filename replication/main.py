"""``modelreg replicate``: run one region's replicator until SIGINT or SIGTERM.

The lead wires it into the CLI as ``modelreg replicate ARGS``; until then it runs as
``python -m modelreg.replication ARGS``. Exit codes: 0 after a signal, 2 for bad settings,
1 when the replicator stopped on an error it cannot handle (logged).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from modelreg.replication.agent import Replicator
from modelreg.replication.config import AgentConfig
from modelreg.replication.lag import register_metrics

log = structlog.get_logger("modelreg.replication")


def build_parser() -> argparse.ArgumentParser:
    """The flags; an unset flag falls back to its ``MODELREG_*`` variable, then the default."""
    parser = argparse.ArgumentParser(
        prog="modelreg replicate",
        description="Replicate the primary region's etcd prefix into this region's etcd: every "
                    "primary revision applied once, in order; two replicas per region may run "
                    "(one applies, elected in the regional etcd).",
        epilog="Every flag can also be set as an environment variable (see "
               "modelreg.replication.config.AgentConfig.ENV); etcd credentials only there.",
    )
    parser.add_argument("--primary", help="primary etcd endpoints HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--region-etcd", dest="region_etcd",
                        help="this region's etcd endpoints HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--region", help="this region's name (a-z0-9-)")
    parser.add_argument("--prefix", help="deployment key prefix on the primary (/modelreg/)")
    parser.add_argument("--region-prefix", dest="region_prefix",
                        help="key prefix in the regional etcd (default: --prefix)")
    parser.add_argument("--replica-id", dest="replica_id",
                        help="unique id of this replica (default: the host name)")
    parser.add_argument("--lease-ttl", dest="lease_ttl", type=int,
                        help="seconds a dead leader blocks its standby (default 10)")
    parser.add_argument("--etcd-timeout", dest="etcd_timeout", type=float,
                        help="deadline of each etcd call in seconds (default 5)")
    parser.add_argument("--probe-interval", dest="probe_interval", type=float,
                        help="seconds of watch silence before probing the primary (default 1)")
    parser.add_argument("--status-interval", dest="status_interval", type=float,
                        help="seconds between status records in the regional etcd (default 5)")
    parser.add_argument("--max-txn-ops", dest="max_txn_ops", type=int,
                        help="the regional etcd's --max-txn-ops (default 128)")
    parser.add_argument("--metrics-listen", dest="metrics_listen",
                        help="Prometheus endpoint HOST:PORT (default: none)")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", dest="log_format", choices=["json", "console"])
    return parser


def configure_logging(level: str, fmt: str) -> None:
    """Logs to stderr: one JSON object per line, or console lines for people."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if fmt == "json"
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def serve(config: AgentConfig) -> int:
    """Runs a :class:`Replicator` until SIGINT/SIGTERM; with its metrics endpoint if set."""
    replicator = Replicator(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, replicator.shutdown)
    metrics_server = None
    if config.metrics_listen:
        registry = CollectorRegistry()
        register_metrics(registry, replicator)
        host, _, port = config.metrics_listen.rpartition(":")
        metrics_server, _ = start_http_server(int(port), addr=host.strip("[]"),
                                              registry=registry)
        log.info("replication.metrics", listen=f"{host}:{metrics_server.server_port}")
    try:
        await replicator.run()
    except Exception:
        log.exception("replication.failed")
        return 1
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``modelreg replicate ARGS`` (``argv`` without the command); an exit code."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    try:
        config = AgentConfig.from_sources(args, os.environ)
    except ValueError as err:
        print(f"modelreg replicate: {err}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130
