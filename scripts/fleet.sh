#!/usr/bin/env bash
# A test fleet of real OpenSSH hosts on this machine, for the SSH target's
# tests. Each host is a network namespace (eth0 = 10.77.0.(10+K)) with its
# own mount, PID and UTS namespaces: its /srv/slipway and /tmp are
# directories under DIR, `ps` there shows only its processes. Every host's
# eth0 hangs off a bridge in one more namespace, <prefix>-sw (10.77.0.1),
# where the client side (OpenSSH, Slipway, tests) runs: the machine's own
# network namespace is never touched.
#
#   fleet.sh up DIR N          N hosts (1..60); writes DIR/fleet.json
#   fleet.sh down DIR          ends DIR's fleet (idempotent)
#   fleet.sh sweep             ends every fleet on the machine (CI, after a crash)
#   fleet.sh ctl DIR K ACTION  link-down|link-up|stop-sshd|start-sshd|freeze|thaw|rekey
#   fleet.sh exec DIR K CMD..  CMD inside host K (net, mount, PID, UTS); its exit code
#   fleet.sh client DIR CMD..  CMD in the bridge namespace; its exit code
#
# FLEET_TIMEOUT (seconds, default 600, 0 = none) bounds `exec` and `client`.
# Needs root. Installs openssh-server when /usr/sbin/sshd is missing.

# The scripts run inside hosts are single-quoted on purpose: they expand there.
# shellcheck disable=SC2016
set -euo pipefail

SUBNET=10.77.0
MAX_HOSTS=60
# Where a host sees its own DIR/hK (sshd config, keys, pid file): /tmp and
# /srv/slipway are mounted over inside the host, and DIR usually lives in /tmp.
HOST_RUN=/run/fleet

