"""The processes a run starts, and waiting for them: every process is
registered in one Procs and stopped, by process group, in one `finally`;
every wait (a port, an HTTP answer, a file, a fleet's part coming up) is
one wait_until, a poll with a deadline; the open-files limit is raised for
what the proxies hold open."""
import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time


# Where `admission` and `balance` run things: coregate alone on PROXY_CPU;
# origins, load generators, the loris herd and the driving process on
# CLIENT_CPU, so client work does not steal the proxy's core.
PROXY_CPU = "1"
CLIENT_CPU = "0"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def helper(module, *args):
    """The command line of one of this package's helper processes (a
    module run with -m; cli puts the package on PYTHONPATH)."""
    return [sys.executable, "-m", f"coregate_bench.{module}", *map(str, args)]


def wrapped(argv, cpu=None, netns=None, ip="ip"):
    """ARGV pinned to CPU (a taskset list) and run inside the network
    namespace NETNS, where given. `ip netns exec` and taskset both exec,
    so the process keeps the pid of the command started."""
    argv = [str(a) for a in argv]
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    if netns is not None:
        argv = [ip, "netns", "exec", netns, *argv]
    return argv


class Procs:
    """Every process a run starts is registered here, and one `finally`
    stops them all, by process group, whatever went wrong. IP is the `ip`
    that starts processes in a network namespace."""

    def __init__(self, ip="ip"):
        self.live = []
        self.ip = ip

    def start(self, argv, cpu=None, log=None, netns=None, **kw):
        """Start ARGV pinned to CPU (a taskset list) inside NETNS, where
        given; with LOG, its stdout and stderr are appended to that file."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        if log is not None:
            kw["stdout"] = open(log, "ab")
            kw["stderr"] = subprocess.STDOUT
        # A session of its own: the process and anything it spawns form one
        # group, signalled together.
        p = subprocess.Popen(wrapped(argv, cpu, netns, self.ip), start_new_session=True, **kw)
        if log is not None:
            kw["stdout"].close()  # the child holds its own copy
        self.live.append(p)
        return p

    def signal(self, p, sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, p, timeout=10.0, sig=None):
        """SIG (default SIGTERM) to P's group, SIGKILL after TIMEOUT seconds."""
        if p.poll() is None:
            self.signal(p, sig or signal.SIGTERM)
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


def wait_until(cond, limit, what):
    """Polls COND() until it returns something true, and returns that;
    after LIMIT seconds raises RuntimeError saying WHAT was awaited."""
    end = time.monotonic() + limit
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= end:
            raise RuntimeError(f"{what} (waited {limit:g} s)")
        time.sleep(0.05)


def accepts(host, port):
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_port(port, limit=10.0, host="127.0.0.1"):
    wait_until(lambda: accepts(host, port), limit, f"nothing accepts on {host}:{port}")


def wait_http(host, port, path, limit=15.0):
    """Waits until HOST:PORT answers PATH with 200; returns the body length."""
    last = []

    def answered():
        try:
            c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200:
                return (len(body),)  # true even for an empty body
            last.append(f"status {r.status}")
        except OSError as e:
            last.append(str(e))
        return None

    try:
        return wait_until(answered, limit, f"{host}:{port}{path} not answering 200")[0]
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {last[-1] if last else 'no answer'}") from None
