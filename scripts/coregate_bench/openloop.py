"""The open-loop load generator of `admission` and `balance`, one process
per load (`python3 -m coregate_bench.openloop SPEC`), so that two loads
side by side do not share an event loop and one's bursts do not delay the
other's schedule.

Request i is due at start + i/rate, whatever happened to earlier ones, and
its latency is counted from that due time, not from when it was actually
written: a closed-loop client waits for slow responses before sending
more and so hides them (coordinated omission). A due request takes a free
connection, or opens a new one (up to a cap) rather than waiting for one
to free up. Each load also reports its own dispatch lag (write time minus
due time), so a noisy client can be told apart from a slow proxy."""
import asyncio
import collections
import json
import sys
import time

from .summary import pct


async def read_response(reader):
    """One response: (status, wants close). Content-Length bodies only."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, close, chunked = head_framing(head)
    if chunked:
        raise ValueError("chunked response")  # never sent by these origins
    if length:
        await reader.readexactly(length)
    return status, close


async def generate(spec):
    loop = asyncio.get_running_loop()
    port, rate, duration, cap = spec["port"], spec["rate"], spec["duration"], spec["cap"]
    request = ("GET / HTTP/1.1\r\nHost: bench\r\n" + "".join(h + "\r\n" for h in spec["headers"]) + "\r\n").encode()
    statuses, errors = collections.Counter(), collections.Counter()
    lat, lag = [], []
    idle, pending, tasks = collections.deque(), collections.deque(), set()
    state = {"open": 0, "opened": 0, "sent": 0}

    async def connect():
        conn = await asyncio.open_connection("127.0.0.1", port)
        state["opened"] += 1
        return conn

    for _ in range(spec["conns"]):
        idle.append(await connect())
    state["open"] = len(idle)
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    t0 = loop.time()
    end = t0 + duration

    async def worker(conn, due):
        # Serve `due`, then any request that queued for a connection meanwhile.
        while True:
            try:
                if conn is None:
                    conn = await connect()
                conn[1].write(request)
                state["sent"] += 1
                lag.append(loop.time() - due)
                status, close = await read_response(conn[0])
                statuses[status] += 1
                if status == 200:
                    lat.append(loop.time() - due)
                if close:
                    conn[1].close()
                    conn = None
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            if not pending or loop.time() >= end:
                break
            due = pending.popleft()
        if conn is not None:
            idle.append(conn)
        else:
            state["open"] -= 1

    def launch(conn, due):
        t = loop.create_task(worker(conn, due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    total = int(rate * duration)
    i = 0
    while i < total:
        due = t0 + i / rate
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        i += 1
        if idle:
            launch(idle.popleft(), due)  # FIFO: spreads requests over all connections
        elif state["open"] < cap:
            state["open"] += 1
            launch(None, due)
        else:
            pending.append(due)
    # Requests still in flight get `grace`; what is left then is cut off.
    wait_until = max(end, loop.time()) + spec["grace"]
    while tasks and loop.time() < wait_until:
        await asyncio.wait(set(tasks), timeout=wait_until - loop.time())
    cut_off = len(tasks)
    for t in list(tasks):
        t.cancel()
    lag.sort()
    return {
        "rate": rate,
        "duration": duration,
        "sent": state["sent"],
        "unsent": total - state["sent"],
        "cut_off": cut_off,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "connections_opened": state["opened"],
        "lat_ms": [round(x * 1000, 3) for x in lat],
        "lag_ms": {"p50": ms(pct(lag, 50)), "p99": ms(pct(lag, 99)), "max": ms(lag[-1] if lag else None)},
    }


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def summarize_load(raw):
    """Percentiles and ratios from one generator's raw result."""
    lat = sorted(raw.pop("lat_ms"))
    statuses = raw["statuses"]
    ok = statuses.get("200", 0)
    raw.update(
        ok=ok,
        success=ok / raw["sent"] if raw["sent"] else None,
        p50_ms=pct(lat, 50),
        p99_ms=pct(lat, 99),
        max_ms=lat[-1] if lat else None,
        offered_rps=raw["sent"] / raw["duration"],
    )
    return raw


def load_spec(port, rate, duration, conns, headers=(), cap=256, grace=10):
    return {
        "port": port,
        "rate": rate,
        "duration": duration,
        "conns": conns,
        "cap": cap,
        "headers": list(headers),
        "grace": grace,
    }


def head_framing(head):
    """(Content-Length, wants close, has Transfer-Encoding) of a head."""
    length, close, chunked = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
        elif name == b"transfer-encoding":
            chunked = True
    return length, close, chunked


if __name__ == "__main__":
    print(json.dumps(asyncio.run(generate(json.loads(sys.argv[1])))))
