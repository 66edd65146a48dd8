"""Instructions per request under callgrind: deterministic where CPU time
on a shared machine is not. The program runs under valgrind; after a
warm-up its counters are zeroed, the measured requests are made, and the
counters dumped; what the kernel does (syscalls, io_uring rings) is not
counted. `profile` and `fleet-cost` measure with it."""
import os
import subprocess

from .procs import wait_http


def instructions(procs, argv, out, cpu, port, load, warm, n, log=None):
    """Instructions per request of ARGV (which listens on 127.0.0.1:PORT)
    under callgrind, its dumps going to OUT.*: LOAD(WARM) requests, zero,
    LOAD(N), dump. Returns the count per request."""
    p = procs.start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv], cpu, log=log)
    try:
        wait_http("127.0.0.1", port, "/", limit=60)
        load(warm)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        load(n)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
    finally:
        procs.stop(p, timeout=60)
    return dumped_total(out) / n


def dumped_total(out):
    """The instruction count of the dump that followed the zeroing: the
    largest total among OUT's numbered dumps (OUT.1, OUT.2 ...)."""
    folder, stem = os.path.split(out)
    total = 0
    for name in os.listdir(folder or "."):
        if name.startswith(stem + "."):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
    return total


def annotate(out):
    """callgrind_annotate's self-cost listing of OUT's latest dump."""
    folder, stem = os.path.split(out)
    dumps = [os.path.join(folder, x) for x in os.listdir(folder) if x.startswith(stem + ".")]
    return subprocess.run(["callgrind_annotate", "--inclusive=no", max(dumps, key=os.path.getmtime)],
                          capture_output=True, text=True).stdout
