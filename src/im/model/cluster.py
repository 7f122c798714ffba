"""Where things are in a cluster: a device's gateway, a registered service instance."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceLocation:
    """A device online at a gateway node. ``conn`` names the exact connection there (unique per node and
    process start) where it matters, in claims and replacements; empty where only the node does (locate)."""

    uid: int
    device: str
    node: str
    conn: str = ""


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    role: str  # "gateway" | "transfer" | "api"
    node: str
    addresses: dict[str, str]  # e.g. {"ws": "ws://host:port/ws"}
    load: int = 0
    #: Its readiness as last published (engines reachable, not draining; docs/operations.md). An entry
    #: written without it (an older node) reads as ready.
    ready: bool = True
    #: im's version on that node ("" when not published).
    version: str = ""
    #: When the process started, Unix seconds (0: not published).
    started_at: float = 0.0
