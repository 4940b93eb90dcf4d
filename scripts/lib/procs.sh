# Sourced by scripts that start commands in the background through
# `fleet.sh client`: such a job is a shell, then fleet.sh, then timeout,
# then the command, and a signal to the shell alone leaves the command
# running until its timeout. stop_tree signals a process and everything
# below it (children first listed, so none is missed when a parent ends).

# The process and its descendants, one pid a line.
proc_tree() {
  local c
  echo "$1"
  for c in $(pgrep -P "$1" 2>/dev/null); do proc_tree "$c"; done
}

# stop_tree PID [SIGNAL]: SIGTERM by default.
stop_tree() {
  [ -n "${1:-}" ] || return 0
  local pids
  pids=$(proc_tree "$1")
  # shellcheck disable=SC2086 # one pid a word
  kill "-${2:-TERM}" $pids 2>/dev/null || true
}
