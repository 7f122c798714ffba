"""gRPC's process-wide settings, which it reads once, when ``grpc`` is first imported.

The transfer link and the etcd client run on grpcio. Its default TCP endpoints come from its
EventEngine, whose threads hand every read and write on to the next thread before the asyncio loop gets
it. grpcio's own experiment switches put its channels and servers back on the endpoints it polls itself
(``event_engine_client`` and ``event_engine_listener`` off): a gRPC message then costs both ends about a
quarter less CPU (``benchmarks/transfer_link.py``; the figures are in
docs/performance.md). Every guarantee of the link (TLS, keepalive, flow control) is
grpcio's own on either path.

``im``'s command line applies this before anything imports ``grpc`` (:func:`im.cli.main`); a
``GRPC_EXPERIMENTS`` already in the environment is left as it is, so an operator can turn the
EventEngine back on with ``GRPC_EXPERIMENTS=event_engine_client,event_engine_listener``.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: What ``GRPC_EXPERIMENTS`` is when the environment does not set it.
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_client,-event_engine_listener"


def use_grpc_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set :data:`GRPC_EXPERIMENTS_DEFAULT` unless ``GRPC_EXPERIMENTS`` is set (it applies only if
    ``grpc`` is imported after this)."""
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
