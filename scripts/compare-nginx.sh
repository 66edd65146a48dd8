#!/usr/bin/env bash
# Side-by-side: coregate vs nginx as a reverse proxy, same machine, same pinning.
#
#   scripts/compare-nginx.sh [--rounds N] [--duration SECONDS] [--conns N] [--body BYTES] [--spikes] [--dry-run]
#
# Layout (2-core machine): origin (coregate origin, 1 worker) and wrk on
# CPU 0; the proxy under test alone on CPU 1: nginx (1 worker, upstream
# keepalive), coregate on io_uring and coregate on epoll (1 worker each,
# idle while another is measured). --spikes adds the two modes of the
# examples/uring_spike prototype (built with --examples): spike-sm (state
# machine) and spike-task (async tasks), single-threaded, on CPU 1 too.
# Rounds interleave the proxies; the table reports medians of max req/s
# (wrk) and the proxy's CPU microseconds per request (utime+stime from
# /proc/PID/stat over the run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh

ROUNDS=5 DURATION=10 CONNS=50 BODY=128 SPIKES=0 DRY=0
PROXY_CPU=1 LOAD_CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2;;
    --duration) DURATION=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --body) BODY=$2; shift 2;;
    --spikes) SPIKES=1; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n 2,14p "$0"; exit 0;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

need wrk nginx taskset python3 curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
BIN=target/release/coregate
SPIKE=target/release/examples/uring_spike
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
run cargo build --release --quiet
if [ "$SPIKES" = 1 ]; then run cargo build --release --quiet --examples; fi

WORK=$(mktemp -d /tmp/coregate-bench.XXXXXX)
ORIGIN_PORT=19100 NGINX_PORT=19101 CG_PORT=19102 CGE_PORT=19103 SSM_PORT=19104 STASK_PORT=19105
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# proxy NAME PORT COMMAND...: start COMMAND pinned to PROXY_CPU (stderr in
# $WORK/NAME.log), to be measured as NAME on PORT in every round, in the
# order the proxies were started.
names=() ports=() proxy_pids=()
proxy() {
  local name=$1 port=$2; shift 2
  names+=("$name") ports+=("$port")
  if [ "$DRY" = 1 ]; then echo "+ taskset -c $PROXY_CPU $*"; return; fi
  taskset -c $PROXY_CPU "$@" >/dev/null 2>"$WORK/$name.log" &
  pids+=($!) proxy_pids+=($!)
}

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
else
  taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 --body-size "$BODY" >/dev/null 2>&1 & pids+=($!)
fi
proxy nginx $NGINX_PORT "$NGINX" -c "$WORK/nginx.conf"
proxy coregate-uring $CG_PORT $BIN run --listen 127.0.0.1:$CG_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver uring
proxy coregate-epoll $CGE_PORT $BIN run --listen 127.0.0.1:$CGE_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 --driver epoll
if [ "$SPIKES" = 1 ]; then
  proxy spike-sm $SSM_PORT $SPIKE --mode sm --listen 127.0.0.1:$SSM_PORT --upstream 127.0.0.1:$ORIGIN_PORT
  proxy spike-task $STASK_PORT $SPIKE --mode task --listen 127.0.0.1:$STASK_PORT --upstream 127.0.0.1:$ORIGIN_PORT
fi
if [ "$DRY" = 1 ]; then
  echo "+ for each of $ROUNDS rounds, each proxy (${names[*]}): taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DURATION}s URL"
  exit 0
fi

sleep 1
for port in $ORIGIN_PORT "${ports[@]}"; do
  curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "port $port not answering" >&2; exit 1; }
done

results="$WORK/results.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!names[@]}"; do
    wrk_round "$round" "${names[$i]}" "${proxy_pids[$i]}" "http://127.0.0.1:${ports[$i]}/" "$results"
  done
done

echo
echo "$ROUNDS interleaved rounds, wrk -t1 -c$CONNS -d${DURATION}s, $BODY-byte responses"
paired_table "$results" nginx "${names[@]}"
