"""Medians, ratios, paired ratios, percentiles and a run workload's summary."""
import math

from coregate_bench.summary import median, paired, pct, ratio, summarize_workload


def test_median_skips_unmeasured():
    assert median([3, None, 1, float("nan"), 2]) == 2
    assert math.isnan(median([]))
    assert math.isnan(median([None]))


def test_ratio():
    assert ratio(3, 2) == 1.5
    assert math.isnan(ratio(1, 0))
    assert math.isnan(ratio(None, 2))


def test_paired_is_the_median_of_per_round_ratios():
    rounds = [{"a": {"x": 2.0}, "b": {"x": 1.0}},
              {"a": {"x": 3.0}, "b": {"x": 2.0}},
              {"a": {"x": 10.0}, "b": {"x": 10.0}}]
    # Per round: 2.0, 1.5, 1.0; the ratio of medians would be 3/2.
    assert paired(rounds, "a", "x", "b") == 1.5


def test_paired_skips_rounds_missing_either():
    rounds = [{"a": {"x": 4.0}, "b": {"x": 2.0}}, {"a": {"x": 9.0}}]
    assert paired(rounds, "a", "x", "b") == 2.0


def test_nearest_rank_percentile():
    values = list(range(1, 101))
    assert pct(values, 50) == 50
    assert pct(values, 99) == 99
    assert pct(values, 100) == 100
    assert pct([], 50) is None


def round_of(rps, cpu, p99):
    return {"rps": rps, "requests": rps * 5, "errors": 0, "cpu_us": cpu, "busy": 1.0}, \
        {"ok": 100, "errors": 1, "cpu_us": cpu * 1.5, "pct": {"p50": p99 / 2, "p99": p99}}


def test_summarize_workload():
    workload = {"proxies": ["nginx", "coregate"], "throughput": [], "latency": []}
    for n_rps, c_rps, n_cpu, c_cpu in ((100, 150, 10.0, 6.0), (110, 150, 11.0, 7.7), (90, 180, 9.0, 4.5)):
        n_tp, n_lat = round_of(n_rps, n_cpu, 2.0)
        c_tp, c_lat = round_of(c_rps, c_cpu, 1.0)
        workload["throughput"].append({"nginx": n_tp, "coregate": c_tp})
        workload["latency"].append({"nginx": n_lat, "coregate": c_lat})
    s = summarize_workload(workload, "nginx")
    assert s["coregate"]["rps"] == 150
    assert s["coregate"]["cpu_us"] == 6.0
    assert s["coregate"]["cpu_x"] == 0.6  # rounds: 0.6, 0.7, 0.5
    assert s["coregate"]["rps_x"] == 1.5  # rounds: 1.5, 1.36, 2.0
    assert s["coregate"]["p99_x"] == 0.5
    assert s["nginx"]["cpu_x"] == 1.0
    assert s["coregate"]["errors"] == 3
    assert s["coregate"]["curve"] == {"p50": 0.5, "p99": 1.0}
