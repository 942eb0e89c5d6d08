"""Capacity search decision logic against a fake prober with a known capacity."""

from __future__ import annotations

import pytest

from loadtest import capacity
from core.errors import ConfigValidationError


def _fake(capacity_rps: float, *, generator_limit: float | None = None, service_ms: float = 5.0):
    calls = []

    def probe(rate: float) -> capacity.Probe:
        calls.append(rate)
        if generator_limit is not None and rate > generator_limit:
            return capacity.Probe(rate, False, rate, service_ms, "load_generator_late: x", True)
        if rate <= capacity_rps:
            # latency rises towards capacity (M/D/1-like)
            rho = rate / capacity_rps
            return capacity.Probe(rate, True, rate * 0.99, service_ms * (1 + rho / (1.001 - rho)), None)
        return capacity.Probe(rate, False, capacity_rps * 0.97, 5000.0, "backlog_growing: x")

    return probe, calls


@pytest.mark.parametrize("true_capacity", [7.0, 173.0, 2400.0])
def test_capacity_search_finds_capacity_within_tolerance_when_server_limits(true_capacity):
    probe, calls = _fake(true_capacity)
    settings = capacity.SearchSettings(start_rps=50, max_probes=10)
    result = capacity.search_capacity(probe, slo_ms=50, settings=settings)
    assert result.limited_by == capacity.LIMITED_BY_SERVER
    assert result.sustained_rps <= true_capacity
    assert result.sustained_rps >= true_capacity / (1 + settings.tolerance)
    assert result.converged and len(calls) <= settings.max_probes
    assert [p.rate_rps for p in result.probes] == calls


def test_capacity_search_stops_after_max_probes_when_it_does_not_converge():
    probe, calls = _fake(1e5)
    result = capacity.search_capacity(probe, slo_ms=50, settings=capacity.SearchSettings(max_probes=4))
    assert len(calls) == 4 and not result.converged
    assert result.sustained_rps == max(calls)


def test_capacity_search_says_load_generator_when_the_generator_fell_behind():
    probe, _ = _fake(1000, generator_limit=300)
    result = capacity.search_capacity(probe, slo_ms=50)
    assert result.limited_by == capacity.LIMITED_BY_LOADGEN
    assert result.sustained_rps <= 300


def test_capacity_rate_at_slo_is_the_highest_sustained_rate_within_the_slo():
    probe, _ = _fake(200, service_ms=10)
    result = capacity.search_capacity(probe, slo_ms=30, settings=capacity.SearchSettings(max_probes=10))
    within = [p for p in result.probes if p.stable and p.p99_ms <= 30]
    assert result.slo_rps == max(p.rate_rps for p in within)
    assert result.slo_rps <= result.sustained_rps
    tight = capacity.search_capacity(probe, slo_ms=1)
    assert tight.slo_rps is None


def test_capacity_bracket_ignores_a_failed_probe_below_a_sustained_one():
    probes = [capacity.Probe(100, True, 99, 5), capacity.Probe(80, False, 70, 50), capacity.Probe(300, False, 150, 900)]
    lo, hi = capacity.bracket(probes)
    assert lo == 100 and hi.rate_rps == 300


def test_capacity_document_has_the_contract_fields():
    probe, _ = _fake(100)
    result = capacity.search_capacity(probe, slo_ms=50)
    doc = capacity.capacity_document({"m": {"whole": result}})
    entry = doc["models"]["m"]["whole"]
    assert set(entry) >= {"sustained_rps", "slo_rps", "slo_ms", "percentile", "limited_by", "probes"}
    assert set(entry["probes"][0]) >= {"rate_rps", "stable", "achieved_rps", "p99_ms", "reason"}
    assert capacity.whole_capacity(doc, "m") == entry["sustained_rps"]
    assert capacity.whole_capacity(doc, "other") is None and capacity.whole_capacity(None, "m") is None
    assert capacity.variant_label("reorch", "dva") == "reorch:dva"


def test_capacity_settings_refuse_nonsense():
    with pytest.raises(ConfigValidationError, match="growth"):
        capacity.SearchSettings(growth=1)
    with pytest.raises(ConfigValidationError, match="start_rps"):
        capacity.SearchSettings(start_rps=0)


def test_search_goes_down_by_its_growth_factor_when_a_probe_kept_up_but_missed_the_latency_limit():
    # the server keeps up at every rate, but p99 passes only at 40 req/s and below: from 72 req/s the search
    # must not creep down by 10% of the achieved rate (every probe failing) but step by the growth factor
    def probe(rate):
        return capacity.Probe(rate, rate <= 40.0, rate, 30.0 if rate <= 40.0 else 150.0,
                              None if rate <= 40.0 else "p99 above the SLO")

    settings = capacity.SearchSettings(start_rps=72.0, growth=1.5, max_probes=6)
    result = capacity.search_capacity(probe, slo_ms=100, settings=settings)
    assert [round(p.rate_rps, 1) for p in result.probes[:2]] == [72.0, 48.0]
    assert result.sustained_rps is not None and result.sustained_rps >= 40.0 / (1 + settings.tolerance)
