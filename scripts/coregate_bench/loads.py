"""The load generators the proxies are measured with, and what each
reports: wrk (closed loop: maximum requests/s) and oha (a fixed rate with
latency correction, or a fixed count of requests), pinned with taskset,
optionally inside a network namespace."""
import json
import re
import subprocess
from dataclasses import dataclass, field

from . import procs


@dataclass
class Load:
    """How to load one URL."""
    url: str
    cpus: str = "0"  # taskset list of the generator (None: not pinned)
    conns: int = 50
    duration: int = 5  # seconds
    keepalive: bool = True
    body: str = None  # a file holding the POST body (oha)
    lua: str = None  # a wrk script (wrk's POST body)
    headers: list = field(default_factory=list)
    netns: str = None  # run inside this network namespace
    ip: str = "ip"  # the `ip` that enters it


def wrapped(load, argv):
    return procs.wrapped(argv, load.cpus, load.netns, load.ip)


def wrk_argv(wrk, load, threads=1):
    cmd = [wrk, f"-t{threads}", f"-c{load.conns}", f"-d{load.duration}s", "--latency"]
    if not load.keepalive:
        cmd += ["-H", "Connection: close"]
    for h in load.headers:
        cmd += ["-H", h]
    if load.lua:
        cmd += ["-s", load.lua]
    return wrapped(load, cmd + [load.url])


def parse_wrk(out):
    """(requests, requests/s, errors) from wrk's report; ValueError when
    OUT is not one."""
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not requests or not rps:
        raise ValueError("no wrk report")
    requests, rps = int(requests.group(1)), float(rps.group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return requests, rps, errors


def wrk(wrk_path, load, threads=1):
    out = subprocess.run(wrk_argv(wrk_path, load, threads), capture_output=True, text=True,
                         timeout=load.duration + 60)
    try:
        return parse_wrk(out.stdout)
    except ValueError:
        raise RuntimeError(f"wrk against {load.url} exited {out.returncode} without a report: "
                           f"{(out.stderr or out.stdout).strip()[:400]}") from None


def oha_argv(oha, load, rate=None, requests=None):
    """oha at RATE requests/s for load.duration (latency-corrected), or for
    REQUESTS requests as fast as it can."""
    cmd = [oha, "--no-tui", "--output-format", "json", "-c", str(load.conns)]
    if requests:
        cmd += ["-n", str(requests)]
    else:
        cmd += ["-z", f"{load.duration}s", "-w", "-q", str(rate), "--latency-correction"]
    if load.url.startswith("https:"):
        cmd.append("--insecure")
    if not load.keepalive:
        cmd.append("--disable-keepalive")
    if load.body:
        cmd += ["-m", "POST", "-D", load.body]
    for h in load.headers:
        cmd += ["-H", h]
    return wrapped(load, cmd + [load.url])


@dataclass
class OhaResult:
    ok: int  # 2xx responses
    errors: int  # other statuses and failed requests
    pct: dict  # latency percentiles, ms: {"p50": ..., "p99": ...}
    codes: dict = field(default_factory=dict)  # responses by status: {"200": ..., "429": ...}
    failed: int = 0  # requests that got no response


def parse_oha(text):
    data = json.loads(text)
    pct = {k: v * 1000.0 for k, v in data["latencyPercentiles"].items() if v is not None}
    codes = dict(data.get("statusCodeDistribution", {}))
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    # Requests oha cut off itself when its time was up are not failures.
    failed = sum(n for e, n in data.get("errorDistribution", {}).items() if e != "aborted due to deadline")
    errors = sum(n for code, n in codes.items() if not code.startswith("2")) + failed
    return OhaResult(ok, errors, pct, codes, failed)


def oha(oha_path, load, rate=None, requests=None):
    out = subprocess.run(oha_argv(oha_path, load, rate, requests), capture_output=True, text=True,
                         timeout=load.duration + 600)
    try:
        return parse_oha(out.stdout)
    except (json.JSONDecodeError, KeyError):
        raise RuntimeError(f"oha printed no JSON report: {out.stderr.strip()[:400]}")
