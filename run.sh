#!/usr/bin/env bash
# run.sh start|stop|restart|status|logs — keep ccproxy running in the background.
# Works from any directory. CONFIG=/path/config.json, PYTHON=python3.x, PIDFILE, LOGFILE and
# CCPROXY_ARGS="--port 3461" (any ccproxy.py flags) override the defaults.
# The log (ccproxy.log) is opened in append mode, so `truncate -s 0 ccproxy.log` rotates it cleanly.
set -u
umask 077       # the log and the PID file, like every file ccproxy writes: the owner's alone
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-$DIR/config.json}
case "$CONFIG" in /*) ;; *) CONFIG=$PWD/$CONFIG ;; esac     # ccproxy starts in $DIR (below)
PIDFILE=${PIDFILE:-$DIR/ccproxy.pid}
LOGFILE=${LOGFILE:-$DIR/ccproxy.log}
START_WAIT_S=${START_WAIT_S:-15}
STOP_WAIT_S=${STOP_WAIT_S:-10}

alive() {
  # Whether process $1 runs. A process that has ended but is not yet reaped (a zombie, whose
  # parent is init since start's shell exited) still answers kill -0: /proc tells them apart.
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null)
  [ "$state" != "Z" ]
}

running_pid() {
  # The PID from the PID file if that process is alive and is ccproxy; a stale file is removed.
  [ -f "$PIDFILE" ] || return 1
  local pid cmd=""
  pid=$(head -n 1 "$PIDFILE" 2>/dev/null)
  if [ -n "$pid" ] && alive "$pid"; then
    if [ -r "/proc/$pid/cmdline" ]; then
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    else
      cmd=$(ps -p "$pid" -o args= 2>/dev/null)
    fi
    # "-m ccproxy" as start() runs it; "ccproxy.py" as run.sh before 2026-12 did
    case "$cmd" in *" -m ccproxy "*|*ccproxy.py*) echo "$pid"; return 0 ;; esac
  fi
  rm -f "$PIDFILE"
  return 1
}

# The address ccproxy said it listens on (the PID file's second line): flags in CCPROXY_ARGS,
# HOST and PORT are all ccproxy's to resolve, not this script's.
running_url() {
  sed -n 2p "$PIDFILE" 2>/dev/null
}

answers() {
  "$PYTHON" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/healthz", timeout=2).read()
except Exception:
    sys.exit(1)
PY
}

start() {
  local pid
  if pid=$(running_pid); then
    echo "ccproxy is already running (pid $pid): $(running_url)/"; return 0
  fi
  local from=0 url=""
  [ -f "$LOGFILE" ] && from=$(wc -c <"$LOGFILE")
  # As a module from its own directory rather than as a script: Python then runs ccproxy from
  # its cached bytecode (__pycache__/) instead of compiling ccproxy.py at every start, and keeps
  # no syntax tree of the file while it serves: about 27 MB resident instead of 47 (Python 3.12).
  # shellcheck disable=SC2086
  (cd "$DIR" && exec nohup "$PYTHON" -m ccproxy --config "$CONFIG" ${CCPROXY_ARGS:-}) \
    >>"$LOGFILE" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  local deadline=$((SECONDS + START_WAIT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    url=$(tail -c +$((from + 1)) "$LOGFILE" 2>/dev/null | sed -n 's/^ccproxy .* listening on \(http:[^ ]*\) .*/\1/p' | head -n 1)
    [ -n "$url" ] && break
    if ! alive "$pid"; then
      rm -f "$PIDFILE"
      echo "ccproxy failed to start; what it said in $LOGFILE:" >&2
      tail -c +$((from + 1)) "$LOGFILE" | tail -n 20 >&2
      return 1
    fi
    sleep 0.1
  done
  if [ -z "$url" ] || ! answers "$url"; then
    echo "ccproxy (pid $pid) did not answer ${url:-on its port} within ${START_WAIT_S}s, so it was stopped;" \
      "what it said in $LOGFILE:" >&2
    tail -c +$((from + 1)) "$LOGFILE" | tail -n 20 >&2
    kill -TERM "$pid" 2>/dev/null
    rm -f "$PIDFILE"
    return 1
  fi
  printf '%s\n%s\n' "$pid" "$url" >"$PIDFILE"
  echo "ccproxy started (pid $pid): $url/  log: $LOGFILE"
  # What ccproxy printed at start (its banner; on a first run, Claude Code's settings and the
  # next step). Log lines (they start with the date) are left in the log.
  tail -c +$((from + 1)) "$LOGFILE" | grep -v '^[0-9]\{4\}-[0-9][0-9]-[0-9][0-9] ' | grep -v '^ccproxy .* listening on '
  return 0
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    echo "ccproxy is not running"; return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  local deadline=$((SECONDS + STOP_WAIT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    alive "$pid" || { rm -f "$PIDFILE"; echo "ccproxy stopped"; return 0; }
    sleep 0.05
  done
  echo "ccproxy did not stop within ${STOP_WAIT_S}s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null
  rm -f "$PIDFILE"
  return 0
}

status() {
  local pid
  if pid=$(running_pid); then
    echo "ccproxy is running (pid $pid): $(running_url)/"
    return 0
  fi
  echo "ccproxy is not running"
  return 3
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop && start ;;
  status) status ;;
  logs) tail -n "${LINES:-50}" -f "$LOGFILE" ;;
  *) echo "usage: $0 start|stop|restart|status|logs   (env: CONFIG, PYTHON, PIDFILE, LOGFILE, CCPROXY_ARGS)" >&2; exit 2 ;;
esac
