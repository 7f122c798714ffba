#!/usr/bin/env bash
# Run the README's two commands on a fresh, minimal Debian (a debootstrap chroot with python3 and no pip,
# no curl, no wget) and print what they cost: the time to install uv, to sync, to the first answer of
# `im serve`, and the size of the environment without and with the dev tools. Not part of the suite.
#
#   sudo bash scripts/check-fresh-debian.sh [--suite bookworm|trixie] [--root DIR] [--fetcher none|curl|wget]
#                                           [--tests "PYTEST ARGS"] [--keep]
#
# --root    where the chroot lives (default /work/debroot/SUITE; made with debootstrap when missing, reused after)
# --fetcher what the fresh machine has to download with besides python3 (default none: uv comes from the
#           PyPI wheel through Python alone; curl or wget: through astral.sh's installer)
# --tests   pytest arguments for scripts/test.sh inside the chroot (default: no test run; "all": the suite).
#           Redis, PostgreSQL and RabbitMQ are the host's (the chroot shares its network); apt installs
#           etcd, Chromium, Prometheus and the engines' binaries inside the chroot.
# --keep    leave the chroot's mounts in place at the end
# The chroot gets a clone of this checkout's HEAD in /root/im (committed work only). Needs root, debootstrap
# (apt-get install debootstrap) and the network. Starts no service in the chroot (a policy-rc.d refuses).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
suite=bookworm root="" fetcher=none tests="" keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --fetcher) fetcher=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--suite S] [--root DIR] [--fetcher none|curl|wget] [--tests ARGS] [--keep]" >&2; exit 2 ;;
  esac
done
root=${root:-/work/debroot/$suite}
[ "$(id -u)" -eq 0 ] || { echo "check-fresh-debian: run as root (debootstrap, chroot, mount)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "check-fresh-debian: apt-get install debootstrap" >&2; exit 2; }
case "$root" in "$repo"|"$repo"/*) echo "check-fresh-debian: --root must be outside the repository" >&2; exit 2 ;; esac

say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ ! -e "$root/etc/debian_version" ]; then
  say "debootstrap $suite (minbase + python3 + ca-certificates) into $root"
  mkdir -p "$(dirname "$root")"  # its log goes beside it
  t=$(now)
  debootstrap --variant=minbase --include=python3,ca-certificates "$suite" "$root" http://deb.debian.org/debian \
    >"$root.debootstrap.log" 2>&1 || { tail -n 20 "$root.debootstrap.log"; exit 1; }
  say "debootstrap took $(since "$t") s"
fi

mounted=()
cleanup() {
  if [ "$keep" -eq 0 ]; then
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT
for m in proc sys dev dev/pts; do
  if ! mountpoint -q "$root/$m"; then
    case "$m" in
      proc) mount -t proc proc "$root/proc" ;;
      sys) mount -t sysfs sys "$root/sys" ;;
      dev) mount --bind /dev "$root/dev" ;;
      dev/pts) mount -t devpts devpts "$root/dev/pts" ;;
    esac
    mounted+=("$root/$m")
  fi
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod 755 "$root/usr/sbin/policy-rc.d"

# A network whose egress re-signs TLS (a proxy with its own CA, as on these sandboxes) needs that CA on every
# machine behind it: the host's extra CAs (/usr/local/share/ca-certificates) go into the chroot's store, and
# SSL_CERT_FILE points uv there (uv trusts its own built-in roots otherwise).
cenv=(HOME=/root LANG=C.UTF-8 TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
  cenv+=(SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
fi

in_root() {  # a clean login-like environment inside the chroot
  env -i "${cenv[@]}" chroot "$root" "$@"
}

if [ "$fetcher" != none ]; then
  in_root sh -c "command -v $fetcher >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $fetcher; }" >/dev/null
fi
say "the machine: $(in_root sh -c '. /etc/os-release; echo "$PRETTY_NAME"'), $(in_root python3 --version)," \
  "pip: $(in_root python3 -m pip --version 2>/dev/null || echo none)," \
  "curl: $(in_root sh -c 'command -v curl || echo none'), wget: $(in_root sh -c 'command -v wget || echo none')"

# A fresh copy of the committed checkout, and no uv, no caches from an earlier run.
rm -rf "$root/root/im" "$root/root/.local" "$root/root/.cache" "$root/root/.cargo"
git clone -q "$repo" "$root/root/im"
say "cloned $(git -C "$repo" rev-parse --short HEAD) ($(git -C "$repo" rev-parse --abbrev-ref HEAD)) into $root/root/im"

port=$((18000 + RANDOM % 1000))
log="$root/root/serve.log"
say "README: bash scripts/serve.sh (on ports $port..$((port + 2)))"
t0=$(now)
# setsid: its own process group, so the check stops exactly the processes it started.
setsid env -i "${cenv[@]}" chroot "$root" bash -c "cd /root/im && exec bash scripts/serve.sh --http-port $port --ws-port $((port + 1)) --tcp-port $((port + 2))" \
  >"$log" 2>&1 &
serve_pid=$!
stop_serve() { kill -TERM -- "-$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; }
trap 'stop_serve; cleanup' EXIT
t_uv="" t_sync="" t_up=""
while :; do
  if ! kill -0 "$serve_pid" 2>/dev/null; then
    say "scripts/serve.sh exited early:"; cat "$log"; exit 1
  fi
  [ -z "$t_uv" ] && grep -q "^bootstrap: uv .* installed\|^Resolved\|^Installed\|^Using CPython\|^Creating virtual" "$log" && t_uv=$(since "$t0")
  [ -z "$t_sync" ] && grep -q "^Installed [0-9]* packages\|^Audited" "$log" && t_sync=$(since "$t0")
  if in_root python3 -c "import urllib.request,sys; sys.exit(0 if b'ok' in urllib.request.urlopen('http://127.0.0.1:$port/api/v1/health', timeout=2).read() else 1)" 2>/dev/null; then
    t_up=$(since "$t0")
    break
  fi
  awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 900) }' && { say "no answer within 900 s"; cat "$log"; exit 1; }
  sleep 0.5
done
health=$(in_root python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/api/v1/health').read().decode())")
say "GET /api/v1/health from inside: $health"
grep "^bootstrap:\|^Installed\|^Using\|^im: " "$log" | sed 's/^/    /'
stop_serve
say "im serve stopped (SIGTERM): $(tail -n 1 "$log")"
venv_runtime=$(du -sh "$root/root/im/.venv" | cut -f1)
uv_version=$(in_root /root/.local/bin/uv --version 2>/dev/null || echo "?")
echo
echo "FIGURES ($suite, fetcher $fetcher, $uv_version)"
echo "  uv installed after        ${t_uv:-?} s"
echo "  runtime deps synced after ${t_sync:-?} s"
echo "  first health answer after ${t_up} s (from the start of scripts/serve.sh)"
echo "  .venv without dev tools   $venv_runtime"

if [ -n "$tests" ]; then
  [ "$tests" = all ] && tests=""
  say "README: bash scripts/test.sh $tests"
  t=$(now)
  set +e
  in_root bash -c "cd /root/im && bash scripts/test.sh $tests" 2>&1 | tee "$root/root/test.log" | tail -n 40
  rc=${PIPESTATUS[0]}
  set -e
  echo "  scripts/test.sh           exit $rc after $(since "$t") s"
  echo "  .venv with dev tools      $(du -sh "$root/root/im/.venv" | cut -f1)"
  exit "$rc"
fi
