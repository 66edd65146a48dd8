"""A coregate fleet on one machine, with real parts.

Three coregate hosts, each in its own network namespace with its own origin; HAProxy in front of
them in a fourth (mode tcp, health-checking each host's /readyz); a real
redis-server holding the fleet's counts; and the load generator (oha) in a
fifth. It shows, with figures:

  exact    a fleet limit of 300 req/s for one principal (x-api-key) holds
           with 900 req/s offered evenly through the balancer, and with all
           900 req/s sent to one host;
  outage   Redis killed for 5 s under load, all of it on one host: no
           5xx, the admitted rate during the outage per the fallback
           (local_share: a third), and the fleet's rate back within 10%
           soon after Redis returns;
  drain    `coregate drain` on one host under load behind the balancer:
           /readyz says draining, HAProxy takes it out, no request fails;
  kill     SIGKILL on one host under load: failed requests no more than
           those it had in flight;
  cost     CPU per request of a fleet-scoped limit against a local one
           (one host, a limit no request reaches), interleaved rounds.

Everything it starts is stopped and the namespaces removed at the end, also
on failure or Ctrl-C. Needs root, iproute2, haproxy, redis-server and oha.

  scripts/bench fleet-demo                    # every part; a table on stdout
  scripts/bench fleet-demo --only exact,kill  # some parts
  scripts/bench fleet-demo --dry-run          # print the plan and the configs
  scripts/bench fleet-demo --out docs/bench/fleet-DATE.md
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

from . import build
from .loads import Load, oha, oha_argv, parse_oha
from .options import names
from .origins import builtin_command
from .proctree import measure, us_per
from .procs import Procs, log, wait_until, wrapped
from .summary import fmt, fmt_x, median, ratio
from .tools import ensure_tools

NET = "10.77.0"
BRIDGE = "cgfleet0"
HOSTS = ["h1", "h2", "h3"]
LB_ADDR = f"{NET}.10"
REDIS = f"{NET}.1:6390"
CLIENT = "cgf-client"
PARTS = ["exact", "outage", "drain", "kill", "cost"]
WORK = "/tmp/coregate-fleet-demo"
API_KEY = "x-api-key: tenant-1"  # the one principal every load is
TOOLS = ["ip", "ss", "haproxy", "redis-server", "redis-cli", "oha", "curl", "taskset"]


def host_addr(i):
    return f"{NET}.{11 + i}"


def ns(name):
    return f"cgf-{name}"


def sh(*cmd, check=True, quiet=False):
    if not quiet:
        log("$", " ".join(cmd))
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def host_config(listen, limit, scope="fleet", redis=f"redis://{REDIS}/0", backend="127.0.0.1:9000",
                drain_grace="3s"):
    """A fleet host's configuration: LIMIT req/s per x-api-key, SCOPE fleet
    (counted with the fleet through REDIS, a URL) or local. DRAIN_GRACE is
    how long a drain keeps answering after /readyz says draining (what the
    balancer needs to take the host out)."""
    fleet = (
        f'[fleet]\nredis = "{redis}"\ninstances = {len(HOSTS)}\n'
        'sync_interval = "100ms"\non_unreachable = "local_share"\n\n'
        if scope == "fleet"
        else ""
    )
    return (
        f'[server]\ndrain_grace = "{drain_grace}"\ndrain_timeout = "10s"\n\n'
        f"{fleet}"
        f'[[listener]]\nlisten = "{listen}"\n'
        "max_connections = 20000\n"
        f'[listener.limits]\nrate = "{limit}/s"\nburst = {max(1, limit // 10)}\n'
        f'principal = "header:x-api-key"\nscope = "{scope}"\n\n'
        f'[upstream.app]\nbackends = ["tcp://{backend}"]\n\n'
        '[[route]]\nupstream = "app"\n'
    )


def haproxy_config():
    servers = "\n".join(
        f"  server {h} {host_addr(i)}:80 check" for i, h in enumerate(HOSTS)
    )
    return f"""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch
