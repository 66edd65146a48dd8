# Shared pieces of the side-by-side benchmark scripts (sourced, not run):
# compare-nginx.sh, compare-routes.sh, compare-stats.sh.
#
# Each script starts its proxies pinned to one CPU and the origin and wrk to
# another, then calls `wrk_round` for every proxy in every round, in turn,
# so that the machine's drift between rounds hits all of them alike, and
# ends with `paired_table`: medians, and medians of the per-round ratios
# against a baseline.

# need TOOL...: exit with the Debian packages to install when a tool is
# missing (nginx may live in /usr/sbin, outside a user's PATH).
need() {
  local tool
  declare -A pkg=([wrk]=wrk [nginx]=nginx-light [taskset]=util-linux [python3]=python3 [curl]=curl)
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
      echo "missing $tool: apt-get install ${pkg[$tool]:-$tool}" >&2; exit 1; }
  done
}

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# wrk_round ROUND NAME PID URL RESULTS: one wrk run against URL, with the
# CPU time PID spent during it; appends a row to RESULTS:
#   round  name  req/s  proxy-CPU-us/request  p99  errors
# Reads LOAD_CPU, CONNS and DURATION from the caller.
wrk_round() {
  local round=$1 name=$2 pid=$3 url=$4 results=$5
  local t0 t1 out reqs rps p99 errs us
  t0=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
  t1=$(cpu_ticks "$pid")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  us=$(python3 -c "print(round(($t1-$t0)*1e6/$(getconf CLK_TCK)/max($reqs,1), 2))")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$us" "$p99" "$errs" | tee -a "$results"
}

# paired_table RESULTS BASELINE NAME...: a Markdown table of median req/s
# and CPU us/request per NAME, with the median over rounds of each
# round's ratio against BASELINE in that same round.
paired_table() {
  python3 - "$@" <<'PY'
import statistics, sys
results, baseline, names = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [l.rstrip("\n").split("\t") for l in open(results)]
by_round = {}
for r in rows:
    by_round.setdefault(r[0], {})[r[1]] = (float(r[2]), float(r[3]))
def med(name, col):
    return statistics.median(v[name][col] for v in by_round.values())
def paired(name, col):
    return statistics.median(v[name][col] / v[baseline][col] for v in by_round.values())
print(f"| proxy (1 worker, CPU 1) | median req/s | median proxy CPU us/request | req/s vs {baseline} | CPU/request vs {baseline} |")
print("|---|---|---|---|---|")
for name in names:
    print(f"| {name} | {med(name, 0):,.0f} | {med(name, 1):.2f} | {paired(name, 0):.3f}x | {paired(name, 1):.3f}x |")
print()
print(f"Ratios are medians of per-round ratios against {baseline} in the same round.")
PY
}
