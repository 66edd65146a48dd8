#!/usr/bin/env bash
# Throughput with 1 and with 1,000 regex routes, coregate vs nginx, side by side.
#
#   scripts/compare-routes.sh [--rounds N] [--duration SECONDS] [--conns N] [--routes N] [--dry-run]
#
# Each proxy gets the same routes: N regex routes `^/api/v{i}/users/(\d+)$`
# (nginx: `location ~`, coregate: `path_regex`), and wrk asks for the path
# matched by the LAST one, so a proxy that tries regexes in order pays for
# all of them. Layout as scripts/compare-nginx.sh: origin and wrk on CPU 0,
# the proxies (1 worker each) on CPU 1, rounds interleaved. Reports median
# req/s, proxy CPU us/request, and the 1000-vs-1 ratio of each proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh

ROUNDS=3 DURATION=8 CONNS=50 ROUTES=1000 DRY=0
PROXY_CPU=1 LOAD_CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2;;
    --duration) DURATION=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --routes) ROUTES=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n 2,12p "$0"; exit 0;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done

need wrk nginx taskset python3 curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
BIN=target/release/coregate
WORK=$(mktemp -d /tmp/coregate-routes.XXXXXX)
ORIGIN_PORT=19200
LAST=$((ROUTES - 1))
TARGET="/api/v$LAST/users/42"

# nginx and coregate configs with the given number of regex routes; the
# last route's regex is the same in both sizes.
nginx_conf() { # name port count
  {
    echo "daemon off; master_process off; worker_processes 1;"
    echo "error_log $WORK/$1-error.log; pid $WORK/$1.pid;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off;"
    echo "  client_body_temp_path $WORK/$1-body; proxy_temp_path $WORK/$1-proxy;"
    echo "  fastcgi_temp_path $WORK/$1-fcgi; uwsgi_temp_path $WORK/$1-uwsgi; scgi_temp_path $WORK/$1-scgi;"
    echo "  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }"
    echo "  server { listen 127.0.0.1:$2 reuseport;"
    for i in $(seq $((ROUTES - $3)) $LAST); do
      echo "    location ~ ^/api/v$i/users/(\d+)\$ { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
    done
    echo "  }"
    echo "}"
  } > "$WORK/$1.conf"
}
coregate_conf() { # name port count
  {
    printf '[[listener]]\nlisten = "127.0.0.1:%s"\n\n[upstream.origin]\nbackends = ["tcp://127.0.0.1:%s"]\n\n' "$2" "$ORIGIN_PORT"
    for i in $(seq $((ROUTES - $3)) $LAST); do
      printf "[[route]]\npath_regex = '^/api/v%s/users/(\\\\d+)\$'\nupstream = \"origin\"\n\n" "$i"
    done
  } > "$WORK/$1.toml"
}
nginx_conf nginx-1 19201 1
nginx_conf nginx-$ROUTES 19202 "$ROUTES"
coregate_conf coregate-1 19203 1
coregate_conf coregate-$ROUTES 19204 "$ROUTES"

if [ "$DRY" = 1 ]; then
  echo "configs written to $WORK"
  echo "+ cargo build --release"
  echo "+ taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1"
  for n in 1 "$ROUTES"; do
    echo "+ taskset -c $PROXY_CPU $NGINX -c $WORK/nginx-$n.conf"
    echo "+ taskset -c $PROXY_CPU $BIN run --config $WORK/coregate-$n.toml --workers 1"
  done
  echo "+ for each of $ROUNDS rounds, each proxy: taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DURATION}s http://127.0.0.1:PORT$TARGET"
  exit 0
fi

cargo build --release --quiet
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c $LOAD_CPU $BIN origin --listen 127.0.0.1:$ORIGIN_PORT --workers 1 >/dev/null 2>&1 & pids+=($!)
declare -A PID PORT
PORT[nginx-1]=19201 PORT[nginx-$ROUTES]=19202 PORT[coregate-1]=19203 PORT[coregate-$ROUTES]=19204
for n in 1 "$ROUTES"; do
  taskset -c $PROXY_CPU "$NGINX" -c "$WORK/nginx-$n.conf" >/dev/null 2>&1 & PID[nginx-$n]=$!; pids+=($!)
  taskset -c $PROXY_CPU $BIN run --config "$WORK/coregate-$n.toml" --workers 1 >/dev/null 2>"$WORK/coregate-$n.log" & PID[coregate-$n]=$!; pids+=($!)
done
sleep 1.5
NAMES="nginx-1 nginx-$ROUTES coregate-1 coregate-$ROUTES"
for name in $NAMES; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$name]}$TARGET")
  [ "$code" = 200 ] || { echo "$name answered $code for $TARGET" >&2; exit 1; }
done

results="$WORK/results.tsv"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
  for name in $NAMES; do
    wrk_round "$round" "$name" "${PID[$name]}" "http://127.0.0.1:${PORT[$name]}$TARGET" "$results"
  done
done

python3 - "$results" "$ROUNDS" "$DURATION" "$CONNS" "$ROUTES" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
n = sys.argv[5]
by_round = {}
for r in rows:
    by_round.setdefault(r[0], {})[r[1]] = (float(r[2]), float(r[3]))
def med(name, col):
    return statistics.median(v[name][col] for v in by_round.values())
def ratio(a, b, col):
    return statistics.median(v[a][col] / v[b][col] for v in by_round.values())
print()
print(f"{sys.argv[2]} interleaved rounds, wrk -t1 -c{sys.argv[4]} -d{sys.argv[3]}s, path matched by the last regex route")
print(f"| proxy (1 worker, CPU 1) | routes | median req/s | median CPU us/request | req/s {n} vs 1 routes |")
print("|---|---|---|---|---|")
for proxy in ("nginx", "coregate"):
    for routes in ("1", n):
        name = f"{proxy}-{routes}"
        rel = f"{ratio(f'{proxy}-{n}', f'{proxy}-1', 0):.2f}x" if routes == n else "1.00x"
        print(f"| {proxy} | {routes} | {med(name, 0):,.0f} | {med(name, 1):.2f} | {rel} |")
print()
print(f"coregate vs nginx, req/s: {ratio('coregate-1', 'nginx-1', 0):.2f}x with 1 route, "
      f"{ratio(f'coregate-{n}', f'nginx-{n}', 0):.2f}x with {n} routes")
print("Ratios are medians of per-round ratios.")
PY
