"""The etcd supervisor restarts a dead embedded etcd, backing off while restarts fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import structlog

from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.etcd_supervisor import EtcdSupervisor
from tests.up_process import wait_for


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


class TestEtcdSupervisor:
    async def test_restart_waits_out_a_held_port_and_reports_down_then_up(
        self, own_etcd: EmbeddedEtcd
    ) -> None:
        """While the dead etcd's port is taken, a restart fails and backs off; once it is free,
        etcd comes back on it and the callbacks saw down, then up.
        """
        changes: list[bool] = []
        restarted: list[int] = []

        async def changed(up: bool) -> None:
            changes.append(up)

        supervisor = EtcdSupervisor(own_etcd, on_change=changed,
                                    on_restart=lambda: restarted.append(1),
                                    initial_backoff=0.8, max_backoff=5.0)
        port, old_pid = own_etcd.client_port, own_etcd.pid
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(supervisor.run())
            try:
                holder = socket.socket()
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    assert old_pid is not None
                    os.kill(old_pid, signal.SIGKILL)  # a crash: the supervisor reaps it
                    # Its other threads may still hold the listener for a moment after the
                    # main one is a zombie.
                    await wait_for(lambda: _bound(holder, port), what="etcd's port free")
                    holder.listen()
                    await wait_for(lambda: any(e["event"] == "etcd_restart_failed"
                                               for e in logs), what="a failed restart")
                    assert changes == [False]
                finally:
                    holder.close()
                await wait_for(lambda: changes == [False, True], what="etcd back")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert own_etcd.running and own_etcd.pid != old_pid
        assert own_etcd.client_port == port
        assert supervisor.restarts == 1 and restarted == [1]
        failed = [e for e in logs if e["event"] == "etcd_restart_failed"]
        assert f"port {port}" in failed[0]["error"]
        assert failed[0]["retry_in"] > logs[0]["restart_in"]  # backing off
        assert [e["event"] for e in logs if e["event"] != "etcd_restart_failed"] == [
            "etcd_exited", "etcd_restarted"]
        assert logs[0]["pid"] == old_pid and logs[0]["exit_code"] == -signal.SIGKILL
