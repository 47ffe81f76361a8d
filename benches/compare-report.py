#!/usr/bin/env python3
"""The table of benches/compare.sh: medians per workload and target, ratios, targets.

    compare-report.py RUNS.jsonl OUT_PREFIX

RUNS.jsonl has one line per load generator run (written by compare.sh): workload, target
(direct, haproxy, gateway, gateway-tokens, rabbitmq-tls), rep, exit, seconds, rss_before_kib,
rss_during_kib and result
(the load generator's JSON, or null). Settings and machine facts come from BENCH_*
environment variables. Writes OUT_PREFIX.json (settings, machine, every run, the medians)
and OUT_PREFIX.md (the table and the machine), and with the sweep workload OUT_PREFIX-sweep.svg
(throughput in all and per connection against the number of connections, a line per path),
prints the table, and exits 1 when a run failed or a cell has no number. Ratios are never a reason to fail: they are judged in the
table (PASS / MISS), and with BENCH_SMOKE=1 not at all.
"""

import json
import math
import os
import statistics
import sys

TARGETS = ("direct", "haproxy", "gateway", "gateway-tokens", "rabbitmq-tls")

# (workload, metric key in the load generator's JSON, label, higher is better)
ROWS = [
    ("1KiB", "msgs_per_s", "msgs/s", True),
    ("1KiB-confirms", "msgs_per_s", "msgs/s", True),
    ("16B", "msgs_per_s", "msgs/s", True),
    ("64KiB", "msgs_per_s", "msgs/s", True),
    ("latency", "p50_us", "p50 µs", False),
    ("latency", "p99_us", "p99 µs", False),
    ("latency", "p999_us", "p99.9 µs", False),
    ("churn", "conns_per_s", "conns/s", True),
    ("churn-distinct", "conns_per_s", "conns/s", True),
    ("idle", "kib_per_conn", "KiB RSS/conn", False),
    ("100x100", "msgs_per_s", "msgs/s", True),
]

# The targets of the performance issue ("ahead of RabbitMQ's own TLS and of HAProxy on every
# workload, with the default settings"): (workload, metric) -> list of (ratio name, bound,
# is a minimum). "gateway_kib" is an absolute bound on the gateway's own cell (the issue asks
# for it at 10,000 connections: `--idle 10000`).
THROUGHPUT = [("gateway/haproxy", 1.05, True), ("gateway/rabbitmq-tls", 1.3, True)]
CHURN = [("gateway/haproxy", 1.05, True), ("gateway/rabbitmq-tls", 1.5, True),
         ("tokens/gateway", 0.9, True)]
TARGETS_OF = {
    ("1KiB", "msgs_per_s"): THROUGHPUT + [("gateway/direct", 0.9, True)],
    ("1KiB-confirms", "msgs_per_s"): THROUGHPUT,
    ("16B", "msgs_per_s"): THROUGHPUT,
    ("64KiB", "msgs_per_s"): THROUGHPUT,
    ("latency", "p50_us"): [("gateway/haproxy", 1.0, False), ("gateway/rabbitmq-tls", 1.0, False),
                            ("gateway/direct", 1.3, False)],
    ("latency", "p99_us"): [("gateway/haproxy", 1.0, False)],
    ("churn", "conns_per_s"): CHURN,
    ("churn-distinct", "conns_per_s"): CHURN,
    ("idle", "kib_per_conn"): [("gateway_kib", 24.0, False)],
    ("100x100", "msgs_per_s"): THROUGHPUT,
}


def threads_text(conf):
    """The proxies' threads, as the settings line says them."""
    if conf["gateway_threads"] in (None, conf["threads"]):
        return "%s threads for HAProxy and the gateway" % conf["threads"]
    return "%s threads for HAProxy, the gateway's worker threads: %s" % (
        conf["threads"], conf["gateway_threads"])


def sweep_points():
    """The sweep's points (producer-consumer pairs), from BENCH_SWEEP."""
    return [int(n) for n in (os.environ.get("BENCH_SWEEP") or "").split(",") if n.strip()]


