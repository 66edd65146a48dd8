#!/usr/bin/env python3
"""Fixed-rate keep-alive load with http.client, checking every answer
against the two configs a reload test swaps between.

Each thread holds one keep-alive connection and sends at its share of the
rate, cycling over /p (proxied: the request header the config set comes
back in the echo, and must match the response header the same config set),
/a/x (a 200 "A" only under config A) and /b/x (a 200 "B" only under B).
A failed request is a connection error, a timeout, or any status other
than 200 and the 404 of the other config's route. A mixed one is an answer
whose parts came from different configs.

Prints one JSON line: sent, failed, mixed, seen_a, seen_b, errors (a few).
"""

import argparse
import http.client
import json
import threading
import time


def check(path, status, headers, body):
    """The config ("A" or "B") an answer came from, or an error string."""
    if path == "/p":
        if status != 200:
            return f"status {status} on /p"
        resp = headers.get("x-config")
        echoed = next(
            (v for k, v in json.loads(body)["headers"] if k.lower() == "x-config"), None
        )
        if resp is None or resp != echoed:
            return f"mixed: response header {resp!r}, request header {echoed!r}"
        return resp
    want = path[1].upper()  # /a/x -> "A"
    if status == 200 and body.decode() == want:
        return want
    if status == 404:
        return "B" if want == "A" else "A"
    return f"status {status} body {body[:40]!r} on {path}"


def worker(host, port, rate, deadline, results, lock):
    paths = ["/p", "/a/x", "/b/x"]
    conn = None
    n = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    local = {"sent": 0, "failed": 0, "mixed": 0, "A": 0, "B": 0, "errors": []}
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        path = paths[n % len(paths)]
        n += 1
        local["sent"] += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            headers = {k.lower(): v for k, v in r.getheaders()}
            verdict = check(path, r.status, headers, body)
        except Exception as e:  # noqa: BLE001 - every failure counts
            verdict = f"error {type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        if verdict in ("A", "B"):
            local[verdict] += 1
        else:
            key = "mixed" if verdict.startswith("mixed") else "failed"
            local[key] += 1
            if len(local["errors"]) < 5:
                local["errors"].append(verdict)
    if conn is not None:
        conn.close()
    with lock:
        for k in ("sent", "failed", "mixed", "A", "B"):
            results[k] += local[k]
        results["errors"].extend(local["errors"][: 5 - len(results["errors"])])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--addr", required=True, help="HOST:PORT of the proxy")
    ap.add_argument("--rate", type=float, default=200, help="requests per second, total")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    deadline = time.monotonic() + args.duration
    results = {"sent": 0, "failed": 0, "mixed": 0, "A": 0, "B": 0, "errors": []}
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=worker,
            args=(host, int(port), args.rate / args.threads, deadline, results, lock),
        )
        for _ in range(args.threads)
    ]
    print("STARTED", flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
