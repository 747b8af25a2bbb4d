"""jobs/report.py on synthetic results with known answers: the budget, the choice per objective, the Pareto front and
the report's verdicts."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report

BASE = {"spec": "base", "ppl": 10.0, "kl_to_base": 0.0, "top1_agreement": 1.0, "greedy_agreement": 1.0,
        "artifact_bytes": 500_000_000, "decode_tokens_per_s_b1": 40.0}


def row(spec, ppl, size_mb, speed, **extra):
    return {"spec": spec, "ppl": ppl, "kl_to_base": (ppl - 10) / 10, "top1_agreement": 0.95, "greedy_agreement": 0.9,
            "artifact_bytes": int(size_mb * 1e6), "decode_tokens_per_s_b1": speed, **extra}


ROWS = [
    BASE,
    row("small", 10.5, 80, 90.0),  # passes, smallest of those that pass
    row("fast", 10.4, 140, 120.0),  # passes, fastest under 150 MB
    row("fastest", 10.8, 260, 130.0),  # passes, fastest overall but over 150 MB
    row("tiny-bad", 13.0, 40, 100.0),  # smallest of all, misses the perplexity budget
    {"spec": "broken", "error": "RuntimeError: out of memory"},  # failed trial: no metrics at all
]
BUDGET = {"max_ppl_increase": 0.1}


@pytest.mark.parametrize("objective,winner", [
    ("smallest", "small"),
    ("fastest", "fastest"),
    ({"fastest_under_size": "150MB"}, "fast"),
    ("fastest_under_size: 100 MB", "small"),
])
def test_choose_picks_the_known_winner_for_each_objective(objective, winner):
    chosen = report.choose(ROWS, BASE, BUDGET, report.check_objective(objective), "causal")
    assert chosen is not None and chosen["spec"] == winner


def test_nothing_is_chosen_when_no_variant_meets_the_budget_or_the_size_cap():
    assert report.choose(ROWS, BASE, {"max_ppl_increase": 0.01}, ("smallest", None), "causal") is None
    assert report.choose(ROWS, BASE, BUDGET, ("fastest_under_size", 50_000_000), "causal") is None
    # the base itself never counts as a variant, even though it meets every budget
    assert report.choose([BASE], BASE, {}, ("smallest", None), "causal") is None


def test_failures_name_each_budget_line_missed():
    r = row("v", 11.5, 100, 50.0, top1_agreement=0.8)
    missed = report.failures(r, BASE, {"max_ppl_increase": 0.1, "min_top1_agreement": 0.9, "max_kl": 0.2,
                                       "min_greedy_agreement": 0.5})
    assert [m.split()[0] for m in missed] == ["max_ppl_increase", "min_top1_agreement"]
    at_limit = row("edge", 12.5, 100, 50.0, top1_agreement=0.9)  # +25% perplexity, exactly representable
    assert report.failures(at_limit, BASE, {"max_ppl_increase": 0.25, "min_top1_agreement": 0.9}) == []
    assert report.failures({"spec": "x", "error": "boom"}, BASE, BUDGET) == ["failed"]
    encoder = {"spec": "e", "cosine_to_base": 0.97, "neighbour_overlap": 0.8}
    assert report.failures(encoder, BASE, {"min_cosine": 0.98}) == ["min_cosine 0.97 vs 0.98"]
    assert report.failures({"spec": "e"}, BASE, {"min_neighbour_overlap": 0.5}) == ["min_neighbour_overlap missing"]


def test_pareto_front_keeps_exactly_the_rows_nothing_beats_on_both_axes():
    pts = [{"spec": s, "size": x, "ppl": y} for s, x, y in
           [("a", 1, 12.0), ("b", 2, 10.0), ("c", 3, 10.5), ("d", 2, 11.0), ("e", 4, 9.0), ("f", 4, 9.0)]]
    front = report.pareto_front(pts + [{"spec": "err", "error": "x"}], "size", "ppl", higher_y_better=False,
                                lower_x_better=True)
    assert sorted(r["spec"] for r in front) == ["a", "b", "e", "f"]  # c and d are dominated by b; ties both stay
    speed_front = report.pareto_front([{"spec": "s", "tps": 10, "ppl": 10}, {"spec": "t", "tps": 20, "ppl": 11},
                                       {"spec": "u", "tps": 15, "ppl": 12}], "tps", "ppl", False, lower_x_better=False)
    assert sorted(r["spec"] for r in speed_front) == ["s", "t"]


def test_objectives_and_sizes_parse_or_say_what_is_expected():
    assert report.check_objective("smallest") == ("smallest", None)
    assert report.check_objective({"fastest_under_size": "1.5GB"}) == ("fastest_under_size", 1_500_000_000)
    assert report.parse_size(12345) == 12345 and report.parse_size("100 kb") == 100_000
    with pytest.raises(ValueError, match="expected one of"):
        report.check_objective("cheapest")
    with pytest.raises(ValueError, match="needs a size"):
        report.check_objective("fastest_under_size")
    with pytest.raises(ValueError, match="100MB"):
        report.parse_size("lots")
    with pytest.raises(ValueError, match="not known for a causal model"):
        report.check_budget({"min_cosine": 0.9}, "causal")
    with pytest.raises(ValueError, match="expected a number"):
        report.check_budget({"max_kl": True}, "causal")


def test_the_report_gives_every_variant_its_verdict(tmp_path):
    objective = report.check_objective("smallest")
    chosen = report.choose(ROWS, BASE, BUDGET, objective, "causal")
    text = report.write_report(tmp_path, ROWS[1:], BASE, BUDGET, objective, "causal", "tiny", chosen).read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**Chosen: `small`**" in text
    assert "| pass |" in lines["small"] and "| pass |" in lines["fast"]
    assert "fail: max_ppl_increase 0.3" in lines["tiny-bad"]
    assert "error: RuntimeError: out of memory" in lines["broken"]
    assert "0.16x" in lines["small"]  # size against the base's: 80 MB / 500 MB
    nothing = report.write_report(tmp_path, ROWS[1:], BASE, {"max_ppl_increase": 0.0}, objective, "causal", "tiny",
                                  None).read_text()
    assert "No variant meets the budget" in nothing and "Chosen" not in nothing


def test_results_parquet_keeps_every_column_when_the_first_trial_failed(tmp_path):
    rows = [{"spec": "int4-g32", "error": "ValueError: boom", "finished_at": 1.0},
            {"spec": "base", "error": None, "ppl": 26.1, "artifact": "a/base", "artifact_bytes": 1234, "seconds": 2.5}]
    report.write_results(tmp_path, rows)
    back = report.read_results(tmp_path)
    assert back[1]["ppl"] == 26.1 and back[1]["artifact_bytes"] == 1234 and back[0]["ppl"] is None
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema.field("ppl").type == pa.float64() and table.schema.field("artifact_bytes").type == pa.int64()
    report.write_results(tmp_path, back + [{"spec": "int8", "error": None, "ppl": 26.2}])  # a resumed sweep appends
    assert [r["spec"] for r in report.read_results(tmp_path)] == ["int4-g32", "base", "int8"]


@pytest.mark.parametrize("kind, scale", [("causal", "log"), ("encoder", "linear")])
def test_the_pareto_plot_puts_perplexity_on_a_log_axis(tmp_path, monkeypatch, kind, scale):
    """Perplexities span orders of magnitude (a failed 2:4 variant at 11x the base): on a linear axis every other
    variant lies flat against the floor. Cosines stay linear."""
    from matplotlib.figure import Figure

    seen = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.extend(ax.get_yscale() for ax in fig.axes),
                                                                 save(fig, *a, **k)))
    rows = ROWS if kind == "causal" else [{"spec": r["spec"], "cosine_to_base": 0.99, "sentences_per_s": 5.0,
                                           "artifact_bytes": r.get("artifact_bytes")} for r in ROWS[:3]]
    report.plot_pareto(tmp_path, rows, kind, None)
    assert seen == [scale, scale] and (tmp_path / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize("needed", [4.5, 5.0, 6.33, 8.5, 9.0])
def test_auto_finds_the_fewest_bits_that_pass_within_a_step_in_few_probes(needed):
    from jobs import auto

    tried = []
    found = auto.search(lambda bits: tried.append(bits) or bits >= needed)
    if needed > auto.HIGH:
        assert found is None and tried == [auto.HIGH]
        return
    assert needed <= found <= needed + auto.STEP and len(tried) <= 9
    assert all(b < needed for b in tried if b < found)  # nothing below the find passed
