#!/usr/bin/env bash
# The quickstart: build Slipway, show the demo project's plan, run it on a
# local `slipway serve` (embedded SQLite store), and show what was recorded.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building slipway"
cargo build --quiet
bin="$PWD/target/debug/slipway"

work=$(mktemp -d /tmp/slipway-demo.XXXXXX)
cp -r examples/demo/. "$work/"
rm -rf "$work/.slipway"  # state of an earlier local run, never part of the demo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export SLIPWAY_CONFIG="$work" SLIPWAY_SERVER="http://127.0.0.1:$port"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo; echo "==> slipway validate"
"$bin" validate
echo; echo "==> slipway plan --env staging   (nothing runs; estimates come from timeouts)"
"$bin" plan --env staging

echo; echo "==> slipway serve --listen 127.0.0.1:$port   (in the background; log in $work/serve.log)"
"$bin" serve --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do curl -sf "$SLIPWAY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

echo; echo "==> slipway run smoke-test --env staging   (smoke-test needs every other job: the whole graph runs)"
"$bin" run smoke-test --env staging
echo; echo "==> slipway deploy api 1.4.0 --env staging   (the api service's jobs and what they need)"
"$bin" deploy api 1.4.0 --env staging

echo; echo "==> slipway plan --env staging   (estimates now come from the recorded runs)"
"$bin" plan --env staging
echo; echo "==> slipway status"
"$bin" status
echo; echo "==> slipway logs 2 deploy-api"
"$bin" logs 2 deploy-api
echo; echo "==> curl $SLIPWAY_SERVER/metrics (excerpt)"
curl -s "$SLIPWAY_SERVER/metrics" | grep -E '^slipway_(deployments|jobs)\{state="succeeded"\}|^slipway_job_duration_seconds_count' || true

cat <<NEXT

Done. Next, with your own slipway.toml:
  slipway validate                    every mistake with file:line:column
  slipway plan --env ENV [--dot]      the graph, critical path and estimate
  slipway serve                       scheduler + API on 127.0.0.1:7878
  slipway deploy SERVICE VERSION --env ENV ; slipway run JOB... --env ENV
  slipway status [ID] ; slipway logs ID [JOB] -f ; slipway cancel ID
  API: http://127.0.0.1:7878/api/v1/openapi.json   metrics: /metrics
NEXT
