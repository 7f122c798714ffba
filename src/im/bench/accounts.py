"""Accounts and groups for a bench run, made through the SDK's :class:`~im.client.ApiClient`."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from im.client import ApiClient, ApiError, Gateway, Tokens
from im.client.tls import client_context

__all__ = ["BenchTls", "BenchUser", "assign_gateways", "create_groups", "create_users", "gateway", "run_id"]


@dataclass(frozen=True, slots=True)
class BenchTls:
    """TLS options of every client of a run (HTTP API and gateway connections); picklable, so they reach
    the client processes. ``ca_file``: trust only this CA (None: the system store);
    ``insecure_skip_verify``: verify nothing (the command line warns once for the whole run)."""

    ca_file: str | None = None
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        """One client context for all of a process's connections (built once: it loads the CA file)."""
        return client_context(ca_file=self.ca_file, insecure_skip_verify=self.insecure_skip_verify)

    def http(self, **kwargs: object) -> httpx.AsyncClient:
        """An HTTP client verifying as configured (no redirects: none may lead from https to http)."""
        return httpx.AsyncClient(verify=self.context(), follow_redirects=False, **kwargs)  # type: ignore[arg-type]


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
    tls: BenchTls = BenchTls(),
) -> list[BenchUser]:
    """Register and log in ``n`` users named ``<prefix><i>``; return them with their access tokens."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with tls.http(timeout=60, limits=limits) as http:
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


async def create_groups(
    base_url: str, groups: list[list[BenchUser]], prefix: str, *, tls: BenchTls = BenchTls()
) -> list[str]:
    """Create one group per list of users (the first one owns it); return the conversation ids."""
    async with tls.http(timeout=60) as http:
        sem = asyncio.Semaphore(8)

        async def one(i: int, members: list[BenchUser]) -> str:
            async with sem:
                owner = members[0]
                api = ApiClient(base_url, http=http, tokens=_tokens(owner))
                group = await api.create_group(f"{prefix}g{i}", members=[m.uid for m in members[1:]])
                return group.conv

        return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(groups))))


async def assign_gateways(base_url: str, users: list[BenchUser], *, tls: BenchTls = BenchTls()) -> list[BenchUser]:
    """Ask the server for a gateway for every user, as each client would (a cluster spreads them)."""
    sem = asyncio.Semaphore(32)
    async with tls.http(timeout=60) as http:

        async def one(user: BenchUser) -> BenchUser:
            async with sem:
                gw = await ApiClient(base_url, http=http, tokens=_tokens(user)).gateway()
            return dataclasses.replace(user, ws=gw.ws, tcp=gw.tcp)

        return list(await asyncio.gather(*(one(u) for u in users)))


async def gateway(base_url: str, user: BenchUser, *, tls: BenchTls = BenchTls()) -> Gateway:
    """The gateway the server hands out (``ws`` URL, ``tcp`` address; ``wss://``/``tls://`` with TLS)."""
    async with tls.http(timeout=60) as http:
        return await ApiClient(base_url, http=http, tokens=_tokens(user)).gateway()
