"""The arithmetic of results: medians that skip what was not measured,
ratios, paired ratios (each round's ratio to a baseline proxy measured in
that same round, so the machine's drift between rounds cancels), nearest-
rank percentiles, and the summary of one `run` workload."""
import math
import statistics

NAN = float("nan")


def measured(x):
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def median(xs):
    """Median of the measured values in XS (None and NaN left out); NaN when none is."""
    vals = [x for x in xs if measured(x)]
    return statistics.median(vals) if vals else NAN


def ratio(a, b):
    """A / B, NaN when either is unmeasured or B is zero."""
    return a / b if measured(a) and measured(b) and b else NAN


def paired(rounds, name, key, base):
    """Median over ROUNDS (dicts of proxy: {key: value}) of NAME's KEY
    divided by BASE's in the same round; rounds missing either are skipped."""
    return median([ratio(r[name][key], r[base][key]) for r in rounds if name in r and base in r])


def pct(sorted_values, p):
    """Nearest-rank percentile P of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def fmt(v, digits=2, grouped=False):
    """A figure for a table: a float to DIGITS places (with thousands
    separators when GROUPED), anything else as it is, `-` when unmeasured."""
    if not measured(v):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if grouped else f"{v:.{digits}f}"
    return f"{v:,}" if grouped and isinstance(v, int) else str(v)


def fmt_x(x):
    """A ratio as `1.23x`, or nothing when unmeasured."""
    return f"{x:.2f}x" if measured(x) else ""


def summarize_workload(workload, base):
    """Medians, and paired ratios against proxy BASE, for one `run`
    workload's rounds: sets workload["summary"] and returns it."""
    summary = {}
    for name in workload["proxies"]:
        tp = [r[name] for r in workload["throughput"] if name in r]
        lat = [r[name] for r in workload["latency"] if name in r]
        s = {
            "rps": median([x["rps"] for x in tp]),
            "cpu_us": median([x["cpu_us"] for x in tp]),
            "busy": median([x["busy"] for x in tp]),
            "errors": sum(x["errors"] for x in tp) + sum(x["errors"] for x in lat),
            "rate_cpu_us": median([x.get("cpu_us") for x in lat]),
            "p50_ms": median([x["pct"].get("p50") for x in lat]),
            "p99_ms": median([x["pct"].get("p99") for x in lat]),
            "p999_ms": median([x["pct"].get("p99.9") for x in lat]),
            "curve": {k: median([x["pct"].get(k) for x in lat]) for k in (lat[0]["pct"] if lat else {})},
        }
        if base in workload["proxies"]:
            s["rps_x"] = paired(workload["throughput"], name, "rps", base)
            s["cpu_x"] = paired(workload["throughput"], name, "cpu_us", base)
            s["rate_cpu_x"] = paired(workload["latency"], name, "cpu_us", base)
            s["p99_x"] = median([ratio(r[name]["pct"].get("p99"), r[base]["pct"].get("p99"))
                                 for r in workload["latency"] if name in r and base in r])
        summary[name] = s
    workload["summary"] = summary
    return summary
