"""The TCP forwarder the engine tests put in front of RabbitMQ, PostgreSQL or S3 to cut it off at will.

:class:`TcpProxy` is :class:`im.faultproxy.FaultProxy` (latency, bandwidth, slicing, resets, blackholes,
cuts: see that module) under its older name, with :meth:`TcpProxy.stop` for a cut: it stops listening
**and resets every open connection** (both sides see a reset, as when the engine dies or the network
goes); :meth:`TcpProxy.start` listens again on the same port.
"""

from __future__ import annotations

from im.faultproxy import FaultProxy


class TcpProxy(FaultProxy):
    def stop(self) -> None:
        """Stop listening and reset every forwarded connection. New connects are refused."""
        self.cut()
