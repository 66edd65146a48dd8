#!/usr/bin/env python3
"""A test origin for coregate's integration tests (Python's http.server).

Listens on 127.0.0.1 (TCP, port 0 by default; HTTPS with --tls CERT KEY)
or on a UNIX socket, prints
`READY <port-or-path>` once it accepts, and serves:

  /echo...        JSON: method, path, headers, peer port, body length and sha256
  /bytes?n=N      N bytes with Content-Length
  /chunked?n=N    N bytes as a chunked response (chunks of up to 1000 bytes)
  /close?n=N      N bytes, no Content-Length: the body ends when we close
  /truncate       announces 100000 bytes, sends 1000, closes
  /slow?ms=M      waits M ms, then answers like /echo
  /inflight       how many /slow requests are being served now
  /hang           never answers (sleeps 60 s)
  /early413       answers 413 without reading the request body, closes
  /stream-echo    echoes a Content-Length body back as a chunked response
                  while still reading it, a piece per read (full duplex)
  /headbody       broken on purpose: sends a body even to HEAD, then
                  a second, unasked-for response
  /ignore         broken on purpose: answers without reading the request
                  body and keeps the connection, so the body is read as
                  the next request (the CL.0 desync)
  /switch?to=P    answers 101 with `Upgrade: P` (none when P is empty),
                  whatever the request asked, then echoes raw bytes until
                  the client's end of stream, and closes
  /switch?to=P&first=N
                  the same, but sends N bytes and shuts its writing side
                  first, then reads until the client's end of stream

Every connection stops after 60 s, so a stuck test cannot keep it alive.
"""
import argparse
import hashlib
import json
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


# `/slow` requests being served now (`/inflight` tells), so a test can
# wait for one to arrive instead of sleeping.
SLOW = 0
SLOW_LOCK = threading.Lock()


def pattern(n):
    block = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    return (block * (n // len(block) + 1))[:n]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, *args):
        pass

    def read_exactly(self, remaining, digest):
        while remaining:
            part = self.rfile.read(min(remaining, 65536))
            if not part:
                raise ConnectionError("truncated body")
            digest.update(part)
            remaining -= len(part)

    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        digest = hashlib.sha256()
        total = 0
        if te.lower().endswith("chunked"):
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                self.read_exactly(size, digest)
                total += size
                self.rfile.readline()
        else:
            total = int(self.headers.get("Content-Length", "0") or 0)
            self.read_exactly(total, digest)
        return total, digest.hexdigest()

    def send_body(self, status, body, ctype="application/octet-stream", length=True, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def stream_echo(self):
        remaining = int(self.headers.get("Content-Length", "0"))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while remaining:
            part = self.rfile.read1(min(remaining, 65536))
            if not part:
                raise ConnectionError("truncated body")
            self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
            remaining -= len(part)
        self.wfile.write(b"0\r\n\r\n")

    def switch(self, to, first):
        head = "HTTP/1.1 101 Switching Protocols\r\n"
        if to:
            head += f"Upgrade: {to}\r\nConnection: upgrade\r\n"
        self.wfile.write((head + "\r\n").encode())
        self.wfile.flush()
        self.close_connection = True
        if first is not None:
            self.wfile.write(pattern(int(first)))
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        while True:
            part = self.rfile.read1(65536)
            if not part:
                break
            if first is None:
                self.wfile.write(part)
                self.wfile.flush()

    def echo(self):
        total, sha = self.read_body()
        peer = self.client_address[1] if isinstance(self.client_address, tuple) else 0
        doc = {
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "peer_port": peer,
            "body_len": total,
            "body_sha256": sha,
        }
        self.send_body(200, json.dumps(doc).encode(), "application/json")

    def handle_any(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        n = int(q.get("n", "0"))
        if url.path.startswith("/bytes"):
            self.read_body()
            self.send_body(200, pattern(n))
        elif url.path.startswith("/chunked"):
            self.read_body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = pattern(n)
            for i in range(0, len(body), 1000):
                part = body[i:i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: done\r\n\r\n")
        elif url.path.startswith("/close"):
            self.read_body()
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(pattern(n))
            self.close_connection = True
        elif url.path.startswith("/truncate"):
            self.read_body()
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(pattern(1000))
            self.wfile.flush()
            self.close_connection = True
        elif url.path.startswith("/slow"):
            global SLOW
            with SLOW_LOCK:
                SLOW += 1
            try:
                time.sleep(int(q.get("ms", "1000")) / 1000)
                self.echo()
            finally:
                with SLOW_LOCK:
                    SLOW -= 1
        elif url.path.startswith("/inflight"):
            with SLOW_LOCK:
                n = SLOW
            self.send_body(200, str(n).encode(), "text/plain")
        elif url.path.startswith("/hang"):
            time.sleep(60)
            self.close_connection = True
        elif url.path.startswith("/headbody"):
            body = b"real body"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\ninjected")
        elif url.path.startswith("/ignore"):
            self.send_body(200, b"ignored\n", "text/plain")
        elif url.path.startswith("/stream-echo"):
            self.stream_echo()
        elif url.path.startswith("/switch"):
            self.switch(q.get("to", ""), q.get("first"))
        elif url.path.startswith("/early413"):
            self.send_body(413, b"too large\n", "text/plain", extra=[("Connection", "close")])
            self.close_connection = True
        else:
            self.echo()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unix")
    ap.add_argument("--fd", type=int,
                    help="listen on this bound TCP socket (a port the test reserved)")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve HTTPS with this certificate and key")
    args = ap.parse_args()
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        server = UnixServer(args.unix, Handler)
        where = args.unix
    else:
        ThreadingHTTPServer.daemon_threads = True
        if args.fd is not None:
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
            server.socket.close()
            server.socket = socket.socket(fileno=args.fd)
            server.socket.listen(128)
            server.server_address = server.socket.getsockname()
        else:
            server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
        where = str(server.server_address[1])
        if args.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*args.tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("READY", where, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
