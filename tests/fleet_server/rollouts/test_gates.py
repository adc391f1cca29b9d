"""Gate parsing and evaluation at the edges of each threshold and of each minimum sample size."""

import pytest

from bundles.errors import ConfigError
from fleet_server.rollouts.gates import (
    METRICS,
    CohortFigures,
    Gate,
    GateResult,
    evaluate_gate,
    evaluate_per_variant,
    parse_gates,
)


def figures(**kw):
    return CohortFigures(**{"devices_reporting": 1, **kw})


@pytest.mark.parametrize(
    ("text", "gate"),
    [
        ("error_rate<0.01", Gate("error_rate", "<", 0.01)),
        ("p99_ms < 40", Gate("p99_ms", "<", 40)),
        ("p95_ms<=25.5", Gate("p95_ms", "<=", 25.5)),
        ("psi<0.2 min=500", Gate("psi", "<", 0.2, min_samples=500)),
        ("shadow_agreement>0.98", Gate("shadow_agreement", ">", 0.98)),
        ("install_success>=0.95", Gate("install_success", ">=", 0.95)),
        ("p99_ms<1.2x", Gate("p99_ms", "<", 1.2, relative=True)),
        ("fallback_rate<1e-3", Gate("fallback_rate", "<", 0.001)),
    ],
)
def test_gates_parse_from_operator_strings_and_print_back(text, gate):
    parsed = Gate.parse(text)
    assert parsed == gate
    assert Gate.parse(parsed.text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("error_rate", "METRIC<VALUE"),
        ("error_rate=0.01", "METRIC<VALUE"),
        ("accuracy>0.9", "unknown metric 'accuracy'"),
        ("psi<1.1x", "no previous-version comparison"),
        ("error_rate<abc", "METRIC<VALUE"),
    ],
)
def test_malformed_gates_are_refused_naming_the_text(text, message):
    with pytest.raises(ConfigError, match=message):
        Gate.parse(text)


def test_an_install_success_gate_is_always_present():
    assert parse_gates(["error_rate<0.01"])[-1] == Gate("install_success", ">=", 0.95)
    assert len(parse_gates(["install_success>=0.5"])) == 1


# (gate, figures, expected status): each threshold probed just inside, on, and just outside.
EDGE_CASES = [
    # error rate over 1000 requests: 9 errors pass, 10 (exactly 0.01) fails a strict <, 11 fails
    ("error_rate<0.01", figures(requests=1000, errors=9), "pass"),
    ("error_rate<0.01", figures(requests=1000, errors=10), "fail"),
    ("error_rate<=0.01", figures(requests=1000, errors=10), "pass"),
    ("error_rate<0.01", figures(requests=1000, errors=11), "fail"),
    # minimum sample size (default 100 requests): 99 waits even with 0 errors, 100 decides
    ("error_rate<0.01", figures(requests=99, errors=0), "wait"),
    ("error_rate<0.01", figures(requests=99, errors=50), "wait"),
    ("error_rate<0.01", figures(requests=100, errors=0), "pass"),
    ("error_rate<0.01", figures(requests=100, errors=1), "fail"),
    ("error_rate<0.01 min=500", figures(requests=499, errors=0), "wait"),
    ("error_rate<0.01 min=500", figures(requests=500, errors=0), "pass"),
    ("error_rate<0.01", figures(requests=0), "wait"),
    ("fallback_rate<0.05", figures(requests=200, fallbacks=9), "pass"),
    ("fallback_rate<0.05", figures(requests=200, fallbacks=10), "fail"),
    # latency: p99 needs 200 requests by default, p95 100
    ("p99_ms<40", figures(requests=200, latency_p99_ms=39.99), "pass"),
    ("p99_ms<40", figures(requests=200, latency_p99_ms=40.0), "fail"),
    ("p99_ms<40", figures(requests=199, latency_p99_ms=10.0), "wait"),
    ("p99_ms<40", figures(requests=500, latency_p99_ms=None), "wait"),
    ("p95_ms<25", figures(requests=100, latency_p95_ms=24.9), "pass"),
    ("p95_ms<25", figures(requests=100, latency_p95_ms=25.1), "fail"),
    ("p95_ms<25", figures(requests=99, latency_p95_ms=1.0), "wait"),
    # drift against the bundle's baseline
    ("psi<0.2", figures(requests=200, psi_max_input=0.199), "pass"),
    ("psi<0.2", figures(requests=200, psi_max_input=0.2), "fail"),
    ("psi<0.2", figures(requests=199, psi_max_input=0.9), "wait"),
    ("psi_output<0.1", figures(requests=300, psi_output=0.05), "pass"),
    ("psi_output<0.1", figures(requests=300, psi_output=0.15), "fail"),
    # shadow agreement counts shadow samples, not requests
    ("shadow_agreement>0.98", figures(requests=10_000, shadow_samples=99, shadow_agreement=1.0), "wait"),
    ("shadow_agreement>0.98", figures(shadow_samples=100, shadow_agreement=0.99), "pass"),
    ("shadow_agreement>0.98", figures(shadow_samples=100, shadow_agreement=0.98), "fail"),
]


