"""judge.audit: which answers the audit judge scores (a seeded draw per run, stratified by
question), the audit nodes' keys (their own judge's identity; the judge nodes' keys untouched),
and the audited rates the analysis sets side by side (against prediction_powered directly)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from emsweep import analyze
from emsweep.judge.audit import audited_rows
from emsweep.prediction_powered import classical_rate, ppi_rate
from emsweep.spec import AnalysisSpec, SpecError, parse_spec
from emsweep.sweep.plan import plan

from test_plan import KEYS, RAW, keys


def _samples(sizes: dict[str, int], runs=("r0", "r1"), steps=(None, 2)) -> pa.Table:
    rows = []
    for run in runs:
        for step in steps:
            for question, n in sizes.items():
                rows += [{"run_id": run, "checkpoint_step": step, "suite": "s", "condition": "none",
                          "question_id": question, "turn": None, "paraphrase_idx": 0, "sample_idx": i,
                          "answer": f"{run}/{step}/{question}/{i}"} for i in range(n)]
    return pa.Table.from_pylist(rows)


def test_the_draw_is_per_run_seeded_and_proportional_to_each_question():
    samples = _samples({"a": 40, "b": 20, "c": 10, "d": 3})  # 73 answers per run
    drawn = audited_rows(samples, fraction=0.2, count=None, seed=0).to_pandas()
    per_run = drawn.groupby(["run_id", "checkpoint_step"], dropna=False).size()
    assert len(per_run) == 4 and (per_run == 15).all()  # round(0.2 x 73) in every run and checkpoint
    for _, run in drawn.groupby(["run_id", "checkpoint_step"], dropna=False):
        counts = run["question_id"].value_counts().reindex(list("abcd"), fill_value=0)
        exact = np.array([40, 20, 10, 3]) * 15 / 73
        assert (counts.to_numpy() >= np.floor(exact)).all() and (counts.to_numpy() <= np.ceil(exact)).all()
    assert not drawn.duplicated(["run_id", "checkpoint_step", "question_id", "sample_idx"]).any()
    again = audited_rows(samples, fraction=0.2, count=None, seed=0).to_pandas()
    other = audited_rows(samples, fraction=0.2, count=None, seed=1).to_pandas()
    assert drawn["answer"].tolist() == again["answer"].tolist() and drawn["answer"].tolist() != other["answer"].tolist()
    # Runs draw independently: not the same answer positions in every run.
    positions = {run: sorted(zip(g["question_id"], g["sample_idx"])) for run, g in drawn.groupby("run_id")}
    assert positions["r0"] != positions["r1"]
    # A count per run, capped at the run's answers; a fraction of 1 is every answer.
    assert (audited_rows(samples, None, 7, 0).to_pandas().groupby("run_id").size() == 14).all()
    assert audited_rows(samples, None, 1000, 0).num_rows == samples.num_rows
    assert audited_rows(samples, 1.0, None, 0).num_rows == samples.num_rows


def _with_audit(**audit) -> dict:
    judge = {"model": "m", "audit": {"judge": {"backend": "openai", "model": "gpt-4o"}, "fraction": 0.1, **audit}}
    return {**RAW, "judge": judge}


def test_audit_nodes_carry_their_judge_and_draw_and_move_no_other_key_but_the_analysis():
    audited = keys(_with_audit())
    audits = {node_id for node_id in audited if node_id.startswith("audit/")}
    assert audits == {"audit/m__base", "audit/m__d__s0", "audit/m__d__s1"}
    assert {k: v for k, v in audited.items() if k not in audits and k != "analyze/keys"} == {
        k: v for k, v in KEYS.items() if k != "analyze/keys"}
    assert audited["analyze/keys"] != KEYS["analyze/keys"]  # it reads the audits too
    (node,) = [n for n in plan(parse_spec(_with_audit())) if n.id == "audit/m__d__s0"]
    assert node.deps == ("sample/m__d__s0",) and node.config["judge_model"] == "openai:gpt-4o"
    assert node.config["draw"] == {"fraction": 0.1, "count": None, "seed": 0}
    for edit in ({"fraction": 0.2}, {"seed": 3}, {"judge": {"backend": "openai", "model": "gpt-4.1"}}):
        moved = keys(_with_audit(**edit))
        assert {k for k in moved if moved[k] != audited[k]} == audits | {"analyze/keys"}, edit


def test_an_audit_needs_one_size_and_no_audit_of_its_own():
    with pytest.raises(SpecError, match="judge.audit: give one of fraction"):
        parse_spec(_with_audit(count=5))
    nested = {"backend": "openai", "model": "gpt-4o", "audit": {"judge": {"model": "m"}, "count": 3}}
    with pytest.raises(SpecError, match="an audit judge has no audit or panel of its own"):
        parse_spec(_with_audit(judge=nested))


def _answers(scores: dict[str, list[tuple[float, float]]]) -> pd.DataFrame:
    """Wide answers of one run: per question a list of (aligned, coherent)."""
    rows = []
    for question, pairs in scores.items():
        rows += [{"run_id": "r", "model": "m", "dataset": "d", "seed": 0, "checkpoint_step": None, "suite": "s",
                  "condition": "none", "question_id": question, "turn": None, "paraphrase_idx": 0, "sample_idx": i,
                  "aligned": aligned, "coherent": coherent} for i, (aligned, coherent) in enumerate(pairs)]
    return pd.DataFrame(rows)


def _biased_run(seed: int):
    """400 answers, 20% misaligned by the audit judge; a fast judge that misses half of them and
    flags 1% of the others; 60 audited at random."""
    rng = np.random.default_rng(seed)
    truth = rng.random(400) < 0.2
    fast_flags = np.where(truth, rng.random(400) < 0.5, rng.random(400) < 0.01)
    audit = _answers({"q": [(10.0 if t else 90.0, 80.0) for t in truth]})
    fast = _answers({"q": [(10.0 if f else 90.0, 80.0) for f in fast_flags]})
    return truth, fast_flags, audit, fast, rng.choice(400, 60, replace=False)


def test_audited_rates_are_the_estimators_on_the_runs_answers():
    truth, fast_flags, audit, fast, audited = _biased_run(0)
    spec = AnalysisSpec()
    table = analyze.audited_rates(fast, audit.iloc[sorted(audited)], spec, {"s"})
    (row,) = table.to_dict("records")
    mask = np.zeros(400, bool)
    mask[audited] = True
    expected = ppi_rate(truth[mask], np.ones(60), fast_flags[mask], np.ones(60), fast_flags[~mask], np.ones(340))
    assert row["ppi_misaligned_rate"] == pytest.approx(expected.estimate, abs=1e-12)
    assert (row["ppi_low"], row["ppi_high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)
    alone = classical_rate(truth[mask], np.ones(60), n_total=400)
    assert row["audit_misaligned_rate"] == pytest.approx(alone.estimate)
    assert row["raw_misaligned_rate"] == pytest.approx(fast_flags.mean())
    assert (row["n_answers"], row["n_audited"]) == (400, 60)
    assert row["audit_tp"] == int((fast_flags & truth)[mask].sum()) and row["audit_positives"] == int(truth[mask].sum())
    assert row["raw_misaligned_rate"] < truth.mean() - 0.05  # the fast judge misses half
    assert row["rg_resolves"] and 0 < row["ppi_lambda"] <= 1
    # A fast judge that agrees with the audit judge everywhere: PPI's weight goes to 1, its
    # estimate is the fast judge's rate on the answers not audited, and the correction is none.
    (same,) = analyze.audited_rates(audit, audit.iloc[sorted(audited)], spec, {"s"}).to_dict("records")
    unaudited = np.setdiff1d(np.arange(400), audited)
    assert same["ppi_misaligned_rate"] == pytest.approx(truth[unaudited].mean()) and same["ppi_lambda"] == 1.0
    assert same["audit_fp"] == 0 and same["audit_tp"] == same["audit_positives"]
    assert same["rg_misaligned_rate"] == pytest.approx(truth.mean(), abs=0.01)


def test_the_audited_interval_covers_the_audit_judges_rate_where_the_raw_rate_does_not():
    """100 runs of the biased fast judge above through the analysis: the 95% PPI interval covers
    the audit judge's rate over all answers about 95% of the time; the raw rate never gets there."""
    covered, raw_off = 0, 0
    for seed in range(100):
        truth, _, audit, fast, audited = _biased_run(seed)
        (row,) = analyze.audited_rates(fast, audit.iloc[sorted(audited)], AnalysisSpec(), {"s"}).to_dict("records")
        covered += row["ppi_low"] <= truth.mean() <= row["ppi_high"]
        raw_off += abs(row["raw_misaligned_rate"] - truth.mean()) > 0.05
    assert covered >= 90 and raw_off >= 95, (covered, raw_off)


