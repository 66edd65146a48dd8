#!/usr/bin/env bash
# Side-by-side: coregate vs nginx as a reverse proxy, same machine, same pinning.
#
#   scripts/compare-nginx.sh [--rounds N] [--duration SECONDS] [--conns N] [--body BYTES] [--dry-run]
#
# Layout (2-core machine): origin (coregate origin, 1 worker) and wrk on
# CPU 0; the proxy under test (coregate 1 worker, or nginx 1 worker with
# upstream keepalive) alone on CPU 1. Rounds interleave the two proxies;
# the table reports medians of max req/s (wrk) and the proxy's CPU
# microseconds per request (utime+stime from /proc/PID/stat over the run).
set -euo pipefail
cd "$(dirname "$0")/.."

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

for tool in wrk nginx taskset python3; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
    echo "missing $tool: apt-get install wrk nginx-light util-linux python3" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
BIN=target/release/coregate
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
run cargo build --release --quiet

WORK=$(mktemp -d /tmp/coregate-bench.XXXXXX)
ORIGIN_PORT=19100 NGINX_PORT=19101 CG_PORT=19102
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
  echo "+ taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CG_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1"
  echo "+ for each of $ROUNDS rounds, each proxy: taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DURATION}s URL"
  exit 0
fi

taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 --body-size "$BODY" >/dev/null 2>&1 & pids+=($!)
taskset -c $PROXY_CPU "$NGINX" -c "$WORK/nginx.conf" >/dev/null 2>&1 & NGINX_PID=$!; pids+=($NGINX_PID)
taskset -c $PROXY_CPU $BIN run --listen 127.0.0.1:$CG_PORT --upstream tcp://127.0.0.1:$ORIGIN_PORT --workers 1 >/dev/null 2>"$WORK/coregate.log" & CG_PID=$!; pids+=($CG_PID)
sleep 1
for port in $ORIGIN_PORT $NGINX_PORT $CG_PORT; do
  curl -sf -o /dev/null "http://127.0.0.1:$port/" || { echo "port $port not answering" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
results="$WORK/results.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  for name in nginx coregate; do
    if [ $name = nginx ]; then pid=$NGINX_PID port=$NGINX_PORT; else pid=$CG_PID port=$CG_PORT; fi
    t0=$(cpu_ticks $pid)
    out=$(taskset -c $LOAD_CPU wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/")
    t1=$(cpu_ticks $pid)
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
    us=$(python3 -c "print(round(($t1-$t0)*1e6/$TCK/max($reqs,1), 2))")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$us" "$p99" "$errs" | tee -a "$results"
  done
done

python3 - "$results" "$ROUNDS" "$DURATION" "$CONNS" "$BODY" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def med(name, col):
    return statistics.median(float(r[col]) for r in rows if r[1] == name)
n_rps, c_rps = med("nginx", 2), med("coregate", 2)
n_us, c_us = med("nginx", 3), med("coregate", 3)
print()
print(f"{sys.argv[2]} interleaved rounds, wrk -t1 -c{sys.argv[4]} -d{sys.argv[3]}s, {sys.argv[5]}-byte responses")
print("| proxy (1 worker, CPU 1) | median req/s | median proxy CPU us/request |")
print("|---|---|---|")
print(f"| nginx | {n_rps:,.0f} | {n_us:.2f} |")
print(f"| coregate | {c_rps:,.0f} | {c_us:.2f} |")
print(f"| ratio coregate/nginx | {c_rps/n_rps:.2f}x | {c_us/n_us:.2f}x |")
PY
