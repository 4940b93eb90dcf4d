#!/usr/bin/env bash
# The docker target, end to end, on this machine's Docker Engine: build the
# demo service into an image (no image can be pulled here: the script
# imports a root filesystem holding the demo binary and the libraries it
# links), push three versions to Debian's docker-registry (with a password,
# from a Slipway secret), then deploy v1, v2 under live traffic, and v3,
# which never becomes healthy and is rolled back; kill Slipway with SIGKILL
# and watch the restarted node adopt the running containers; `slipway gc`.
# Needs: dockerd running, docker-registry and htpasswd (apt-get install
# docker-registry apache2-utils). Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker docker-registry htpasswd curl python3; do
  command -v "$tool" >/dev/null || { echo "docker-demo: $tool not found (apt-get install docker.io docker-registry apache2-utils curl)"; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "docker-demo: the Docker Engine does not answer (is dockerd running?)"; exit 1; }

# Build slipway and slipway-demo, or take the builds SLIPWAY_BIN and
# SLIPWAY_DEMO_BIN name: sets $bin and $demo.
. scripts/lib/builds.sh
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/slipway-docker-demo.XXXXXX)
reg_port=$(free_port); api_port=$(free_port); web_port=$(free_port)
repo="127.0.0.1:$reg_port/demo"
reg_pid=""; serve_pid=""; load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  # A graceful stop: Slipway removes the containers it runs.
  [ -n "$serve_pid" ] && { kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; }
  [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null || true
  for v in 1 2 3; do docker image rm "$repo:$v" >/dev/null 2>&1 || true; done
  docker image rm slipway-demo:local >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> an image of the demo: its binary and the libraries ldd names, imported"
mkdir -p "$work/rootfs"
cp "$demo" "$work/rootfs/demo"
for lib in $(ldd "$demo" | grep -o '/[^ ]*'); do
  mkdir -p "$work/rootfs$(dirname "$lib")"; cp -L "$lib" "$work/rootfs$lib"
done
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
docker import "$work/rootfs.tar" slipway-demo:local >/dev/null

echo "==> docker-registry on 127.0.0.1:$reg_port, user deployer (password in a file: a Slipway secret)"
echo -n "demo-$(date +%s%N)" >"$work/registry-password"
htpasswd -Bbn deployer "$(cat "$work/registry-password")" >"$work/htpasswd"
cat >"$work/registry.yml" <<EOF
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $work/registry }, delete: { enabled: true } }
http: { addr: "127.0.0.1:$reg_port" }
auth: { htpasswd: { realm: demo, path: $work/htpasswd } }
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -s "http://127.0.0.1:$reg_port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
docker login -u deployer --password-stdin "127.0.0.1:$reg_port" <"$work/registry-password" >/dev/null 2>&1
for v in 1 2 3; do
  docker tag slipway-demo:local "$repo:$v"
  docker push -q "$repo:$v" >/dev/null
done
docker logout "127.0.0.1:$reg_port" >/dev/null 2>&1 || true
# Forget the pushed names (tags and digests), so Slipway must pull, with
# its own credentials.
for ref in "$repo:1" "$repo:2" "$repo:3" $(docker image inspect --format '{{range .RepoDigests}}{{.}} {{end}}' slipway-demo:local); do
  docker image rm "$ref" >/dev/null 2>&1 || true
done

mkdir -p "$work/config"
cat >"$work/config/slipway.toml" <<EOF
[[environment]]
name = "staging"

[secret.registry]
file = "$work/registry-password"

[[registry]]
host = "127.0.0.1:$reg_port"
username = "deployer"
password = "registry"

[[service]]
name = "shop"
target = "docker"
image = "$repo"
port = 8080
memory = "64m"
listen = "127.0.0.1:$web_port"
instances = 2
command = ["/demo", "serve", "--host", "0.0.0.0", "--port", "{port}", "--version", "{version}"]
health = { http = "/healthz", interval = "200ms", healthy_after = 2, deadline = "5s" }
rollout = { strategy = "rolling", max_surge = 1, max_unavailable = 0, drain = "500ms" }
migrate = { command = ["/demo", "migrate", "--file", "/migrations.log", "--version", "{version}"] }
EOF
export SLIPWAY_CONFIG="$work/config" SLIPWAY_SERVER="http://127.0.0.1:$api_port"
start_serve() {
  "$bin" serve --listen "127.0.0.1:$api_port" >>"$work/serve.log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 100); do curl -sf "$SLIPWAY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
}
echo; echo "==> slipway serve (log in $work/serve.log)"
start_serve
web="http://127.0.0.1:$web_port"

echo; echo "==> slipway deploy shop 1   (tag pinned to its digest, pulled with the secret's password, migrated once, 2 containers)"
"$bin" deploy shop 1 --env staging
echo "curl $web/  ->  $(curl -s "$web/")"
echo; echo "==> slipway logs 1 shop.fetch"
"$bin" logs 1 shop.fetch

echo; echo "==> slipway deploy shop 2   (while a client sends requests without pause)"
( while :; do if out=$(curl -sf -m 2 "$web/"); then echo "$out"; else echo FAILED; fi; done >"$work/traffic.log" 2>&1 ) &
load_pid=$!
sleep 1
"$bin" deploy shop 2 --env staging
sleep 1
kill "$load_pid" 2>/dev/null || true; wait "$load_pid" 2>/dev/null || true; load_pid=""
echo "traffic during the rollout: $(wc -l <"$work/traffic.log") requests, $(grep -c '^FAILED$' "$work/traffic.log" || true) failed"

echo; echo "==> slipway deploy shop 3   (v3 fails its health check: automatic rollback, the reason in the record)"
"$bin" deploy shop 3 --env staging || echo "(exit code $?: rolled back, as expected)"
echo "curl $web/  ->  $(curl -s "$web/")"

echo; echo "==> kill -9 slipway, start it again: it adopts the running containers of version 2"
before=$(docker ps -q --filter label=slipway.service=shop --filter "label=slipway.version=2" | sort | tr '\n' ' ')
kill -9 "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
start_serve
for _ in $(seq 100); do curl -sf "$web/" >/dev/null 2>&1 && break; sleep 0.1; done
after=$(docker ps -q --filter label=slipway.service=shop --filter "label=slipway.version=2" | sort | tr '\n' ' ')
echo "containers before: $before"
echo "containers after:  $after  $([ "$before" = "$after" ] && echo '(the same: adopted)')"
echo "curl $web/  ->  $(curl -s "$web/")"

echo; echo "==> slipway status"
"$bin" status
echo; echo "==> slipway gc   (a dry run)"
"$bin" gc
