"""An example inference server: predictions from the tinymodel a stage pointer names, hot-swapped.

A :class:`~modelreg.client.ThreadedModelWatcher` follows ``models/{model}/stages/{stage}``,
fetches and verifies each version's artifact and loads it with :func:`tinymodel.load`; the
HTTP handlers only ever read ``watcher.current``, once per request, so each answer comes from
one complete, verified model, and a promotion or rollback takes effect without a restart::

    python deploy/example/serve.py --target 127.0.0.1:50051 --model fraud-detector --port 8080

Endpoints (JSON):

* ``GET /predict?x=1.0,2.0`` -> ``{"prediction": 2.9, "version": 1, ...}``; 503 until a model
  is loaded, 400 for bad features.
* ``GET /healthz`` -> 200 while the process runs; ``ready`` says whether a model is loaded.
* ``GET /model`` -> the version served, the one kept warm for rollback, and the watcher's view
  (committed version, last failure).

SIGTERM or SIGINT stops the HTTP server, then the watcher, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import tinymodel

from modelreg.client import DEFAULT_TARGET, LoadedModel, ThreadedModelWatcher

log = logging.getLogger("example.serve")

Watcher = ThreadedModelWatcher[tinymodel.Model]


def _version_info(loaded: LoadedModel[tinymodel.Model] | None) -> dict[str, Any] | None:
    if loaded is None:
        return None
    return {
        "version": loaded.version,
        "sha256": loaded.model_version.sha256,
        "artifact_uri": loaded.model_version.artifact_uri,
        "kind": loaded.model.kind,
        "features": len(loaded.model.weights),
        "loaded_at": loaded.loaded_at.isoformat(),
    }


class Handler(BaseHTTPRequestHandler):
    """Answers ``/predict``, ``/healthz`` and ``/model`` from the server's watcher.

    Connections are kept alive (HTTP/1.1), so each response must leave in one piece. The
    stdlib's default writes the headers and the body in two ``send`` calls; with Nagle's
    algorithm the second waits for the ACK of the first, which a client on a kept-alive
    connection delays by about 40 ms: every request after a connection's first took 42 ms
    instead of under one. Hence both settings below: a buffered ``wfile`` (flushed once per
    response) puts headers and body in one ``send``, one segment for these small answers; and
    ``TCP_NODELAY`` makes sure that a response that still needs several sends (larger than
    the buffer, or a stdlib error page) never waits for an ACK either.
    """

    server: InferenceServer
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # buffered (io.DEFAULT_BUFFER_SIZE), instead of one send per write
    disable_nagle_algorithm = True  # TCP_NODELAY on each accepted socket

    def do_GET(self) -> None:
        """Route a GET request."""
        url = urlsplit(self.path)
        if url.path == "/predict":
            self._predict(parse_qs(url.query))
        elif url.path == "/healthz":
            ready = self.server.watcher.current is not None
            self._reply(HTTPStatus.OK, {"status": "ok", "ready": ready})
        elif url.path == "/model":
            self._model()
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})

    def _predict(self, query: dict[str, list[str]]) -> None:
        loaded = self.server.watcher.current  # the one read: model and version agree
        if loaded is None:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model loaded yet"})
            return
        try:
            features = [float(v) for v in ",".join(query.get("x", [])).split(",") if v.strip()]
            if not all(math.isfinite(x) for x in features):
                raise ValueError("features must be finite numbers")
            prediction = loaded.model.predict(features)
        except ValueError as err:
            self._reply(HTTPStatus.BAD_REQUEST,
                        {"error": f"bad x: {err}", "version": loaded.version})
            return
        self._reply(HTTPStatus.OK, {"prediction": prediction, "version": loaded.version,
                                    "model": self.server.model, "stage": self.server.stage})

    def _model(self) -> None:
        watcher = self.server.watcher
        current, previous, stats = watcher.current, watcher.previous, watcher.stats
        self._reply(HTTPStatus.OK, {
            "model": self.server.model,
            "stage": self.server.stage,
            "node_id": watcher.node_id,
            "serving": _version_info(current),
            "warm_previous": _version_info(previous),
            "committed_version": stats.committed_version,
            "failed_version": stats.failed_version,
            "last_error": stats.last_error,
            "swaps": stats.swaps,
        })

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()  # headers and body leave together, in one send

    def log_message(self, format: str, *args: Any) -> None:
        """Log each request through :mod:`logging` at debug level."""
        log.debug("%s %s", self.address_string(), format % args)


class InferenceServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the watcher its handlers read."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], watcher: Watcher, model: str,
                 stage: str) -> None:
        self.watcher = watcher
        self.model = model
        self.stage = stage
        super().__init__(address, Handler)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("MODELREG_TARGET", DEFAULT_TARGET),
                        help="modelreg server host:port (default %(default)s)")
    parser.add_argument("--model", default="fraud-detector", help="model id (%(default)s)")
    parser.add_argument("--stage", default="production", help="stage to serve (%(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (%(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (%(default)s)")
    parser.add_argument("--node-id", default=None,
                        help="this node's id in the fleet view (default: host name and pid)")
    parser.add_argument("--region", default="", help="this node's region, for the fleet view")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where verified artifacts are kept (default: a temporary dir)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    watcher: Watcher = ThreadedModelWatcher(
        args.model, args.stage, tinymodel.load, target=args.target, node_id=args.node_id,
        region=args.region, cache_dir=args.cache_dir,
        labels={"app": "tinymodel-example"},
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with InferenceServer((args.host, args.port), watcher, args.model, args.stage) as httpd, \
            watcher:  # bind first, then watch; leaving the block stops the watcher, then closes
        http_thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
        http_thread.start()
        log.info("listening on http://%s:%d, following %s/%s at %s as node %s",
                 *httpd.server_address[:2], args.model, args.stage, args.target,
                 watcher.node_id)
        try:
            while not stopping.wait(1.0):  # a timed wait, so signals are handled promptly
                pass
        finally:
            httpd.shutdown()  # no new requests; waits for serve_forever to return
            http_thread.join()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
