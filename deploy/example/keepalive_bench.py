"""Requests per second on one kept-alive HTTP connection to ``serve.py``.

One client, one connection, one request at a time (what a service calling its model server
through a connection pool does): the figure is bound by per-request latency, so it shows at
once whether each response waits for a delayed ACK (about 40 ms on Linux) or leaves at once::

    python deploy/example/keepalive_bench.py 'http://127.0.0.1:8080/predict?x=1.0,2.0'

Prints requests, seconds, requests per second and latency percentiles. Stdlib only.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="URL to GET, e.g. http://127.0.0.1:8080/predict?x=1.0,2.0")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long to send requests (%(default)s)")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or url.hostname is None:
        parser.error("the URL must be http://HOST[:PORT]/PATH")
    path = url.path + (f"?{url.query}" if url.query else "")

    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
    latencies: list[float] = []
    connections, last = 0, None
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < args.seconds:
            sent = time.perf_counter()
            conn.request("GET", path)
            reply = conn.getresponse()
            reply.read()
            latencies.append(time.perf_counter() - sent)
            if conn.sock is not last:  # http.client reconnects if the server closed
                connections, last = connections + 1, conn.sock
    finally:
        conn.close()
    elapsed = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{len(ms)} requests in {elapsed:.1f} s on {connections} connection(s): "
          f"{len(ms) / elapsed:.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
          f"max {ms[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
