"""The token-signing secret a process makes in its data directory when none is configured: nodes of a
cluster that share the directory and start at the same moment must all sign with the same one (seen in
a full run as an API node refusing to start: it read the file while another node was writing it)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from im.compose_security import load_secret
from im.config import Config, load_config


def _all_at_once(config: Config, nodes: int) -> list[bytes | BaseException]:
    start = threading.Barrier(nodes)
    got: list[bytes | BaseException] = []

    def node() -> None:
        start.wait()
        try:
            got.append(load_secret(config))
        except BaseException as exc:
            got.append(exc)

    threads = [threading.Thread(target=node) for _ in range(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_nodes_creating_the_secret_at_once_all_read_the_same_whole_one(tmp_path: Path) -> None:
    for round_ in range(30):
        config = load_config(None, {"data_dir": str(tmp_path / str(round_))})
        got = _all_at_once(config, 8)
        assert len(set(got)) == 1, got
        secret = got[0]
        assert isinstance(secret, bytes) and len(secret) >= 48, secret
        path = config.data_dir / "secret.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary file left