def sweep_rows():
    """A row per sweep point: throughput in all (judged like any throughput workload) and
    per connection (2 per pair: the producer's and the consumer's), for the plot."""
    rows = []
    for n in sweep_points():
        w = "sweep-%d" % n
        rows.append((w, "msgs_per_s", "msgs/s", True))
        rows.append((w, "msgs_per_s_per_conn", "msgs/s per conn", True))
        TARGETS_OF[(w, "msgs_per_s")] = THROUGHPUT
    return rows


COLOURS = {"direct": "#555555", "haproxy": "#1f77b4", "gateway": "#d62728",
           "gateway-tokens": "#ff7f0e", "rabbitmq-tls": "#2ca02c"}


def svg_sweep(points, medians, title):
    """Two log-x line charts side by side: msgs/s in all, and msgs/s per connection (log y),
    against connections (2 per pair). `medians[(target, n)] = (total, per_conn)`."""
    w, h, pad_l, pad_r, pad_b, pad_t, gap = 420, 310, 70, 24, 50, 56, 30
    width = 2 * w + gap
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (width, h + 60),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="18" font-size="14" text-anchor="middle">%s</text>' % (width / 2, title)]
    xs = [2 * n for n in points]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    if lx1 == lx0:
        lx1 = lx0 + 1

    def panel(ox, idx, label, log_y):
        vals = [v[idx] for v in medians.values() if v[idx]]
        if not vals:
            return
        lo, hi = (min(vals), max(vals))
        if log_y:
            y0, y1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
            if y1 == y0:
                y1 += 1
            ty = lambda v: (math.log10(v) - y0) / (y1 - y0)  # noqa: E731
            ticks = [10 ** k for k in range(y0, y1 + 1)]
        else:
            step = 10 ** math.floor(math.log10(hi))
            if hi / step < 4:
                step /= 2
            top = math.ceil(hi / step) * step
            ty = lambda v: v / top  # noqa: E731
            ticks = [k * step for k in range(int(top / step) + 1)]
        px = lambda x: ox + pad_l + (math.log10(x) - lx0) / (lx1 - lx0) * (w - pad_l - pad_r)  # noqa: E731
        py = lambda v: pad_t + (1 - ty(v)) * (h - pad_t - pad_b + 20)  # noqa: E731
        base = py(ticks[0])
        out.append('<text x="%d" y="%d" text-anchor="middle">%s</text>' % (ox + w / 2, pad_t - 14, label))
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>' % (
            ox + pad_l, base, ox + w - pad_r, base))
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>' % (
            ox + pad_l, base, ox + pad_l, pad_t))
        for t in ticks:
            out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#dddddd"/>' % (
                ox + pad_l, py(t), ox + w - pad_r, py(t)))
            out.append('<text x="%.1f" y="%.1f" text-anchor="end">%s</text>' % (
                ox + pad_l - 4, py(t) + 4, "{:,.0f}".format(t)))
        for x in xs:
            out.append('<text x="%.1f" y="%.1f" text-anchor="middle">{:,}</text>'.format(x) % (px(x), base + 16))
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle">connections (producers + consumers)</text>' % (
            ox + pad_l + (w - pad_l) / 2, base + 34))
        for target in TARGETS:
            pts = [(px(2 * n), py(medians[(target, n)][idx])) for n in points
                   if medians.get((target, n)) and medians[(target, n)][idx]]
            if not pts:
                continue
            c = COLOURS[target]
            out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (
                c, " ".join("%.1f,%.1f" % p for p in pts)))
            out.extend('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (x, y, c) for x, y in pts)

    panel(0, 0, "msgs/s in all (↑)", False)
    panel(w + gap, 1, "msgs/s per connection (↑, log)", True)
    x = 20
    for target in TARGETS:
        out.append('<rect x="%d" y="%d" width="14" height="4" fill="%s"/>' % (x, h + 38, COLOURS[target]))
        out.append('<text x="%d" y="%d">%s</text>' % (x + 18, h + 44, target))
        x += 40 + 8 * len(target)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def metric(run, key):
    """The run's number for `key`, or None when the run failed or has no such number."""
    res = run.get("result")
    if run.get("exit") != 0 or not isinstance(res, dict):
        return None
    if key == "kib_per_conn":
        before, during = run.get("rss_before_kib"), run.get("rss_during_kib")
        opened = res.get("opened") or res.get("connections")
        if before is None or during is None or not opened:
            return None
        return (during - before) / opened
    if key == "msgs_per_s_per_conn":
        n = int(run["workload"].split("-", 1)[1])
        value = res.get("msgs_per_s")
        return float(value) / (2 * n) if isinstance(value, (int, float)) else None
    value = res.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def cost_units(run):
    """What a run's CPU is divided by: messages published (each one crosses a proxy twice,
    in from its producer and out to its consumer) or connections opened, with the unit's
    name; None when the run has no such count."""
    res = run.get("result")
    if run.get("exit") != 0 or not isinstance(res, dict):
        return None
    if res.get("mode") == "throughput" and res.get("published"):
        return res["published"], "message"
    if res.get("mode") == "churn" and res.get("connections"):
        return res["connections"], "connection"
    return None


# The parts of a run's cost: (key, label). proxy: the proxy's process (none for direct and
# RabbitMQ's own TLS); broker: beam.smp; load generator: its own process, the clients' TLS
# included; idle: CPU time no process used during the run (all CPUs), per unit: what the
# path left unused while its processes waited on each other.
COST_PARTS = (("proxy", "proxy"), ("broker", "broker"), ("loadgen", "load generator"),
              ("all", "all three"), ("idle", "idle"), ("proxy_ctx", "context switches"))


def cost_of(run):
    """The run's CPU per unit in µs (and the proxy's context switches per unit), by part."""
    units = cost_units(run)
    cost = run.get("cost")
    if not units or not isinstance(cost, dict):
        return None
    n, unit = units
    proxy, broker = cost.get("proxy_cpu_s"), cost.get("broker_cpu_s")
    loadgen = run["result"].get("loadgen_cpu_s")
    out = {"unit": unit}
    out["proxy"] = proxy * 1e6 / n if isinstance(proxy, (int, float)) else None
    out["broker"] = broker * 1e6 / n if isinstance(broker, (int, float)) else None
    out["loadgen"] = loadgen * 1e6 / n if isinstance(loadgen, (int, float)) else None
    parts = [out["broker"], out["loadgen"]] + ([out["proxy"]] if out["proxy"] is not None else [])
    out["all"] = sum(parts) if None not in parts else None
    idle = cost.get("idle_cpu_s")
    out["idle"] = idle * 1e6 / n if isinstance(idle, (int, float)) else None
    ctx = cost.get("proxy_ctx_switches")
    out["proxy_ctx"] = ctx / n if isinstance(ctx, (int, float)) else None
    return out


def cost_table(runs, workloads):
    """CPU per message (or per connection, for churn) of each part, medians by workload and
    target, and the gateway's proxy CPU against HAProxy's: what each path costs the machine,
    apart from how the two CPUs happened to be shared in a run."""
    rows, table = [], []
    table.append("| workload | µs CPU per | part | direct | haproxy | gateway | gateway-tokens "
                 "| rabbitmq-tls | gateway/haproxy |")
    table.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for workload in workloads:
        costs = {t: [c for r in runs if r["workload"] == workload and r["target"] == t
                     for c in [cost_of(r)] if c] for t in TARGETS}
        units = {c["unit"] for cs in costs.values() for c in cs}
        if len(units) != 1:
            continue
        unit = units.pop()
        for key, label in COST_PARTS:
            cells, samples = {}, {}
            for t in TARGETS:
                good = [c[key] for c in costs[t] if c[key] is not None]
                samples[t] = good
                cells[t] = statistics.median(good) if good else None
            if all(v is None for v in cells.values()):
                continue
            r = ratio(cells["gateway"], cells["haproxy"]) if key in ("proxy", "all", "proxy_ctx") else None
            rows.append({"workload": workload, "per": unit, "part": key, "median": cells,
                         "samples": samples, "gateway/haproxy": r})
            table.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                workload, unit, label, fmt(cells["direct"]), fmt(cells["haproxy"]),
                fmt(cells["gateway"]), fmt(cells["gateway-tokens"]), fmt(cells["rabbitmq-tls"]),
                fmt(r)))
    return rows, table


