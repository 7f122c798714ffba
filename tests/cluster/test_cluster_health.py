"""Readiness across a real cluster: a gateway that lost an engine publishes ready=false and the API stops
handing it out; healthy again, it is handed out again; a draining gateway is never handed out; ``im
status`` prints every node from etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from im.cluster import LocalCluster
from im.procs import free_port
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import register
from tests.support.wait import eventually


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster", transfers=1).start()
    yield c
    stop_checked(c)


def im_status(c: LocalCluster, *flags: str) -> subprocess.CompletedProcess[str]:
    assert c.etcd_endpoint is not None
    cmd = [
        sys.executable,
        "-m",
        "im",
        "status",
        "--set",
        "registry.kind=etcd",
        "--set",
        f"registry.etcd_endpoints={c.etcd_endpoint}",
        "--set",
        f"registry.prefix=/{c.redis_prefix.rstrip(':')}/services/",
        *flags,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def status_json(c: LocalCluster) -> dict[str, dict[str, object]]:
    done = im_status(c, "--json")
    assert done.returncode in (0, 1), done.stderr
    return {n["node"]: n for n in json.loads(done.stdout)}


async def handed_out(http: httpx.AsyncClient, api: str, token: str, times: int = 24) -> set[str]:
    """The gateways ``GET /gateway`` names over ``times`` calls (ties between equal loads are random)."""
    seen = set()
    for _ in range(times):
        r = await http.get(f"{api}/gateway", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        seen.add(r.json()["node"])
    return seen


async def test_an_unready_gateway_is_not_handed_out_and_comes_back_when_healthy(small_cluster: LocalCluster) -> None:
    c = small_cluster
    alice = await register(c.api, "alice")
    async with httpx.AsyncClient(timeout=10) as http:

        async def both() -> bool:
            return await handed_out(http, c.api, alice.access) == {"gw-1", "gw-2"}

        await eventually(both, "both gateways are handed out", timeout=20)
        for path in ("/health", "/health/ready", "/health/live"):
            r = await http.get(f"{c.api}{path}")
            assert (r.status_code, r.json()) == (200, {"status": "ok"}), path

        # im status: every node (api, gateways, transfer), ready, with its version and addresses.
        done = await asyncio.to_thread(im_status, c)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split()[:6] == ["ROLE", "NODE", "READY", "VERSION", "LOAD", "UP"]
        assert sorted(line.split()[1] for line in lines[1:]) == ["api-1", "gw-1", "gw-2", "tr-1"]
        nodes = await asyncio.to_thread(status_json, c)
        assert {n: (v["role"], v["ready"]) for n, v in nodes.items()} == {
            "api-1": ("api", True),
            "gw-1": ("gateway", True),
            "gw-2": ("gateway", True),
            "tr-1": ("transfer", True),
        }
        assert nodes["gw-1"]["version"] == "0.1.0" and isinstance(nodes["gw-1"]["started_at"], float)
        assert str(nodes["gw-2"]["addresses"]["ws"]).startswith("ws://127.0.0.1:")  # type: ignore[index]

        # gw-2 restarts with its presence pointed at a dead Redis port: it runs, but is not ready.
        gw2 = c.nodes["gw-2"]
        healthy_args = list(gw2.args)
        assert gw2.stop() == 0
        gw2.args = [*healthy_args, "--set", f"presence.redis_url=redis://127.0.0.1:{free_port()}/0"]
        await asyncio.to_thread(gw2.start)
        nodes = await asyncio.to_thread(status_json, c)
        assert nodes["gw-2"]["ready"] is False and nodes["gw-1"]["ready"] is True
        assert (await asyncio.to_thread(im_status, c)).returncode == 1  # a node is not ready
        assert await handed_out(http, c.api, alice.access, 40) == {"gw-1"}

        # Healthy again: handed out again.
        assert gw2.stop() == 0
        gw2.args = healthy_args
        await asyncio.to_thread(gw2.start)
        await eventually(both, "gw-2 is handed out again", timeout=20)

        # gw-1 drains (SIGTERM): it leaves the registry first and is never handed out after that.
        gw1 = c.nodes["gw-1"]
        assert gw1.proc is not None
        gw1.proc.terminate()
        await eventually(lambda: "gw-1" not in status_json(c), "gw-1 left the registry", timeout=10)
        assert await handed_out(http, c.api, alice.access, 40) == {"gw-2"}
        assert await asyncio.to_thread(gw1.stop) == 0
