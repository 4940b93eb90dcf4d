#!/usr/bin/env bash
# The quickstart: build Slipway and its demo service, show the demo
# project's plan, run its job graph on a local `slipway serve` (embedded
# SQLite store), then deploy the demo HTTP service three times: v1, v2 under
# live traffic (no request fails), and v3, which never becomes healthy and
# is rolled back by itself.
#
#   scripts/quickstart.sh          everything stops when it ends
#   scripts/quickstart.sh --keep   the demo's server keeps running until Ctrl-C,
#                                  for `slipway status`, `logs`, the dashboard
set -euo pipefail
keep=""
case "${1:-}" in
  --keep) keep=1 ;;
  "") ;;
  *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

# Build slipway and slipway-demo, or take the builds SLIPWAY_BIN and
# SLIPWAY_DEMO_BIN name: sets $bin and $demo.
. scripts/lib/builds.sh
# The demo config runs `slipway-demo` from PATH; its migration appends here.
bindirs="$(dirname "$demo"):$(dirname "$bin")"
export PATH="$bindirs:$PATH"

# The config directory is the revision: everything in it is snapshotted
# at each deploy. The demo's logs go beside it, not in it (the demo's
# .slipwayignore would leave *.log out anyway).
work=$(mktemp -d /tmp/slipway-demo.XXXXXX)
config="$work/config"
logs="$work/logs"
mkdir -p "$config" "$logs"
cp -r examples/demo/. "$config/"
rm -rf "$config/.slipway"  # state of an earlier local run, never part of the demo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export SLIPWAY_CONFIG="$config" SLIPWAY_SERVER="http://127.0.0.1:$port"
serve_pid=""
load_pid=""
cleanup() {
  if [ -n "$load_pid" ]; then kill "$load_pid" 2>/dev/null || true; fi
  # A graceful stop: Slipway stops the service instances it runs.
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo; echo "==> slipway validate"
"$bin" validate
echo; echo "==> slipway plan --env staging   (nothing runs; estimates come from timeouts)"
"$bin" plan --env staging

# Jobs inherit serve's environment: the demo migration's file.
export SLIPWAY_DEMO_MIGRATIONS="$logs/migrations.log"
echo; echo "==> slipway serve --listen 127.0.0.1:$port   (in the background; log in $logs/serve.log)"
"$bin" serve --listen "127.0.0.1:$port" >"$logs/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do curl -sf "$SLIPWAY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

echo; echo "==> slipway run smoke-test --env staging   (smoke-test needs every other job: the whole graph runs)"
"$bin" run smoke-test --env staging
echo; echo "==> slipway deploy api 1.4.0 --env staging   (the api service's jobs and what they need)"
"$bin" deploy api 1.4.0 --env staging

echo; echo "==> slipway plan --env staging   (estimates now come from the recorded runs)"
"$bin" plan --env staging
echo; echo "==> slipway logs 2 deploy-api"
"$bin" logs 2 deploy-api

web=http://127.0.0.1:8480
echo; echo "==> slipway deploy web 1 --env staging   (migrate once, then start 2 instances behind the proxy on $web)"
"$bin" deploy web 1 --env staging
echo "curl $web/  ->  $(curl -s "$web/")"

echo; echo "==> slipway deploy web 2 --env staging   (while a client sends requests through the proxy without pause)"
( while :; do
    if out=$(curl -sf -m 2 "$web/"); then echo "$out"; else echo "FAILED"; fi
  done >"$logs/traffic.log" 2>&1 ) &
load_pid=$!
sleep 1
"$bin" deploy web 2 --env staging
sleep 1
kill "$load_pid" 2>/dev/null || true; wait "$load_pid" 2>/dev/null || true; load_pid=""
total=$(wc -l <"$logs/traffic.log"); bad=$(grep -c '^FAILED$' "$logs/traffic.log" || true)
echo "traffic during the rollout: $total requests, $bad failed"
echo "   answered by v1: $(grep -c 'demo 1$' "$logs/traffic.log" || true), by v2: $(grep -c 'demo 2$' "$logs/traffic.log" || true);" \
  "first answer: $(head -1 "$logs/traffic.log"), last: $(tail -1 "$logs/traffic.log")"
echo "   (for a moment both versions serve: a rolling update replaces one instance at a time)"

echo; echo "==> slipway deploy web 3 --env staging   (v3 fails its health check: automatic rollback)"
"$bin" deploy web 3 --env staging || echo "(exit code $?: the deployment was rolled back, as expected)"
echo "curl $web/  ->  $(curl -s "$web/")"
echo; echo "==> the migration ran once per deployment ($SLIPWAY_DEMO_MIGRATIONS):"
sed 's/^/   /' "$SLIPWAY_DEMO_MIGRATIONS"

echo; echo "==> slipway why web --env staging   (why it runs what it runs, from the record)"
"$bin" why web --env staging

echo; echo "==> slipway status"
"$bin" status
echo; echo "==> curl $SLIPWAY_SERVER/metrics (excerpt)"
curl -s "$SLIPWAY_SERVER/metrics" | grep -E '^slipway_(deployments|jobs)\{state="succeeded"\}|^slipway_job_duration_seconds_count' || true

revisions=$(curl -s "$SLIPWAY_SERVER/api/v1/deployments" | python3 -c 'import json, sys; d = json.load(sys.stdin); print(len(d), len({x["revision"] for x in d}))')
echo; echo "==> deployments and the config revisions they ran: ${revisions% *} deployments, ${revisions#* } revision(s)"
echo "   (the config did not change, so neither did its revision: the logs are written outside it)"

echo; echo "==> slipway logs 5 web.rollout   (the rollout's own account of v3's rollback)"
"$bin" logs 5 web.rollout | tail -n 8

cat <<NEXT

Done. Next, with your own slipway.toml:
  slipway validate                    every mistake with file:line:column
  slipway plan --env ENV [--dot]      the graph, critical path and estimate
  slipway serve                       scheduler + API on 127.0.0.1:7878
  slipway deploy SERVICE VERSION --env ENV ; slipway run JOB... --env ENV
  slipway rollback SERVICE --env ENV  back to the previous version
  slipway status [ID] ; slipway logs ID [JOB] -f ; slipway cancel ID
  API: /api/v1/openapi.json   metrics: /metrics   dashboard: /
NEXT

if [ -n "$keep" ]; then
  cat <<KEEP

The demo's server is still running, until Ctrl-C. In another shell:
  export SLIPWAY_CONFIG=$config SLIPWAY_SERVER=$SLIPWAY_SERVER PATH=$bindirs:\$PATH
  slipway status ; slipway logs 5 web.rollout ; slipway why web --env staging
  dashboard: $SLIPWAY_SERVER/   (the API is open until the first token exists)
KEEP
  wait "$serve_pid" || true
else
  echo
  echo "(The demo's server stops now, with this script. To look around it yourself: scripts/quickstart.sh --keep)"
fi
