#!/usr/bin/env bash
# run.sh start|stop|restart|status|logs — keep ccproxy running in the background.
# Works from any directory. CONFIG=/path/config.json and PYTHON=python3.x override the defaults.
# The log (ccproxy.log) is opened in append mode, so `truncate -s 0 ccproxy.log` rotates it cleanly.
set -u
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-$DIR/config.json}
PIDFILE=${PIDFILE:-$DIR/ccproxy.pid}
LOGFILE=${LOGFILE:-$DIR/ccproxy.log}
START_WAIT_S=${START_WAIT_S:-15}
STOP_WAIT_S=${STOP_WAIT_S:-10}

running_pid() {
  # The PID from the PID file if that process is alive and is ccproxy; a stale file is removed.
  [ -f "$PIDFILE" ] || return 1
  local pid cmd=""
  pid=$(cat "$PIDFILE" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ -r "/proc/$pid/cmdline" ]; then
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    else
      cmd=$(ps -p "$pid" -o args= 2>/dev/null)
    fi
    case "$cmd" in *ccproxy.py*) echo "$pid"; return 0 ;; esac
  fi
  rm -f "$PIDFILE"
  return 1
}

# host and port as the running config says (flags in CCPROXY_ARGS are not parsed here)
address() {
  "$PYTHON" - "$CONFIG" <<'PY' 2>/dev/null
import json, sys
try:
    c = json.load(open(sys.argv[1], encoding="utf-8"))
except (OSError, ValueError):
    c = {}
host = c.get("HOST", "127.0.0.1")
print("127.0.0.1" if host in ("0.0.0.0", "", "::") else host, c.get("PORT", 3456))
PY
}

answers() {
  "$PYTHON" - "$1" "$2" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen("http://%s:%s/healthz" % (sys.argv[1], sys.argv[2]), timeout=1).read()
except Exception:
    sys.exit(1)
PY
}

start() {
  local pid
  if pid=$(running_pid); then
    echo "ccproxy is already running (pid $pid)"; return 0
  fi
  # shellcheck disable=SC2086
  nohup "$PYTHON" "$DIR/ccproxy.py" --config "$CONFIG" ${CCPROXY_ARGS:-} >>"$LOGFILE" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  local host port i
  read -r host port <<<"$(address)"
  for ((i = 0; i < START_WAIT_S * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "ccproxy failed to start; the end of $LOGFILE:" >&2
      tail -n 20 "$LOGFILE" >&2
      return 1
    fi
    if answers "$host" "$port"; then
      echo "ccproxy started (pid $pid): http://$host:$port/  log: $LOGFILE"
      return 0
    fi
    sleep 0.1
  done
  echo "ccproxy (pid $pid) does not answer on $host:$port after ${START_WAIT_S}s; the end of $LOGFILE:" >&2
  tail -n 20 "$LOGFILE" >&2
  return 1
}

stop() {
  local pid i
  if ! pid=$(running_pid); then
    echo "ccproxy is not running"; return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < STOP_WAIT_S * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "ccproxy stopped"; return 0; }
    sleep 0.1
  done
  echo "ccproxy did not stop within ${STOP_WAIT_S}s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null
  rm -f "$PIDFILE"
  return 0
}

status() {
  local pid host port
  if pid=$(running_pid); then
    read -r host port <<<"$(address)"
    echo "ccproxy is running (pid $pid): http://$host:$port/"
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
  *) echo "usage: $0 start|stop|restart|status|logs   (env: CONFIG, PYTHON, CCPROXY_ARGS)" >&2; exit 2 ;;
esac
