"""Files over real HTTP (and WebSocket, for sending them) against a running ``im serve``.

Every test makes its own users (unique names), so the tests share one server safely.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.checker import History
from tests.support.client import Account, register
from tests.support.server import ServerProcess

MAX_UPLOAD = 20 * 1024 * 1024  # files.max_upload_bytes default


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.api, timeout=30) as client:
        yield client


async def user(server: ServerProcess, prefix: str) -> Account:
    return await register(server.api, f"{prefix}_{uuid.uuid4().hex[:8]}")


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


async def upload(
    api: httpx.AsyncClient,
    who: Account,
    data: bytes,
    name: str = "f.bin",
    content_type: str = "application/octet-stream",
) -> httpx.Response:
    return await api.post("/files", headers=who.auth, files={"file": (name, data, content_type)})


def blobs(server: ServerProcess) -> list[Path]:
    root = server.data_dir / "files"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")


def staging(server: ServerProcess) -> list[Path]:
    return sorted((server.data_dir / "files" / "tmp").iterdir())


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["code"] == code, r.text


async def test_same_bytes_from_two_users_one_id_one_blob(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    r1 = await upload(api, alice, data, "a.bin")
    r2 = await upload(api, bob, data, "b.bin")
    r3 = await upload(api, bob, data, "b-again.bin")
    assert (r1.status_code, r2.status_code, r3.status_code) == (201, 201, 200), (r1.text, r2.text, r3.text)
    one, two = r1.json(), r2.json()
    assert one["file_id"] == two["file_id"] == r3.json()["file_id"] == one["sha256"] == sha
    assert (one["name"], two["name"], r3.json()["name"]) == ("a.bin", "b.bin", "b.bin")
    assert one["size"] == len(data) and one["content_type"] == "application/octet-stream"
    found = blobs(server)
    assert len(found) == 1  # stored once, sealed (docs/security.md, Encryption): neither named nor holding it
    assert found[0].name != sha and data[:4096] not in found[0].read_bytes()
    # both uploaders may download it
    for who in (alice, bob):
        r = await api.get(f"/files/{sha}", headers=who.auth)
        assert r.status_code == 200 and r.content == data


async def test_download_headers_and_etag(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    data = png()
    file_id = (await upload(api, alice, data, "pic.png", "image/png")).json()["file_id"]
    r = await api.get(f"/files/{file_id}", headers=alice.auth)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"{file_id}"'
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "pic.png" in r.headers["content-disposition"]
    r = await api.get(f"/files/{file_id}", headers={**alice.auth, "If-None-Match": f'"{file_id}"'})
    assert r.status_code == 304 and r.content == b""
    r = await api.get(f"/files/{file_id}/info", headers=alice.auth)
    assert r.status_code == 200
    assert r.json() == {
        "file_id": file_id,
        "sha256": file_id,
        "size": len(data),
        "content_type": "image/png",
        "width": 64,
        "height": 48,
        "name": "pic.png",
    }
    r = await api.get(f"/files/{file_id}")
    assert_error(r, 401, "unauthenticated")


async def test_a_stranger_who_knows_the_hash_sees_nothing(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice, mallory = await user(server, "alice"), await user(server, "mallory")
    data = b"alice's diary " * 100
    sha = hashlib.sha256(data).hexdigest()
    assert (await upload(api, alice, data)).status_code == 201
    assert (await api.get(f"/files/by-hash/{sha}", headers=alice.auth)).json()["file_id"] == sha
    unknown = hashlib.sha256(b"nobody uploaded this").hexdigest()
    for path in (f"/files/by-hash/{sha}", f"/files/{sha}", f"/files/{sha}/info"):
        r = await api.get(path, headers=mallory.auth)
        assert_error(r, 404, "not_found")
        # exactly what an unknown file looks like
        other = await api.get(path.replace(sha, unknown), headers=mallory.auth)
        assert_error(other, 404, "not_found")
        assert r.json()["message"].replace(sha, unknown) == other.json()["message"]
    # uploading the bytes proves possession: then mallory may read it (and is told it is new to her)
    r = await upload(api, mallory, data, "mine.txt")
    assert r.status_code == 201 and r.json()["file_id"] == sha
    assert (await api.get(f"/files/{sha}", headers=mallory.auth)).content == data


async def test_oversize_upload_is_refused_and_leaves_nothing(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    r = await upload(api, alice, b"\0" * (MAX_UPLOAD + 1), "big.bin")
    assert_error(r, 413, "too_large")
    r = await upload(api, alice, b"\0" * (MAX_UPLOAD + 5 * 1024 * 1024), "bigger.bin")  # refused by length
    assert_error(r, 413, "too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="c.bin"\r\n\r\n'
        for _ in range(MAX_UPLOAD // (1024 * 1024) + 2):
            yield b"\1" * (1024 * 1024)
        yield b"\r\n--bnd--\r\n"

    headers = {**alice.auth, "Content-Type": "multipart/form-data; boundary=bnd"}
    try:
        r = await api.post("/files", headers=headers, content=chunked())
    except httpx.TransportError:
        pass  # the server may answer and close before the client has finished sending: also a refusal
    else:
        assert_error(r, 413, "too_large")
    assert blobs(server) == [] and staging(server) == []
    # the largest allowed size still goes through
    data = b"\2" * MAX_UPLOAD
    r = await upload(api, alice, data, "max.bin")
    assert r.status_code == 201 and r.json()["size"] == MAX_UPLOAD
    assert len(blobs(server)) == 1 and blobs(server)[0].name != hashlib.sha256(data).hexdigest()


async def test_a_lying_content_type_is_refused(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    r = await upload(api, alice, b"MZ this is no png" * 10, "x.png", "image/png")
    assert_error(r, 400, "invalid")
    assert "content type does not match" in r.json()["message"]
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    r = await upload(api, alice, jpeg.getvalue(), "x.png", "image/png")
    assert_error(r, 400, "invalid")
    assert blobs(server) == []


async def test_png_gets_its_size(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    r = await upload(api, alice, png((123, 45)), "p.png", "image/png")
    assert r.status_code == 201, r.text
    assert (r.json()["content_type"], r.json()["width"], r.json()["height"]) == ("image/png", 123, 45)
    # the declared type is not needed: the bytes say what it is
    r = await upload(api, alice, png((10, 20)), "noname", "application/octet-stream")
    assert (r.json()["content_type"], r.json()["width"], r.json()["height"]) == ("image/png", 10, 20)


async def test_other_bytes_get_the_sniffed_type_or_octet_stream(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    r = await upload(api, alice, b"<html><script>alert(1)</script></html>", "x.html", "text/html")
    assert r.status_code == 201
    assert (r.json()["content_type"], r.json()["width"]) == ("application/octet-stream", None)
    r = await api.get(f"/files/{r.json()['file_id']}", headers=alice.auth)
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment")
    r = await upload(api, alice, b"%PDF-1.4\n" + b"1" * 200, "doc.pdf", "application/pdf")
    assert r.json()["content_type"] == "application/pdf"


async def test_bad_upload_requests(server: ServerProcess, api: httpx.AsyncClient) -> None:
    alice = await user(server, "alice")
    r = await api.post("/files", headers=alice.auth, files={"other": ("x", b"data")})
    assert_error(r, 400, "invalid")
    r = await api.post("/files", headers=alice.auth, json={"file": "nope"})
    assert_error(r, 400, "invalid")
    r = await upload(api, alice, b"", "empty.bin")
    assert_error(r, 400, "invalid")
    r = await api.post("/files", files={"file": ("x", b"data")})
    assert_error(r, 401, "unauthenticated")
    assert blobs(server) == []


async def test_recipient_of_a_file_message_may_download(
    server: ServerProcess, api: httpx.AsyncClient, history: History
) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    data = png((30, 30))
    file_id = (await upload(api, alice, data, "x.png", "image/png")).json()["file_id"]
    assert_error(await api.get(f"/files/{file_id}", headers=bob.auth), 404, "not_found")
    a = history.client(alice, "phone")
    b = history.client(bob, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    body: dict[str, Any] = {"file_id": file_id, "name": "x.png"}
    ack = await a.send(body, to=bob.uid, type="image")
    assert ack is not None, a.errors
    got = await b.wait_messages(1)
    assert got[0]["type"] == "image" and got[0]["body"] == body
    r = await api.get(f"/files/{file_id}", headers=bob.auth)
    assert r.status_code == 200 and r.content == data
    info = (await api.get(f"/files/{file_id}/info", headers=bob.auth)).json()
    assert (info["width"], info["name"]) == (30, None)
    assert (await api.get(f"/files/by-hash/{file_id}", headers=bob.auth)).status_code == 200
    # a bystander still sees nothing
    assert_error(await api.get(f"/files/{file_id}", headers=carol.auth), 404, "not_found")


async def test_group_members_may_download_until_they_leave(
    server: ServerProcess, api: httpx.AsyncClient, history: History
) -> None:
    alice, bob, carol = await user(server, "alice"), await user(server, "bob"), await user(server, "carol")
    data = b"%PDF-1.4\n" + os.urandom(5000)
    file_id = (await upload(api, alice, data, "minutes.pdf")).json()["file_id"]
    r = await api.post("/groups", headers=alice.auth, json={"name": "team", "members": [bob.uid, carol.uid]})
    assert r.status_code == 201, r.text
    gid, conv = r.json()["gid"], r.json()["conv"]
    a = history.client(alice, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert await a.send({"file_id": file_id, "name": "minutes.pdf"}, conv=conv, type="file") is not None, a.errors
    for who in (bob, carol):
        assert (await api.get(f"/files/{file_id}", headers=who.auth)).content == data
    r = await api.post(f"/groups/{gid}/leave", headers=carol.auth)
    assert r.status_code == 204, r.text
    assert_error(await api.get(f"/files/{file_id}", headers=carol.auth), 404, "not_found")
    assert (await api.get(f"/files/{file_id}", headers=bob.auth)).status_code == 200


async def test_sending_a_file_one_cannot_read_is_refused(
    server: ServerProcess, api: httpx.AsyncClient, history: History
) -> None:
    alice, bob = await user(server, "alice"), await user(server, "bob")
    file_id = (await upload(api, alice, b"only alice has this")).json()["file_id"]
    b = history.client(bob, "phone")
    assert (await b.connect())["t"] == "auth_ok"
    assert await b.send({"file_id": file_id}, to=alice.uid, type="file") is None
    assert b.errors[-1]["code"] == "not_found"
    assert await b.send({"no": "file id"}, to=alice.uid, type="image") is None
    assert b.errors[-1]["code"] == "invalid"
    # a refused send grants nothing
    assert_error(await api.get(f"/files/{file_id}", headers=bob.auth), 404, "not_found")
