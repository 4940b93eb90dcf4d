#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: install what is missing
# (Debian packages), start a throwaway PostgreSQL on a private port, run
# every test against it, stop it. Usage: scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Lints first: they take seconds to a couple of minutes, the suite much
# longer, so a formatting slip or a clippy warning fails the run before any
# test starts. --all / --workspace cover every crate of the workspace.
# SLIPWAY_SKIP_LINTS=1 skips them when rerunning one test file locally.
if [ "${SLIPWAY_SKIP_LINTS:-0}" != 1 ]; then
  cargo fmt --all --check \
    || { echo "test.sh: code is not formatted as rustfmt wants; run \`cargo fmt --all\` and commit the result" >&2; exit 1; }
  cargo clippy --workspace --all-targets --quiet -- -D warnings \
    || { echo "test.sh: clippy found warnings (above); fix them or allow one with a reason" >&2; exit 1; }
fi

need_apt=()
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v curl >/dev/null || need_apt+=(curl)
# tests/tls.rs, tests/api_tls.rs: certificates made by the tests.
command -v openssl >/dev/null || need_apt+=(openssl)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v htpasswd >/dev/null || need_apt+=(apache2-utils)
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || need_apt+=(postgresql)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# The dashboard's browser tests (tests/dashboard.rs): Debian's Chromium and
# its WebDriver server.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# tests/issue18_cli.rs: the unit in contrib/ and the man pages.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# tests/metrics.rs: promtool and a real Prometheus.
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v man >/dev/null || need_apt+=(man-db)
# crates/slipway-bench/tests/bench.rs: the services bench runs wrk against
# Slipway's proxy and nginx side by side.
command -v wrk >/dev/null || need_apt+=(wrk)
# (nginx-light where Debian still has it: bookworm; plain nginx after.)
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if apt-cache show nginx-light >/dev/null 2>&1; then need_apt+=(nginx-light); else need_apt+=(nginx); fi
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq "${need_apt[@]}" >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi

# The API contract test's tools (tests/openapi.rs), from PyPI, in a
# virtualenv kept across runs and made again only when these versions
# change.
openapi_tools="schemathesis==4.32.5 openapi-spec-validator==0.9.0"
openapi_venv="${XDG_CACHE_HOME:-$HOME/.cache}/slipway/openapi-tools"
if [ "$(cat "$openapi_venv/.installed" 2>/dev/null)" != "$openapi_tools" ]; then
  echo "test.sh: installing $openapi_tools (PyPI) into $openapi_venv"
  rm -rf "$openapi_venv"
  python3 -m venv "$openapi_venv"
  # shellcheck disable=SC2086
  timeout 900 "$openapi_venv/bin/pip" install -q --disable-pip-version-check $openapi_tools \
    || { echo "test.sh: cannot install $openapi_tools from PyPI" >&2; exit 1; }
  echo "$openapi_tools" > "$openapi_venv/.installed"
fi
export SLIPWAY_OPENAPI_TOOLS="$openapi_venv/bin"
export SLIPWAY_REQUIRE_OPENAPI_TOOLS=1

# moto's server, a real implementation of the AWS APIs the ECS target
# calls (tests/ecs_moto.rs), from PyPI, in a virtualenv of its own (its
# pins differ from the contract tools').
moto_tools="moto[server]==5.2.5"
moto_venv="${XDG_CACHE_HOME:-$HOME/.cache}/slipway/moto"
if [ "$(cat "$moto_venv/.installed" 2>/dev/null)" != "$moto_tools" ]; then
  echo "test.sh: installing $moto_tools (PyPI) into $moto_venv"
  rm -rf "$moto_venv"
  python3 -m venv "$moto_venv"
  timeout 900 "$moto_venv/bin/pip" install -q --disable-pip-version-check "$moto_tools" \
    || { echo "test.sh: cannot install $moto_tools from PyPI" >&2; exit 1; }
  echo "$moto_tools" > "$moto_venv/.installed"
fi
export SLIPWAY_MOTO="$moto_venv/bin"
export SLIPWAY_REQUIRE_MOTO=1

# Throwaway PostgreSQL: its own data directory and a free port. initdb
# refuses to run as root, so the server runs as `nobody` when we are root.
pg_dir=$(mktemp -d /tmp/slipway-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
run_pg() { if [ "$(id -u)" = 0 ]; then runuser -u nobody -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown nobody "$pg_dir"; chmod 700 "$pg_dir"; fi
cleanup() {
  run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate -w -t 20 stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
trap cleanup EXIT
run_pg "$pg_bin/initdb" -D "$pg_dir/data" -U slipway --auth=trust -E UTF8 >/dev/null
run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w -t 60 \
  -o "-h 127.0.0.1 -p $port -k $pg_dir -c max_connections=300 -c fsync=off" start >/dev/null
export SLIPWAY_TEST_POSTGRES="postgres://slipway@127.0.0.1:$port/postgres"
export SLIPWAY_REQUIRE_POSTGRES=1
# A process of this host (the bench reads its CPU from /proc).
export SLIPWAY_TEST_POSTGRES_HERE=1
echo "test.sh: PostgreSQL on 127.0.0.1:$port"

# The demo service the tests deploy is a crate of its own, which a test of
# the root package cannot name with env!(): built once here and passed on
# (tests/common/mod.rs builds it itself when this is not set).
SLIPWAY_DEMO_BIN=$(cargo build --quiet -p slipway-demo --bin slipway-demo --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "slipway-demo" and m.get("executable"):
        print(m["executable"])')
[ -x "$SLIPWAY_DEMO_BIN" ] || { echo "test.sh: cannot build slipway-demo" >&2; exit 1; }
export SLIPWAY_DEMO_BIN
export SLIPWAY_REQUIRE_WRK=1

scripts/fleet.sh sweep || true # SSH test fleets (namespaces, sshd's) a crashed run left behind

# The whole workspace: the engine, slipway-bench and slipway-demo. Two
# cores in CI: keep test binaries' own parallelism modest, since many
# tests run real processes and real servers.
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast --test-threads 4 "$@"
else
  cargo test --workspace --no-fail-fast "$@" -- --test-threads 4
fi
