"""The regression gate: coregate's CPU per request and p99 in a run,
against a baseline run. Both sides are ratios to nginx measured in their
own run, so the gate does not depend on how fast the machine is."""
import json

# The proxy every gated ratio is against.
BASE = "nginx"


def compare(results, baseline, cpu_threshold, p99_threshold):
    """Lines describing coregate against the baseline, and whether any
    figure regressed past its threshold (a fraction: 0.10 is +10%)."""
    lines, failed = [], False
    for wname, base in baseline["workloads"].items():
        now = results["workloads"].get(wname)
        if not now or "coregate" not in now["summary"] or "coregate" not in base["summary"]:
            lines.append(f"{wname}: not in this run, skipped")
            continue
        for key, threshold, label in (("cpu_x", cpu_threshold, "CPU/request"), ("p99_x", p99_threshold, "p99")):
            b, n = base["summary"]["coregate"].get(key), now["summary"]["coregate"].get(key)
            if b is None or n is None or b != b or n != n:
                lines.append(f"{wname} {label}: no ratio to {BASE}, skipped")
                continue
            limit = b * (1 + threshold)
            worse = n > limit
            failed |= worse
            lines.append(f"{wname} {label}: {n:.3f}x {BASE}, baseline {b:.3f}x, limit {limit:.3f}x: "
                         f"{'REGRESSED' if worse else 'ok'}")
    return lines, failed


def load(path):
    with open(path) as f:
        return json.load(f)


def gate(results, baseline_path, cpu_threshold, p99_threshold):
    """Prints the comparison; returns the exit status (1: regression)."""
    lines, failed = compare(results, load(baseline_path), cpu_threshold, p99_threshold)
    print(f"coregate against baseline {baseline_path} (CPU threshold +{cpu_threshold:.0%}, "
          f"p99 threshold +{p99_threshold:.0%}):")
    for line in lines:
        print("  " + line)
    print("regression" if failed else "no regression")
    return 1 if failed else 0
