#!/usr/bin/env bash
# Side-by-side: coregate vs nginx as a reverse proxy, same machine, same pinning.
#
#   scripts/compare-nginx.sh [--rounds N] [--duration SECONDS] [--conns N] [--body BYTES] [--dry-run]
#
# Layout (2-core machine): origin (coregate origin, 1 worker) and wrk on
# CPU 0; the proxy under test alone on CPU 1: nginx (1 worker, upstream
# keepalive), coregate on io_uring and coregate on epoll (1 worker each,
# idle while another is measured). Rounds interleave the proxies;
# the table reports medians of max req/s (wrk) and the proxy's CPU
# microseconds per request (utime+stime from /proc/PID/stat over the run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh

ROUNDS=5 DURATION=10 CONNS=50 BODY=128 DRY=0
PROXY_CPU=1 LOAD_CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2;;
    --duration) DURATION=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --body) BODY=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n 2,11p "$0"; exit 0;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

need wrk nginx taskset python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
BIN=target/release/coregate
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
run cargo build --release --quiet

WORK=$(mktemp -d /tmp/coregate-bench.XXXXXX)
ORIGIN_PORT=19100 NGINX_PORT=19101 CG_PORT=19102 CGE_PORT=19103
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat > "$WORK/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
error_log $WORK/nginx-error.log;
pid $WORK/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body; proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi; uwsgi_temp_path $WORK/uwsgi; scgi_temp_path $WORK/scgi;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT reuseport;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF

if [ "$DRY" = 1 ]; then
  echo "+ taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 --body-size $BODY"
  echo "+ taskset -c $PROXY_CPU $NGINX -c $WORK/nginx.conf"
  echo "+ taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CG_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver uring"
  echo "+ taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CGE_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver epoll"
  echo "+ for each of $ROUNDS rounds, each proxy: taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DURATION}s URL"
  exit 0
fi

taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 --body-size "$BODY" >/dev/null 2>&1 & pids+=($!)
taskset -c $PROXY_CPU "$NGINX" -c "$WORK/nginx.conf" >/dev/null 2>&1 & NGINX_PID=$!; pids+=($NGINX_PID)
taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CG_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver uring >/dev/null 2>"$WORK/coregate.log" & CG_PID=$!; pids+=($CG_PID)
taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CGE_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver epoll >/dev/null 2>"$WORK/coregate-epoll.log" & CGE_PID=$!; pids+=($CGE_PID)
sleep 1
for port in $ORIGIN_PORT $NGINX_PORT $CG_PORT $CGE_PORT; do
  curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "port $port not answering" >&2; exit 1; }
done

results="$WORK/results.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  wrk_round "$round" nginx "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/" "$results"
  wrk_round "$round" coregate-uring "$CG_PID" "http://127.0.0.1:$CG_PORT/" "$results"
  wrk_round "$round" coregate-epoll "$CGE_PID" "http://127.0.0.1:$CGE_PORT/" "$results"
done

echo
echo "$ROUNDS interleaved rounds, wrk -t1 -c$CONNS -d${DURATION}s, $BODY-byte responses"
paired_table "$results" nginx nginx coregate-uring coregate-epoll
