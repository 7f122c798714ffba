"""``im certs``: files made through im.certs, clear messages, nothing overwritten unless asked; and
``im serve`` refuses to start on TLS files it cannot use."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from im import certs
from im.cli import main


def test_ca_then_node_then_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert main(["certs", "ca", "--dir", str(d)]) == 0
    assert "ca.crt (clients trust this one)" in capsys.readouterr().out
    assert main(["certs", "node", "gw-1", "--host", "chat.example.org", "--host", "10.0.0.5", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"im serve --tls-cert {d / 'gw-1.crt'} --tls-key {d / 'gw-1.key'}" in out
    node = certs.load_certificate(d / "gw-1.crt")
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["chat.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert certs.node_identity(node) == "gw-1"
    assert stat.S_IMODE((d / "gw-1.key").stat().st_mode) == 0o600
    assert main(["certs", "client", "ops", "--dir", str(d)]) == 0
    usages = certs.load_certificate(d / "ops.crt").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_node_defaults_to_the_local_names(tmp_path: Path) -> None:
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 0
    assert main(["certs", "node", "server", "--dir", str(tmp_path)]) == 0
    sans = certs.load_certificate(tmp_path / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_nothing_is_overwritten_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "ca.key").read_bytes()
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "exists already; nothing was written (--overwrite replaces it)" in err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert main(["certs", "node", "n1", "--dir", str(tmp_path)]) == 0
    assert main(["certs", "node", "n1", "--dir", str(tmp_path)]) == 1
    assert main(["certs", "node", "n1", "--dir", str(tmp_path), "--overwrite"]) == 0
    assert main(["certs", "ca", "--dir", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "node", "n1", "--dir", str(tmp_path / "empty")]) == 1
    assert f"run `im certs ca --dir {tmp_path / 'empty'}` first" in capsys.readouterr().err
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 0
    assert main(["certs", "node", "ca", "--dir", str(tmp_path)]) == 1  # the CA's own name
    assert "not a usable certificate name" in capsys.readouterr().err
    assert main(["certs", "node", "x", "--days", "0", "--dir", str(tmp_path)]) == 2


def test_serve_refuses_unusable_tls_files(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "im", "serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0"]
    missing = subprocess.run(
        [*cmd, "--tls-cert", str(tmp_path / "no.crt"), "--tls-key", str(tmp_path / "no.key")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert f"tls: {tmp_path / 'no.crt'}: no such file" in missing.stderr
    half = subprocess.run([*cmd, "--tls-cert", str(tmp_path / "no.crt")], capture_output=True, text=True, timeout=60)
    assert half.returncode == 2
    assert "tls.cert_file and tls.key_file go together" in half.stderr
