"""A process and all its descendants, read from /proc: the one place CPU
time and resident memory are measured. A proxy's figure covers its whole
tree: nginx's workers, the program taskset and valgrind exec into, the
threads of each (a process's /proc/PID/stat already sums its threads).
Children that exit during a measurement take their time with them; the
proxies measured here do not fork per request."""
import os
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat this package reads."""
    pid: int
    ppid: int
    utime: int
    stime: int


def parse_stat(text):
    """A Stat from the text of /proc/PID/stat. The command name (field 2)
    sits in parentheses and may itself hold spaces and parentheses, so the
    other fields are counted from the last ')': state, ppid (field 4) ...
    utime (field 14), stime (field 15)."""
    head, _, tail = text.rpartition(")")
    rest = tail.split()
    return Stat(pid=int(head.split("(", 1)[0]), ppid=int(rest[1]), utime=int(rest[11]), stime=int(rest[12]))


def read_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return parse_stat(f.read())


def all_stats():
    """Every process's Stat; ones that exit while being read are left out."""
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats.append(read_stat(entry))
            except (OSError, IndexError, ValueError):
                continue
    return stats


def tree(pid, stats):
    """The Stats of PID and its descendants, found by ppid in STATS."""
    children = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    found = [s for s in stats if s.pid == pid]
    todo = list(found)
    while todo:
        kids = children.get(todo.pop().pid, [])
        found += kids
        todo += kids
    return found


@dataclass(frozen=True)
class Ticks:
    """CPU time in clock ticks, user and system apart."""
    user: int = 0
    system: int = 0

    def __sub__(self, other):
        return Ticks(self.user - other.user, self.system - other.system)

    @property
    def total(self):
        return self.user + self.system


def cpu_ticks(pid):
    """utime and stime of PID and all its descendants (zero once it is gone)."""
    found = tree(pid, all_stats())
    return Ticks(sum(s.utime for s in found), sum(s.stime for s in found))


def us_per(ticks, count):
    """TICKS (clock ticks) in microseconds per one of COUNT; NaN (not
    measured) when COUNT is zero: the interval's CPU time belongs to no
    request."""
    if not count:
        return float("nan")
    return ticks * 1e6 / TICKS_PER_S / count


def measure(pid, work):
    """Runs WORK(), which returns how many requests (messages, handshakes)
    it made; returns that count and the CPU Ticks PID's tree spent meanwhile."""
    before = cpu_ticks(pid)
    count = work()
    return count, cpu_ticks(pid) - before


def status_kib(pid, field):
    """A KiB field (VmRSS, VmHWM) of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_kib(pid):
    """Resident memory of PID and its descendants, KiB."""
    total = 0
    for s in tree(pid, all_stats()):
        try:
            total += status_kib(s.pid, "VmRSS")
        except (OSError, RuntimeError):
            pass  # gone, or a zombie
    return total
