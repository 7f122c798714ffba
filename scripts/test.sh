#!/usr/bin/env bash
# Lint, type-check and test, installing first what the tests need and is missing: uv (from PyPI), etcd
# (Debian's etcd-server, as root; the etcd tests start their own private etcd on free ports) and Chromium
# (Debian's chromium, as root; the web client's tests drive it headless with Playwright, and fail without it)
# and Prometheus (Debian's prometheus, as root: the metrics tests run it and promtool checks the alert rules).
# Redis, PostgreSQL and RabbitMQ must already run locally, as on the dev machines and CI.
# Arguments go to pytest: `bash scripts/test.sh tests/contract -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"

command -v uv >/dev/null 2>&1 || pip install uv

if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq etcd-server
  else
    echo "scripts/test.sh: etcd is missing and this is not root: install it with" \
      "'apt-get install -y etcd-server' as root; the etcd tests fail until then" >&2
  fi
fi

apt_install() {  # apt_install <package>: as root, non-interactive; apt-get update only if a first try fails
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "$1" || { apt-get update -qq && apt-get install -y -qq "$1"; }
}

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_install chromium
  else
    echo "scripts/test.sh: /usr/bin/chromium is missing and this is not root: install it with" \
      "'apt-get install -y chromium' as root; the web tests fail until then" >&2
  fi
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_install prometheus  # the metrics tests scrape a cluster with it; promtool checks the alert rules
  else
    echo "scripts/test.sh: prometheus/promtool are missing and this is not root: install them with" \
      "'apt-get install -y prometheus' as root; the metrics tests fail until then" >&2
  fi
fi

uv sync --frozen
uv run ruff check src tests benchmarks
uv run ruff format --check src tests benchmarks
uv run mypy
uv run pytest -q -p no:cacheprovider "$@"
