"""A bounded, deterministic run of the descriptor-driven API fuzzer against a real server.

The long run is ``python bench/fuzz_api.py --cases 100000``; both share ``bench/_fuzz.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from bench._fuzz import MODEL, Case, Fuzzer, LoopThread, cases
from modelreg.client import cli
from modelreg.server.embedded_etcd import EmbeddedEtcd
from tests.helpers import start_server

CASES = 2000


@pytest.fixture
def fuzzer(etcd_server: EmbeddedEtcd) -> Iterator[tuple[LoopThread, Fuzzer]]:
    """A real server on the session etcd under a fresh prefix, and a fuzzer connected to it."""
    prefix = f"/fuzz/{uuid.uuid4().hex}/"
    loop = LoopThread()
    server = loop.run(start_server(etcd_server.endpoint, prefix, etcd_timeout=5.0))
    fuzz = Fuzzer(server.target, etcd_server.host, etcd_server.client_port, prefix,
                  first_message_timeout=0.3)
    try:
        loop.run(fuzz.open())
        yield loop, fuzz
    finally:
        loop.run(fuzz.close())
        loop.run(server.stop())
        loop.close()


class TestFuzzApi:
    def test_generated_and_raw_requests_keep_the_invariants(
        self, fuzzer: tuple[LoopThread, Fuzzer]
    ) -> None:
        """2,000 generated requests over every RPC: never UNKNOWN/INTERNAL, refusals write
        nothing, and the server stays SERVING.
        """
        loop, fuzz = fuzzer

        @settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def check(case: Case) -> None:
            finding = loop.run(fuzz.run(case))
            assert finding is None, finding

        check()
        assert loop.run(fuzz.check_serving()) is None
        assert fuzz.codes["OK"] > 0 and fuzz.codes["INVALID_ARGUMENT"] > 0, fuzz.codes

    def test_cli_renders_what_the_fuzzer_stored(
        self, fuzzer: tuple[LoopThread, Fuzzer], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every listing command prints, as text and JSON, whatever 300 fuzz cases stored."""
        loop, fuzz = fuzzer

        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def send(case: Case) -> None:
            loop.run(fuzz.run(case))

        send()
        loop.run(fuzz.prepare())
        for command in (["models", "list"], ["versions", "list", MODEL], ["stages", "list", MODEL],
                        ["history", MODEL, "staging"], ["audit", "--limit", "0"], ["nodes"],
                        ["rollout", MODEL, "staging"]):
            for fmt in ([], ["--json"]):
                code = cli.main(["--target", fuzz.target, *fmt, *command])
                err = capsys.readouterr().err
                assert code == 0 and "Traceback" not in err, (command, err)
