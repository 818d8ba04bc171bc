"""The fleet service (``python -m services.fleet``): the device's agent in a fleet managed
over MQTT.  It reads its desired state (signed deployment documents) from the broker,
downloads bundles in verified chunks, installs them through the model store, applies
config fragments through the kernel's reload, and reports what it runs.

``Agent`` (``_agent.py``) is the pure core (events in, actions out) with its storage
interface (``DiskStorage``, ``MemoryStorage``): a simulation runs many of them in one process.
"""

from ._agent import (
    Action,
    Activate,
    Agent,
    AgentState,
    ApplyConfig,
    Audit,
    Connected,
    Disconnected,
    DiskStorage,
    Done,
    Event,
    Fetch,
    Fetched,
    Health,
    Install,
    MemoryStorage,
    Models,
    Publish,
    Received,
    Rollback,
    Serving,
    Storage,
    StorageFull,
    Subscribe,
    Tick,
    TrustChanged,
    Unsubscribe,
)
from ._config import ConfigFragmentError, dumps, merge_fragment
from ._service import FleetService
from ._settings import BrokerSettings, FleetSettings

__all__ = [
    "Agent", "AgentState", "Storage", "DiskStorage", "MemoryStorage", "StorageFull",
    "Event", "Connected", "Disconnected", "Received", "Models", "Done", "Health", "Serving", "Tick", "TrustChanged",
    "Action", "Subscribe", "Unsubscribe", "Publish", "Fetch", "Fetched", "Install", "Activate", "Rollback", "ApplyConfig", "Audit",
    "FleetSettings", "BrokerSettings", "ConfigFragmentError", "merge_fragment", "dumps", "FleetService",
]

