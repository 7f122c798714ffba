#!/usr/bin/env bash
# Start `im serve` on a fresh machine: install uv when it is missing (scripts/bootstrap.sh), install im and
# its runtime dependencies only (no dev tools: --no-dev; mypyc for the compiled build), compile the hot
# modules when a C compiler is there, then run the server. Arguments go to `im serve`:
#   bash scripts/serve.sh --http-port 9000 --set limits.send_rate=500
# uv picks a Python 3.11 (the system's, or it downloads one: Debian 13 ships 3.13).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bootstrap.sh
. scripts/bootstrap.sh
ensure_uv
prefer_system_python
# --inexact: a checkout that also has the dev tools keeps them (scripts/test.sh needs them). The compile
# group is mypyc, for the compiled build below.
uv sync --frozen --no-dev --group compile --inexact || {
  echo "scripts/serve.sh: uv sync failed (above). im needs Python 3.11: the system's, or one uv downloads" \
    "from github.com (Debian 13 ships 3.13); UV_PYTHON=/path/to/python3.11 names one" >&2
  exit 1
}
# The compiled build of the hot modules (scripts/compile.py): about a minute the first time and after the
# source changes, nothing otherwise. Without a C compiler and the Python headers (apt-get install gcc
# python3.11-dev), or with IM_COMPILED=0, im runs interpreted: the same server, a sixth more CPU per message.
if [ "${IM_COMPILED:-1}" != 0 ]; then
  uv run --frozen --no-dev --group compile python scripts/compile.py || echo "scripts/serve.sh: im runs interpreted" >&2
fi
exec uv run --frozen --no-dev im serve "$@"