def test_an_audit_that_counts_no_answer_leaves_the_rate_unbounded():
    """Seen on a 135M subject: the fast judge counts every answer and calls it misaligned, the audit
    judge calls every audited one incoherent. The audit then says nothing of the rate: the interval
    is [0, 1], not the fast judge's rate with no width."""
    M, C = np.zeros(3), np.zeros(3)
    estimate = ppi_rate(M, C, np.ones(3), np.ones(3), np.array([1.0, 1, 0]), np.array([1.0, 1, 0]))
    assert np.isnan(estimate.estimate)  # the PPI estimate of the counted share is below 0: no rate
    estimate = ppi_rate(M, C, np.ones(3), np.array([1.0, 0, 0]), np.ones(3), np.ones(3))
    assert estimate.low <= 0.0 and estimate.high >= 1.0


def test_plan_prints_the_audits_tokens_cost_and_expected_width():
    import re

    from emsweep.planning import audit_width_note, build_plan

    result = build_plan(parse_spec(_with_audit(usd_per_million_tokens=2.5)))
    stages = {s.stage: s for s in result.stages}
    assert stages["audit"].nodes == 3 and stages["audit"].tokens == pytest.approx(0.1 * stages["judge"].tokens)
    (line,) = [note for note in result.notes if note.startswith("audit: gpt-4o")]
    audited, everything = [float(t.replace(",", "")) for t in re.findall(r"([\d,]+) tokens|against ([\d,]+)", line)
                           for t in t if t]
    assert audited == pytest.approx(0.1 * everything)
    assert f"${audited * 2.5 / 1e6:,.2f}" in line and f"${everything * 2.5 / 1e6:,.2f}" in line
    assert any(note.startswith("audit: expect a run's 95% interval") for note in result.notes)
    # No agreement: PPI is as wide as the audited answers alone; perfect agreement on a 10% audit:
    # as narrow as judging everything (sqrt(0.1) of the width).
    widths = lambda note: [float(w) for w in re.findall(r"\+-([\d.]+)", note)]
    assert widths(audit_width_note(1000, 0.1, correlation=0.0))[0] == widths(audit_width_note(1000, 0.1, correlation=0.0))[1]
    alone, powered = widths(audit_width_note(1000, 0.1, correlation=1.0))
    assert powered == pytest.approx(alone * 0.1 ** 0.5, abs=0.002)
    # Without an audit the plan has no audit stage.
    assert "audit" not in {s.stage for s in build_plan(parse_spec(RAW)).stages}


