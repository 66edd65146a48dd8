"""CPU accounting: the /proc stat parse and the process tree."""
import os

from coregate_bench.proctree import Stat, Ticks, cpu_ticks, parse_stat, tree


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
    mine = cpu_ticks(os.getpid())
    with open(f"/proc/{os.getpid()}/stat") as f:
        own = parse_stat(f.read())
    assert mine.total >= own.utime + own.stime > 0
