"""Long fuzz run of the modelreg API: ``python bench/fuzz_api.py --cases 100000 --seed 1``.

Starts a private etcd and a ``modelreg serve`` child (see ``_harness``), then sends ``--cases``
requests generated from the service descriptors by ``_fuzz`` (the same generator the test
suite runs 2,000 derandomized cases of) and checks the invariants after each: never UNKNOWN or
INTERNAL, a refused request changes nothing in etcd, the server stays SERVING. No shrinking:
every finding is kept and the run goes on. The last lines are the seed, the count per gRPC
code and the findings; the exit code is 1 if there are any.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence

import grpc
from _fuzz import Case, Fuzzer, LoopThread, cases
from _harness import (
    PREFIX,
    interrupt_on_sigterm,
    make_tmpdir,
    remove_tmpdir,
    serving,
    wait_serving,
)
from hypothesis import HealthCheck, Phase, given, seed, settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", type=int, default=100_000, help="requests to send")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random)")
    parser.add_argument("--first-message-timeout", type=float, default=1.0,
                        help="seconds to wait for a watch stream's first message (1)")
    parser.add_argument("--keep", action="store_true", help="keep etcd data and the log")
    return parser.parse_args(argv)


def fuzz(loop: LoopThread, fuzzer: Fuzzer, cases_n: int, run_seed: int) -> None:
    started = time.monotonic()

    @seed(run_seed)
    @settings(max_examples=cases_n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(case: Case) -> None:
        finding = loop.run(fuzzer.run(case))
        if finding is not None:
            print(f"FINDING {finding}", file=sys.stderr, flush=True)
        if fuzzer.sent % 5000 == 0:
            rate = fuzzer.sent / (time.monotonic() - started)
            print(f"{fuzzer.sent} cases, {rate:.0f}/s, {dict(fuzzer.codes)}", file=sys.stderr,
                  flush=True)

    one()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the fuzzer; returns 1 if any invariant broke."""
    args = parse_args(argv)
    run_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {run_seed} (rerun: python bench/fuzz_api.py --cases {args.cases} "
          f"--seed {run_seed})", flush=True)
    interrupt_on_sigterm()
    tmp = make_tmpdir()
    loop = LoopThread()
    interrupted = False
    fuzzer: Fuzzer | None = None
    try:
        with serving(tmp) as server:
            fuzzer = Fuzzer(server.listen, server.etcd.host, server.etcd.client_port, PREFIX,
                            first_message_timeout=args.first_message_timeout)

            async def start() -> None:
                async with grpc.aio.insecure_channel(server.listen) as channel:
                    await wait_serving(channel, server.proc, server.log)
                await fuzzer.open()

            loop.run(start())
            try:
                fuzz(loop, fuzzer, args.cases, run_seed)
                final = loop.run(fuzzer.check_serving())
                if final is not None:
                    fuzzer.findings.append(f"after the run: {final}")
            finally:
                loop.run(fuzzer.close())
    except KeyboardInterrupt:
        # SIGTERM or Ctrl-C: still report what ran, so a long run cut short counts.
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        loop.close()
        remove_tmpdir(tmp, args.keep)
    print(f"seed {run_seed}{' (interrupted)' if interrupted else ''}")
    if fuzzer is None:
        return 130
    print(f"cases {fuzzer.sent}")
    for code, count in fuzzer.codes.most_common():
        print(f"code {code} {count}")
    print(f"findings {len(fuzzer.findings)}")
    for finding in fuzzer.findings:
        print(f"finding {finding}")
    return 130 if interrupted else 1 if fuzzer.findings else 0


if __name__ == "__main__":
    sys.exit(main())
