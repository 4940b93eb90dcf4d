#!/usr/bin/env bash
# Slipway against Ansible on one fleet of real sshd hosts (scripts/fleet.sh),
# side by side in one run:
#   (a) one command on every host: `slipway run` of a job with hosts = "web"
#       against `ansible all -m command -a true` (pipelining, ControlPersist,
#       forks = N); both warm (the second of two runs; the first is shown too);
#   (b) a tarball service rolled out in batches of 5 with a health check:
#       `slipway deploy` against a playbook doing copy, unpack, restart and
#       wait_for (only with --rollout: needs the host supervisor).
# Prints a table and, last, one JSON line. Needs root. Installs ansible-core
# from PyPI into a cache directory when it is missing.
#
#   scripts/bench-ssh.sh [HOSTS] [--rollout]      (default 20 hosts)
set -euo pipefail

HOSTS=${1:-20}
ROLLOUT=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/slipway-bench-ssh.XXXXXX)
FLEET="$WORK/fleet"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/slipway-bench
SLIPWAY=${SLIPWAY_BIN:-$ROOT/target/debug/slipway}
DEMO=${SLIPWAY_DEMO_BIN:-$(dirname "$SLIPWAY")/slipway-demo}

. "$ROOT/scripts/lib/procs.sh"
cleanup() {
  stop_tree "${SERVE_PID:-}" KILL
  stop_tree "${WWW_PID:-}"
  "$ROOT/scripts/fleet.sh" down "$FLEET" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$SLIPWAY" ] || (cd "$ROOT" && timeout 3600 cargo build -q -p slipway)
# The hosts get Slipway without its debug information (4× smaller).
timeout 120 strip --strip-debug -o "$WORK/slipway-agent" "$SLIPWAY" 2>/dev/null || cp "$SLIPWAY" "$WORK/slipway-agent"

if [ ! -x "$CACHE/ansible/bin/ansible" ]; then
  echo "installing ansible-core into $CACHE/ansible" >&2
  timeout 600 python3 -m venv "$CACHE/ansible"
  timeout 900 "$CACHE/ansible/bin/pip" install -q 'ansible-core>=2.19,<2.20'
fi
ANSIBLE="$CACHE/ansible/bin"

"$ROOT/scripts/fleet.sh" up "$FLEET" "$HOSTS" >/dev/null
KEY=$FLEET/id_ed25519
KNOWN=$FLEET/known_hosts
ADDRS=$(python3 -c 'import json,sys; print(" ".join(h["address"] for h in json.load(open(sys.argv[1]))["hosts"]))' "$FLEET/fleet.json")

# ---- Slipway -------------------------------------------------------------
CONF="$WORK/config"
mkdir -p "$CONF"
{
  printf '[secret.key]\nfile = "%s"\n[secret.known]\nfile = "%s"\n\n' "$KEY" "$KNOWN"
  printf '[[hosts]]\ngroup = "web"\naddresses = [%s]\nkey = "key"\nknown_hosts = "known"\ndir = "/srv/slipway"\nconnect_timeout = "5s"\n\n' \
    "$(for a in $ADDRS; do printf '"%s", ' "$a"; done | sed 's/, $//')"
  printf '[[job]]\nname = "hello"\ncommand = ["true"]\nhosts = "web"\n'
} >"$CONF/slipway.toml"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
client() { FLEET_TIMEOUT=900 "$ROOT/scripts/fleet.sh" client "$FLEET" "$@"; }
client env SLIPWAY_SSH_AGENT="$WORK/slipway-agent" "$SLIPWAY" --config "$CONF" serve --listen "127.0.0.1:$PORT" \
  --store "sqlite://$WORK/store.db" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 100); do
  client curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
now() { date +%s.%N; }
slipway_run() {
  local t0 t1
  t0=$(now)
  client "$SLIPWAY" --config "$CONF" --server "http://127.0.0.1:$PORT" run hello >/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc
}
S_COLD=$(slipway_run)
S_WARM=$(slipway_run)

# ---- Ansible -------------------------------------------------------------
INV="$WORK/inventory.ini"
{
  echo "[web]"
  for a in $ADDRS; do echo "$a"; done
} >"$INV"
cat >"$WORK/ansible.cfg" <<CFG
[defaults]
inventory = $INV
forks = $HOSTS
host_key_checking = True
remote_user = root
private_key_file = $KEY
interpreter_python = /usr/bin/python3
stdout_callback = minimal
[ssh_connection]
pipelining = True
ssh_args = -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=$KNOWN -o StrictHostKeyChecking=yes
control_path_dir = $WORK/cp
CFG
ansible_run() {
  local t0 t1
  t0=$(now)
  client env ANSIBLE_CONFIG="$WORK/ansible.cfg" "$ANSIBLE/ansible" all -m command -a true >/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc
}
A_COLD=$(ansible_run)
A_WARM=$(ansible_run)

