"""What a `run` writes besides its JSON: the Markdown report (machine,
tools, method, the table, memory per idle connection, the goals against
nginx) and the SVG of latency percentile curves."""
import math
import os

from .summary import NAN, fmt, fmt_x, measured

COLORS = {"nginx": "#1b9e77", "haproxy": "#d95f02", "envoy": "#7570b3", "coregate": "#e7298a",
          "coregate-epoll": "#66a61e", "coregate-log": "#e6ab02", "coregate-nostats": "#a6761d",
          "spike-sm": "#666666", "spike-task": "#1f78b4"}


def markdown(results):
    meta = results["meta"]
    base = meta.get("baseline", "nginx")
    out = [f"# coregate against nginx, HAProxy and Envoy ({meta['date']})", ""]
    out += ["Command: `" + meta["command"] + "`", ""]
    out += ["## Machine", ""]
    out += [f"- {k}: {v}" for k, v in meta["machine"].items()]
    out += ["", "Tools:", ""]
    out += [f"- {k}: {v}" for k, v in meta["versions"].items()]
    out += ["", "## Method", "", meta["method"], ""]
    out += ["## Results", "",
            "req/s: wrk's maximum, closed loop. CPU/req: the proxy's user+system CPU time per request "
            "during that run. busy: the proxy's CPU time over wall time (1.00 = one core saturated). "
            "rate/s: the fixed rate of the oha runs; CPU at rate: the proxy's CPU time per request "
            f"during them; p50/p99: their latency, with latency correction. Ratios: against {base}, "
            "medians of per-round ratios.", ""]
    out.append(f"| workload | proxy | req/s | vs {base} | CPU us/req | vs {base} | busy | rate/s | CPU at rate "
               f"| vs {base} | p50 ms | p99 ms | p99 vs {base} | errors |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wname, w in results["workloads"].items():
        for pname in w["proxies"]:
            s = w["summary"][pname]
            out.append(f"| {wname} | {pname} | {fmt(s['rps'], 0, grouped=True)} | {fmt_x(s.get('rps_x', NAN))} | "
                       f"{fmt(s['cpu_us'])} | {fmt_x(s.get('cpu_x', NAN))} | {fmt(s['busy'])} | "
                       f"{w['rate']:,} | {fmt(s.get('rate_cpu_us', NAN))} | "
                       f"{fmt_x(s.get('rate_cpu_x', NAN))} | {fmt(s['p50_ms'], 3)} | {fmt(s['p99_ms'], 3)} | "
                       f"{fmt_x(s.get('p99_x', NAN))} | {s['errors']} |")
    unsaturated = sorted({wname for wname, w in results["workloads"].items()
                          if any(measured(s["busy"]) and s["busy"] < 0.9 for s in w["summary"].values())})
    if unsaturated:
        out += ["", f"busy below 0.90 in {', '.join(unsaturated)}: a proxy there did not use its whole core, "
                "so that workload's req/s measures the load generator or the origin as much as the proxy; "
                "its CPU per request still holds."]
    if results.get("idle"):
        out += [""] + idle_table(results["idle"])
    goals = goal_lines(results)
    if goals:
        out += ["", "## Against the goal (coregate vs nginx, one pinned core, get-128)", ""] + goals
    if results["workloads"]:
        out += ["", f"Latency percentile curves: `{os.path.basename(meta['svg'])}`. Raw rounds: "
                f"`{os.path.basename(meta['json'])}`.", ""]
    return "\n".join(out) + "\n"


def idle_table(idle):
    out = [f"## Memory per idle keep-alive connection ({idle['conns']:,} connections)", "",
           "| proxy | RSS before KiB | RSS after KiB | bytes/connection |", "|---|---|---|---|"]
    for pname, r in idle["proxies"].items():
        out.append(f"| {pname} | {r['rss_before_kib']:,} | {r['rss_after_kib']:,} | {fmt(r['bytes_per_conn'], 0)} |")
    return out


def goal(what, x, limit, at_most=True):
    """One goal line: WHAT is X times nginx, against LIMIT (at most, or at
    least); `not measured` when X is not."""
    bound = "at most" if at_most else "at least"
    if not measured(x):
        return f"- {what}: not measured (goal {bound} {limit:.2f}x)"
    met = x <= limit if at_most else x >= limit
    return f"- {what}: {x:.2f}x nginx (goal {bound} {limit:.2f}x): {'met' if met else 'not met'}"


def goal_lines(results):
    w = results["workloads"].get("get-128")
    lines = []
    if w and "coregate" in w["summary"] and "cpu_x" in w["summary"]["coregate"] \
            and results["meta"].get("baseline", "nginx") == "nginx":
        s = w["summary"]["coregate"]
        lines.append(goal("CPU per request", s["cpu_x"], 0.70))
        lines.append(goal("maximum req/s", s["rps_x"], 1.30, at_most=False))
        if measured(s.get("rate_cpu_x")):
            lines.append(goal(f"CPU per request at {w['rate']:,}/s", s["rate_cpu_x"], 0.90))
        lines.append(goal(f"p99 at {w['rate']:,}/s", s["p99_x"], 1.00))
    idle = results.get("idle")
    if idle and "coregate" in idle["proxies"] and "nginx" in idle["proxies"]:
        c, n = idle["proxies"]["coregate"]["bytes_per_conn"], idle["proxies"]["nginx"]["bytes_per_conn"]
        lines.append(f"- RSS per idle connection: {c:.0f} B vs nginx {n:.0f} B (goal at most nginx's): "
                     f"{'met' if c <= n else 'not met'}")
    return lines


def svg(results):
    """Latency percentile curves, one panel per workload: x is the
    percentile on a log scale of 1/(1-p), y is latency in ms."""
    workloads = [(n, w) for n, w in results["workloads"].items() if w["latency"]]
    cols, pw, ph, ml, mt, mb = 3, 380, 260, 55, 40, 45
    rows = (len(workloads) + cols - 1) // cols
    width, height = cols * pw, rows * ph + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14">Latency by percentile at a fixed rate (oha, latency-corrected), '
           f'{results["meta"]["date"]}</text>']
    xs_max = math.log10(1 / (1 - 0.9999))
    for i, (wname, w) in enumerate(workloads):
        ox, oy = (i % cols) * pw, 40 + (i // cols) * ph
        plot_w, plot_h = pw - ml - 20, ph - mt - mb
        curves = {p: w["summary"][p]["curve"] for p in w["proxies"]}
        ymax = max((v for c in curves.values() for v in c.values() if measured(v)), default=1.0) * 1.05 or 1.0
        out.append(f'<text x="{ox + ml}" y="{oy + 20}" font-size="12">{wname} at {w["rate"]:,}/s</text>')
        x0, y0 = ox + ml, oy + mt + plot_h
        out.append(f'<rect x="{x0}" y="{oy + mt}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
        for p in (50, 90, 99, 99.9, 99.99):
            x = x0 + plot_w * math.log10(1 / (1 - p / 100)) / xs_max
            out.append(f'<line x1="{x:.1f}" y1="{oy + mt}" x2="{x:.1f}" y2="{y0}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{p:g}</text>')
        for j in range(5):
            y = y0 - plot_h * j / 4
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{ymax * j / 4:.2f}</text>')
        out.append(f'<text x="{x0 + plot_w / 2}" y="{y0 + 30}" text-anchor="middle">percentile</text>')
        out.append(f'<text x="{ox + 12}" y="{oy + mt + plot_h / 2}" transform="rotate(-90 {ox + 12} '
                   f'{oy + mt + plot_h / 2})" text-anchor="middle">ms</text>')
        for k, (pname, curve) in enumerate(curves.items()):
            pts = sorted((x0 + plot_w * math.log10(1 / (1 - q)) / xs_max, y0 - plot_h * v / ymax)
                         for q, v in ((float(key[1:]) / 100, v) for key, v in curve.items())
                         if 0.5 <= q < 1 and measured(v))
            color = COLORS.get(pname, "#333")
            if pts:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                           + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            out.append(f'<rect x="{x0 + 8}" y="{oy + mt + 6 + 14 * k}" width="10" height="3" fill="{color}"/>')
            out.append(f'<text x="{x0 + 22}" y="{oy + mt + 11 + 14 * k}">{pname}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(results, root, md_path):
    """Writes the SVG (where the run has latency curves) and the Markdown
    report; returns the report."""
    if results["workloads"]:
        with open(os.path.join(root, results["meta"]["svg"]), "w") as f:
            f.write(svg(results))
    text = markdown(results)
    with open(md_path, "w") as f:
        f.write(text)
    return text
