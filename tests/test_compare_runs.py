"""``stagebatch compare`` of two synthetic runs: matched points, intervals, and no winner where loads differ."""

from __future__ import annotations

from loadtest.compare import compare_runs, write_comparison
from loadtest.report import load_run
from loadtest.report.findings import BETTER, NO_WINNER
from stagebatch.cli import main
from tests.report_runs import Spec, write_run


def _runs(tmp_path, rate_b: float = 40.0):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    write_run(
        a,
        [
            Spec("whole", 40.0, 20.0, multiple=0.5),
            Spec("reorch", 40.0, 20.0, policy="dva", multiple=0.5),
            Spec("ensemble", 40.0, 20.0, load="only_in_a"),
        ],
        seed=1,
    )
    write_run(
        b,
        [
            Spec("whole", rate_b, 5.0, multiple=0.5),
            Spec("reorch", rate_b, 20.0, policy="dva", multiple=0.5, saturated=True),
        ],
        seed=2,
        capacity={"models": {"bert_base": {"whole": {"sustained_rps": rate_b * 2, "limited_by": "server"}}}},
    )
    return a, b


def test_compare_lines_up_matching_points_and_states_intervals(tmp_path):
    a, b = _runs(tmp_path)
    result = compare_runs(load_run(a), load_run(b))
    assert [m.key[2] for m in result.matches] == ["whole", "reorch[dva]"]
    whole, reorch = result.matches
    assert whole.key[4] == "0.5x capacity"
    assert (whole.sustained_a, whole.sustained_b) == (None, 80.0)
    assert whole.comparison.verdict == BETTER and "95% CI" in whole.comparison.text
    assert reorch.comparison.metric == "achieved req/s"  # B saturated: no latency compared
    assert [k[3] for k in result.only_a] == ["only_in_a"] and not result.only_b
    html_path, md_path = write_comparison(result, tmp_path / "out")
    assert "<td>reorch[dva]</td>" in html_path.read_text()
    assert "| whole |" in md_path.read_text()


def test_compare_names_no_winner_when_the_offered_loads_differ(tmp_path):
    a, b = _runs(tmp_path, rate_b=60.0)  # same multiple of capacity, different machines' rates
    result = compare_runs(load_run(a), load_run(b))
    assert len(result.matches) == 2
    assert all(m.comparison.verdict == NO_WINNER for m in result.matches)
    assert all("different offered loads" in m.comparison.text for m in result.matches)


def test_compare_command_prints_the_table_and_writes_the_files(tmp_path, capsys):
    a, b = _runs(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reorch[dva]" in printed and "B against A" in printed and "1 point(s) only in A" in printed
    assert (out / "compare.html").is_file() and (out / "compare.md").is_file()


def test_compare_command_fails_cleanly_on_a_missing_run(tmp_path):
    a, _ = _runs(tmp_path)
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 1