R_JSON=""
if [ "$ROLLOUT" = "--rollout" ]; then
  # ---- (b) a tarball service in batches of 5 with a health check ----------
  [ -x "$DEMO" ] || (cd "$ROOT" && timeout 3600 cargo build -q -p slipway-demo)
  REL="$WORK/release"
  mkdir -p "$REL/bin" "$WORK/www"
  timeout 120 strip --strip-debug -o "$REL/bin/slipway-demo" "$DEMO" 2>/dev/null || cp "$DEMO" "$REL/bin/slipway-demo"
  printf '#!/bin/sh\nexec "$(dirname "$0")/slipway-demo" serve --port "$1" --version "$2"\n' >"$REL/bin/web"
  chmod +x "$REL/bin/web"
  tar -C "$REL" -czf "$WORK/www/web.tar.gz" bin
  for v in 1.0 2.0; do cp "$WORK/www/web.tar.gz" "$WORK/www/web-$v.tar.gz"; done
  SHA=$(sha256sum "$WORK/www/web.tar.gz" | cut -d' ' -f1)
  WWW=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  client python3 -m http.server "$WWW" --bind 127.0.0.1 --directory "$WORK/www" >/dev/null 2>&1 &
  WWW_PID=$!
  cat >>"$CONF/slipway.toml" <<TOML

[[environment]]
name = "production"

[[service]]
name = "web"
target = "ssh"
hosts = "web"
batch = 5
listen = "0.0.0.0:8080"
command = ["./bin/web", "{port}", "{version}"]
artifact = { url = "http://127.0.0.1:$WWW/web-{version}.tar.gz" }
health = { http = "/healthz", interval = "200ms", deadline = "10s" }
rollout = { drain = "50ms" }
TOML
  # The server reads its config at each request: no restart needed.
  deploy() { client "$SLIPWAY" --config "$CONF" --server "http://127.0.0.1:$PORT" deploy web "$1" --env production --sha256 "$SHA" >/dev/null; }
  deploy 1.0
  t0=$(now); deploy 2.0; t1=$(now)
  S_ROLL=$(echo "$t1 - $t0" | bc)
  cat >"$WORK/rollout.yml" <<'YML'
- hosts: web
  serial: 5
  gather_facts: false
  tasks:
    - name: where releases go
      file: { path: "/srv/slipway/ansible", state: directory }
    - name: copy the release
      copy: { src: "{{ tarball }}", dest: "/srv/slipway/ansible/web-{{ v }}.tar.gz" }
    - name: its directory
      file: { path: "/srv/slipway/ansible/{{ v }}", state: directory }
    - name: unpack it
      unarchive: { src: "/srv/slipway/ansible/web-{{ v }}.tar.gz", dest: "/srv/slipway/ansible/{{ v }}", remote_src: true }
      args: { creates: "/srv/slipway/ansible/{{ v }}/bin/web" }
    - name: stop the old one
      shell: "pkill -f '[s]lipway-demo serve --port 8081' || true"
    - name: start the new one
      shell: "cd /srv/slipway/ansible/{{ v }} && (setsid nohup ./bin/web 8081 {{ v }} >/dev/null 2>&1 &)"
    - name: wait for its port
      wait_for: { port: 8081, host: 127.0.0.1, timeout: 30 }
    - name: health check
      uri: { url: "http://127.0.0.1:8081/healthz", status_code: 200 }
      register: health
      retries: 50
      delay: 0.2
      until: health.status == 200
YML
  play() {
    client env ANSIBLE_CONFIG="$WORK/ansible.cfg" "$ANSIBLE/ansible-playbook" "$WORK/rollout.yml" -e "v=$1" -e "tarball=$WORK/www/web.tar.gz" >"$WORK/play.log" 2>&1 \
      || { echo "ansible-playbook failed:" >&2; tail -40 "$WORK/play.log" >&2; return 1; }
  }
  play 1.0
  t0=$(now); play 2.0; t1=$(now)
  A_ROLL=$(echo "$t1 - $t0" | bc)
  stop_tree "$WWW_PID"
  WWW_PID=""
  R_RATIO=$(echo "scale=3; $S_ROLL / $A_ROLL" | bc)
  R_JSON=$(printf ',"rollout":{"batch":5,"slipway_s":%s,"ansible_s":%s,"ratio":%s}' "$S_ROLL" "$A_ROLL" "$R_RATIO")
fi

RATIO=$(echo "scale=3; $S_WARM / $A_WARM" | bc)
printf '\n%-34s %10s %10s\n' "one command on $HOSTS hosts" "cold (s)" "warm (s)"
printf '%-34s %10.2f %10.2f\n' "slipway run (job on hosts)" "$S_COLD" "$S_WARM"
printf '%-34s %10.2f %10.2f\n' "ansible -m command (pipelining)" "$A_COLD" "$A_WARM"
printf '%-34s %21s\n' "slipway ÷ ansible (warm)" "$RATIO"
if [ -n "$R_JSON" ]; then
  printf '\n%-34s %10s\n' "tarball service, batches of 5" "wall (s)"
  printf '%-34s %10.2f\n' "slipway deploy (health-gated)" "$S_ROLL"
  printf '%-34s %10.2f\n' "ansible-playbook (copy..wait_for)" "$A_ROLL"
  printf '%-34s %10s\n' "slipway ÷ ansible" "$R_RATIO"
fi
printf '{"bench":"ssh","hosts":%s,"cores":%s,"load":"%s","one_command":{"slipway_cold_s":%s,"slipway_warm_s":%s,"ansible_cold_s":%s,"ansible_warm_s":%s,"ratio_warm":%s}%s}\n' \
  "$HOSTS" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$S_COLD" "$S_WARM" "$A_COLD" "$A_WARM" "$RATIO" "$R_JSON"
