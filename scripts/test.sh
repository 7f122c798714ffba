#!/usr/bin/env bash
# Lint, type-check and test, installing first what the tests need and is missing:
# - uv (scripts/bootstrap.sh: pip where allowed, else astral.sh's installer, else Python alone);
# - as root, with apt (waiting for another apt or unattended-upgrades to finish, --no-install-recommends):
#   etcd (etcd-server: the etcd tests start private ones), Chromium (chromium: the web client's tests drive
#   it headless), Prometheus (prometheus: the metrics tests run it, promtool checks the alert rules), and
#   the engines' own binaries that the TLS tests start privately (redis-server, rabbitmq-server, and
#   PostgreSQL's initdb/postgres, put on PATH from /usr/lib/postgresql/*/bin);
# - the PostgreSQL database the tests use (`test` unless IM_TEST_POSTGRES_DSN names another), when missing;
# - the compiled build (scripts/compile.py: as root, gcc and the Python headers when missing). The suite runs
#   on it, and the tests of the compiled modules run again on the interpreted build (IM_COMPILED=0).
# Redis, PostgreSQL and RabbitMQ must run (locally by default, or where the README's overrides point):
# scripts/test_engines.py checks them first and says what is missing, instead of 20 minutes of failures.
# Arguments go to pytest: `bash scripts/test.sh tests/contract -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bootstrap.sh
. scripts/bootstrap.sh
ensure_uv
prefer_system_python

APT_WAIT=${IM_APT_WAIT:-600}  # seconds to wait for another apt (unattended-upgrades on a new machine)

apt_update() {  # apt-get update, waiting while another apt holds the lists lock
  local deadline=$((SECONDS + APT_WAIT)) out said=0
  while :; do
    if out=$(apt-get -o DPkg::Lock::Timeout="$APT_WAIT" update -qq 2>&1); then
      return 0
    fi
    if grep -qiE "could not get lock|unable to lock" <<<"$out" && [ "$SECONDS" -lt "$deadline" ]; then
      [ "$said" -eq 1 ] || echo "scripts/test.sh: another apt is running (unattended upgrades?); waiting for its lock" >&2
      said=1
      sleep 5
      continue
    fi
    echo "$out" >&2
    return 1
  done
}

apt_install() {  # apt_install PACKAGE...: non-interactive, no recommends, waits for the dpkg lock
  export DEBIAN_FRONTEND=noninteractive
  local cmd=(apt-get -o DPkg::Lock::Timeout="$APT_WAIT" install -y -qq --no-install-recommends "$@")
  "${cmd[@]}" || { apt_update && "${cmd[@]}"; }
}

latest_pg_bin() {  # Debian keeps initdb and postgres off PATH, in /usr/lib/postgresql/<version>/bin
  local dirs
  dirs=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) || true
  echo "$dirs"
}
pg_bin=$(latest_pg_bin)
[ -n "$pg_bin" ] && export PATH="$PATH:$pg_bin"

missing=()  # Debian packages for the tools that are not here
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
[ -x "${IM_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
{ command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; } || missing+=(postgresql)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]} (apt, --no-install-recommends)" >&2
    started=$SECONDS
    apt_install "${missing[@]}"
    echo "scripts/test.sh: installed in $((SECONDS - started)) s" >&2
    pg_bin=$(latest_pg_bin)
    [ -n "$pg_bin" ] && export PATH="$PATH:$pg_bin"
  else
    echo "scripts/test.sh: missing ${missing[*]} and this is not root: install them with" \
      "'apt-get install -y --no-install-recommends ${missing[*]}' as root; their tests fail until then" >&2
  fi
fi

uv sync --frozen

# The compiled build (scripts/compile.py, im.compiled), remade when the source changed since the last one;
# as root, gcc and the Python headers are installed when missing. IM_COMPILED=0: the interpreted build only.
build=compiled
if [ "${IM_COMPILED:-1}" = 0 ]; then
  build=interpreted
else
  status=0
  uv run --frozen python scripts/compile.py || status=$?
  if [ "$status" -eq 3 ] && [ "$(id -u)" -eq 0 ]; then  # 3: no compiler or headers here
    headers=$(uv run --frozen python -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')
    echo "scripts/test.sh: installing gcc $headers (apt, --no-install-recommends) for the compiled build" >&2
    apt_install gcc "$headers"
    status=0
    uv run --frozen python scripts/compile.py || status=$?
  fi
  if [ "$status" -eq 3 ]; then
    echo "scripts/test.sh: testing the interpreted build only: the compiled one cannot be made here (above)" >&2
    build=interpreted
  elif [ "$status" -ne 0 ]; then
    echo "scripts/test.sh: the compiled build failed (above)" >&2
    exit 1
  fi
fi

uv run --frozen python scripts/test_engines.py
uv run ruff check src tests benchmarks scripts
uv run ruff format --check src tests benchmarks scripts
uv run mypy
# Two pytest-xdist workers (IM_TEST_WORKERS; 0: one process, no workers). --dist loadgroup keeps each
# module on one worker and runs the cluster, fault and timing tests on one worker, one after another
# (tests/support/workers.py, which also gives each worker ports of its own).
# IM_TEST_BUILD: the build the tests check is running (tests/test_compiled.py).
IM_TEST_BUILD=$build uv run pytest -q -p no:cacheprovider -n "${IM_TEST_WORKERS:-2}" --dist loadgroup "$@"
if [ "$build" = compiled ] && [ $# -eq 0 ]; then
  # The whole suite ran compiled; the tests of the compiled modules (the unit tests and the decoders' fuzz
  # and poison tests) run again on the interpreted build, so that both builds pass them.
  echo "scripts/test.sh: the interpreted build (IM_COMPILED=0) on tests/test_*.py and the decoders' tests" >&2
  IM_COMPILED=0 IM_TEST_BUILD=interpreted uv run pytest -q -p no:cacheprovider -n "${IM_TEST_WORKERS:-2}" \
    --dist loadgroup tests/test_*.py tests/security/test_decoders_fuzz.py tests/security/test_poison.py
fi
