#!/usr/bin/env bash
# What statistics and access logging cost: coregate with statistics, the
# same source built without them, and with an access log line per request.
#
#   scripts/compare-stats.sh [--rounds N] [--duration SECONDS] [--conns N] [--dry-run]
#
# Three proxies, 1 worker each, alone on CPU 1, in front of coregate's own
# origin (128-byte bodies) on CPU 0 with wrk: `stats-off` is built with
# `--no-default-features` (recording compiled out), `stats-on` is the
# release build, `access-log` is the release build with a [[rule]] logging
# every request (time, method, path, status, latency, upstream, bytes) to
# a file. Rounds interleave the three; ratios are against stats-off, and
# access-log against stats-on is the logging's own cost.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh

ROUNDS=5 DURATION=8 CONNS=50 DRY=0
PROXY_CPU=1 LOAD_CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2;;
    --duration) DURATION=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n 2,14p "$0"; exit 0;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

need wrk taskset python3 curl
ON=target/release/coregate
OFF=target/nostats/release/coregate
ORIGIN_PORT=19300 ON_PORT=19301 OFF_PORT=19302 LOG_PORT=19303
if [ "$DRY" = 1 ]; then
  echo "+ cargo build --release"
  echo "+ cargo build --release --no-default-features --target-dir target/nostats"
  echo "+ taskset -c $LOAD_CPU $ON origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1"
  echo "+ taskset -c $PROXY_CPU $OFF run (stats-off), $ON run (stats-on), $ON run with a logging rule (access-log)"
  echo "+ for each of $ROUNDS rounds, each proxy: taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DURATION}s URL"
  exit 0
fi
cargo build --release --quiet
cargo build --release --quiet --no-default-features --target-dir target/nostats

WORK=$(mktemp -d /tmp/coregate-stats.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

config() { # PORT [EXTRA]
  printf '[server]\naccess_log = "%s/access.log"\n\n[[listener]]\nlisten = "127.0.0.1:%s"\n\n' "$WORK" "$1"
  printf '[upstream.origin]\nbackends = ["tcp://127.0.0.1:%s"]\n\n%s\n[[route]]\nupstream = "origin"\n' "$ORIGIN_PORT" "${2:-}"
}
config $ON_PORT > "$WORK/on.toml"
config $OFF_PORT > "$WORK/off.toml"
config $LOG_PORT '[[rule]]
log = ["time", "method", "path", "status", "latency", "upstream", "bytes"]
' > "$WORK/log.toml"

taskset -c $LOAD_CPU $ON origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 >/dev/null 2>&1 & pids+=($!)
taskset -c $PROXY_CPU $OFF run --config "$WORK/off.toml" --workers 1 >/dev/null 2>&1 & OFF_PID=$!; pids+=($OFF_PID)
taskset -c $PROXY_CPU $ON run --config "$WORK/on.toml" --workers 1 >/dev/null 2>&1 & ON_PID=$!; pids+=($ON_PID)
taskset -c $PROXY_CPU $ON run --config "$WORK/log.toml" --workers 1 >/dev/null 2>&1 & LOG_PID=$!; pids+=($LOG_PID)
sleep 1
for port in $ORIGIN_PORT $ON_PORT $OFF_PORT $LOG_PORT; do
  curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "port $port not answering" >&2; exit 1; }
done

results="$WORK/results.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  wrk_round "$round" stats-off "$OFF_PID" "http://127.0.0.1:$OFF_PORT/" "$results"
  wrk_round "$round" stats-on "$ON_PID" "http://127.0.0.1:$ON_PORT/" "$results"
  wrk_round "$round" access-log "$LOG_PID" "http://127.0.0.1:$LOG_PORT/" "$results"
done

echo
echo "$ROUNDS interleaved rounds, wrk -t1 -c$CONNS -d${DURATION}s, 128-byte responses"
paired_table "$results" stats-off stats-off stats-on access-log
echo
echo "The access log's own cost, against stats-on (same binary, no logging rule):"
paired_table "$results" stats-on stats-on access-log
echo "access log: $(wc -l < "$WORK/access.log") lines, $(du -h "$WORK/access.log" | cut -f1)"
rm -f "$WORK/access.log"
