"""A process that starts an embedded etcd and then just lives, for parent-death tests.

Usage: python tests/etcd_parent.py DATA_DIR DIE_WITH_PARENT(0|1)
Prints ``etcd PID`` on stdout once etcd is healthy; runs until killed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from modelreg.server.embedded_etcd import EmbeddedEtcd


def main() -> None:
    etcd = EmbeddedEtcd(Path(sys.argv[1]), die_with_parent=sys.argv[2] == "1")
    etcd.start()
    print(f"etcd {etcd.pid}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
