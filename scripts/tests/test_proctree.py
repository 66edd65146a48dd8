"""CPU accounting: the /proc stat parse and the process tree."""
import math
import os
import subprocess
import sys

from coregate_bench.proctree import TICKS_PER_S, Stat, Ticks, cpu_ticks, parse_stat, read_stat, tree, us_per
from coregate_bench.procs import wait_until


def stat_line(pid, comm, ppid, utime, stime):
    # Fields 3.. of /proc/PID/stat: state, ppid, pgrp, session, tty_nr,
    # tpgid, flags, minflt, cminflt, majflt, cmajflt, utime, stime, ...
    return f"{pid} ({comm}) S {ppid} 1 1 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 1 0 5 0 0\n"


def test_parse_plain():
    assert parse_stat(stat_line(42, "nginx", 1, 300, 45)) == Stat(42, 1, 300, 45)


def test_parse_comm_with_spaces_and_parentheses():
    line = stat_line(7, "a) (b c) S 9 9", 3, 11, 13)
    assert parse_stat(line) == Stat(7, 3, 11, 13)


def test_tree_follows_ppid_through_generations():
    stats = [Stat(1, 0, 5, 5), Stat(10, 1, 1, 2), Stat(11, 10, 3, 4), Stat(12, 11, 5, 6), Stat(20, 1, 100, 100)]
    assert sorted(s.pid for s in tree(10, stats)) == [10, 11, 12]


def test_tree_of_a_gone_process_is_empty():
    assert tree(99, [Stat(1, 0, 1, 1)]) == []


def test_ticks_subtract_and_total():
    d = Ticks(10, 4) - Ticks(3, 1)
    assert (d.user, d.system, d.total) == (7, 3, 10)


def test_cpu_ticks_of_this_process_counts_its_own_time():
    sum(i * i for i in range(300000))  # burn some CPU
    # Own time first: the tree's, read after, can only be larger.
    own = read_stat(os.getpid())
    mine = cpu_ticks(os.getpid())
    assert mine.total >= own.utime + own.stime > 0


# Burns CPU for about 0.3 s, then waits, alive, until its stdin closes.
BURNER = "import sys, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end:\n    pass\n" \
         "sys.stdin.read()\n"


def test_cpu_ticks_count_a_child_while_it_lives():
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE)
    try:
        def burnt():
            s = read_stat(child.pid)
            return s.utime + s.stime >= TICKS_PER_S // 5
        wait_until(burnt, 20, "the child did not burn 0.2 s of CPU")
        child_stat = read_stat(child.pid)
        own = read_stat(os.getpid())
        tree_total = cpu_ticks(os.getpid()).total
        assert tree_total >= own.utime + own.stime + child_stat.utime + child_stat.stime
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def test_us_per_is_microseconds_and_nan_for_nothing():
    assert us_per(TICKS_PER_S, 10**6) == 1.0
    assert us_per(TICKS_PER_S, 1) == 1e6
    assert math.isnan(us_per(TICKS_PER_S, 0))
