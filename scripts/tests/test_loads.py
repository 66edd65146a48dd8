"""What the load generators' reports are read as."""
import json

from coregate_bench.loads import Load, oha_argv, parse_oha, parse_wrk, wrk_argv

WRK = """Running 5s test @ http://127.0.0.1:19301/
  1 threads and 50 connections
  123456 requests in 5.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 4
Requests/sec:  24691.20
Transfer/sec:      6.00MB
"""


def test_parse_wrk():
    assert parse_wrk(WRK) == (123456, 24691.20, 7)


def test_parse_oha():
    report = {"latencyPercentiles": {"p50": 0.001, "p99": 0.0025, "p99.9": None},
              "statusCodeDistribution": {"200": 990, "502": 3},
              "errorDistribution": {"connection reset": 2, "aborted due to deadline": 50}}
    got = parse_oha(json.dumps(report))
    assert (got.ok, got.errors, got.pct) == (990, 5, {"p50": 1.0, "p99": 2.5})


def test_command_lines():
    load = Load("https://127.0.0.1:1/", "0", conns=8, duration=3, keepalive=False, netns="ns")
    assert wrk_argv("wrk", load)[:6] == ["ip", "netns", "exec", "ns", "taskset", "-c"]
    assert "Connection: close" in wrk_argv("wrk", load)
    argv = oha_argv("oha", load, rate=100)
    assert "--insecure" in argv and "--disable-keepalive" in argv and argv[argv.index("-q") + 1] == "100"
    assert "-n" in oha_argv("oha", Load("http://a/"), requests=10)
