"""A stand-in for ``modelreg up --regions`` that a test can SIGKILL: starts the parts of a
cluster that run without the regional server mode (tests/e2e/regions_env.py), writes
``cluster.json``, prints ``ready`` and waits.

Usage: python -m tests.e2e.regions_parent DATA_DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from modelreg.server.regions_cluster import Cluster
from modelreg.server.regions_plan import server_command
from tests.e2e.regions_env import options, start_parts


async def main(data_dir: Path) -> None:
    cluster = Cluster(options(data_dir), server_command=server_command)
    await start_parts(cluster)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