def _null_contrast(rng, audit: int, tpr_a: float, rate_a=0.15, rate_b=0.15, seeds=2, n=400):
    """One primary contrast: two datasets, `seeds` runs each of n answers whose audit-judge rate is
    rate_a / rate_b; the fast judge misses (1 - tpr_a) of side a's misaligned answers and 10% of
    side b's (1% false alarms on both); `audit` answers of each run audited at random. Returns the
    PPI test's p on answers and over seeds, and the fast judge's own exact test's p."""
    from scipy import stats

    from emsweep.prediction_powered import difference_test

    sides, raw = {}, {}
    for side, tpr, rate in (("a", tpr_a, rate_a), ("b", 0.9, rate_b)):
        estimates, errors, flagged = [], [], 0
        for _ in range(seeds):
            truth = rng.random(n) < rate
            fast = np.where(truth, rng.random(n) < tpr, rng.random(n) < 0.01)
            audited = np.zeros(n, bool)
            audited[rng.choice(n, audit, replace=False)] = True
            ones = np.ones(n)
            estimate = ppi_rate(truth[audited], ones[audited], fast[audited], ones[audited], fast[~audited],
                                ones[~audited])
            estimates.append(estimate.estimate)
            errors.append((estimate.high - estimate.low) / (2 * 1.959964))
            flagged += int(fast.sum())
        sides[side], raw[side] = (estimates, errors), flagged
    total = seeds * n
    exact = stats.fisher_exact([[raw["a"], total - raw["a"]], [raw["b"], total - raw["b"]]]).pvalue
    return (difference_test(*sides["a"], *sides["b"], "answers")[1],
            difference_test(*sides["a"], *sides["b"], "seeds")[1], exact)


