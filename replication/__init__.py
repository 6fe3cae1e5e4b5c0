"""Region replication: the primary's etcd prefix copied into each region's etcd, exactly once.

:class:`Replicator` is the agent (``modelreg replicate``); :mod:`modelreg.replication.layout`
is the contract with whoever reads a region: where the replicated keys live, how values carry
the primary's revisions, and how to read and watch them consistently.

Example::

    config = AgentConfig(primary=("10.0.0.1:2379",), region_etcd=("127.0.0.1:2379",),
                         region="eu")
    async with Replicator(config) as replicator:
        await asyncio.sleep(60)
        print(replicator.lag())
"""

from modelreg.replication.agent import AgentState, Replicator
from modelreg.replication.config import AgentConfig
from modelreg.replication.lag import Lag, LagSource, register_metrics
from modelreg.replication.layout import Envelope, Kind, State, Status
from modelreg.replication.main import main

__all__ = [
    "AgentConfig",
    "AgentState",
    "Envelope",
    "Kind",
    "Lag",
    "LagSource",
    "Replicator",
    "State",
    "Status",
    "main",
    "register_metrics",
]
