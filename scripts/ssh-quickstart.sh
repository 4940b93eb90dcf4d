#!/usr/bin/env bash
# Slipway on SSH hosts, tried on a throwaway fleet: three real OpenSSH
# servers, each in its own network, mount and PID namespaces on this
# machine (scripts/fleet.sh; needs root; the machine's own network is never
# touched). It runs a job on every host, deploys a release tarball service
# host by host (v1, then v2 while a client sends requests to every host
# without pause, then v3, which never becomes healthy and is rolled back),
# lists the hosts, drains one, and tears everything down.
#
#   scripts/ssh-quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

[ "$(id -u)" = 0 ] || { echo "ssh-quickstart: the test fleet needs root (network namespaces)" >&2; exit 1; }
# Build slipway and slipway-demo, or take the builds SLIPWAY_BIN and
# SLIPWAY_DEMO_BIN name: sets $bin and $demo.
. "$ROOT/scripts/lib/builds.sh"
BIN=$bin DEMO=$demo

WORK=$(mktemp -d /tmp/slipway-ssh.XXXXXX)
FLEET=$WORK/fleet
SERVE_PID=""
LOAD_PID=""
WWW_PID=""
. "$ROOT/scripts/lib/procs.sh"
cleanup() {
  for p in "$LOAD_PID" "$WWW_PID" "$SERVE_PID"; do stop_tree "$p"; done
  "$ROOT/scripts/fleet.sh" down "$FLEET" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # the EXIT trap then cleans up
# Everything that talks to the hosts runs on the fleet's bridge.
client() { FLEET_TIMEOUT=600 "$ROOT/scripts/fleet.sh" client "$FLEET" "$@"; }

echo; echo "==> scripts/fleet.sh up $FLEET 3   (three sshd hosts: h1 h2 h3)"
"$ROOT/scripts/fleet.sh" up "$FLEET" 3 >/dev/null
ADDRS=$(python3 -c 'import json,sys; print(" ".join(h["address"] for h in json.load(open(sys.argv[1]))["hosts"]))' "$FLEET/fleet.json")
echo "hosts: $ADDRS"

# A release: bin/web PORT VERSION starts the demo server from the tarball.
mkdir -p "$WORK/release/bin" "$WORK/www"
cp "$DEMO" "$WORK/release/bin/slipway-demo"
printf '#!/bin/sh\nexec "$(dirname "$0")/slipway-demo" serve --port "$1" --version "$2"\n' >"$WORK/release/bin/web"
chmod +x "$WORK/release/bin/web"
tar -C "$WORK/release" -czf "$WORK/www/web.tar.gz" bin
for v in 1 2 3; do cp "$WORK/www/web.tar.gz" "$WORK/www/web-$v.tar.gz"; done
SHA=$(sha256sum "$WORK/www/web.tar.gz" | cut -d' ' -f1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WWW=$(free_port)
client python3 -m http.server "$WWW" --bind 127.0.0.1 --directory "$WORK/www" >/dev/null 2>&1 &
WWW_PID=$!

CONF=$WORK/config
mkdir -p "$CONF"
cat >"$CONF/slipway.toml" <<TOML
[[environment]]
name = "production"

[secret.deploy_key]
file = "$FLEET/id_ed25519"
[secret.known_hosts]
file = "$FLEET/known_hosts"

[[hosts]]
group = "web"
addresses = [$(for a in $ADDRS; do printf '"%s", ' "$a"; done | sed 's/, $//')]
key = "deploy_key"
known_hosts = "known_hosts"
dir = "/srv/slipway"

[[job]]
name = "uptime"
command = ["sh", "-c", "echo \$(hostname): up since \$(uptime -s 2>/dev/null || date)"]
hosts = "web"
batch = 2

[[service]]
name = "web"
target = "ssh"
hosts = "web"
batch = 1
listen = "0.0.0.0:8080"
command = ["./bin/web", "{port}", "{version}"]
artifact = { url = "http://127.0.0.1:$WWW/web-{version}.tar.gz" }
health = { http = "/healthz", interval = "200ms", deadline = "4s" }
migrate = { command = ["sh", "-c", "echo migrated to \$SLIPWAY_VERSION on \$(hostname) >> /srv/slipway/migrations.log"] }
TOML
echo; echo "==> $CONF/slipway.toml"
sed -n '/\[\[hosts\]\]/,$p' "$CONF/slipway.toml"

PORT=$(free_port)
export SLIPWAY_CONFIG=$CONF SLIPWAY_SERVER=http://127.0.0.1:$PORT
echo; echo "==> slipway serve   (on the bridge; log in $WORK/serve.log)"
client "$BIN" serve --listen "127.0.0.1:$PORT" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 100); do client curl -sf "$SLIPWAY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

echo; echo "==> slipway run uptime   (every host of the group, two at a time; each recorded apart)"
client "$BIN" run uptime
echo; echo "==> slipway status 1"
client "$BIN" status 1
echo; echo "==> slipway logs 1 uptime --host ${ADDRS%% *}"
client "$BIN" logs 1 uptime --host "${ADDRS%% *}"

get_all() { for a in $ADDRS; do printf '%s: %s\n' "$a" "$(client curl -s -m 2 "http://$a:8080/" || echo unreachable)"; done; }
echo; echo "==> slipway deploy web 1 --sha256 ${SHA:0:12}…   (host by host: migrate once, start, health, switch)"
client "$BIN" deploy web 1 --env production --sha256 "$SHA"
get_all

echo; echo "==> slipway deploy web 2   (while a client sends requests to every host without pause)"
( while :; do
    for a in $ADDRS; do
      if out=$(client curl -sf -m 2 "http://$a:8080/"); then echo "$out"; else echo "FAILED $a"; fi
    done
  done ) >"$WORK/load.log" 2>&1 &
LOAD_PID=$!
sleep 1
client "$BIN" deploy web 2 --env production --sha256 "$SHA"
sleep 1
stop_tree "$LOAD_PID"; wait "$LOAD_PID" 2>/dev/null || true; LOAD_PID=""
echo "requests during the rollout: $(grep -c 'hello from demo' "$WORK/load.log") answered, $(grep -c FAILED "$WORK/load.log" || true) failed"
get_all

echo; echo "==> slipway deploy web 3   (v3 never gets healthy: rolled back on the host it touched)"
client "$BIN" deploy web 3 --env production --sha256 "$SHA" || echo "(exit $?: rolled back, as it should be)"
get_all

echo; echo "==> slipway hosts"
client "$BIN" hosts
H2=$(echo "$ADDRS" | cut -d' ' -f2)
echo; echo "==> slipway hosts drain $H2   (its proxy takes no new connections; deploys pass it by)"
client "$BIN" hosts drain "$H2"
get_all
client "$BIN" hosts undrain "$H2"

echo; echo "==> the migration ran once per deployment, on one host:"
for k in 1 2 3; do cat "$FLEET/h$k/root/migrations.log" 2>/dev/null || true; done
echo; echo "done: the fleet and everything on it is removed on exit"
