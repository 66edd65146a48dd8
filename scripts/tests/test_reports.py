"""The Markdown the subcommands write, from summaries: tls and ws (paired
ratios through sides.summarize, an idle phase that may be skipped or grow
nginx by nothing), run's report with unmeasured figures, idle-memory's
ratio line."""
import argparse
import copy
import json
import math
import os

from coregate_bench import ROOT, report, sides, tls, ws
from coregate_bench.idle_memory import ratio_line

NAN = float("nan")


def args(**kw):
    return argparse.Namespace(proxies=["nginx", "coregate"], proxy_cpus="1", load_cpus="0", rounds=2, duration=2,
                              conns=50, rate=3000, size=1024, **kw)


def test_sides_summarize_is_medians_and_paired_ratios():
    rounds = [{"nginx": {"x": 10.0}, "coregate": {"x": 5.0}}, {"nginx": {"x": 20.0}, "coregate": {"x": 16.0}}]
    s = sides.summarize(rounds, ["x"], ["nginx", "coregate"])
    assert s["nginx"] == {"x": 15.0, "x_x": 1.0}
    assert s["coregate"]["x"] == 10.5 and math.isclose(s["coregate"]["x_x"], 0.65)


def tls_rounds(cpu_resumed_coregate):
    base = {"rps": 1000.0, "cpu_ka": 10.0, "cpu_rate": 12.0, "p99_ms": 1.0, "hs": 100.0, "cpu_hs": 50.0,
            "cpu_resumed": 20.0}
    return [{"nginx": dict(base), "coregate": dict(base, rps=1500.0, cpu_resumed=cpu_resumed_coregate)}] * 2


def test_tls_markdown():
    summary = sides.summarize(tls_rounds(10.0), [k for k, _ in tls.KEYS], ["nginx", "coregate"])
    idle = {"nginx": {"bytes_per_conn": 4000.0}, "coregate": {"bytes_per_conn": 2000.0}}
    text = tls.markdown(args(), summary, idle, 100, "scripts/bench tls")
    assert "| keep-alive requests/s | 1000.00 | 1500.00 (1.50x) |" in text
    assert "| CPU us/resumed handshake (TLS 1.2) | 20.00 | 10.00 (0.50x) |" in text
    assert "| RSS per idle keep-alive TLS connection (100) | 4000 B | 2000 B (0.50x) |" in text
    assert text.rstrip().endswith("```") and "Machine: " in text


def test_tls_markdown_without_idle_and_with_unmeasured_figures():
    # A round with no resumed handshakes: us_per gave NaN, not the whole
    # interval's CPU time.
    summary = sides.summarize(tls_rounds(NAN), [k for k, _ in tls.KEYS], ["nginx", "coregate"])
    text = tls.markdown(args(), summary, {}, 0, "scripts/bench tls --idle-conns 0")
    assert "| CPU us/resumed handshake (TLS 1.2) | 20.00 | - |" in text
    assert "RSS per idle" not in text


def test_tls_markdown_when_nginx_grew_by_nothing():
    summary = sides.summarize(tls_rounds(10.0), [k for k, _ in tls.KEYS], ["nginx", "coregate"])
    idle = {"nginx": {"bytes_per_conn": 0.0}, "coregate": {"bytes_per_conn": 2000.0}}
    assert "| 0 B | 2000 B (n/a) |" in tls.markdown(args(), summary, idle, 10, "c")


def ws_summary():
    base = {"rate": 20000.0, "cpu_us_per_msg": 10.0, "user_us_per_msg": 4.0, "p99_us": 800.0}
    rounds = [{"nginx": dict(base), "coregate": dict(base, rate=30000.0, cpu_us_per_msg=6.0)}]
    return sides.summarize(rounds, ws.KEYS, ["nginx", "coregate"])


def test_ws_markdown():
    idle = {"nginx": {"bytes_per_conn": 0.0}, "coregate": {"bytes_per_conn": 3000.0}}
    text = ws.markdown(args(), ws_summary(), idle, 100, "scripts/bench ws")
    assert "| coregate | 30000 | 1.50x | 6.00 | 0.60x | 4.00 | 0.80 ms | 3000 B | n/a |" in text
    assert "| nginx | 20000 | 1.00x | 10.00 | 1.00x | 4.00 | 0.80 ms | 0 B | n/a |" in text
    text = ws.markdown(args(), ws_summary(), {}, 0, "scripts/bench ws --tunnels 0")
    assert "| coregate | 30000 | 1.50x | 6.00 | 0.60x | 4.00 | 0.80 ms |  |  |" in text


def test_run_report_prints_unmeasured_figures_as_dashes():
    with open(os.path.join(ROOT, "docs", "bench", "baseline.json")) as f:
        results = json.load(f)
    results = copy.deepcopy(results)
    s = results["workloads"]["get-128"]["summary"]["coregate"]
    s["cpu_us"], s["cpu_x"], s["p99_ms"], s["busy"] = NAN, NAN, NAN, NAN
    text = report.markdown(results)
    row = next(line for line in text.splitlines() if line.startswith("| get-128 | coregate |"))
    assert row.split(" | ")[4:7] == ["-", "", "-"]
    assert "- CPU per request: not measured (goal at most 0.70x)" in text


def test_idle_memory_ratio_line():
    idle = {"conns": 10, "proxies": {"nginx": {"bytes_per_conn": 4000.0}, "coregate": {"bytes_per_conn": 1000.0}}}
    assert ratio_line(idle) == "coregate / nginx: 0.25x"
    idle["proxies"]["nginx"]["bytes_per_conn"] = 0.0
    assert ratio_line(idle) == "coregate / nginx: n/a (nginx grew by nothing)"
    assert ratio_line({"conns": 10, "proxies": {"nginx": {"bytes_per_conn": 1.0}}}) is None