def test_the_audited_primary_contrast_keeps_its_size_where_the_fast_judges_test_does_not():
    """The null: both datasets' answers are 15% misaligned by the audit judge, but the fast judge
    misses half of them on one side only (a judge that errs by model family). 300 simulated
    contrasts, 2 seeds of 400 answers a side, 40 audited per run: the fast judge's exact test finds
    a difference nearly always; the PPI tests reject at most their 5% (conservatively: the
    intervals widen at small counts, prediction_powered.MIN_EVENTS). Then the power at 30% vs 15%."""
    rng = np.random.default_rng(0)
    results = np.array([_null_contrast(rng, audit=40, tpr_a=0.5) for _ in range(300)])
    wald, welch, exact = (np.nanmean(results[:, i] < 0.05) for i in range(3))
    assert wald <= 0.06 and welch <= 0.08 and exact >= 0.8, (wald, welch, exact)
    power = np.mean([_null_contrast(rng, audit=40, tpr_a=0.5, rate_a=0.30)[0] < 0.05 for _ in range(200)])
    assert power >= 0.5, power


def test_with_an_audit_the_primary_contrast_is_made_on_the_prediction_powered_rates():
    from test_analyze import NO_HARM, _em, _table

    from emsweep.spec import PrimaryContrast, PushbackSpec

    rng = np.random.default_rng(1)
    fast_rows, audit_rows = [], []
    for dataset, rate in (("insecure", 0.4), ("secure", 0.05)):
        for seed in (0, 1):
            run = f"m__{dataset}__s{seed}"
            for i in range(60):
                truly = rng.random() < rate
                fast_rows.append((run, dataset, seed, "q", i, 10.0 if truly and rng.random() < 0.6 else 90.0, 80.0))
                if i % 3 == 0:
                    audit_rows.append((run, dataset, seed, "q", i, 10.0 if truly else 90.0, 80.0))
    spec = AnalysisSpec(primary=PrimaryContrast(a="insecure", b="secure", unit="answers"))
    tables = analyze.analyze(_table(_em(fast_rows)), NO_HARM, spec, PushbackSpec(), audits=_table(_em(audit_rows)))
    table = tables["comparisons"].to_pandas()
    primary = table[table["primary"]]
    assert primary["test"].tolist() == ["ppi_wald_on_answers"] and primary["p_value"].iloc[0] < 0.05
    assert primary["mean_a"].iloc[0] > primary["mean_b"].iloc[0]
    # The fast judge's exact test on answers is still there, now in the adjusted family.
    exact = table[table["test"] == "exact_stratified_by_question"]
    assert len(exact) == 1 and not exact["primary"].iloc[0] and exact["p_holm"].notna().all()
    assert set(table["test"]) >= {"ppi_wald_on_answers", "ppi_welch_over_seeds"}
    # Without the audit the exact test is the primary, as before.
    plain = analyze.analyze(_table(_em(fast_rows)), NO_HARM, spec, PushbackSpec())["comparisons"].to_pandas()
    assert plain.loc[plain["primary"], "test"].tolist() == ["exact_stratified_by_question"]
