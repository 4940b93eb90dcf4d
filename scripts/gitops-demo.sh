#!/usr/bin/env bash
# Config from git and promotion, end to end on this machine: a config
# repository made here, staging following its `main` branch, production
# promoting from staging after a soak and an approval.
#
#   1. the first commit is the baseline; a commit changing nginx/ runs only
#      the nginx job (and what needs it); `plan --from --to` says so first
#   2. a broken commit is rejected; staging stays on the last good one
#   3. `deploy web 1.0` to staging; production gets it by promotion, waiting
#      for a 5 s soak and an approval, which only an approver may give
set -euo pipefail
cd "$(dirname "$0")/.."

# Build slipway and slipway-demo, or take the builds SLIPWAY_BIN and
# SLIPWAY_DEMO_BIN name: sets $bin and $demo.
. scripts/lib/builds.sh

work=$(mktemp -d /tmp/slipway-gitops.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); staging_port=$(free_port); production_port=$(free_port)
export SLIPWAY_CONFIG="$work/node" SLIPWAY_SERVER="http://127.0.0.1:$port"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  if [ "${KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
git_() { git -C "$work/repo" -c user.name=demo -c user.email=demo@example.com -c commit.gpgsign=false "$@"; }

# The repository's config: what runs. Each job says it ran.
mkdir -p "$work/repo/nginx" "$work/repo/db" "$work/node"
repo_config() {
  cat <<EOF
[[job]]
name = "nginx"
command = ["sh", "-c", "echo nginx: applying site.conf"]
files = ["nginx/**"]

[[job]]
name = "reload"
command = ["sh", "-c", "echo reload: nginx reloaded"]
needs = ["nginx"$1]

[[job]]
name = "schema"
command = ["sh", "-c", "echo schema: migrations applied"]
files = ["db/*.sql"]

[[service]]
name = "web"
follows = "registry.example.org/web"
auto_deploy = ["staging", "production"]
listen = { staging = "127.0.0.1:$staging_port", production = "127.0.0.1:$production_port" }
command = ["$demo", "serve", "--port", "{port}", "--version", "{version}"]
health = { http = "/healthz", interval = "200ms", healthy_after = 1 }
EOF
}
# The node's own config: where each environment's config comes from, and
# its gates (never read from the repository: a commit cannot lift them).
cat >"$work/node/slipway.toml" <<EOF
[[environment]]
name = "staging"
[environment.git]
url = "$work/repo"
branch = "main"

[[environment]]
name = "production"
promote_from = "staging"
soak = "5s"
approval = true
[environment.git]
url = "$work/repo"
branch = "main"
EOF

echo; echo "==> a config repository with its first commit"
git -C "$work/repo" init -q -b main
repo_config "" >"$work/repo/slipway.toml"
echo "server { listen 80; }" >"$work/repo/nginx/site.conf"
echo "create table t (id int);" >"$work/repo/db/001.sql"
git_ add -A && git_ commit -q -m "first"
first=$(git_ rev-parse HEAD)

echo; echo "==> slipway serve (fetches each environment's branch once at start)"
"$bin" serve --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do curl -sf "$SLIPWAY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
"$bin" revisions staging

echo; echo "==> a commit changing nginx/site.conf; first, what would it run?"
echo "server { listen 8080; }" >"$work/repo/nginx/site.conf"
git_ commit -q -am "nginx: listen on 8080"
second=$(git_ rev-parse HEAD)
"$bin" plan --env staging --from "$first" --to "$second"

echo; echo "==> slipway revisions staging --check   (what a push webhook or a poll does)"
"$bin" revisions staging --check
sleep 1
dep=$("$bin" --json revisions staging | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["deployment"])')
"$bin" status "$dep"

echo; echo "==> a broken commit: rejected, staging stays on ${second:0:12}"
repo_config ', "nginx-typo"' >"$work/repo/slipway.toml"
git_ commit -q -am "reload needs a job that does not exist"
"$bin" revisions staging --check || echo "(exit $?: rejected)"

echo; echo "==> tokens: an admin, a deployer, an approver for production"
admin=$("$bin" --json token create root --role '*=admin' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
deployer=$("$bin" --token "$admin" --json token create ci --role '*=deployer' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
approver=$("$bin" --token "$admin" --json token create alice --role 'production=approver' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$bin" --token "$admin" revisions production --check >/dev/null || true

echo; echo "==> slipway deploy web 1.0 --env staging"
"$bin" --token "$deployer" deploy web 1.0 --env staging
sleep 2
echo; echo "==> slipway status   (production waits for the soak and an approval)"
"$bin" --token "$deployer" status --limit 4
pid=$(curl -sf -H "Authorization: Bearer $deployer" "$SLIPWAY_SERVER/api/v1/approvals" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["deployment"]["id"])')

echo; echo "==> slipway approve $pid   as the deployer: refused"
"$bin" --token "$deployer" approve "$pid" || echo "(exit $?)"
echo; echo "==> slipway approve $pid   as alice, an approver of production"
"$bin" --token "$approver" approve "$pid"
for _ in $(seq 100); do
  state=$(curl -sf -H "Authorization: Bearer $deployer" "$SLIPWAY_SERVER/api/v1/deployments/$pid" | python3 -c 'import json,sys; print(json.load(sys.stdin)["deployment"]["state"])')
  [ "$state" = succeeded ] || [ "$state" = failed ] || [ "$state" = rolled_back ] && break
  sleep 0.2
done
echo; echo "==> slipway why web --env production"
"$bin" --token "$deployer" why web --env production
echo "curl production  ->  $(curl -s "http://127.0.0.1:$production_port/")"
echo; echo "==> slipway audit"
"$bin" --token "$admin" audit --limit 8
