"""The processes a run starts, and waiting for them: every process is
registered in one Procs and stopped, by process group, in one `finally`;
ports and HTTP answers are polled with a deadline; the open-files limit is
raised for what the proxies hold open."""
import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def helper(module, *args):
    """The command line of one of this package's helper processes (a
    module run with -m; cli puts the package on PYTHONPATH)."""
    return [sys.executable, "-m", f"coregate_bench.{module}", *map(str, args)]


class Procs:
    """Every process a run starts is registered here, and one `finally`
    stops them all, by process group, whatever went wrong."""

    def __init__(self):
        self.live = []

    def start(self, argv, cpu, log=None, **kw):
        """Start ARGV pinned to CPU (a taskset list); with LOG, its stdout
        and stderr are appended to that file."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        if log is not None:
            kw["stdout"] = open(log, "ab")
            kw["stderr"] = subprocess.STDOUT
        # A session of its own: the process and anything it spawns form one
        # group, signalled together.
        p = subprocess.Popen(["taskset", "-c", cpu, *map(str, argv)], start_new_session=True, **kw)
        if log is not None:
            kw["stdout"].close()  # the child holds its own copy
        self.live.append(p)
        return p

    def signal(self, p, sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, p, timeout=10.0):
        if p.poll() is None:
            self.signal(p, signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(p, signal.SIGKILL)
                p.wait()
        self.forget(p)

    def forget(self, p):
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in reversed(list(self.live)):
            self.stop(p, timeout=5.0)


def raise_nofile(want):
    """Raise the soft open-files limit to at least WANT (never lowering it),
    for this process and all it starts: up to the hard limit, or past it
    where that is allowed (root with CAP_SYS_RESOURCE). Returns the soft
    limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    if hard == resource.RLIM_INFINITY or hard >= want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_count(wanted, what):
    """How many of WHAT (each holding two descriptors in a proxy: HAProxy
    asks for two per connection it may accept, a tunnel has two ends) every
    proxy can be given under the open-files limit."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = max(0, min(wanted, (limit - 1024) // 2))
    if n < wanted:
        log(f"{what} capped at {n} (not {wanted}) by the open files limit {limit}; "
            f"raise the hard limit (ulimit -Hn, as a privileged user) for more")
    return n


def free_port():
    # Another process could take it before it is bound; on a quiet
    # 127.0.0.1 that race is not worth more machinery.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=10.0, host="127.0.0.1"):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on {host}:{port}")


def wait_http(host, port, path, limit=15.0):
    """Waits until HOST:PORT answers PATH with 200; returns the body length."""
    end = time.monotonic() + limit
    last = None
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200:
                return len(body)
            last = f"status {r.status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{host}:{port}{path} not answering 200: {last}")
