"""Files across API nodes on an S3 store: a cluster with two API nodes and a private SeaweedFS
(``LocalCluster(s3=True)``, what ``im cluster --s3`` runs, with encryption at rest on); an upload through
one API node downloads, whole and by range, through the other; the bucket holds it once, sealed; nothing is
kept in a node's local directory. Sent as a file message (committed by a transfer node, which keys the
file ref), it downloads for the recipient through either API node and for no stranger; the PostgreSQL
file tables hold no file hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import obstore
import pytest

from im.backends.blobs.s3 import S3Settings
from im.cluster import LocalCluster
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import ChatClient, register
from tests.support.keys import SEALED_MAGIC
from tests.support.postgres import connect


@pytest.fixture
def s3_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster", apis=2, s3=True, gateways=1, transfers=1).start()
    try:
        yield c
    finally:
        stop_checked(c)
        assert c.weed is not None
        c.weed.destroy()


async def test_an_upload_through_one_api_node_downloads_through_another(s3_cluster: LocalCluster) -> None:
    c = s3_cluster
    first, second = c.api_url(1), c.api_url(2)
    alice = await register(first, "alice")
    data = os.urandom(300_000)
    async with httpx.AsyncClient(headers=alice.auth, timeout=30) as http:
        r = await http.post(f"{first}/files", files={"file": ("notes.bin", data, "application/octet-stream")})
        assert r.status_code == 201, r.text
        file_id = r.json()["file_id"]
        assert file_id == hashlib.sha256(data).hexdigest()

        r = await http.get(f"{second}/files/{file_id}")
        assert r.status_code == 200, r.text
        assert r.content == data
        r = await http.get(f"{second}/files/{file_id}", headers={"Range": "bytes=100000-100099"})
        assert r.status_code == 206, r.text
        assert r.content == data[100_000:100_100]
        assert r.headers["content-range"] == f"bytes 100000-100099/{len(data)}"

        # The same bytes through the second node: the same file, one object in the bucket.
        r = await http.post(f"{second}/files", files={"file": ("again.bin", data, "application/octet-stream")})
        assert r.status_code == 200 and r.json()["file_id"] == file_id, r.text

    assert c.weed is not None
    store = S3Settings(
        bucket=c.weed.bucket,
        endpoint=c.weed.endpoint,
        access_key_id=c.weed.access_key_id,
        secret_access_key=c.weed.secret_access_key,
        allow_http=True,
    ).client()
    # One object, sealed (the cluster runs with encryption at rest on): under a keyed name, not the hash.
    [key] = [meta["path"] for page in obstore.list(store) for meta in page]
    assert key.startswith("sealed/") and file_id not in key
    stored = bytes(obstore.get(store, key).bytes())
    assert stored[:8] == SEALED_MAGIC and data[:1000] not in stored
    assert not (c.data_dir / "files").exists()  # no API node kept a local copy

    # Sent to Bob through a gateway: the transfer node's commit writes the file ref under the keyed id
    # that the API nodes look up.
    bob, eve = await register(first, "bob"), await register(first, "eve")
    gw = next(n for n, node in c.nodes.items() if node.role == "gateway")
    sender = ChatClient(f"ws://127.0.0.1:{c.nodes[gw].ports['ws']}/ws", alice, "phone")
    await sender.connect()
    try:
        ack = await sender.send({"file_id": file_id, "name": "notes.bin"}, to=bob.uid, type="file")
        assert ack is not None, sender.errors
    finally:
        await sender.close()
    for api in (first, second):
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.get(f"{api}/files/{file_id}", headers=bob.auth)
            assert r.status_code == 200 and r.content == data, r.text[:200]
            assert (await http.get(f"{api}/files/{file_id}", headers=eve.auth)).status_code == 404
    conn = await connect()
    try:
        schema = c.postgres_schema
        rows = [
            str(tuple(r))
            for table in ("files", "file_owners", "file_refs")
            for r in await conn.fetch(f'SELECT * FROM "{schema}".{table}')
        ]
    finally:
        await conn.close()
    assert len(rows) == 3 and not [r for r in rows if file_id in r]  # a file, its uploader, a ref: all keyed