def run_failed(run):
    res = run.get("result")
    if run.get("exit") != 0 or not isinstance(res, dict):
        return "exit %s" % run.get("exit")
    if run["workload"] == "idle" and res.get("failed"):
        return "%s connections failed" % res["failed"]
    if run["workload"] not in ("idle",) and res.get("errors"):
        return "%s errors" % res["errors"]
    return None


def fmt(x):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return "{:,.0f}".format(x)
    if abs(x) >= 10:
        return "{:.1f}".format(x)
    return "{:.2f}".format(x)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def ceiling(name, minimum, cells):
    """The most a proxy could reach of a "gateway/X at least" target: direct ÷ X. Every
    path but RabbitMQ's own TLS listener is a proxy in front of the same node, sharing its
    CPUs, so none of them does better than clients talking to the node directly. A bound
    below the target means the target is beyond any proxy on this run."""
    peer = name.split("/", 1)[1] if name.startswith("gateway/") else None
    if not minimum or peer in (None, "direct"):
        return None
    return ratio(cells.get("direct"), cells.get(peer))


def judge(workload, key, cells, ratios, smoke):
    rules = TARGETS_OF.get((workload, key))
    if not rules:
        return "", ""
    texts, verdicts = [], []
    for name, bound, minimum in rules:
        if name == "gateway_kib":
            value = cells.get("gateway")
            texts.append("gateway ≤ %g KiB" % bound)
        else:
            value = ratios.get(name)
            texts.append("%s %s %g×" % (name, "≥" if minimum else "≤", bound))
        if value is None:
            verdicts.append("n/a")
        elif (value >= bound) if minimum else (value <= bound):
            verdicts.append("PASS")
        elif (c := ceiling(name, minimum, cells)) is not None and c < bound:
            verdicts.append("MISS (beyond direct: %.2f×)" % c)
        else:
            verdicts.append("MISS")
    verdict = "not judged (smoke)" if smoke else " / ".join(verdicts)
    return "; ".join(texts), verdict


