"""How ``im serve`` serves the web client: the files, their types, the security headers, and the API's own
404/405 answers left intact. No browser needed."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from im.api.web import WEB_DIR
from tests.support.server import ServerProcess


def test_index_and_assets_are_served_with_a_strict_policy(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.http, timeout=10) as http:
        r = http.get("/")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="js/main.js">' in r.text
        csp = r.headers["content-security-policy"]
        policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert policy["default-src"] == "'self'"
        assert policy["script-src"] == "'self'"  # no inline scripts, no eval, no other origin
        assert policy["style-src"] == "'self'"
        assert policy["connect-src"] == "'self' ws: wss:"  # the gateway listens on another port
        assert policy["img-src"] == "'self' blob:"
        assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert http.get("/index.html").text == r.text

        types = {"/js/main.js": "text/javascript", "/style.css": "text/css", "/favicon.svg": "image/svg+xml"}
        for path, kind in types.items():
            r = http.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(kind), (path, r.headers["content-type"])
            assert "content-security-policy" in r.headers

        r = http.get("/no/such/file.js")
        assert r.status_code == 404
        # The API keeps answering in JSON, including for unknown paths and wrong methods.
        r = http.get("/api/v1/no/such/thing")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        r = http.delete("/api/v1/health")
        assert r.status_code == 405 and r.json()["code"] == "invalid"
        assert "content-security-policy" not in r.headers
        assert http.get("/api/v1/health").json() == {"status": "ok"}


def test_every_asset_is_local_and_referenced_modules_exist() -> None:
    """No file of the client names another origin (no CDN, no web font); every import resolves."""
    files = [p for p in WEB_DIR.rglob("*") if p.is_file()]
    imports = 0
    assert {p.suffix for p in files} <= {".html", ".css", ".js", ".svg"}
    for p in files:
        text = p.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (p, urls)  # the SVG namespace names, fetches nothing
        # User content goes in as text: no HTML parsing of strings, no eval.
        assert not re.search(r"\.(?:inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(", text), p
        for target in re.findall(r"""(?:import[^"';]*from\s*|import\s*)["'](\.[^"']+)["']""", text):
            assert (p.parent / target).resolve().is_file(), (p, target)
            imports += 1
        assert len(text.splitlines()) < 800, f"{p} is too long to read comfortably"
    assert imports >= 10, "the module imports were not found: is the pattern still right?"
    html = (WEB_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#][^"]*)"', html):
        assert (WEB_DIR / ref).is_file(), ref


def test_the_client_ships_in_the_package() -> None:
    """The files live inside the ``im`` package (hatch packages src/im whole, so the wheel has them)."""
    package = Path(__file__).resolve().parents[2] / "src" / "im"
    assert WEB_DIR.resolve().is_relative_to(package)
    assert (WEB_DIR / "index.html").is_file()
