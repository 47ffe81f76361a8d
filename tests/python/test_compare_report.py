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
