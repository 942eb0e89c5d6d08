"""Honest findings on synthetic runs: no latency read off a saturated queue, verdicts only with a CI off 0."""

from __future__ import annotations

from loadtest.report import findings, load_run
from loadtest.report.content import state_cell
from loadtest.report.data import GENERATOR_LIMITED
from loadtest.report.findings import BETTER, NO_DIFFERENCE, NO_WINNER, WORSE, compare_configs, slo_findings
from tests.report_runs import Spec, capacity_document, write_run

CAPACITY = capacity_document()


def _run(tmp_path, specs, **kwargs):
    write_run(tmp_path, specs, **kwargs)
    return load_run(tmp_path)


def test_findings_refuse_to_compare_latencies_when_both_points_are_saturated(tmp_path):
    run = _run(
        tmp_path,
        [Spec("whole", 40.0, 50.0, saturated=True), Spec("reorch", 40.0, 5.0, policy="dva", saturated=True)],
        capacity=CAPACITY,
    )
    whole, reorch = run.points
    result = compare_configs([whole], [reorch], run)
    assert result.metric == "achieved req/s" and result.verdict == NO_WINNER and result.ci is None
    assert "both saturated" in result.text and "latencies are not compared" in result.text
    assert "reorch[dva] sustained 1.40x whole's rate" in result.text
    # no sentence of the report quotes either point's latency
    for sentence in findings(run):
        for p in (whole, reorch):
            for value in (p.summary.p99_ms, p.summary.avg_ms, p.summary.p50_ms):
                assert f"{value:.1f} ms" not in sentence, sentence


def test_findings_compare_throughput_not_latency_when_only_one_side_saturated(tmp_path):
    run = _run(tmp_path, [Spec("whole", 40.0, 50.0, saturated=True), Spec("reorch", 40.0, 5.0, policy="dva")])
    whole, reorch = run.points
    assert compare_configs([whole], [reorch]).verdict == BETTER
    assert compare_configs([reorch], [whole]).verdict == WORSE
    assert "kept up" in compare_configs([whole], [reorch]).text
    assert "ms" not in compare_configs([whole], [reorch]).text


def test_findings_give_no_verdict_when_the_interval_spans_zero(tmp_path):
    run = _run(tmp_path, [Spec("whole", 50.0, 10.0), Spec("ensemble", 50.0, 10.0)])
    result = compare_configs([run.points[0]], [run.points[1]])
    assert result.verdict == NO_DIFFERENCE
    assert result.ci.low < 0 < result.ci.high
    assert "no measurable difference in p99" in result.text and "single runs" in result.text


def test_findings_call_a_gain_with_its_interval_when_it_excludes_zero(tmp_path):
    run = _run(tmp_path, [Spec("whole", 50.0, 20.0), Spec("reorch", 50.0, 5.0, policy="dva")])
    result = compare_configs([run.points[0]], [run.points[1]])
    assert result.verdict == BETTER and result.ci.high < 0
    assert "p99 lower" in result.text and "95% CI" in result.text


def test_findings_with_repeats_resample_repeats(tmp_path):
    specs = [
        Spec(variant, 50.0, mean, policy=policy, repeat=r, repeats=3)
        for r in range(3)
        for variant, policy, mean in (("whole", None, 20.0), ("reorch", "dva", 5.0))
    ]
    run = _run(tmp_path, specs)
    sentences = [f for f in findings(run) if "against whole" in f]
    assert len(sentences) == 1
    assert "3 and 3 repeats" in sentences[0] and "p99 lower" in sentences[0]


def test_findings_name_no_winner_when_offered_loads_differ(tmp_path):
    run = _run(tmp_path, [Spec("whole", 20.0, 10.0), Spec("whole", 40.0, 5.0)])
    result = compare_configs([run.points[0]], [run.points[1]])
    assert result.verdict == NO_WINNER and "different offered loads" in result.text


def test_highest_throughput_within_slo_uses_stable_points_and_achieved_rate(tmp_path):
    run = _run(
        tmp_path,
        [
            Spec("whole", 10.0, 5.0),
            Spec("whole", 20.0, 5.0, extra={"achieved_rps": 19.2}),
            # unstable (a late generator): never the answer, although its p99 met the SLO
            Spec("whole", 40.0, 5.0, extra={"stable": False, "unstable_reason": "generator late"}),
        ],
    )
    assert run.points[2].summary.p99_ms < 30
    (sentence,) = slo_findings(run)
    assert sentence.endswith("whole (curve): 19.2.")


def test_highest_throughput_within_slo_says_none_when_no_stable_point_met_it(tmp_path):
    run = _run(tmp_path, [Spec("whole", 10.0, 5.0), Spec("whole", 20.0, 5.0)], new_format=False)
    (sentence,) = slo_findings(run)  # an old run: stability unknown, so no point counts
    assert "no stable point met it" in sentence


def test_findings_compare_achieved_rate_with_an_interval_when_saturated_points_repeat(tmp_path):
    specs = [
        Spec(
            variant,
            40.0,
            20.0,
            policy=policy,
            repeat=r,
            repeats=3,
            saturated=True,
            extra={"achieved_rps": achieved + r},
        )
        for r in range(3)
        for variant, policy, achieved in (("whole", None, 20.0), ("reorch", "dva", 30.0))
    ]
    run = _run(tmp_path, specs)
    whole = [p for p in run.points if p.label == "whole"]
    reorch = [p for p in run.points if p.label == "reorch[dva]"]
    result = compare_configs(whole, reorch, run)
    assert result.metric == "achieved req/s" and result.verdict == BETTER
    # resampled means lie in [20, 22] and [30, 32]: every difference is within [8, 12]
    assert result.ci.estimate == 10.0 and 8.0 <= result.ci.low < result.ci.high <= 12.0
    assert "measurably more served" in result.text and "p99" not in result.text


def test_findings_name_no_winner_when_the_load_generator_was_off_schedule(tmp_path):
    late = {"stable": False, "unstable_reason": "load_generator_late: 10 of 101 arrivals sent late"}
    run = _run(tmp_path, [Spec("whole", 40.0, 20.0, extra=late), Spec("reorch", 40.0, 5.0, policy="dva")])
    whole, reorch = run.points
    assert whole.stability == GENERATOR_LIMITED and not whole.saturated
    assert state_cell(whole).startswith("UNSTABLE: load generator")
    result = compare_configs([whole], [reorch], run)
    assert result.verdict == NO_WINNER and "did not keep its open-loop schedule" in result.text
    assert any("load generator did not keep" in f for f in findings(run))
