#!/usr/bin/env python3
"""WebSocket peers for coregate's tunnel tests, on the `websockets` package.

Server: `ws.py server` listens on 127.0.0.1 (port 0), prints `READY <port>`
and serves:

  /echo            every message back, as it came (text or binary)
  /stream?n=N      N numbered text messages, unasked, then a clean close
  /decline         refuses the upgrade: 403 with a small body, the
                   connection staying HTTP

Every connection ends after 120 s, so a stuck test cannot keep it alive.

Client: `ws.py client URL STEP...` opens a WebSocket to URL and runs the
steps in order, printing one line per step; any failure prints
`error ...` and exits 1.

  echo:N:SEED      N binary messages of random sizes up to 1 MiB (and the
                   frame-length boundaries), each checked when it comes back
  text:N           N text messages, checked
  ping             a ping, waiting for its pong
  recv:N           N messages from the server, checked in order
  line             waits for a line on stdin (the test acts meanwhile)
  close            a clean close handshake; prints the close code
  wait-close:S     waits up to S seconds for the proxy or server to close;
                   prints `closed` or `open`

A refused handshake prints `refused <status>` and exits 0. A `wss://` URL
trusts the certificate in $WS_CA for the name in $WS_SERVER_NAME.
"""
import asyncio
import os
import random
import ssl
import sys
from http import HTTPStatus
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

MAX = 1 << 20
# Sizes where the frame length encoding changes (7-bit, 16-bit, 64-bit).
BOUNDARIES = [0, 1, 125, 126, 127, 65535, 65536, MAX]


async def handler(ws):
    url = urlparse(ws.request.path)
    if url.path == "/echo":
        async for message in ws:
            await ws.send(message)
    elif url.path == "/stream":
        n = int(parse_qs(url.query).get("n", ["10"])[0])
        for i in range(n):
            await ws.send(f"message {i}")
        await ws.close()


def process_request(connection, request):
    if urlparse(request.path).path == "/decline":
        return connection.respond(HTTPStatus.FORBIDDEN, "declined\n")
    return None


async def server():
    async with serve(
        handler,
        "127.0.0.1",
        0,
        max_size=None,
        ping_interval=None,
        process_request=process_request,
    ) as s:
        port = s.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.sleep(120)


def out(line):
    print(line, flush=True)


async def client(url, steps):
    tls = {}
    if url.startswith("wss://"):
        # The proxy's test certificate: trusted from WS_CA, for the name
        # in WS_SERVER_NAME.
        context = ssl.create_default_context(cafile=os.environ["WS_CA"])
        tls = {"ssl": context, "server_hostname": os.environ["WS_SERVER_NAME"]}
    try:
        ws = await connect(url, max_size=None, ping_interval=None, open_timeout=10, **tls)
    except InvalidStatus as e:
        out(f"refused {e.response.status_code}")
        return 0
    out("open")
    for step in steps:
        kind, *args = step.split(":")
        if kind == "echo":
            n, seed = int(args[0]), int(args[1])
            rng = random.Random(seed)
            sizes = BOUNDARIES + [
                int(2 ** rng.uniform(0, 20)) for _ in range(max(0, n - len(BOUNDARIES)))
            ]
            total = 0
            for size in sizes[:n]:
                message = rng.randbytes(size)
                await ws.send(message)
                back = await asyncio.wait_for(ws.recv(), 30)
                if back != message:
                    out(f"error: a {size}-byte message came back as {len(back)} different bytes")
                    return 1
                total += size
            out(f"echoed {n} {total}")
        elif kind == "text":
            for i in range(int(args[0])):
                message = f"text {i} " + "é" * i
                await ws.send(message)
                back = await asyncio.wait_for(ws.recv(), 30)
                if back != message:
                    out(f"error: text {i} came back as {back!r}")
                    return 1
            out(f"texted {args[0]}")
        elif kind == "ping":
            pong = await ws.ping(b"coregate")
            await asyncio.wait_for(pong, 10)
            out("pong")
        elif kind == "recv":
            for i in range(int(args[0])):
                message = await asyncio.wait_for(ws.recv(), 30)
                if message != f"message {i}":
                    out(f"error: message {i} came as {message!r}")
                    return 1
            out(f"received {args[0]}")
        elif kind == "line":
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        elif kind == "close":
            await asyncio.wait_for(ws.close(), 10)
            out(f"closed {ws.close_code}")
        elif kind == "wait-close":
            try:
                await asyncio.wait_for(ws.wait_closed(), float(args[0]))
                out("closed")
            except asyncio.TimeoutError:
                out("open")
        else:
            out(f"error: unknown step {step}")
            return 1
    return 0


def main():
    if sys.argv[1] == "server":
        asyncio.run(server())
        return 0
    try:
        return asyncio.run(client(sys.argv[2], sys.argv[3:]))
    except (ConnectionClosed, OSError, asyncio.TimeoutError) as e:
        out(f"error: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