@pytest.mark.parametrize(("text", "canary", "status"), EDGE_CASES)
def test_gate_edges(text, canary, status):
    result = evaluate_gate(Gate.parse(text), canary)
    assert result.status == status, result.reason


def test_breach_reason_names_the_gate_and_its_figures():
    result = evaluate_gate(Gate.parse("error_rate<0.01"), figures(requests=812, errors=28))
    assert result.status == "fail"
    assert result.reason == "error_rate=0.03448 breached <0.01 over 812 requests"
    assert result.value == pytest.approx(28 / 812) and result.sample == 812 and result.min_samples == 100


def test_relative_gate_compares_with_the_previous_version():
    gate = Gate.parse("p99_ms<1.2x")
    control = figures(requests=1000, latency_p99_ms=20.0)
    assert evaluate_gate(gate, figures(requests=300, latency_p99_ms=23.9), control).status == "pass"
    slow = evaluate_gate(gate, figures(requests=300, latency_p99_ms=24.1), control)
    assert slow.status == "fail" and slow.threshold == pytest.approx(24.0) and slow.control_value == 20.0
    assert "previous version: 20" in slow.reason


def test_relative_gate_waits_while_the_control_has_too_little_data():
    gate = Gate.parse("p99_ms<1.2x")
    result = evaluate_gate(gate, figures(requests=300, latency_p99_ms=99.0), figures(requests=10, latency_p99_ms=1))
    assert result.status == "wait" and "previous version" in result.reason
    assert evaluate_gate(gate, figures(requests=300, latency_p99_ms=99.0), None).status == "wait"


def test_absolute_gate_records_the_control_value_for_context():
    result = evaluate_gate(Gate.parse("error_rate<0.01"), figures(requests=100), figures(requests=1000, errors=3))
    assert result.status == "pass" and result.control_value == pytest.approx(0.003)


INSTALL_CASES = [
    # (healthy, failed, timed_out, total, status) for install_success>=0.95
    (19, 1, 0, 20, "pass"),  # exactly 0.95
    (18, 2, 0, 20, "fail"),  # 0.90
    (0, 2, 0, 20, "fail"),  # out of reach already: even 18 more healthy gives 0.90
    (0, 1, 0, 20, "wait"),  # still reachable, devices unsettled
    (10, 0, 0, 20, "wait"),  # installed/soaking devices do not count yet
    (0, 0, 1, 20, "wait"),
    (0, 0, 2, 20, "fail"),  # silent devices count as failures
    (1, 0, 0, 1, "pass"),
    (0, 0, 1, 1, "fail"),
    (0, 0, 0, 3, "wait"),
]


