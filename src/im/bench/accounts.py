"""Accounts and groups for a bench run, made through the SDK's :class:`~im.client.ApiClient`."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from im.client import ApiClient, ApiError, Gateway, Tokens

__all__ = ["BenchUser", "assign_gateways", "create_groups", "create_users", "gateway", "run_id"]

PASSWORD = "bench-password-1"


@dataclass(frozen=True, slots=True)
class BenchUser:
    index: int
    uid: int
    username: str
    token: str  # access token (the bench runs well within its lifetime)
    ws: str = ""  # the gateway the server handed this user (empty: the run's default)
    tcp: str | None = None


def _tokens(user: BenchUser) -> Tokens:
    """An API client's tokens from a saved access token (no refresh token: the run is short)."""
    return Tokens(access_token=user.token, refresh_token="", expires_in=900, uid=user.uid)


def run_id() -> str:
    """A short random tag that keeps this run's user names apart from any earlier run's."""
    return secrets.token_hex(4)


async def create_users(
    base_url: str,
    n: int,
    prefix: str,
    *,
    concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[BenchUser]:
    """Register and log in ``n`` users named ``<prefix><i>``; return them with their access tokens."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> BenchUser:
            async with sem:
                api = ApiClient(base_url, http=http)
                name = f"{prefix}{i}"
                try:
                    await api.register(name, PASSWORD)
                except ApiError as exc:
                    if exc.code != "conflict":
                        raise
                tokens = await api.login(name, PASSWORD)
                if progress is not None:
                    progress(1)
                return BenchUser(i, tokens.uid, name, tokens.access_token)

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def create_groups(base_url: str, groups: list[list[BenchUser]], prefix: str) -> list[str]:
    """Create one group per list of users (the first one owns it); return the conversation ids."""
    async with httpx.AsyncClient(timeout=60) as http:
        sem = asyncio.Semaphore(8)

        async def one(i: int, members: list[BenchUser]) -> str:
            async with sem:
                owner = members[0]
                api = ApiClient(base_url, http=http, tokens=_tokens(owner))
                group = await api.create_group(f"{prefix}g{i}", members=[m.uid for m in members[1:]])
                return group.conv

        return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(groups))))


async def assign_gateways(base_url: str, users: list[BenchUser]) -> list[BenchUser]:
    """Ask the server for a gateway for every user, as each client would (a cluster spreads them)."""
    sem = asyncio.Semaphore(32)

    async def one(user: BenchUser) -> BenchUser:
        async with sem:
            gw = await gateway(base_url, user)
        return dataclasses.replace(user, ws=gw.ws, tcp=gw.tcp)

    return list(await asyncio.gather(*(one(u) for u in users)))


async def gateway(base_url: str, user: BenchUser) -> Gateway:
    """The gateway the server hands out (``ws`` URL, ``tcp`` address)."""
    async with ApiClient(base_url, tokens=_tokens(user)) as api:
        return await api.gateway()
