"""The SDK honours the server's ``retry_after`` (error frames, HTTP 429/503)."""

from __future__ import annotations

import httpx
import pytest

from im.client import ApiClient, ApiError
from im.protocol.frames import Error
from tests.client.test_session import opened, out, srv


def test_session_keeps_the_longest_retry_after_until_retry() -> None:
    s = opened()
    a, b = s.send("a", to=2), s.send("b", to=2)
    s.data_to_send()
    s.receive(srv(Error(code="rate_limited", message="user send limit reached", ref=a.cmid, retry_after=2.5)))
    s.receive(srv(Error(code="rate_limited", message="user send limit reached", ref=b.cmid, retry_after=0.5)))
    assert s.wants_retry and s.retry_after == 2.5  # the pump waits at least this long before retry()
    s.retry()
    assert s.retry_after == 0.0
    assert out(s) == [a, b]


def test_refusal_without_retry_after_leaves_the_pumps_own_delay() -> None:
    s = opened()
    a = s.send("a", to=2)
    s.data_to_send()
    s.receive(srv(Error(code="unavailable", message="storage", ref=a.cmid)))
    assert s.wants_retry and s.retry_after == 0.0


async def test_api_error_carries_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"code": "rate_limited", "message": "too many login attempts; retry in 42 s", "retry_after": 42}
        return httpx.Response(429, json=body, headers={"Retry-After": "42"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://im") as http:
        api = ApiClient("http://im", http=http)
        with pytest.raises(ApiError) as refused:
            await api.login("alice", "password123")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after == 42