@pytest.mark.parametrize(("healthy", "failed", "timed_out", "total", "status"), INSTALL_CASES)
def test_install_success_counts_only_devices_healthy_after_the_soak(healthy, failed, timed_out, total, status):
    canary = CohortFigures(
        devices_total=total, devices_healthy=healthy, devices_failed=failed, devices_timed_out=timed_out
    )
    result = evaluate_gate(Gate.parse("install_success>=0.95"), canary)
    assert result.status == status, result.reason


def test_install_success_min_lets_a_gate_decide_before_every_device_settles():
    canary = CohortFigures(devices_total=100, devices_healthy=10)
    assert evaluate_gate(Gate.parse("install_success>=0.9 min=10"), canary).status == "pass"
    assert evaluate_gate(Gate.parse("install_success>=0.9 min=11"), canary).status == "wait"


def test_figures_read_a_telemetry_cohort_stats_object_by_attribute():
    class Stats:
        devices_reporting, requests, errors, fallbacks = 3, 500, 5, 7
        latency_p95_ms, latency_p99_ms, psi_max_input, psi_output = 10.0, 20.0, 0.05, 0.02
        shadow_agreement, shadow_samples = None, 0

    canary = CohortFigures.from_stats(Stats(), devices_total=3, devices_healthy=2)
    assert canary.value("error_rate") == pytest.approx(0.01) and canary.value("p99_ms") == 20.0
    assert canary.devices_total == 3 and canary.devices_reporting == 3 and canary.sample("devices") == 2


def test_results_round_trip_and_every_metric_is_documented():
    result = evaluate_gate(Gate.parse("psi<0.2"), figures(requests=1000, psi_max_input=0.3))
    assert GateResult.from_dict(result.to_dict()) == result
    assert all(m.meaning for m in METRICS.values())


def test_relative_gate_passes_when_both_versions_are_at_zero():
    gate = Gate.parse("error_rate<1.5x")
    control = figures(requests=1000, errors=0)
    assert evaluate_gate(gate, figures(requests=200, errors=0), control).status == "pass"
    assert evaluate_gate(gate, figures(requests=200, errors=1), control).status == "fail"


def test_a_per_variant_gate_parses_and_prints_back():
    gate = Gate.parse("error_rate<0.01 min=20 per=variant")
    assert gate == Gate("error_rate", "<", 0.01, min_samples=20, per_variant=True)
    assert gate.text == "error_rate<0.01 min=20 per=variant" and Gate.parse(gate.text) == gate
    assert Gate.parse("p99_ms<40 per=variant").per_variant


def test_a_per_variant_gate_fails_when_one_variant_fails_behind_a_healthy_majority():
    gate = Gate.parse("error_rate<0.01 min=100 per=variant")
    healthy = figures(requests=10_000, errors=10)
    bad = figures(requests=200, errors=40)
    whole = figures(requests=10_200, errors=50)
    assert evaluate_gate(gate, whole).status == "pass"  # the whole wave hides the bad variant
    result = evaluate_per_variant(gate, {"onnx-int8-static": healthy, "tflite-int8-weight": bad})
    assert result.status == "fail" and result.reason.startswith("variant tflite-int8-weight: error_rate=0.2 breached")


def test_a_per_variant_gate_waits_for_the_smallest_variant_and_passes_naming_every_one():
    gate = Gate.parse("error_rate<0.01 min=100 per=variant")
    enough, thin = figures(requests=500, errors=0), figures(requests=20, errors=0)
    waiting = evaluate_per_variant(gate, {"onnx-fp16": enough, "tflite-fp16": thin})
    assert waiting.status == "wait" and waiting.reason == "variant tflite-fp16: needs 100 requests, has 20"
    passed = evaluate_per_variant(gate, {"onnx-fp16": enough, "tflite-fp16": enough})
    assert passed.status == "pass" and "onnx-fp16: error_rate=0" in passed.reason and "tflite-fp16:" in passed.reason
    assert evaluate_per_variant(gate, {}).status == "wait"
