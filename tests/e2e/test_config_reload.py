"""``im serve`` on its in-memory registry re-reads its configuration file on SIGHUP: a dynamic setting
changed in the file (a connection's send rate, the shared per-user budget) applies to the connections
already open; a setting that needs a restart is named in
one log line and not applied; a file that no longer loads changes nothing."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

from tests.support.client import ChatClient, register
from tests.support.server import running_server
from tests.support.wait import eventually

_probes = itertools.count()


async def limited(client: ChatClient, to: int, why: str = "") -> bool:
    """Whether three sends in a row meet ``rate_limited`` (with a message containing ``why``): with
    send_rate 1 a connection's bucket holds 2, with sends_per_user 2/60 the user's budget holds 2."""
    # Probes refused before are resent first, in order: a later send of the conversation waits for them
    # (docs/protocol.md section 8, "Sender order").
    refused = dict.fromkeys(str(e["ref"]) for e in client.errors if str(e.get("ref")).startswith("probe-"))
    again = [m for m in refused if m not in client.acks]
    cmids = [f"probe-{next(_probes)}" for _ in range(3)]
    for cmid in again:
        await client.send("probe", to=to, cmid=cmid, wait=False)
    errors_before = len(client.errors)
    for cmid in cmids:
        await client.send("probe", to=to, cmid=cmid, wait=False)
    await client.wait_for(
        lambda: all(m in client.acks or any(e.get("ref") == m for e in client.errors[errors_before:]) for m in cmids)
    )
    return any(
        (e["code"] == "rate_limited" or "resend it first" in e["message"]) and why in e["message"]
        for e in client.errors[errors_before:]
    )


async def test_sighup_applies_dynamic_settings_from_the_file_and_names_the_others(tmp_path: Path) -> None:
    config = tmp_path / "im.yaml"
    config.write_text("limits:\n  send_rate: 1000\n")
    with running_server(tmp_path / "data", ["-c", str(config)]) as server:
        assert server.proc is not None
        alice, bob = await register(server.api, "alice"), await register(server.api, "bob")
        client = ChatClient(server.ws, alice, "phone")
        assert (await client.connect())["t"] == "auth_ok"
        try:
            assert not await limited(client, bob.uid)

            config.write_text("limits:\n  send_rate: 1\ngateway:\n  replay_page: 7\n")
            server.proc.send_signal(signal.SIGHUP)
            await eventually(lambda: limited(client, bob.uid), "send_rate 1 applied to the open connection", timeout=5)
            await eventually(lambda: "need a restart" in server.log(), timeout=5)
            restart = [line for line in server.log().splitlines() if "need a restart" in line]
            assert len(restart) == 1 and "gateway.replay_page" in restart[0] and "send_rate" not in restart[0]

            # The shared per-user budget changes too (the hub's rules), and send_rate goes back up.
            config.write_text("limits:\n  send_rate: 1000\nrates:\n  sends_per_user: 2/60\n")
            server.proc.send_signal(signal.SIGHUP)
            await eventually(
                lambda: limited(client, bob.uid, "user send limit"), "sends_per_user 2/60 applied", timeout=5
            )
            assert len([line for line in server.log().splitlines() if "need a restart" in line]) == 1

            config.write_text("limits:\n  send_rate: fast\n")  # does not load: nothing changes
            server.proc.send_signal(signal.SIGHUP)
            await eventually(lambda: "configuration reload failed" in server.log(), timeout=5)
            assert await limited(client, bob.uid)
        finally:
            await client.close()
