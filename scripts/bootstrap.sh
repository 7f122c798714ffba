# shellcheck shell=bash
# Sourced by scripts/serve.sh and scripts/test.sh: `ensure_uv` puts uv on PATH, installing it with what
# this machine has when it is missing. A fresh Debian 12 or 13 has python3 but no pip (and Debian's own
# pip refuses with externally-managed-environment), so the ways are tried in this order:
#   1. uv already on PATH, or in ~/.local/bin or ~/.cargo/bin (a previous install);
#   2. pip, where this Python lets it install (a virtualenv, pyenv, a Python without PEP 668's marker);
#   3. astral.sh's installer for that uv version, fetched with curl or wget (into ~/.local/bin);
#   4. python3 -m venv + pip in ~/.local/share/im/uv (needs Debian's python3-venv);
#   5. python3 alone: the uv wheel from PyPI (checked against its sha256), unpacked into ~/.local/bin.
# Each step that fails says so in one line and the next is tried. IM_UV_VERSION picks the version.

IM_UV_VERSION="${IM_UV_VERSION:-0.13.9}"

_uv_say() { echo "bootstrap: $*" >&2; }

_uv_found() {
  hash -r
  command -v uv >/dev/null 2>&1 && uv --version >/dev/null 2>&1
}

_uv_from_pip() {
  python3 -m pip --version >/dev/null 2>&1 || { _uv_say "no pip for python3"; return 1; }
  local out
  if out=$(python3 -m pip install --quiet --disable-pip-version-check "uv==$IM_UV_VERSION" 2>&1); then
    return 0
  fi
  if grep -q externally-managed-environment <<<"$out"; then
    _uv_say "pip refuses to install into the system Python (externally-managed-environment)"
  else
    _uv_say "pip install uv failed: $(tail -n 1 <<<"$out")"
  fi
  return 1
}

_uv_from_installer() {
  local url="https://astral.sh/uv/$IM_UV_VERSION/install.sh" script
  if command -v curl >/dev/null 2>&1; then
    script=$(curl -LsSf --retry 2 --connect-timeout 20 --max-time 120 "$url") || { _uv_say "curl could not fetch $url"; return 1; }
  elif command -v wget >/dev/null 2>&1; then
    script=$(wget -qO- --timeout=20 --tries=2 "$url") || { _uv_say "wget could not fetch $url"; return 1; }
  else
    _uv_say "neither curl nor wget"
    return 1
  fi
  # UV_NO_MODIFY_PATH: leave the shell profiles alone (we put ~/.local/bin on PATH ourselves).
  env UV_NO_MODIFY_PATH=1 UV_PRINT_QUIET=1 sh -s -- --quiet <<<"$script" || { _uv_say "the uv installer failed"; return 1; }
}

_uv_from_venv() {
  local dir="$HOME/.local/share/im/uv"
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    rm -rf "$dir"
    _uv_say "python3 -m venv does not work here (Debian: apt-get install python3-venv)"
    return 1
  fi
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$IM_UV_VERSION" >/dev/null 2>&1 \
    || { _uv_say "pip in a new venv could not install uv"; return 1; }
  mkdir -p "$HOME/.local/bin"
  ln -sf "$dir/bin/uv" "$HOME/.local/bin/uv"
  ln -sf "$dir/bin/uvx" "$HOME/.local/bin/uvx"
}

_uv_from_wheel() {
  # The standard library alone: PyPI's JSON API names the wheels of that version with their sha256.
  python3 - "$IM_UV_VERSION" "$HOME/.local/bin" <<'PY'
import hashlib, io, json, os, platform, sys, urllib.parse, urllib.request, zipfile

version, bindir = sys.argv[1], sys.argv[2]
machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
libc = "musllinux" if platform.libc_ver()[0] != "glibc" else "manylinux"


def fetch(url: str, timeout: float, *, missing_ok: bool = False) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (OSError, ValueError) as exc:  # URLError, timeouts, TLS: one line, not a traceback
        if missing_ok and getattr(exc, "code", None) == 404:
            return None
        sys.exit(f"bootstrap: cannot fetch {url}: {getattr(exc, 'reason', exc)}")


# The version's own page, or (mirrors that serve only the project's page) its entry under "releases".
where = f"https://pypi.org/pypi/uv/{version}/json"
page = fetch(where, 60, missing_ok=True)
if page is not None:
    files = json.loads(page)["urls"]
else:
    where = "https://pypi.org/pypi/uv/json"
    files = json.loads(fetch(where, 60) or b"{}").get("releases", {}).get(version, [])
wheels = [f for f in files if f["filename"].endswith(".whl") and libc in f["filename"] and machine in f["filename"]]
if not wheels:
    sys.exit(f"bootstrap: no uv {version} wheel for {libc} {machine} on PyPI")
wheel = wheels[0]
data = fetch(urllib.parse.urljoin(where, wheel["url"]), 300) or b""  # a mirror may give relative URLs
if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
    sys.exit(f"bootstrap: {wheel['filename']}: sha256 mismatch")
os.makedirs(bindir, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for name in z.namelist():
        if "/scripts/" in name and os.path.basename(name) in ("uv", "uvx"):
            target = os.path.join(bindir, os.path.basename(name))
            with open(target, "wb") as out:
                out.write(z.read(name))
            os.chmod(target, 0o755)
PY
}

ensure_uv() {
  export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
  if _uv_found; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || { _uv_say "python3 is missing (Debian: apt-get install python3)"; return 1; }
  _uv_say "uv is missing: installing uv $IM_UV_VERSION"
  local way
  for way in _uv_from_pip _uv_from_installer _uv_from_venv _uv_from_wheel; do
    if "$way" && _uv_found; then
      _uv_say "uv $IM_UV_VERSION installed (${way#_uv_from_}): $(command -v uv)"
      return 0
    fi
  done
  _uv_say "could not install uv: see https://docs.astral.sh/uv/getting-started/installation/"
  return 1
}

# prefer_system_python: which Python 3.11 uv builds the environment with, unless UV_PYTHON says. Debian's
# and Ubuntu's /usr/bin/python3.11 are compiled with profile-guided and link-time optimisation; pyenv's
# default build is not, and runs im (and its tests) about 15-20 % slower. uv would take the first Python
# on PATH (pyenv's shims, where pyenv is installed): point it at the distribution's build when there is
# one. An existing environment made with another Python is rebuilt by the next `uv sync`.
prefer_system_python() {
  [ -n "${UV_PYTHON:-}" ] && return 0
  if [ -x /usr/bin/python3.11 ] && /usr/bin/python3.11 -c 'import ssl, sqlite3' >/dev/null 2>&1; then
    export UV_PYTHON=/usr/bin/python3.11
  fi
}
