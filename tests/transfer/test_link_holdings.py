"""The transfer node's table of the users each gateway holds (``Hello.held``, ``GatewayFrame.holdings``,
``TransferFrame.holdings_applied``): it routes by the table, not by Presence, and a gateway learns when
a change is in it. Real gRPC on loopback, a real Committer on SQLite; Presence stays empty throughout
unless a test says otherwise, so every delivery here was routed by the table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from typing import Any

import grpc

from im.core.committer import SendRequest
from im.model.cluster import DeviceLocation
from im.transfer.client import TransferLink
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.wire import SERVICE_NAME
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results


class HoldingSink(RecordingSink):
    """A gateway's hub stand-in that reports the users it holds (``held``, changed by the test)."""

    def __init__(self, held: Collection[int] = ()) -> None:
        super().__init__()
        self.held = set(held)

    def held_users(self) -> Collection[int]:
        return list(self.held)


async def user(core: Core, name: str) -> int:
    """An account, announced nowhere in Presence."""
    return (await core.accounts.create_user(name, name.title(), "hash", 1)).uid


def send(uid: int, to: int, cmid: str) -> SendRequest:
    return SendRequest(uid=uid, device="d1", cmid=cmid, conv=None, to=to, type="text", body=b'{"text":"hi"}')


async def test_deliveries_follow_the_table_in_the_hello_with_presence_empty(core: Core) -> None:
    alice, bob = await user(core, "alice"), await user(core, "bob")
    sink_a, sink_b = HoldingSink([alice]), HoldingSink([bob])
    link_a = await core.link("gw-a", sink_a)
    await core.link("gw-b", sink_b)
    assert core.router.holders({alice, bob}) == {alice: {"gw-a"}, bob: {"gw-b"}}

    results = Results()
    for i in range(5):
        link_a.submit(send(alice, bob, f"c{i}"), results.done)
    await eventually(lambda: len(sink_b.messages) == 5 and len(sink_a.messages) == 5)
    assert [m.seq for m, _ in sink_b.messages] == [1, 2, 3, 4, 5]
    assert {tuple(uids) for _, uids in sink_b.messages} == {(bob,)}
    assert {tuple(uids) for _, uids in sink_a.messages} == {(alice,)}
    assert await core.presence.locate([alice, bob]) == {}  # presence had nothing to say


async def test_an_announced_user_is_in_the_table_when_its_future_is_done(core: Core) -> None:
    alice, bob = await user(core, "alice"), await user(core, "bob")
    sink_a, sink_b = HoldingSink([alice]), HoldingSink()
    link_a = await core.link("gw-a", sink_a)
    link_b = await core.link("gw-b", sink_b)
    assert core.router.holders({bob}) == {}

    sink_b.held.add(bob)
    done = link_b.announce(bob, True)
    assert done is not None and not done.done()
    await asyncio.wait_for(done, 5)
    assert core.router.holders({bob}) == {bob: {"gw-b"}}  # in the table when the future is done

    results = Results()
    link_a.submit(send(alice, bob, "c1"), results.done)
    await eventually(lambda: len(sink_b.messages) == 1)

    sink_b.held.discard(bob)
    assert link_b.announce(bob, False) is None  # nobody waits for a user to leave
    await eventually(lambda: core.router.holders({bob}) == {})
    link_a.submit(send(alice, bob, "c2"), results.done)
    await eventually(lambda: len(sink_a.messages) == 2)
    await asyncio.sleep(0.1)
    assert len(sink_b.messages) == 1  # not routed to gw-b once bob left it


async def test_a_node_s_table_leaves_with_its_stream_and_a_new_stream_brings_its_own(core: Core) -> None:
    alice, bob = await user(core, "alice"), await user(core, "bob")
    sink = HoldingSink([alice])
    link = await core.link("gw-a", sink)
    assert core.router.holders({alice, bob}) == {alice: {"gw-a"}}
    await link.close()
    await eventually(lambda: core.router.holders({alice}) == {})

    sink2 = HoldingSink([bob])
    await core.link("gw-a", sink2)  # the same node again, holding someone else now
    assert core.router.holders({alice, bob}) == {bob: {"gw-a"}}
    assert sink2.catch_ups == 1  # the new stream's sessions check the log (nothing was routed to them)


