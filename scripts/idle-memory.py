#!/usr/bin/env python3
"""Memory per idle keep-alive connection: coregate against nginx.

    scripts/idle-memory.py [--conns N] [--binary target/release/coregate] [--driver auto|uring|epoll]

Starts the built-in origin, nginx (1 worker, master_process off) and
coregate (1 worker) on 127.0.0.1, all pinned to CPU 1. Then, for each proxy
in turn, it opens N connections, sends one request on each and reads the
response, so that every connection is an idle keep-alive connection. It
reports the proxy's RSS growth divided by N, and the same for the built-in
origin itself, which already runs on the native I/O core (`engine`) while
the proxy moves onto it. Everything it starts is stopped before it exits.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from benchkit import open_idle, raise_nofile, rss_kib, wait_port  # noqa: E402


def measure(name, pid, port, n):
    # Warm up: the first connections grow pools and arenas once.
    warm = open_idle("127.0.0.1", port, 200)
    for s in warm:
        s.close()
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = open_idle("127.0.0.1", port, n)
    time.sleep(1.0)
    after = rss_kib(pid)
    for s in conns:
        s.close()
    per = (after - before) * 1024 / n
    print(f"| {name} | {n} | {before} | {after} | {per:.0f} |", flush=True)
    return per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--binary", default="target/release/coregate")
    ap.add_argument("--driver", default="auto", choices=["auto", "uring", "epoll"])
    args = ap.parse_args()
    want = args.conns + 1000
    raise_nofile(want)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = tempfile.mkdtemp(prefix="coregate-idle.")
    origin_port, nginx_port, cg_port = 19400, 19401, 19402
    conf = f"""daemon off; master_process off; worker_processes 1;
worker_rlimit_nofile {want};
error_log {work}/error.log; pid {work}/nginx.pid;
events {{ worker_connections {want}; }}
http {{
  access_log off;
  keepalive_timeout 300s; keepalive_requests 1000000;
  client_body_temp_path {work}/b; proxy_temp_path {work}/p; fastcgi_temp_path {work}/f;
  uwsgi_temp_path {work}/u; scgi_temp_path {work}/s;
  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port};
    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
"""
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(conf)
    with open(f"{work}/coregate.toml", "w") as f:
        f.write(f"""[[listener]]
listen = "127.0.0.1:{cg_port}"
keepalive_timeout = "300s"
[upstream.origin]
backends = ["tcp://127.0.0.1:{origin_port}"]
[[route]]
upstream = "origin"
""")
    pin = ["taskset", "-c", "1"]
    procs = []
    try:
        origin = subprocess.Popen(pin + [args.binary, "origin", "--listen", f"127.0.0.1:{origin_port}", "--workers", "1",
                                         "--driver", args.driver],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(origin)
        ng = subprocess.Popen(pin + [nginx, "-c", f"{work}/nginx.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ng)
        cg = subprocess.Popen(pin + [args.binary, "run", "--config", f"{work}/coregate.toml", "--workers", "1",
                                     "--driver", args.driver],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(cg)
        for p in (origin_port, nginx_port, cg_port):
            wait_port(p)
        print(f"kernel {os.uname().release}; {args.conns} idle keep-alive connections each, after one 128-byte response")
        print("| proxy | connections | RSS before (KiB) | RSS after (KiB) | bytes per idle connection |")
        print("|---|---|---|---|---|")
        # The origin first: the proxies' upstream connections to it would
        # otherwise count against its listener's 10,000-connection cap.
        o = measure("coregate origin (native core)", origin.pid, origin_port, args.conns)
        n = measure("nginx", ng.pid, nginx_port, args.conns)
        c = measure("coregate", cg.pid, cg_port, args.conns)
        print(f"\ncoregate / nginx: {c / n:.2f}x; the built-in origin, already on the native core: {o / n:.2f}x")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
