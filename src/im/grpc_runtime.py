"""gRPC's process-wide settings, which it reads once, when ``grpc`` is first imported.

The transfer link and the etcd client run on grpcio. Its default TCP endpoints come from its
EventEngine, whose threads hand every read and write on to the next thread before the asyncio loop gets
it. grpcio's own experiment switches put its channels and servers back on the endpoints it polls itself
(``event_engine_client`` and ``event_engine_listener`` off): measured on the 2-core machine of the
README's performance section with ``benchmarks/transfer_link.py``, a gRPC message then costs both ends
about 28 % less CPU (295 -> 211 µs with TLS, one send per message) and a send about 12 % less with 80
sends per message (14.5 -> 12.7 µs). Every guarantee of the link (TLS, keepalive, flow control) is
grpcio's own on either path.

``im``'s command line applies this before anything imports ``grpc`` (:func:`im.cli.main`); a
``GRPC_EXPERIMENTS`` already in the environment is left as it is, so an operator can turn the
EventEngine back on with ``GRPC_EXPERIMENTS=event_engine_client,event_engine_listener``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: What ``GRPC_EXPERIMENTS`` is when the environment does not set it.
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_client,-event_engine_listener"


def use_grpc_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set :data:`GRPC_EXPERIMENTS_DEFAULT` unless ``GRPC_EXPERIMENTS`` is set. Returns whether it
    applies to this process: False when ``grpc`` was imported already (it read its settings then)."""
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
    return "grpc" not in sys.modules
