"""im.tls.ReloadingContext: the server context follows the files, and a broken replacement changes nothing.

Each check is a real handshake over a socket pair: the certificate a client is shown is the proof.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
from pathlib import Path
from typing import cast

import pytest

from im import certs
from im.config import ConfigError, load_config
from im.tls import ReloadingContext, TlsFilesError, server_context


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA and two server certificates (``one``, ``two``); ``live.crt``/``live.key`` start as ``one``."""
    ca = certs.create_ca(tmp_path)
    for name in ("one", "two"):
        certs.issue(tmp_path, ca, name)
    install(tmp_path, "one")
    return tmp_path


def install(d: Path, name: str) -> None:
    """Replace live.crt/live.key by ``name``'s, each by a rename (the key first, as documented)."""
    for ext in ("key", "crt"):
        shutil.copy(d / f"{name}.{ext}", d / f".tmp.{ext}")
        os.replace(d / f".tmp.{ext}", d / f"live.{ext}")


def served_name(context: ssl.SSLContext, ca: Path, *, max_version: ssl.TLSVersion | None = None) -> str:
    """Handshake against ``context`` and return the common name of the certificate the client saw."""
    client = ssl.create_default_context(cafile=ca)
    if max_version is not None:
        client.maximum_version = max_version
    a, b = socket.socketpair()
    server = context.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    tls = client.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
    with server, tls:
        server.setblocking(False)
        tls.setblocking(False)
        for _ in range(100):
            done = 0
            for side in (tls, server):
                try:
                    side.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            if done == 2:
                break
        return peer_name(tls)


def peer_name(tls: ssl.SSLSocket | ssl.SSLObject) -> str:
    """The common name of the certificate the peer showed."""
    cert = tls.getpeercert()
    assert cert is not None
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert["subject"])
    return next(value for rdn in subject for key, value in rdn if key == "commonName")


def test_serves_the_files(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    assert served_name(ctx.context, pki / "ca.crt") == "one"
    assert ctx.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.context.options & ssl.OP_NO_COMPRESSION
    assert ctx.context.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.context.verify_mode is ssl.CERT_NONE  # no client certificates on the client listeners


def test_check_reloads_only_when_the_files_change(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    first = ctx.context
    assert ctx.check() is False
    assert ctx.context is first
    install(pki, "two")
    assert ctx.check() is True
    assert ctx.context is not first
    assert served_name(ctx.context, pki / "ca.crt") == "two"
    assert ctx.check() is False  # nothing changed since
    assert ctx.reloads == 1


def test_reload_reads_the_files_even_unchanged(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    first = ctx.context
    assert ctx.reload() is True
    assert ctx.context is not first


def test_a_broken_replacement_keeps_the_old_context(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    first = ctx.context
    (pki / "live.crt").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    with caplog.at_level(logging.ERROR, logger="im.tls"):
        assert ctx.check() is False
        assert ctx.check() is False  # the same broken file: not retried, not logged again
    assert ctx.context is first
    assert served_name(ctx.context, pki / "ca.crt") == "one"
    assert ctx.failures == 1
    assert len([r for r in caplog.records if "does not load" in r.message]) == 1
    install(pki, "two")  # fixed: the next check picks it up
    assert ctx.check() is True
    assert served_name(ctx.context, pki / "ca.crt") == "two"


def test_a_key_that_does_not_match_keeps_the_old_context(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    first = ctx.context
    shutil.copy(pki / "two.crt", pki / "live.crt")  # the certificate of two, the key of one
    assert ctx.check() is False
    assert ctx.context is first
    assert ctx.reload() is False
    assert served_name(ctx.context, pki / "ca.crt") == "one"


def test_missing_files_keep_the_old_context_until_they_return(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key")
    first = ctx.context
    os.rename(pki / "live.crt", pki / "gone.crt")
    assert ctx.check() is False
    assert ctx.reload() is False
    assert ctx.context is first
    os.rename(pki / "gone.crt", pki / "live.crt")
    assert ctx.check() is True


def test_tls_1_3_only_refuses_a_1_2_client(pki: Path) -> None:
    ctx = ReloadingContext(pki / "live.crt", pki / "live.key", min_version="1.3")
    assert served_name(ctx.context, pki / "ca.crt") == "one"
    with pytest.raises(ssl.SSLError):
        served_name(ctx.context, pki / "ca.crt", max_version=ssl.TLSVersion.TLSv1_2)


def test_unusable_files_at_start_are_an_error_naming_them(pki: Path) -> None:
    with pytest.raises(TlsFilesError, match=r"nope\.crt: no such file"):
        server_context(pki / "nope.crt", pki / "live.key")
    with pytest.raises(TlsFilesError, match="not a PEM certificate chain"):
        server_context(pki / "live.key", pki / "live.key")
    with pytest.raises(TlsFilesError, match="version"):
        server_context(pki / "live.crt", pki / "live.key", min_version="1.1")


def test_warns_about_a_key_readable_by_others(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    (pki / "live.key").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="im.tls"):
        ReloadingContext(pki / "live.crt", pki / "live.key")
    assert any("readable by other users" in r.message for r in caplog.records)


def test_config_wants_both_files_or_neither(tmp_path: Path) -> None:
    assert not load_config(None, {}).tls.enabled
    with pytest.raises(ConfigError, match=r"tls\.cert_file and tls\.key_file go together"):
        load_config(None, {"tls": {"cert_file": str(tmp_path / "a.crt")}})
    on = load_config(None, {"tls": {"cert_file": "a.crt", "key_file": "a.key"}}).tls
    assert on.enabled and on.min_version == "1.2" and on.handshake_timeout == 10.0
    assert on.hsts_max_age == 365 * 24 * 3600
    with pytest.raises(ConfigError, match="min_version"):
        load_config(None, {"tls": {"min_version": "1.1"}})
