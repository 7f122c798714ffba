"""Where things are in a cluster: a device's gateway, a registered service instance."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceLocation:
    uid: int
    device: str
    node: str


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    role: str  # "gateway" | "transfer" | "api"
    node: str
    addresses: dict[str, str]  # e.g. {"ws": "ws://host:port/ws"}
    load: int = 0
