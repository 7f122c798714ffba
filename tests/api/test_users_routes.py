"""/users and /contacts: lookups, search limits, id ranges, contacts."""

from __future__ import annotations

from tests.api.conftest import Api, assert_error

V1 = "/api/v1"
MAX_ID = 2**63 - 1


async def test_me_by_id_and_by_name(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    me = (await api.http.get(f"{V1}/users/me", headers=alice.auth)).json()
    assert (me["uid"], me["username"]) == (alice.uid, "alice")
    r = await api.http.get(f"{V1}/users/{bob.uid}", headers=alice.auth)
    assert r.status_code == 200 and r.json()["username"] == "bob"
    r = await api.http.get(f"{V1}/users/by-name/BOB", headers=alice.auth)
    assert r.status_code == 200 and r.json()["uid"] == bob.uid
    assert_error(await api.http.get(f"{V1}/users/by-name/nobody", headers=alice.auth), 404, "not_found")
    assert_error(await api.http.get(f"{V1}/users/{MAX_ID}", headers=alice.auth), 404, "not_found")


async def test_user_ids_out_of_range_are_400_and_not_numbers_422(api: Api) -> None:
    alice = await api.user("alice")
    for uid in ("0", "-1", str(MAX_ID + 1)):
        assert_error(await api.http.get(f"{V1}/users/{uid}", headers=alice.auth), 400, "invalid")
    assert_error(await api.http.get(f"{V1}/users/abc", headers=alice.auth), 422, "invalid")


async def test_search_by_prefix_of_name_or_display_name_with_its_limits(api: Api) -> None:
    alice = await api.user("alice")
    for name in ("bob", "bobby", "carol"):
        await api.user(name)
    r = await api.http.get(f"{V1}/users", params={"q": "BOB"}, headers=alice.auth)
    assert r.status_code == 200 and sorted(u["username"] for u in r.json()) == ["bob", "bobby"]
    r = await api.http.get(f"{V1}/users", params={"q": "bob", "limit": 1}, headers=alice.auth)
    assert len(r.json()) == 1
    out_of_range: list[dict[str, str | int]] = [
        {"q": ""},
        {"q": "x" * 65},
        {"q": "b", "limit": 0},
        {"q": "b", "limit": 101},
    ]
    for params in out_of_range:
        assert_error(await api.http.get(f"{V1}/users", params=params, headers=alice.auth), 400, "invalid")
    assert_error(await api.http.get(f"{V1}/users", headers=alice.auth), 422, "invalid")  # no q


async def test_contacts_add_idempotent_list_remove(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    for _ in range(2):
        assert (await api.http.put(f"{V1}/contacts/{bob.uid}", headers=alice.auth)).status_code == 204
    r = await api.http.get(f"{V1}/contacts", headers=alice.auth)
    assert [u["uid"] for u in r.json()] == [bob.uid]
    assert (await api.http.get(f"{V1}/contacts", headers=bob.auth)).json() == []  # one-way
    assert_error(await api.http.put(f"{V1}/contacts/{alice.uid}", headers=alice.auth), 400, "invalid")
    assert_error(await api.http.put(f"{V1}/contacts/{MAX_ID}", headers=alice.auth), 404, "not_found")
    assert (await api.http.delete(f"{V1}/contacts/{bob.uid}", headers=alice.auth)).status_code == 204
    assert_error(await api.http.delete(f"{V1}/contacts/{bob.uid}", headers=alice.auth), 404, "not_found")
    assert (await api.http.get(f"{V1}/contacts", headers=alice.auth)).json() == []
