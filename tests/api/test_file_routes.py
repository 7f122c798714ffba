"""/files: upload (201 new, 200 again), metadata, lookup by hash, download with ETag, and who may read.

The multipart reader itself is tested in tests/test_files_routes.py; these go through the app."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from tests.api.conftest import MAX_UPLOAD_BYTES, Api, User, assert_error

FILES = "/api/v1/files"
DATA = b"minutes of the meeting\n" * 10


async def upload(api: Api, user: User, data: bytes = DATA, name: str = "minutes.txt") -> tuple[int, dict[str, object]]:
    r = await api.http.post(FILES, files={"file": (name, data, "text/plain")}, headers=user.auth)
    body: dict[str, object] = r.json()
    return r.status_code, body


async def test_upload_is_201_then_200_for_the_same_bytes_with_one_id(api: Api) -> None:
    alice = await api.user("alice")
    status, first = await upload(api, alice)
    assert status == 201, first
    sha = hashlib.sha256(DATA).hexdigest()
    assert first == {
        "file_id": sha,
        "sha256": sha,
        "size": len(DATA),
        "content_type": "application/octet-stream",  # sniffed from the bytes, not the declared type
        "width": None,
        "height": None,
        "name": "minutes.txt",
    }
    status, again = await upload(api, alice, name="again.txt")
    assert status == 200 and again["file_id"] == sha


async def test_an_image_is_sniffed_measured_and_shown_inline(api: Api) -> None:
    alice = await api.user("alice")
    png = io.BytesIO()
    Image.new("RGB", (7, 3), "red").save(png, format="PNG")
    r = await api.http.post(
        FILES, files={"file": ("dot.bin", png.getvalue(), "application/octet-stream")}, headers=alice.auth
    )
    assert r.status_code == 201, r.text
    meta = r.json()
    assert (meta["content_type"], meta["width"], meta["height"]) == ("image/png", 7, 3)
    r = await api.http.get(f"{FILES}/{meta['file_id']}", headers=alice.auth)
    assert r.headers["content-type"] == "image/png" and r.headers["content-disposition"].startswith("inline")


async def test_info_by_hash_and_download_with_etag(api: Api) -> None:
    alice = await api.user("alice")
    _, meta = await upload(api, alice)
    file_id = meta["file_id"]
    r = await api.http.get(f"{FILES}/{file_id}/info", headers=alice.auth)
    assert r.status_code == 200 and r.json() == meta
    r = await api.http.get(f"{FILES}/by-hash/{file_id}", headers=alice.auth)
    assert r.status_code == 200 and r.json()["file_id"] == file_id
    r = await api.http.get(f"{FILES}/{file_id}", headers=alice.auth)
    assert r.status_code == 200 and r.content == DATA
    assert r.headers["etag"] == f'"{file_id}"' and r.headers["content-length"] == str(len(DATA))
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment")
    assert r.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert r.headers["cache-control"] == "private, no-cache"
    r = await api.http.get(f"{FILES}/{file_id}", headers={**alice.auth, "If-None-Match": f'"{file_id}"'})
    assert r.status_code == 304 and r.content == b""


async def test_others_read_a_file_only_once_it_was_sent_to_them(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    _, meta = await upload(api, alice)
    file_id = meta["file_id"]
    for path in (f"{FILES}/{file_id}", f"{FILES}/{file_id}/info", f"{FILES}/by-hash/{file_id}"):
        assert_error(await api.http.get(path, headers=bob.auth), 404, "not_found")
    await api.services.send(alice.uid, {"file_id": file_id}, to=bob.uid, type="file")
    r = await api.http.get(f"{FILES}/{file_id}", headers=bob.auth)
    assert r.status_code == 200 and r.content == DATA
    info = (await api.http.get(f"{FILES}/{file_id}/info", headers=bob.auth)).json()
    assert info["file_id"] == file_id and info["name"] is None  # bob did not upload it
    assert_error(await api.http.get(f"{FILES}/{'0' * 64}", headers=alice.auth), 404, "not_found")


async def test_upload_refusals(api: Api) -> None:
    alice = await api.user("alice")
    status, body = await upload(api, alice, data=b"x" * (MAX_UPLOAD_BYTES + 1))
    assert status == 413 and body["code"] == "too_large", body
    r = await api.http.post(FILES, json={"file": "no"}, headers=alice.auth)
    assert_error(r, 400, "invalid")
    r = await api.http.post(FILES, files={"other": ("a.txt", b"data", "text/plain")}, headers=alice.auth)
    assert_error(r, 400, "invalid")
    fake_png = {"file": ("a.png", b"not an image at all", "image/png")}
    assert_error(await api.http.post(FILES, files=fake_png, headers=alice.auth), 400, "invalid")
    assert_error(await api.http.post(FILES, files={"file": ("a.txt", b"x", "text/plain")}), 401, "unauthenticated")
