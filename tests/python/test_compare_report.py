"""benches/compare-report.py's judgement of the performance targets (no processes, no
network): ratios against each bound, and the ceiling a proxy cannot pass."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location(
        "compare_report", ROOT / "benches" / "compare-report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells(direct, haproxy, gateway, tls):
    return {"direct": direct, "haproxy": haproxy, "gateway": gateway,
            "gateway-tokens": gateway, "rabbitmq-tls": tls}


def judged(report, workload, key, c):
    ratios = {
        "gateway/direct": report.ratio(c["gateway"], c["direct"]),
        "gateway/haproxy": report.ratio(c["gateway"], c["haproxy"]),
        "gateway/rabbitmq-tls": report.ratio(c["gateway"], c["rabbitmq-tls"]),
        "tokens/gateway": report.ratio(c["gateway-tokens"], c["gateway"]),
    }
    return report.judge(workload, key, c, ratios, False)[1].split(" / ")


@pytest.mark.parametrize("c, verdicts", [
    # The 16 B row of 2026-12-06 (evening): direct is only 1.03x RabbitMQ's TLS.
    (cells(107_643, 90_733, 85_141, 104_269),
     ["MISS", "MISS (beyond direct: 1.03×)"]),
    # Behind both, but a proxy could reach both bounds.
    (cells(200, 100, 90, 100), ["MISS", "MISS"]),
    # Ahead of both.
    (cells(200, 100, 140, 100), ["PASS", "PASS"]),
    # Ahead of HAProxy; RabbitMQ's TLS as fast as direct.
    (cells(100, 80, 95, 100), ["PASS", "MISS (beyond direct: 1.00×)"]),
])
def test_throughput_targets_and_their_ceiling(report, c, verdicts):
    assert judged(report, "16B", "msgs_per_s", c) == verdicts


def test_the_1kib_row_judges_direct_itself_without_a_ceiling(report):
    # gateway/direct >= 0.9x: a ratio to direct has no ceiling of its own.
    assert judged(report, "1KiB", "msgs_per_s", cells(100, 70, 80, 80)) == [
        "PASS", "MISS (beyond direct: 1.25×)", "MISS"]


def test_latency_has_no_ceiling(report):
    # Lower is better: the ceiling is for "at least" targets only.
    assert judged(report, "latency", "p50_us", cells(100, 150, 160, 120)) == [
        "MISS", "MISS", "MISS"]


def test_a_missing_cell_is_not_judged(report):
    assert judged(report, "16B", "msgs_per_s", cells(None, 100, 120, None)) == ["PASS", "n/a"]


def run(workload, target, result, cost, rep=1, exit=0):
    return {"workload": workload, "target": target, "rep": rep, "exit": exit,
            "cost": cost, "result": result}


def throughput(published, loadgen_cpu_s):
    return {"mode": "throughput", "published": published, "loadgen_cpu_s": loadgen_cpu_s}


def test_cost_per_message_by_part_and_the_proxies_ratio(report):
    runs = [
        # Direct: no proxy, the broker and the load generator.
        run("1KiB", "direct", throughput(100_000, 1.0),
            {"broker_cpu_s": 2.0, "proxy_cpu_s": None, "proxy_ctx_switches": None}),
        run("1KiB", "haproxy", throughput(50_000, 1.0),
            {"broker_cpu_s": 1.0, "proxy_cpu_s": 1.0, "proxy_ctx_switches": 5_000}),
        run("1KiB", "haproxy", throughput(50_000, 1.0),
            {"broker_cpu_s": 1.0, "proxy_cpu_s": 2.0, "proxy_ctx_switches": 5_000}, rep=2),
        run("1KiB", "gateway", throughput(40_000, 1.0),
            {"broker_cpu_s": 0.8, "proxy_cpu_s": 1.2, "proxy_ctx_switches": 400,
             "idle_cpu_s": 0.4}),
        # A failed run is not counted.
        run("1KiB", "gateway", throughput(40_000, 1.0),
            {"broker_cpu_s": 9.0, "proxy_cpu_s": 9.0, "proxy_ctx_switches": 9}, rep=2, exit=1),
    ]
    rows, lines = report.cost_table(runs, ["1KiB"])
    by = {r["part"]: r for r in rows}
    assert by["proxy"]["per"] == "message"
    assert by["proxy"]["median"]["direct"] is None
    assert by["proxy"]["median"]["haproxy"] == pytest.approx(30.0)   # median of 20 and 40 µs
    assert by["proxy"]["median"]["gateway"] == pytest.approx(30.0)
    assert by["proxy"]["gateway/haproxy"] == pytest.approx(1.0)
    assert by["broker"]["median"]["direct"] == pytest.approx(20.0)
    assert by["loadgen"]["median"]["gateway"] == pytest.approx(25.0)
    # All three: broker + load generator (+ proxy), per run, then the median.
    assert by["all"]["median"]["direct"] == pytest.approx(30.0)
    assert by["all"]["median"]["gateway"] == pytest.approx(75.0)
    assert by["proxy_ctx"]["median"]["haproxy"] == pytest.approx(0.1)
    assert by["proxy_ctx"]["median"]["gateway"] == pytest.approx(0.01)
    assert by["broker"]["gateway/haproxy"] is None
    # Idle: only where the run read it.
    assert by["idle"]["median"]["gateway"] == pytest.approx(10.0)
    assert by["idle"]["median"]["haproxy"] is None
    assert len(lines) == 2 + len(report.COST_PARTS)


def test_churn_costs_per_connection_and_idle_has_no_cost(report):
    runs = [
        run("churn", "gateway", {"mode": "churn", "connections": 1_000, "loadgen_cpu_s": 0.5},
            {"broker_cpu_s": 1.0, "proxy_cpu_s": 0.9, "proxy_ctx_switches": 20_000}),
        run("idle", "gateway", {"mode": "idle", "opened": 100, "loadgen_cpu_s": 0.1}, None),
    ]
    rows, _ = report.cost_table(runs, ["churn", "idle"])
    assert {r["workload"] for r in rows} == {"churn"}
    proxy = next(r for r in rows if r["part"] == "proxy")
    assert proxy["per"] == "connection"
    assert proxy["median"]["gateway"] == pytest.approx(900.0)
