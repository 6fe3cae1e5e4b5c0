"""A serving node in its own process, for fleet tests: follows one stage with the SDK.

Usage: python tests/node_process.py TARGET MODEL STAGE NODE_ID REGION CACHE_DIR
Prints ``serving N`` on stdout after each swap; runs until killed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from modelreg.client.watcher import LoadedModel, ThreadedModelWatcher


def main() -> None:
    target, model, stage, node_id, region, cache = sys.argv[1:7]

    def swapped(new: LoadedModel[bytes], old: LoadedModel[bytes] | None) -> None:
        del old
        print(f"serving {new.version}", flush=True)

    watcher: ThreadedModelWatcher[bytes] = ThreadedModelWatcher(
        model, stage, Path.read_bytes, target=target, node_id=node_id, region=region,
        cache_dir=Path(cache), ttl_seconds=5, on_swap=swapped)
    watcher.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
