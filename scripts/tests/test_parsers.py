"""What the subcommands read from other programs: strace's table,
callgrind's dumps, HTTP heads, the open-loop generator's raw result,
coregate's drain-time refusal lines, wrk's failures."""
import pytest

from coregate_bench import callgrind, loads
from coregate_bench.figures import rejections
from coregate_bench.openloop import head_framing, summarize_load
from coregate_bench.profile import parse_strace

STRACE = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 45.00    0.004500          10       450           io_uring_enter
 30.00    0.003000           5       600       120 read
 25.00    0.002500           2      1000           write
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000           4      2050       120 total
"""


def test_parse_strace():
    assert parse_strace(STRACE) == {"io_uring_enter": (450, 0), "read": (600, 120), "write": (1000, 0)}


def test_dumped_total_is_the_largest_numbered_dump(tmp_path):
    (tmp_path / "cg.1").write_text("events: Ir\nsummary: 1000\n")
    (tmp_path / "cg.2").write_text("events: Ir\ntotals: 5000\n")
    (tmp_path / "cgx.1").write_text("summary: 999999\n")  # another measurement's
    assert callgrind.dumped_total(str(tmp_path / "cg")) == 5000


@pytest.mark.parametrize("head, framing", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 128", (128, False, False)),
    (b"HTTP/1.1 200 OK\r\ncontent-length:  7 \r\nConnection: Close", (7, True, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", (0, False, True)),
    (b"HTTP/1.1 204 No Content", (0, False, False)),
])
def test_head_framing(head, framing):
    assert head_framing(head) == framing


def test_summarize_load():
    raw = {"rate": 10, "duration": 2, "sent": 4, "statuses": {"200": 3, "503": 1},
           "lat_ms": [4.0, 1.0, 3.0], "errors": {}}
    got = summarize_load(raw)
    assert (got["ok"], got["success"], got["p50_ms"], got["p99_ms"], got["max_ms"], got["offered_rps"]) == \
        (3, 0.75, 3.0, 4.0, 4.0, 2.0)
    assert "lat_ms" not in got


def test_summarize_load_with_nothing_sent():
    got = summarize_load({"duration": 1, "sent": 0, "statuses": {}, "lat_ms": []})
    assert (got["ok"], got["success"], got["p99_ms"], got["max_ms"]) == (0, None, None, None)


def test_rejections_from_the_workers_drain_lines():
    err = ["coregate[main] info: listening\n",
           "coregate[w0] info: worker 0 rejected: rate=5 queue=2\n",
           "coregate[w1] info: worker 1 rejected: rate=3\n",
           "coregate[w1] warn: upstream 127.0.0.1:9000: connect failed\n"]
    assert rejections(err) == {"total": {"rate": 8, "queue": 2},
                               "per_worker": {0: {"rate": 5, "queue": 2}, 1: {"rate": 3}}}
    assert rejections([]) == {"total": {}, "per_worker": {}}


def test_a_failed_wrk_says_why(tmp_path):
    fake = tmp_path / "wrk"
    fake.write_text("#!/bin/sh\necho 'unable to connect to 127.0.0.1:1 Connection refused' >&2\nexit 1\n")
    fake.chmod(0o755)
    load = loads.Load("http://127.0.0.1:1/", cpus=None, duration=1)
    with pytest.raises(RuntimeError, match="exited 1 without a report: unable to connect"):
        loads.wrk(str(fake), load)


def test_parse_wrk_refuses_what_is_not_a_report():
    with pytest.raises(ValueError):
        loads.parse_wrk("")
