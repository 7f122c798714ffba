"""Certificates for tests of TLS to the engines: one CA, a server certificate for 127.0.0.1/localhost,
a client certificate, and a CA nobody trusts (all from :mod:`im.certs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from im import certs


@dataclass(frozen=True)
class EnginePki:
    dir: Path
    ca: certs.Issued
    server: certs.Issued
    client: certs.Issued
    #: A certificate of another CA, for "a client the engine must refuse".
    stranger: certs.Issued

    @classmethod
    def create(cls, directory: Path) -> EnginePki:
        ca = certs.create_ca(directory)
        other = certs.create_ca(directory / "other", common_name="an unrelated CA")
        return cls(
            directory,
            ca,
            certs.issue(directory, ca, "engine", hosts=("localhost", "127.0.0.1")),
            certs.issue(directory, ca, "im-client", server=False),
            certs.issue(directory / "other", other, "stranger", server=False),
        )