def machine():
    env = os.environ.get
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
        "memory_gib": mem_gib(),
        "rabbitmq": env("BENCH_RABBITMQ_VERSION", ""),
        "erlang_otp": env("BENCH_ERLANG_VERSION", ""),
        "haproxy": env("BENCH_HAPROXY_VERSION", ""),
        "rustc": env("BENCH_RUSTC_VERSION", ""),
        "commit": env("BENCH_COMMIT", ""),
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def mem_gib():
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return round(kib / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


def settings():
    env = os.environ.get
    return {
        "stamp": env("BENCH_STAMP", ""),
        "smoke": env("BENCH_SMOKE") == "1",
        "reps": env("BENCH_REPS"),
        "duration_s": env("BENCH_DURATION"),
        "warmup_s": env("BENCH_WARMUP"),
        "idle_connections": env("BENCH_IDLE"),
        "sweep": env("BENCH_SWEEP"),
        "threads": env("BENCH_THREADS"),
        "gateway_threads": env("BENCH_GATEWAY_THREADS") or env("BENCH_THREADS"),
        "profile": env("BENCH_PROFILE"),
        "workloads": env("BENCH_WORKLOADS"),
        "elapsed_s": env("BENCH_ELAPSED"),
    }


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    runs_path, prefix = sys.argv[1], sys.argv[2]
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    conf = settings()
    smoke = conf["smoke"]
    workloads = [w for w in (conf["workloads"] or "").split(",") if w]
    if "sweep" in workloads:
        workloads += ["sweep-%d" % n for n in sweep_points()]

    problems = []
    for run in runs:
        why = run_failed(run)
        if why:
            problems.append("%s %s rep %s: %s" % (run["workload"], run["target"], run["rep"], why))

    rows, table = [], []
    header = ("| workload | metric | direct | haproxy | gateway | gateway-tokens | rabbitmq-tls "
              "| haproxy/direct | gateway/direct | gateway/haproxy | gateway/rabbitmq-tls "
              "| tokens/gateway | target | result |")
    table.append(header)
    table.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for workload, key, label, higher in ROWS + sweep_rows():
        if workloads and workload not in workloads:
            continue
        cells, samples = {}, {}
        for target in TARGETS:
            values = [metric(r, key) for r in runs
                      if r["workload"] == workload and r["target"] == target]
            good = [v for v in values if v is not None]
            samples[target] = good
            cells[target] = statistics.median(good) if good else None
            if not good:
                problems.append("%s %s (%s): no number" % (workload, label, target))
        ratios = {
            "haproxy/direct": ratio(cells["haproxy"], cells["direct"]),
            "gateway/direct": ratio(cells["gateway"], cells["direct"]),
            "gateway/haproxy": ratio(cells["gateway"], cells["haproxy"]),
            # RabbitMQ's own TLS listener verifying the same token with its OAuth 2.0 plugin.
            "gateway/rabbitmq-tls": ratio(cells["gateway"], cells["rabbitmq-tls"]),
            # The cost of backend tokens: the same gateway, RabbitMQ checking too.
            "tokens/gateway": ratio(cells["gateway-tokens"], cells["gateway"]),
        }
        target_text, verdict = judge(workload, key, cells, ratios, smoke)
        better = "higher is better" if higher else "lower is better"
        rows.append({"workload": workload, "metric": key, "unit": label, "better": better,
                     "median": cells, "samples": samples, "ratios": ratios,
                     "target": target_text, "result": verdict})
        table.append("| %s | %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            workload, label, "↑" if higher else "↓",
            fmt(cells["direct"]), fmt(cells["haproxy"]), fmt(cells["gateway"]),
            fmt(cells["gateway-tokens"]), fmt(cells["rabbitmq-tls"]),
            fmt(ratios["haproxy/direct"]), fmt(ratios["gateway/direct"]),
            fmt(ratios["gateway/haproxy"]), fmt(ratios["gateway/rabbitmq-tls"]),
            fmt(ratios["tokens/gateway"]), target_text, verdict))

    svg = None
    if "sweep" in workloads and sweep_points():
        med = {}
        for r in rows:
            if r["workload"].startswith("sweep-"):
                n = int(r["workload"].split("-", 1)[1])
                for t in TARGETS:
                    tot, per = med.get((t, n), (None, None))
                    if r["metric"] == "msgs_per_s":
                        tot = r["median"][t]
                    else:
                        per = r["median"][t]
                    med[(t, n)] = (tot, per)
        svg = svg_sweep(sweep_points(), med,
                        "Connection sweep, 1 KiB with confirms, a queue per producer-consumer pair (%s)"
                        % (conf["stamp"] or ""))
        with open(prefix + "-sweep.svg", "w") as f:
            f.write(svg)

    cost_rows, cost_lines = cost_table(runs, [w for w in workloads if w != "sweep"])

    mach = machine()
    notes = [
        "",
        "↑ higher is better, ↓ lower is better. Cells are medians of %s repetition(s) "
        "(idle: one); ratios are ratios of the medians. idle/direct is RabbitMQ's own RSS "
        "per connection (beam.smp), for information." % conf["reps"],
        "",
        "Machine: %s × %s, %s GiB, Linux %s; RabbitMQ %s (OTP %s); %s; %s; commit %s." % (
            mach["nproc"], mach["cpu"], mach["memory_gib"], mach["kernel"], mach["rabbitmq"],
            mach["erlang_otp"], mach["haproxy"], mach["rustc"], mach["commit"]),
        "Settings: %s reps, %s s runs (%s s warm-up), %s idle connections, %s, %s build%s; "
        "%s s in all." % (
            conf["reps"], conf["duration_s"], conf["warmup_s"], conf["idle_connections"],
            threads_text(conf), conf["profile"], ", SMOKE" if smoke else "", conf["elapsed_s"]),
    ]
    if len(cost_lines) > 2:
        notes += ["", "CPU per message (per connection for churn), in µs, medians: the proxy's "
                  "process, the broker (beam.smp), the load generator (its clients' TLS "
                  "included), the three together, the CPU time no process used (all CPUs), "
                  "and the proxy's context switches per unit. "
                  "Read from /proc around each run, warm-up and draining included.", ""]
        notes += cost_lines
    if problems:
        notes += ["", "Problems:"] + ["- " + p for p in problems]
    text = "\n".join(table + notes) + "\n"

    with open(prefix + ".md", "w") as f:
        f.write("# benches/compare.sh, %s\n\n" % conf["stamp"])
        f.write(text)
    with open(prefix + ".json", "w") as f:
        json.dump({"settings": conf, "machine": mach, "rows": rows, "cost": cost_rows, "runs": runs,
                   "problems": problems}, f, indent=1)
    print(text)
    print("written: %s.md %s.json%s" % (prefix, prefix, " %s-sweep.svg" % prefix if svg else ""))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
