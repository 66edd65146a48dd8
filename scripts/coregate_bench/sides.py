"""What `tls` and `ws` share: nginx and coregate (or a variant) side by
side, one worker each on the proxy CPUs, the origin and the load on the
load CPUs; rounds in rotating order; medians and paired ratios to nginx;
the report written as OUT/STEM-DATE-TIME.json and .md with one footer."""
import datetime
import json
import os

from . import ROOT
from .configs import Site
from .options import names
from .procs import log, wait_port
from .proxies import Proxy
from .summary import median, paired
from .tools import machine_line

# The open-files limit both ask for; idle connections are capped by it.
NOFILE = 65536


def add_arguments(ap, base_port, rounds=5):
    ap.add_argument("--proxies", type=names(["nginx", "coregate", "coregate-epoll"]),
                    default=["nginx", "coregate"], help="comma list, nginx first (default nginx,coregate)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--base-port", type=int, default=base_port)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))


def check(args):
    if "nginx" not in args.proxies:
        raise SystemExit("--proxies must include nginx: every figure is a ratio to it")


def sites(args, work, conns, **kind):
    """Each proxy's Site: ports after the origin's (--base-port)."""
    return {name: Site(work, "127.0.0.1", args.base_port + 1 + i, args.base_port, conns=conns, **kind)
            for i, name in enumerate(args.proxies)}


def print_plan(args, tools, bins, work, conns, **kind):
    """Writes each proxy's configuration into WORK and prints it with its command."""
    for name, site in sites(args, work, conns, **kind).items():
        proxy = Proxy(name, tools, bins)
        conf = proxy.write(site)
        print(f"--- taskset -c {args.proxy_cpus} {' '.join(proxy.command(conf, site))}")
        with open(conf) as f:
            print(f.read())


def start(args, tools, bins, procs, work, conns, **kind):
    """Starts every proxy; {name: (process, port)}."""
    live = {}
    for name, site in sites(args, work, conns, **kind).items():
        p = Proxy(name, tools, bins).start(procs, site, args.proxy_cpus, f"{work}/{name}.log")
        wait_port(site.port)
        live[name] = (p, site.port)
    return live


def summarize(rounds, keys, proxies):
    """{proxy: {key: median, key_x: paired ratio to nginx}} over ROUNDS."""
    return {name: {**{k: median([r[name][k] for r in rounds]) for k in keys},
                   **{f"{k}_x": paired(rounds, name, k, "nginx") for k in keys}}
            for name in proxies}


def footer(command):
    """The lines every report ends with: the machine and the command."""
    return ["", machine_line(), "", "Command:", "", "```", command, "```", ""]


def write(out, stem, data, text):
    """Writes DATA as OUT/STEM-DATE-TIME.json and TEXT as .md beside it,
    prints TEXT; returns the path without its extension."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{stem}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    log(f"written: {base}.md, {base}.json")
    return base
