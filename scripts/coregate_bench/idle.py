"""Resident memory per idle connection: a proxy's RSS growth (its whole
process tree) while it holds N idle connections, over N. Used by `run`
and `idle-memory` (HTTP keep-alive), `tls` (HTTPS) and `ws` (open tunnels)."""
import socket
import ssl
import time

from .openloop import head_framing
from .proctree import rss_kib


def open_idle(addr, port, n, tls=False):
    """N connections to ADDR:PORT (HTTPS with TLS, certificate unchecked),
    each after one GET and its whole response: idle keep-alive
    connections, returned open."""
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    conns = []
    for _ in range(n):
        s = socket.create_connection((addr, port), timeout=10)
        if ctx:
            s = ctx.wrap_socket(s)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        read_response(s)
        conns.append(s)
    return conns


def read_response(s):
    """Reads one Content-Length response from socket S."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before a response")
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length, _, chunked = head_framing(head)
    if chunked:
        raise RuntimeError("a chunked response: the origins here send Content-Length")
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in a response body")
        body += chunk


def http_holder(addr, port, tls=False):
    """hold(n) for rss_growth: N idle keep-alive connections."""
    def hold(n):
        conns = open_idle(addr, port, n, tls)
        return lambda: [s.close() for s in conns]
    return hold


def rss_growth(pid, hold, n, warm=100):
    """RSS of PID's tree before and after HOLD(N) (which opens N idle
    connections and returns what closes them), and the bytes per
    connection. HOLD(WARM) first grows pools and buffers once, so that only
    the connections' own memory counts."""
    hold(warm)()
    time.sleep(0.5)
    before = rss_kib(pid)
    release = hold(n)
    time.sleep(1.0)
    after = rss_kib(pid)
    release()
    return {"rss_before_kib": before, "rss_after_kib": after, "bytes_per_conn": (after - before) * 1024 / max(n, 1)}
