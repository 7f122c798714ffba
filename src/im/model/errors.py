"""The error vocabulary: protocol/HTTP error codes with :class:`ImError`, and the two store
conflicts the core handles.

One vocabulary for the chat protocol and the HTTP API (docs/protocol.md, "Errors"): an ``error`` frame
and an HTTP error body both carry ``{code, message}``."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"  # not decodable, or fields of the wrong type / missing
    UNKNOWN_TYPE = "unknown_type"  # a frame kind the server does not know
    TOO_LARGE = "too_large"  # frame or body above the configured limit
    UNAUTHENTICATED = "unauthenticated"  # a frame other than auth before auth
    AUTH_FAILED = "auth_failed"  # token invalid, expired or revoked
    ALREADY_AUTHENTICATED = "already_authenticated"
    NOT_MEMBER = "not_member"  # sender or reader is not a member of the conversation
    NOT_FOUND = "not_found"  # unknown user, group or conversation
    INVALID = "invalid"  # well-formed but unacceptable value
    RATE_LIMITED = "rate_limited"
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"  # more unacked sends than the server allows per connection
    UNAVAILABLE = "unavailable"  # storage failed or the server is stopping: retry later, same cmid
    INTERNAL = "internal"
    # HTTP API only
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    BAD_CREDENTIALS = "bad_credentials"
    # bye codes
    IDLE_TIMEOUT = "idle_timeout"
    AUTH_TIMEOUT = "auth_timeout"
    SHUTDOWN = "shutdown"
    SLOW_CONSUMER = "slow_consumer"
    REPLACED = "replaced"  # the same device connected again; this older connection is closed


class ImError(Exception):
    """A refusal with a protocol error code; safe to show to the client. ``retry_after``: seconds after
    which the same request may succeed (rate limits, overload); None when retrying sooner is fine or
    pointless."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        ref: str | None = None,
        retry_after: float | None = None,
        *,
        gateway: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref  # the cmid of the refused send, when the refusal is about one
        self.retry_after = retry_after  # seconds until a retry can succeed, when the refusal knows
        #: A send refused at the gateway, before any committer saw it (no transfer link): the gateway's
        #: session holds that conversation's later sends back (im.model.send_order); a committer holds its own.
        self.gateway = gateway


class SeqConflict(Exception):
    """Another writer got there first (head moved, seq taken or cmid used): reload and retry."""


class FenceRefused(Exception):
    """A commit carried a fencing token (``CommitBatch.fence``) lower than the one the store records for
    its node id: another process claimed that node id since. Nothing was written; the committer stops
    minting under that id and claims one again (im.backends.node_ids)."""

    def __init__(self, node_id: int, token: int, held: int | None = None) -> None:
        super().__init__(f"node id {node_id} is fenced: this batch carries token {token}, the store holds {held}")
        self.node_id, self.token, self.held = node_id, token, held


class Conflict(Exception):
    """A unique value (user name, ...) is taken."""
