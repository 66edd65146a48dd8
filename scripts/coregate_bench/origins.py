"""The origins behind the proxies measured: coregate's built-in origin
(`coregate origin`, whose command line every subcommand takes from
builtin_command), and the slow origins of `admission` and `balance`: a
fixed delay before every answer, one process each (`python3 -m
coregate_bench.origins PORT MS threads|asyncio`).

Why two: behind an inflight cap that is always full (figure fair), every
response frees a slot that is refilled at once, so two slots whose
responses leave the origin together stay together from then on: over
seconds the 16 slots bunch into a few groups, like buses on one line, and
a request waiting for a slot waits for the next group rather than for the
next slot. How strongly an origin merges responses therefore shows in
the figure. asyncio's timers wake at epoll's 1 ms granularity and fire
everything due by then together, so the asyncio origin merges responses
up to 1 ms apart; a thread per connection ends its sleep within tens of
microseconds and merges far less. The thread origin is the default; the
asyncio one stays to show the difference (`--slow-origin asyncio`).
"""
import asyncio
import signal
import socketserver
import sys
import time

from .openloop import head_framing


def builtin_command(binary, listen, body_size=None):
    """The command line of coregate's built-in origin on LISTEN
    (ADDR:PORT), one worker, BODY_SIZE-byte responses (its default, 128,
    when None)."""
    argv = [binary, "origin", "--listen", listen, "--workers", "1"]
    if body_size is not None:
        argv += ["--body-size", str(body_size)]
    return argv


def parse_request_head(head):
    """(Content-Length, wants close) of a request head."""
    length, close, chunked = head_framing(head)
    # Not expected here; do not guess at framing: close after it.
    return length, close or chunked


SLOW_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


async def serve_slow_asyncio(port, delay_ms):
    async def handle(reader, writer):
        try:
            while True:
                length, close = parse_request_head(await reader.readuntil(b"\r\n\r\n"))
                if length:
                    await reader.readexactly(length)  # read and discard the body
                await asyncio.sleep(delay_ms / 1000)
                writer.write(SLOW_RESPONSE)
                await writer.drain()
                if close:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def serve_slow_threads(port, delay_ms):
    """One thread per connection; coregate keeps a few dozen upstream
    connections at most here, so threads are cheap enough."""

    class Handler(socketserver.StreamRequestHandler):
        disable_nagle_algorithm = True

        def handle(self):
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    head += line
                length, close = parse_request_head(head)
                if length:
                    self.rfile.read(length)  # read and discard the body
                time.sleep(delay_ms / 1000)
                self.wfile.write(SLOW_RESPONSE)
                if close:
                    return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 4096

    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()  # until SIGTERM ends the process


if __name__ == "__main__":
    port, delay_ms, kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if kind == "asyncio":
        asyncio.run(serve_slow_asyncio(port, delay_ms))
    else:
        serve_slow_threads(port, delay_ms)
