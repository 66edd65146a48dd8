"""Every proxy a benchmark can measure, by name: its kind, the binaries
and tools it needs, its configuration file, its command line and its own
configuration check.

  nginx, haproxy, envoy    as configs writes them
  coregate                 the release build, io_uring where the kernel allows
  coregate-epoll           the same on the epoll driver
  coregate-log             the same with an access-log line per request
  coregate-nostats         the build with statistics compiled out
  spike-sm, spike-task     the examples/uring_spike prototype's two modes
                           (no configuration; one prefix route only)
"""
import os

from . import configs

PROXIES = ["nginx", "haproxy", "envoy", "coregate", "coregate-epoll", "coregate-log", "coregate-nostats",
           "spike-sm", "spike-task"]


def kind(name):
    return name.split("-")[0]


def tool(name):
    """The outside tool NAME runs on, or None for coregate's own binaries."""
    return kind(name) if kind(name) in ("nginx", "haproxy", "envoy") else None


def binary(name):
    """The build (build.BINARIES) NAME runs on, or None for outside tools."""
    if kind(name) == "spike":
        return "spike"
    if kind(name) == "coregate":
        return "nostats" if name == "coregate-nostats" else "coregate"
    return None


class Proxy:
    """One proxy of a run: NAME, the tools' and binaries' paths (name: path)."""

    def __init__(self, name, tools, binaries):
        self.name = name
        self.kind = kind(name)
        self.tools = tools
        self.binaries = binaries

    def write(self, site):
        """Writes the configuration for SITE into site.work; its path (None
        for a spike, which takes its addresses as options)."""
        if self.kind == "spike":
            if site.routes != 1 or site.regex or site.tls or site.websocket:
                raise ValueError(f"{self.name} proxies one prefix route of plain HTTP only")
            return None
        if self.name == "coregate-log":
            site = configs.Site(**{**vars(site), "access_log": True})
        writer, ext = configs.WRITERS[self.kind]
        path = f"{site.work}/{self.name}.{ext}"
        text = writer(site)
        with open(path, "w") as f:
            f.write(text)
        return path

    def command(self, conf, site):
        exe = self.tools.get(self.kind) or self.kind
        if self.kind == "nginx":
            return [exe, "-c", conf]
        if self.kind == "haproxy":
            return [exe, "-db", "-f", conf]
        if self.kind == "envoy":
            return [exe, "-c", conf, "--concurrency", str(site.workers), "--disable-hot-restart",
                    "-l", "error", "--base-id", str(site.port)]
        if self.kind == "spike":
            return [self.binaries["spike"], "--mode", self.name.split("-", 1)[1],
                    "--listen", f"{site.addr}:{site.port}", "--upstream", f"127.0.0.1:{site.origin}"]
        driver = "epoll" if self.name == "coregate-epoll" else "auto"
        return [self.binaries[binary(self.name)], "run", "--config", conf, "--workers", str(site.workers),
                "--driver", driver]

    def start(self, procs, site, cpus, log):
        """Writes SITE's configuration and starts the proxy on it, pinned to
        CPUS, its output appended to LOG; the process (not yet listening)."""
        return procs.start(self.command(self.write(site), site), cpus, log=log)

    def check_command(self, conf):
        """The proxy's own configuration check, or None where it has none or
        is not installed."""
        if self.kind == "coregate":
            exe = self.binaries[binary(self.name)]
            return [exe, "check", "--config", conf] if os.access(exe, os.X_OK) else None
        exe = self.tools.get(self.kind)
        if self.kind == "spike" or not exe or not os.access(exe, os.X_OK):
            return None
        return {"nginx": [exe, "-t", "-q", "-c", conf], "haproxy": [exe, "-c", "-q", "-f", conf],
                "envoy": [exe, "--mode", "validate", "-c", conf, "-l", "error"]}[self.kind]
