"""The load generators the proxies are measured with, and what each
reports: wrk (closed loop: maximum requests/s) and oha (a fixed rate with
latency correction, or a fixed count of requests), pinned with taskset,
optionally inside a network namespace."""
import json
import re
import subprocess
from dataclasses import dataclass, field


@dataclass
class Load:
    """How to load one URL."""
    url: str
    cpus: str = "0"  # taskset list of the generator
    conns: int = 50
    duration: int = 5  # seconds
    keepalive: bool = True
    body: str = None  # a file holding the POST body (oha)
    lua: str = None  # a wrk script (wrk's POST body)
    headers: list = field(default_factory=list)
    netns: str = None  # run inside this network namespace


def wrapped(load, argv):
    cmd = ["taskset", "-c", load.cpus, *argv]
    return ["ip", "netns", "exec", load.netns, *cmd] if load.netns else cmd


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
    """(requests, requests/s, errors) from wrk's report."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
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
                         timeout=load.duration + 60).stdout
    return parse_wrk(out)


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


def parse_oha(text):
    data = json.loads(text)
    pct = {k: v * 1000.0 for k, v in data["latencyPercentiles"].items() if v is not None}
    codes = data.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    errors = sum(n for code, n in codes.items() if not code.startswith("2"))
    # Requests oha cut off itself when its time was up are not failures.
    errors += sum(n for e, n in data.get("errorDistribution", {}).items() if e != "aborted due to deadline")
    return OhaResult(ok, errors, pct)


def oha(oha_path, load, rate=None, requests=None):
    out = subprocess.run(oha_argv(oha_path, load, rate, requests), capture_output=True, text=True,
                         timeout=load.duration + 600)
    try:
        return parse_oha(out.stdout)
    except (json.JSONDecodeError, KeyError):
        raise RuntimeError(f"oha printed no JSON report: {out.stderr.strip()[:400]}")