die() {
  echo "fleet.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^$/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# Namespace names from DIR: the same DIR always gives the same prefix, so
# `down` works even when DIR/prefix is gone. 11 characters keep
# "<prefix>-h60" within the 15 that interface-ish names allow.
prefix_for() {
  local abs
  abs=$(realpath -m -- "$1")
  printf 'slw%s' "$(printf '%s' "$abs" | sha256sum | cut -c1-8)"
}

ipc() { timeout -k 2 10 ip "$@"; }

# The namespaces of a prefix (or of every fleet, with no argument) that
# exist now. Only names this script makes: slw + 8 hex + -sw or -hK.
fleet_namespaces() {
  local pat='^slw[0-9a-f]{8}-(sw|h[0-9]+)$'
  [ $# -eq 0 ] || pat="^$1-(sw|h[0-9]+)\$"
  { timeout 10 ip netns list 2>/dev/null || true; } | awk '{print $1}' | grep -E "$pat" || true
}

# The parent pid of process $1 in REPLY; fails when it is gone. No fork
# (it runs once per process of a namespace). The command name in the stat
# line may hold spaces and parentheses, so the fields after its last ")".
ppid_of() {
  local st
  read -r st 2>/dev/null <"/proc/$1/stat" || return 1
  st=${st##*) }
  read -r _ REPLY _ <<<"$st"
}

# Whether process $1 is this script, an ancestor of it (a sweep may run
# from inside a bridge namespace) or a descendant (its own subshells and
# commands): never killed.
ours() {
  local p=$1
  [ "$p" = "$$" ] && return 0
  while [ "$p" -gt 1 ] 2>/dev/null; do
    ppid_of "$p" || return 1
    p=$REPLY
    [ "$p" = "$$" ] && return 0
  done
  p=$$
  while [ "$p" -gt 1 ] 2>/dev/null; do
    [ "$p" = "$1" ] && return 0
    ppid_of "$p" || return 1
    p=$REPLY
  done
  return 1
}

# SIGKILL every process in namespace $1 (but ours), until none is left or
# 10 s passed.
kill_ns_processes() {
  local ns=$1 all p victims=()
  for _ in $(seq 1 100); do
    all=$(timeout 10 ip netns pids "$ns" 2>/dev/null || true)
    victims=()
    for p in $all; do
      # Gone already (such as the very `ip netns pids` that listed it).
      [ -e "/proc/$p" ] || continue
      ours "$p" || victims+=("$p")
    done
    [ ${#victims[@]} -gt 0 ] || return 0
    kill -KILL "${victims[@]}" 2>/dev/null || true
    sleep 0.1
  done
  echo "fleet.sh: processes still in $ns after 10 s: ${victims[*]}" >&2
}

netns_inode() { stat -L -c %i "$1" 2>/dev/null || true; }

# The unshare process of host K, if it is still the one we started (its
# network namespace is the host's): guards against a reused pid.
host_unshare_pid() {
  local k=$1 upid want got
  upid=$(cat "$dir/h$k/pid" 2>/dev/null) || return 1
  [[ $upid =~ ^[0-9]+$ ]] || return 1
  want=$(netns_inode "/run/netns/$prefix-h$k")
  got=$(netns_inode "/proc/$upid/ns/net")
  [ -n "$want" ] && [ "$want" = "$got" ] || return 1
  echo "$upid"
}

# The init of host K's PID namespace: the child of its unshare process.
host_init_pid() {
  local upid kids
  upid=$(host_unshare_pid "$1") || return 1
  kids=$(cat "/proc/$upid/task/$upid/children" 2>/dev/null) || return 1
  kids=${kids%% *}
  [ -n "$kids" ] || return 1
  echo "$kids"
}

load_fleet() {
  dir=$(realpath -m -- "$1")
  prefix=$(cat "$dir/prefix" 2>/dev/null || prefix_for "$dir")
  sw="$prefix-sw"
}

check_host() {
  local k=$1
  if ! [[ $k =~ ^[0-9]+$ ]] || [ ! -d "$dir/h$k" ]; then
    die "no host $k in $dir"
  fi
}

# Run a fixed script as root inside host K (all its namespaces).
in_host() {
  local k=$1 ipid
  shift
  ipid=$(host_init_pid "$k") || die "host h$k of $dir is not running"
  timeout -k 5 30 nsenter --target "$ipid" --mount --pid --net --uts --wdns=/ -- "$@"
}

ssh_opts() {
  echo -F /dev/null -i "$dir/id_ed25519" -o IdentitiesOnly=yes -o IdentityAgent=none \
    -o UserKnownHostsFile="$dir/known_hosts" -o GlobalKnownHostsFile=/dev/null \
    -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=3 -o LogLevel=ERROR
}

# Inside a host: stop its sshd listener (only that: sessions and other
# processes live on). A frozen listener gets SIGCONT so SIGTERM lands.
STOP_SSHD='
p=$(cat '"$HOST_RUN"'/sshd.pid 2>/dev/null) || exit 0
kill -TERM "$p" 2>/dev/null || exit 0
kill -CONT "$p" 2>/dev/null || true
i=0
while kill -0 "$p" 2>/dev/null; do
  i=$((i + 1))
  if [ "$i" -ge 100 ]; then kill -KILL "$p" 2>/dev/null || true; fi
  if [ "$i" -ge 150 ]; then echo "sshd ($p) does not end" >&2; exit 1; fi
  sleep 0.1
done
rm -f '"$HOST_RUN"'/sshd.pid'

# Inside a host: start sshd unless it runs. Not daemonized (-D): sshd
# would daemonize before it binds, hiding a failure to bind; in its own
# session instead, and done once it writes its pid file, which it does
# once it listens. The host's init adopts it when this shell ends.
START_SSHD='
p=$(cat '"$HOST_RUN"'/sshd.pid 2>/dev/null) && kill -0 "$p" 2>/dev/null && exit 0
rm -f '"$HOST_RUN"'/sshd.pid
setsid /usr/sbin/sshd -D -f '"$HOST_RUN"'/sshd_config -E '"$HOST_RUN"'/sshd.log </dev/null >/dev/null 2>&1 &
p=$!
i=0
until [ -s '"$HOST_RUN"'/sshd.pid ]; do
  i=$((i + 1))
  if ! kill -0 "$p" 2>/dev/null || [ "$i" -ge 100 ]; then
    echo "sshd did not start: $(tail -n 3 '"$HOST_RUN"'/sshd.log)" >&2
    exit 1
  fi
  sleep 0.1
done
'

SIGNAL_SSHD='
p=$(cat '"$HOST_RUN"'/sshd.pid 2>/dev/null) || { echo "sshd is not running" >&2; exit 1; }
kill "-$1" "$p"'

# The host's init, run by `unshare` in the host's network namespace with
# new mount, PID and UTS namespaces: private mounts, then sshd, then a
# reaper as PID 1 (sessions and daemons started on the host outlive sshd
# and are reaped when they end). Arguments: DIR/hK, hK.
HOST_INIT='set -e
hdir=$1
mount --make-rprivate /
# Copies of /run/netns would keep the other hosts alive as long as this one.
umount -R -l /run/netns 2>/dev/null || true
mount -t tmpfs -o mode=755,size=16m fleet-run /run
mkdir -m 755 /run/sshd '"$HOST_RUN"'
mount --bind "$hdir" '"$HOST_RUN"'
mount --bind "$hdir/root" /srv/slipway
mount --bind "$hdir/tmp" /tmp
# A host of its own has its own shell start-up files, not this machine'"'"'s:
# bash sources ~/.bashrc for every command run over SSH, and a start-up
# file that blocks (a pyenv rehash lock left by a killed shell waits 60 s)
# would stall every host at once.
[ ! -f /root/.bashrc ] || mount --bind /dev/null /root/.bashrc
hostname "$2"
'"$START_SSHD"'
exec perl -e '\''$0 = "fleet-init"; while (1) { sleep 1 if wait() == -1 }'\'

json_string() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# The Debian packages of the tools this script uses that are missing.
missing_packages() {
  [ -x /usr/sbin/sshd ] || echo openssh-server
  command -v ssh-keygen >/dev/null || echo openssh-client
  command -v ip >/dev/null || echo iproute2
  command -v ps >/dev/null || echo procps
  command -v perl >/dev/null || echo perl-base
  command -v nsenter >/dev/null || echo util-linux
}

install_missing() {
  local need
  mapfile -t need < <(missing_packages)
  [ ${#need[@]} -gt 0 ] || return 0
  echo "fleet.sh: installing ${need[*]}" >&2
  # One installer at a time (tests bring fleets up in parallel); and no
  # machine-wide sshd started by the package's postinst.
  (
    flock -w 900 9 || die "apt lock busy for 900 s"
    mapfile -t need < <(missing_packages)
    [ ${#need[@]} -gt 0 ] || exit 0
    policy_made=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      policy_made=1
    fi
    rc=0
    export DEBIAN_FRONTEND=noninteractive
    timeout -k 10 600 apt-get update -qq || rc=$?
    [ $rc -ne 0 ] || timeout -k 10 900 apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null || rc=$?
    [ -z "$policy_made" ] || rm -f /usr/sbin/policy-rc.d
    [ $rc -eq 0 ] || die "apt-get could not install ${need[*]} (exit $rc)"
  ) 9>/var/lock/slipway-fleet-apt.lock
  mapfile -t need < <(missing_packages)
  [ ${#need[@]} -eq 0 ] || die "still missing after apt-get: ${need[*]}"
}

cmd_down() {
  load_fleet "$1"
  local ns k upid
  # The hosts' unshare processes: --kill-child takes their init, and the
  # end of a PID namespace's init takes everything in it.
  for f in "$dir"/h*/pid; do
    [ -e "$f" ] || continue
    k=${f%/pid}
    k=${k##*/h}
    if upid=$(host_unshare_pid "$k"); then
      kill -KILL "$upid" 2>/dev/null || true
    fi
  done
  # Whatever else is left in a host's network namespace. Not the bridge
  # namespace's: the caller may run there, and what it started is its own.
  for ns in $(fleet_namespaces "$prefix"); do
    [ "$ns" = "$sw" ] || kill_ns_processes "$ns"
  done
  for ns in $(fleet_namespaces "$prefix"); do
    ipc netns del "$ns" 2>/dev/null || echo "fleet.sh: could not delete namespace $ns" >&2
  done
  rm -f "$dir"/h*/pid "$dir"/h*/sshd.pid 2>/dev/null || true
  return 0
}

cmd_sweep() {
  local ns
  for ns in $(fleet_namespaces); do
    kill_ns_processes "$ns"
  done
  for ns in $(fleet_namespaces); do
    ipc netns del "$ns" 2>/dev/null || echo "fleet.sh: could not delete namespace $ns" >&2
  done
  return 0
}

cmd_up() {
  local n=$2 k ns addr hdir
  if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt $MAX_HOSTS ]; then
    die "N must be 1..$MAX_HOSTS, not '$n'"
  fi
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, mounts)"
  install_missing
  mkdir -p -- "$1"
  load_fleet "$1"
  # A fleet left by an earlier run of the same DIR goes first.
  cmd_down "$dir" >/dev/null 2>&1 || true
  up_ok=
  trap '[ -n "$up_ok" ] || [ "${FLEET_KEEP_ON_FAIL:-0}" = 1 ] || cmd_down "$dir" >/dev/null 2>&1 || true' EXIT

  echo "$prefix" >"$dir/prefix"
  rm -rf -- "$dir"/h[0-9]* "$dir/id_ed25519" "$dir/id_ed25519.pub" "$dir/known_hosts" "$dir/fleet.json"
  timeout 30 ssh-keygen -q -t ed25519 -N '' -C slipway-fleet-client -f "$dir/id_ed25519"
  : >"$dir/known_hosts"
  # The mount point of every host's /srv/slipway.
  mkdir -p /srv/slipway

  ipc netns add "$sw"
  ipc -n "$sw" link set lo up
  ipc -n "$sw" link add br0 type bridge
  ipc -n "$sw" addr add "$SUBNET.1/24" dev br0
  ipc -n "$sw" link set br0 up

  for k in $(seq 1 "$n"); do
    ns="$prefix-h$k"
    addr="$SUBNET.$((10 + k))"
    hdir="$dir/h$k"
    mkdir -p "$hdir/root" "$hdir/tmp"
    chmod 755 "$hdir" "$hdir/root"
    chmod 1777 "$hdir/tmp"
    timeout 30 ssh-keygen -q -t ed25519 -N '' -C "h$k" -f "$hdir/ssh_host_ed25519_key"
    cp "$dir/id_ed25519.pub" "$hdir/authorized_keys"
    echo "$addr $(cut -d' ' -f1-2 "$hdir/ssh_host_ed25519_key.pub")" >>"$dir/known_hosts"
    cat >"$hdir/sshd_config" <<EOF
Port 22
ListenAddress $addr
HostKey $HOST_RUN/ssh_host_ed25519_key
AuthorizedKeysFile $HOST_RUN/authorized_keys
PidFile $HOST_RUN/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
MaxSessions 100
UseDNS no
PrintMotd no
Subsystem sftp internal-sftp
EOF
    ipc netns add "$ns"
    ipc -n "$ns" link set lo up
    # Made in the bridge namespace with its peer moved straight into the
    # host's: neither end ever exists in the machine's namespace.
    ipc -n "$sw" link add "v$k" type veth peer name eth0 netns "$ns"
    ipc -n "$sw" link set "v$k" master br0 up
    ipc -n "$ns" addr add "$addr/24" dev eth0
    ipc -n "$ns" link set eth0 up
    # The host runs until `down`; no timeout. Its output goes to a file so
    # that callers reading ours see EOF when we end.
    ip netns exec "$ns" unshare --mount --pid --uts --fork --kill-child --mount-proc \
      sh -c "$HOST_INIT" fleet-host "$hdir" "h$k" </dev/null >"$hdir/host.log" 2>&1 &
    echo $! >"$hdir/pid"
  done

  # Every host must take a real login before the fleet counts as up.
  local opts waits=()
  opts=$(ssh_opts)
  for k in $(seq 1 "$n"); do
    (
      addr="$SUBNET.$((10 + k))"
      deadline=$((SECONDS + 30))
      while :; do
        # shellcheck disable=SC2086
        if timeout -k 2 10 ip netns exec "$sw" ssh $opts "root@$addr" true </dev/null >/dev/null 2>"$dir/h$k/wait.err"; then
          exit 0
        fi
        if ! host_unshare_pid "$k" >/dev/null; then
          echo "fleet.sh: host h$k ($addr) ended while starting: $(tail -n 5 "$dir/h$k/host.log" 2>/dev/null | tr '\n' ' ')" >&2
          exit 1
        fi
        if [ $SECONDS -ge $deadline ]; then
          echo "fleet.sh: host h$k ($addr) did not accept ssh within 30 s: $(tr '\n' ' ' <"$dir/h$k/wait.err"); sshd log: $(tail -n 5 "$dir/h$k/sshd.log" 2>/dev/null | tr '\n' ' ')" >&2
          exit 1
        fi
        sleep 0.2
      done
    ) &
    waits+=($!)
  done
  local failed=0
  for p in "${waits[@]}"; do
    wait "$p" || failed=$((failed + 1))
  done
  [ $failed -eq 0 ] || die "$failed of $n hosts did not come up (above)"

  {
    printf '{"prefix":%s,"bridge_ns":%s,"key":%s,"known_hosts":%s,"user":"root","dir":"/srv/slipway","hosts":[' \
      "$(json_string "$prefix")" "$(json_string "$sw")" "$(json_string "$dir/id_ed25519")" "$(json_string "$dir/known_hosts")"
    for k in $(seq 1 "$n"); do
      [ "$k" = 1 ] || printf ','
      printf '{"name":"h%s","address":"%s","port":22,"ns":"%s"}' "$k" "$SUBNET.$((10 + k))" "$prefix-h$k"
    done
    printf ']}\n'
  } >"$dir/fleet.json.tmp"
  mv "$dir/fleet.json.tmp" "$dir/fleet.json"
  up_ok=1
  echo "fleet.sh: $n hosts up ($prefix), $dir/fleet.json"
}

cmd_ctl() {
  load_fleet "$1"
  local k=$2 action=$3 ns addr
  check_host "$k"
  ns="$prefix-h$k"
  addr="$SUBNET.$((10 + k))"
  case $action in
    link-down) ipc -n "$ns" link set eth0 down ;;
    link-up) ipc -n "$ns" link set eth0 up ;;
    stop-sshd) in_host "$k" sh -c "$STOP_SSHD" ;;
    start-sshd)
      in_host "$k" sh -c "$START_SSHD"
      # Its pid file says it listens; checked from the client side too.
      for _ in $(seq 1 100); do
        if timeout 2 ip netns exec "$sw" bash -c 'exec 3<>"/dev/tcp/$0/22"' "$addr" 2>/dev/null; then
          return 0
        fi
        sleep 0.1
      done
      die "sshd on h$k ($addr) does not listen after start-sshd"
      ;;
    freeze) in_host "$k" sh -c "$SIGNAL_SSHD" sh STOP ;;
    thaw) in_host "$k" sh -c "$SIGNAL_SSHD" sh CONT ;;
    rekey)
      rm -f "$dir/h$k/ssh_host_ed25519_key" "$dir/h$k/ssh_host_ed25519_key.pub"
      timeout 30 ssh-keygen -q -t ed25519 -N '' -C "h$k" -f "$dir/h$k/ssh_host_ed25519_key"
      in_host "$k" sh -c "$STOP_SSHD"
      cmd_ctl "$1" "$k" start-sshd
      ;;
    *) die "unknown action '$action' (link-down|link-up|stop-sshd|start-sshd|freeze|thaw|rekey)" ;;
  esac
}

# A bound for a caller's command; interactive use keeps the terminal.
run_bounded() {
  local t=${FLEET_TIMEOUT:-600}
  [[ $t =~ ^[0-9]+$ ]] || die "FLEET_TIMEOUT must be whole seconds, not '$t'"
  if [ -t 0 ]; then
    timeout --foreground -k 5 "$t" "$@"
  else
    timeout -k 5 "$t" "$@"
  fi
}

cmd_exec() {
  load_fleet "$1"
  local k=$2 ipid
  shift 2
  check_host "$k"
  [ $# -gt 0 ] || die "exec needs a command"
  ipid=$(host_init_pid "$k") || die "host h$k of $dir is not running"
  run_bounded nsenter --target "$ipid" --mount --pid --net --uts --wdns=/ -- "$@"
}

cmd_client() {
  load_fleet "$1"
  shift
  [ $# -gt 0 ] || die "client needs a command"
  [ -e "/run/netns/$sw" ] || die "no bridge namespace $sw for $dir"
  run_bounded ip netns exec "$sw" "$@"
}

[ $# -ge 1 ] || usage
case $1 in
  up) [ $# -eq 3 ] || usage; cmd_up "$2" "$3" ;;
  down) [ $# -eq 2 ] || usage; cmd_down "$2" ;;
  sweep) [ $# -eq 1 ] || usage; cmd_sweep ;;
  ctl) [ $# -eq 4 ] || usage; cmd_ctl "$2" "$3" "$4" ;;
  exec) [ $# -ge 4 ] || usage; d=$2; k=$3; shift 3; cmd_exec "$d" "$k" "$@" ;;
  client) [ $# -ge 3 ] || usage; d=$2; shift 2; cmd_client "$d" "$@" ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