async def test_a_gateway_that_reports_no_table_sends_every_lookup_to_presence(core: Core) -> None:
    alice, bob = await user(core, "alice"), await user(core, "bob")
    link_a = await core.link("gw-a", HoldingSink([alice]))
    legacy = RecordingSink()  # held_users() is None: an older gateway, routed by Presence
    link_b = await core.link("gw-b", legacy)
    assert core.router.holders({alice, bob}) is None
    assert link_b.announce(bob, True) is None  # its stream carries no table: nothing to announce

    await core.presence.set_online([DeviceLocation(bob, "d1", "gw-b")], ttl=600)
    results = Results()
    link_a.submit(send(alice, bob, "c1"), results.done)
    await eventually(lambda: len(legacy.messages) == 1)  # found through presence
    await link_b.close()
    await eventually(lambda: core.router.holders({alice}) == {alice: {"gw-a"}})


async def test_the_welcome_s_catch_up_waits_for_changes_made_after_the_hello(core: Core) -> None:
    """A user announced after the hello left but before the welcome came is not in the table the
    welcome answers: the sessions' catch-up that the welcome starts must wait until it is, or a message
    routed by the older table in between would pass that user's session by."""
    bob = await user(core, "bob")
    seen_at_catch_up: list[Any] = []
    announced_before_welcome: list[bool] = []

    class Sink(HoldingSink):
        def held_users(self) -> Collection[int]:
            held = super().held_users()
            asyncio.get_running_loop().call_soon(self.hold_bob)  # right after the hello is taken
            return held

        def hold_bob(self) -> None:
            announced_before_welcome.append(not link.connected)
            self.held.add(bob)
            link.announce(bob, True)

        def catch_up(self) -> None:
            super().catch_up()
            seen_at_catch_up.append(core.router.holders({bob}))

    class SlowHoldings(TransferLink):
        """Writes a frame of holdings 0.3 s late: the welcome arrives well before they are applied."""

        async def _next_frame(self, epoch: int) -> Any:
            frame = await super()._next_frame(epoch)
            if frame is not None and frame.holdings:
                await asyncio.sleep(0.3)
            return frame

    link = SlowHoldings(core.address, "gw-b", Sink(), backoff_initial=0.02, backoff_max=0.2)
    core.links.append(link)
    link.start()
    await asyncio.wait_for(link.wait_connected(), 10)
    await eventually(lambda: seen_at_catch_up, timeout=5)
    assert announced_before_welcome == [True]  # the test's premise
    assert seen_at_catch_up == [{bob: {"gw-b"}}]


async def test_a_transfer_node_that_does_not_route_by_tables_holds_no_login_up() -> None:
    """An older transfer node: its welcome lacks ``routes_by_held`` and it never sends
    ``holdings_applied``. A login announced before that welcome is released by it, and later
    announcements wait for nothing (presence routes there)."""
    hellos: list[pb.Hello] = []

    async def old_link(requests: AsyncIterator[pb.GatewayFrame], context: Any) -> None:
        it = requests.__aiter__()
        hellos.append((await it.__anext__()).hello)
        await asyncio.sleep(0.2)  # the gateway announces a user meanwhile
        await context.write(pb.TransferFrame(welcome=pb.Welcome(node="tr-old")))
        async for _ in it:
            pass

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Link": grpc.stream_stream_rpc_method_handler(
                old_link,
                request_deserializer=pb.GatewayFrame.FromString,
                response_serializer=pb.TransferFrame.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    early: list[asyncio.Future[None] | None] = []

    class Sink(HoldingSink):
        def held_users(self) -> Collection[int]:
            asyncio.get_running_loop().call_soon(lambda: early.append(link.announce(7, True)))
            return super().held_users()

    link = TransferLink(f"127.0.0.1:{port}", "gw-a", Sink([3]), backoff_initial=0.02, backoff_max=0.2)
    link.start()
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        assert hellos[0].holds_users and list(hellos[0].held) == [3]
        (waiting,) = early
        assert waiting is not None and waiting.done() and not waiting.cancelled()  # released by the welcome
        assert link.announce(8, True) is None  # nothing to wait for on this stream
    finally:
        await link.close()
        await server.stop(None)