frontend fe
  bind {LB_ADDR}:80
  default_backend hosts
backend hosts
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 200ms fall 1 rise 2
{servers}
"""


class Fleet:
    """The namespaces and every process in them, by key ("h1", "redis",
    "load-exact" ...); `stop_all` and `net_down` undo it all. TOOLS: the
    outside tools' paths (name: path), which also work under sudo."""

    def __init__(self, binary, limit, tools):
        self.binary = binary
        self.limit = limit
        self.tools = tools
        self.procs = Procs(ip=tools["ip"])
        self.named = {}

    def ip(self, *args, **kw):
        return sh(self.tools["ip"], *args, **kw)

    # ---- network ----
    def net_up(self):
        self.ip("link", "add", BRIDGE, "type", "bridge")
        self.ip("addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        self.ip("link", "set", BRIDGE, "up")
        names = [(ns(h), host_addr(i)) for i, h in enumerate(HOSTS)]
        names += [(ns("lb"), LB_ADDR), (CLIENT, f"{NET}.30")]
        for k, (name, addr) in enumerate(names):
            self.ip("netns", "add", name)
            a, b = f"cgf{k}a", f"cgf{k}b"
            self.ip("link", "add", a, "type", "veth", "peer", "name", b)
            self.ip("link", "set", a, "master", BRIDGE)
            self.ip("link", "set", a, "up")
            self.ip("link", "set", b, "netns", name)
            self.ip("-n", name, "addr", "add", f"{addr}/24", "dev", b)
            self.ip("-n", name, "link", "set", b, "up")
            self.ip("-n", name, "link", "set", "lo", "up")

    def net_down(self):
        for name in [ns(h) for h in HOSTS] + [ns("lb"), CLIENT]:
            self.ip("netns", "del", name, check=False, quiet=True)
        # A run cut off between creating a pair and moving its end leaves
        # the pair in this namespace.
        for k in range(len(HOSTS) + 2):
            self.ip("link", "del", f"cgf{k}a", check=False, quiet=True)
        self.ip("link", "del", BRIDGE, check=False, quiet=True)

    # ---- processes ----
    def spawn(self, key, argv, netns=None, cpu=None, **kw):
        """Starts ARGV as KEY (in NETNS, pinned to CPU, where given); its
        output goes to WORK/KEY.log unless KW says where."""
        if "stdout" not in kw:
            kw["log"] = os.path.join(WORK, f"{key}.log")
        self.named[key] = self.procs.start(argv, cpu, netns=netns, **kw)
        return self.named[key]

    def wait(self, key, timeout=None):
        """Waits for KEY to exit by itself; its exit status."""
        p = self.named.pop(key)
        status = p.wait(timeout)
        self.procs.forget(p)
        return status

    def stop(self, key, sig=signal.SIGTERM, wait=15):
        p = self.named.pop(key, None)
        if p is not None:
            self.procs.stop(p, timeout=wait, sig=sig)

    def redis_up(self):
        host, port = REDIS.split(":")
        self.spawn("redis", [self.tools["redis-server"], "--bind", host, "--port", port,
                             "--save", "", "--appendonly", "no", "--protected-mode", "no"])
        wait_until(lambda: sh(self.tools["redis-cli"], "-h", host, "-p", port, "ping", check=False,
                              quiet=True).stdout.strip() == "PONG", 15, "redis not up")

    def hosts_up(self):
        for i, h in enumerate(HOSTS):
            path = os.path.join(WORK, f"{h}.toml")
            with open(path, "w") as f:
                f.write(host_config(f"{host_addr(i)}:80", self.limit))
            self.spawn(f"{h}-origin", builtin_command(self.binary, "127.0.0.1:9000", 128), netns=ns(h))
            self.spawn(h, [self.binary, "run", "--config", path, "--workers", "1",
                           "--admin-socket", admin(h)], netns=ns(h))
        for h in HOSTS:
            wait_until(lambda h=h: os.path.exists(admin(h)) and stats(h) is not None, 15, f"{h} not up")

    def lb_up(self):
        path = os.path.join(WORK, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(haproxy_config())
        self.spawn("haproxy", [self.tools["haproxy"], "-db", "-f", path], netns=ns("lb"))
        wait_until(lambda: self.http_status(f"http://{LB_ADDR}/readyz") == 200, 15, "haproxy not up")

    def http_status(self, url):
        """The status of a GET of URL from the load generator's namespace (0: none)."""
        r = subprocess.run(wrapped([self.tools["curl"], "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "--max-time", "2", url], netns=CLIENT, ip=self.tools["ip"]),
                           capture_output=True, text=True)
        return int(r.stdout or 0)

    def load(self, url, seconds=5, keepalive=False, conns=50, cpu=None):
        """How oha loads URL from the load generator's namespace, as API_KEY."""
        return Load(url, cpu, conns, seconds, keepalive, headers=[API_KEY], netns=CLIENT, ip=self.tools["ip"])

    def stop_all(self):
        # Loads at once; then the rest, last started first: the hosts
        # before the Redis they sync with.
        for key in [k for k in self.named if k.startswith("load")]:
            self.stop(key, signal.SIGKILL, wait=5)
        self.named.clear()
        self.procs.stop_all()


def admin(h):
    return os.path.join(WORK, f"{h}.sock")


def stats(h):
    """A host's admin socket answer to `stats`, or None when it is gone."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(admin(h))
            s.sendall(b"stats\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def admitted(h):
    """Requests a host has admitted: its routes' counts less its refusals
    (the balancer's /readyz checks are 2xx too, but go through no route)."""
    s = stats(h)
    if s is None:
        return None
    return sum(s["total"]["routes"].values()) - sum(s["total"]["rejected"].values())


def load(fleet, key, url, rate, seconds, keepalive=False, conns=50):
    """Starts oha as KEY at RATE req/s for SECONDS in the background, its
    JSON report going to WORK/KEY.json (load_result reads it)."""
    argv = oha_argv(fleet.tools["oha"], fleet.load(url, seconds, keepalive, conns), rate=rate)
    with open(os.path.join(WORK, f"{key}.json"), "w") as out, open(os.path.join(WORK, f"{key}.log"), "w") as err:
        return fleet.spawn(key, argv, stdout=out, stderr=err)


def load_result(key):
    """Status counts and failed requests (loads.parse_oha: requests oha cut
    off itself when its time was up are not failures)."""
    with open(os.path.join(WORK, f"{key}.json")) as f:
        got = parse_oha(f.read())
    return got.codes, got.failed


def sample_admitted(duration, every=0.5, during=None):
    """Per-sample admitted requests (all hosts) over `duration`; `during`
    is called with the elapsed time each sample, to act mid-run."""
    series = []
    last = {h: admitted(h) or 0 for h in HOSTS}
    t0 = last_t = time.monotonic()
    next_t = t0
    while time.monotonic() - t0 < duration:
        next_t += every
        time.sleep(max(0.0, next_t - time.monotonic()))
        if during:
            during(time.monotonic() - t0)
        now = {h: admitted(h) for h in HOSTS}
        t = time.monotonic()
        delta = sum((now[h] - last[h]) for h in HOSTS if now[h] is not None)
        # Per second of the time that really passed between the samples.
        series.append((round(t - t0, 2), delta / (t - last_t)))
        last = {h: (now[h] if now[h] is not None else last[h]) for h in HOSTS}
        last_t = t
    return series


def window_rate(series, start, end):
    xs = [r for t, r in series if start <= t <= end]
    return sum(xs) / len(xs) if xs else float("nan")


def part_exact(fleet, args, rows):
    for name, url in [("even, through the balancer", f"http://{LB_ADDR}/"),
                      ("all on h1", f"http://{host_addr(0)}/")]:
        time.sleep(1.5)  # buckets refill between runs
        load(fleet, "load-exact", url, args.rate, args.seconds)
        series = sample_admitted(args.seconds)
        fleet.wait("load-exact")
        rate = window_rate(series, 2.0, args.seconds - 0.5)
        codes, errors = load_result("load-exact")
        rows.append((f"exact: {args.rate} req/s {name}", f"{rate:.0f} req/s admitted",
                     f"{rate / args.limit:.3f}x of {args.limit}", f"codes {codes}, errors {errors}"))


def part_outage(fleet, args, rows):
    events = {}

    def act(t):
        if "kill" not in events and t >= 5:
            fleet.stop("redis", signal.SIGKILL)
            events["kill"] = t
        if "back" not in events and t >= 10:
            fleet.redis_up()
            events["back"] = t

    # All the load on h1: the fallback's local share (a third of the rate)
    # then differs from the fleet's, so the return shows.
    time.sleep(1.5)
    load(fleet, "load-outage", f"http://{host_addr(0)}/", args.rate, 16)
    series = sample_admitted(16, every=0.25, during=act)
    fleet.wait("load-outage")
    codes, errors = load_result("load-outage")
    five = sum(v for k, v in codes.items() if k.startswith("5"))
    outage = window_rate(series, events["kill"] + 0.5, events["back"] - 0.25)
    back_at = next((t for t, r in series if t > events["back"] and abs(r - args.limit) <= 0.1 * args.limit
                    and all(abs(r2 - args.limit) <= 0.1 * args.limit
                            for t2, r2 in series if events["back"] < t <= t2 <= t + 1.0)), None)
    after = window_rate(series, events["back"] + 1.0, 15.5)
    before = window_rate(series, 2.0, events["kill"] - 0.25)
    rows.append((f"outage: Redis killed 5 s under {args.rate} req/s, all on h1", f"{five} 5xx, {errors} errors",
                 f"before: {before:.0f} req/s; during: {outage:.0f} req/s "
                 f"(local_share: {args.limit}/{len(HOSTS)} = {args.limit / len(HOSTS):.0f})",
                  f"back within 10%: {back_at - events['back']:.2f} s after restart; after: {after:.0f} req/s"
                  if back_at else f"not back within 10% by the end (after: {after:.0f} req/s)"))
    with open(os.path.join(WORK, "outage-series.json"), "w") as f:
        json.dump({"events": events, "series": series}, f)


def part_drain(fleet, args, rows):
    time.sleep(1.5)
    load(fleet, "load-drain", f"http://{LB_ADDR}/", 600, 12)
    time.sleep(4)
    sh(fleet.binary, "drain", "--socket", admin("h2"))
    fleet.wait("load-drain")
    codes, errors = load_result("load-drain")
    failed = errors + sum(v for k, v in codes.items() if k not in ("200", "429"))
    gone = fleet.wait("h2", 15)
    rows.append(("drain: `coregate drain` on h2 under 600 req/s", f"{failed} failed",
                 f"codes {codes}, errors {errors}", f"h2 exited {gone}"))


def part_kill(fleet, args, rows):
    """Keep-alive load, so that what h3 has in flight is bounded by the
    connections open to it (at most one request each), counted by the
    kernel in h3's namespace just before the kill."""
    time.sleep(1.5)
    load(fleet, "load-kill", f"http://{LB_ADDR}/", 600, 10, keepalive=True, conns=48)
    time.sleep(4)
    open_to_h3 = sh(*wrapped([fleet.tools["ss"], "-Htn", "state", "established", "( sport = :80 )"],
                             netns=ns("h3"), ip=fleet.tools["ip"]), quiet=True).stdout.count("\n")
    fleet.stop("h3", signal.SIGKILL)
    fleet.wait("load-kill")
    codes, errors = load_result("load-kill")
    failed = errors + sum(v for k, v in codes.items() if k not in ("200", "429"))
    rows.append(("kill: SIGKILL on h3 under 600 req/s (keep-alive)", f"{failed} failed",
                 f"{open_to_h3} connections open to h3 just before (at most one request each)",
                 f"codes {codes}"))


def part_cost(fleet, args, rows):
    """One proxy on the load generator's loopback (its own namespace),
    pinned apart from oha, with a limit no request reaches: local scope
    against fleet scope (which counts every request for the sync thread
    and syncs with the fleet's Redis)."""
    costs = []
    for scope in ["local", "fleet"] * args.rounds:
        path = os.path.join(WORK, f"cost-{scope}.toml")
        with open(path, "w") as f:
            f.write(host_config("127.0.0.1:80", 1_000_000_000, scope=scope))
        fleet.spawn("cost-origin", builtin_command(fleet.binary, "127.0.0.1:9000"), netns=CLIENT)
        proxy = fleet.spawn("cost-proxy", [fleet.binary, "run", "--config", path, "--workers", "1"], netns=CLIENT,
                            cpu="0")
        wait_until(lambda: fleet.http_status("http://127.0.0.1:80/healthz") == 200, 15, "cost proxy not up")
        # `ip netns exec` and `taskset` exec: the child is coregate itself.
        load = fleet.load("http://127.0.0.1:80/", keepalive=True, conns=32, cpu="1")
        ok, ticks = measure(proxy.pid, lambda: oha(fleet.tools["oha"], load, requests=args.cost_requests).ok)
        costs.append((scope, us_per(ticks.total, ok)))
        fleet.stop("cost-proxy")
        fleet.stop("cost-origin")
    local = median([c for s, c in costs if s == "local"])
    flt = median([c for s, c in costs if s == "fleet"])
    rows.append((f"cost: CPU per request, fleet scope vs local ({args.rounds} interleaved rounds, "
                 f"{args.cost_requests} requests each)", fmt_x(ratio(flt, local)) or "n/a",
                 f"median CPU us/request local {fmt(local)}, fleet {fmt(flt)}", ""))


PART = {"exact": part_exact, "outage": part_outage, "drain": part_drain, "kill": part_kill, "cost": part_cost}


def add_arguments(ap):
    ap.add_argument("--limit", type=int, default=300, help="the fleet limit, req/s")
    ap.add_argument("--rate", type=int, default=900, help="offered load, req/s")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="cost: rounds of each scope")
    ap.add_argument("--cost-requests", type=int, default=100_000)
    ap.add_argument("--only", type=names(PARTS), default=PARTS, help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--out", help="also write the table to this Markdown file")


def main(args):
    parts = args.only
    if args.dry_run:
        print(f"parts: {', '.join(parts)}")
        print(f"network: bridge {BRIDGE} {NET}.1/24 (redis {REDIS}); hosts "
              + ", ".join(f"{ns(h)} {host_addr(i)}" for i, h in enumerate(HOSTS))
              + f"; balancer {ns('lb')} {LB_ADDR}; load {CLIENT} {NET}.30")
        print("--- h1.toml\n" + host_config(f"{host_addr(0)}:80", args.limit))
        print("--- haproxy.cfg\n" + haproxy_config())
        return 0
    if os.geteuid() != 0:
        raise SystemExit("fleet-demo: needs root (network namespaces)")
    tools = ensure_tools(TOOLS)
    binary = build.ensure(args, ["coregate"])["coregate"]
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    fleet = Fleet(binary, args.limit, tools)
    rows = []

    def stopped(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM and SIGHUP clean up as Ctrl-C does.
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGHUP, stopped)
    fleet.net_down()
    try:
        fleet.net_up()
        fleet.redis_up()
        if any(p in parts for p in ["exact", "outage", "drain", "kill"]):
            fleet.hosts_up()
            fleet.lb_up()
        for p in PARTS:
            if p in parts:
                log(f"--- {p}")
                PART[p](fleet, args, rows)
    finally:
        # Not interrupted again while undoing it all.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        fleet.stop_all()
        fleet.net_down()
    table = "| what | result | detail | more |\n|---|---|---|---|\n" + "\n".join(
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Fleet demo, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                    f"`{args.command}`; work files in {WORK}.\n\n{table}\n")
    return 0
