"""Pieces the Python benchmark scripts share (imported, not run):
scripts/bench, scripts/ws-bench, scripts/admission-figures.py (and
balance-figures.py through it), scripts/idle-memory.py and
scripts/profile-request.py.

Processes every run starts, the open-files limit, waiting for a port,
idle keep-alive connections, CPU time and resident memory of a process
tree from /proc, medians, and the command line of a one-worker nginx or
coregate.
"""
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time


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


def wait_port(port, limit=10.0, host="127.0.0.1"):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on {host}:{port}")


def cpu_ticks_split(pid):
    """(utime, stime) of PID and all its descendants, in clock ticks
    (threads are included in their process's figures)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[11]), int(fields[12])))
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user, system = int(fields[11]), int(fields[12])
    except OSError:
        return 0, 0
    todo = [pid]
    while todo:
        for child, u, s in children.get(todo.pop(), []):
            user += u
            system += s
            todo.append(child)
    return user, system


def cpu_ticks(pid):
    """utime+stime of PID and all its descendants, in clock ticks."""
    return sum(cpu_ticks_split(pid))


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_kib(pid):
    """Resident memory of PID and its child processes (nginx's workers), KiB."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except OSError:
                pass
    total = 0
    for p in pids:
        try:
            total += proc_status_kib(p, "VmRSS")
        except (OSError, RuntimeError):
            pass  # gone, or a zombie
    return total


def open_idle(addr, port, n):
    """N connections to ADDR:PORT, each after one GET and its whole
    response: idle keep-alive connections, returned open."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    conns = []
    for _ in range(n):
        s = socket.create_connection((addr, port), timeout=10)
        s.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed before a response")
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        while len(body) < length:
            body += s.recv(65536)
        conns.append(s)
    return conns


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def idle_count(wanted, what):
    """How many of WHAT (each holding two descriptors in a proxy) every
    proxy can be given under the open-files limit."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = min(wanted, (limit - 1024) // 2)
    if n < wanted:
        log(f"{what} capped at {n} (not {wanted}) by the open files limit {limit}")
    return n


def proxy_command(name, path, coregate):
    """nginx, or coregate (`coregate-epoll` on its epoll driver) with one
    worker, on the config at PATH."""
    if name == "nginx":
        return ["nginx", "-c", path]
    driver = "epoll" if name == "coregate-epoll" else "auto"
    return [coregate, "run", "--config", path, "--workers", "1", "--driver", driver]
