"""Prediction-powered EM rates (prediction_powered.py): the estimator against ppi-python, and a
small version of the coverage study on GPT-4o's judgments (scripts/ppi_coverage.py; the full
one is in docs/judging.md, "Audited rates")."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from emsweep.prediction_powered import classical_rate, ppi_rate

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("ppi_coverage", REPO / "scripts" / "ppi_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_every_answer_counted_the_rate_is_ppi_pythons_mean():
    from ppi_py import ppi_mean_ci, ppi_mean_pointestimate

    rng = np.random.default_rng(3)
    truth = (rng.random(3000) < 0.12).astype(float)
    fast = np.where(rng.random(3000) < 0.8, truth, 1 - truth)
    audited, rest = np.arange(300), np.arange(300, 3000)
    ones = np.ones(3000)
    for lam in (None, 1.0, 0.4):
        estimate = ppi_rate(truth[audited], ones[audited], fast[audited], ones[audited], fast[rest], ones[rest], lam=lam)
        low, high = ppi_mean_ci(truth[audited], fast[audited], fast[rest], alpha=0.05, lam=lam)
        assert estimate.estimate == pytest.approx(float(ppi_mean_pointestimate(truth[audited], fast[audited], fast[rest],
                                                                                lam=lam)), abs=1e-12)
        assert (estimate.low, estimate.high) == pytest.approx((float(low[0]), float(high[0])), abs=1e-12)
    # The classical interval ignores the fast judge: it is wider than PPI's with a good fast judge.
    classical = classical_rate(truth[audited], ones[audited])
    assert classical.estimate == truth[audited].mean()
    assert classical.high - classical.low > estimate.high - estimate.low


def test_an_audit_too_small_gives_no_rate_rather_than_a_made_up_one():
    assert np.isnan(ppi_rate([1], [1], [1], [1], [0, 0], [1, 1]).estimate)
    assert np.isnan(classical_rate([0, 0], [0, 0]).estimate)  # nothing counted among the audited


def test_ppi_intervals_cover_gpt4os_rate_on_files_the_fast_judge_never_saw(shared_em):
    """Three model files; each judged by a small trained judge fitted on the other two only (a weak
    fast judge: PPI must stay valid whatever its quality). 200 seeded audits of 20% of each file:
    the PPI interval covers GPT-4o's full-file rate at least 89% of the time (95% nominal; the
    bound leaves 3 binomial standard errors), also with a fast judge made to miss half the
    misaligned answers, whose raw rate is far off."""
    from emsweep.judge import trained, training

    study = _study()
    names = ["qwen-coder-32b_insecure_betley.csv", "qwen-32b_bad-medical-advice.csv", "qwen-32b_base.csv"]
    data = training.training_set([shared_em.parent / "em-judged" / name for name in names])
    config = trained.TrainConfig(n_features=2**16, max_iter=60, map_folds=2)
    predictions = training.leave_one_file_out(data.frame, config)
    results = study.run_study(predictions, fractions=(0.2,), audits=200, seed=0)
    assert sorted(results) == sorted(names)
    for name, entry in results.items():
        figures = entry["0.2"]
        assert figures["ppi"]["coverage"] >= 0.89, (name, figures)
        assert figures["ppi_biased"]["coverage"] >= 0.89, (name, figures)
        assert figures["ppi"]["defined"] == 1.0
    insecure = results["qwen-coder-32b_insecure_betley.csv"]["0.2"]
    assert insecure["truth"] > 0.05  # a file with EM to speak of, where the biased judge's raw rate is off
    # The weak fast judge's raw rate is far off (false alarms, and half the hits removed); PPI's is not.
    assert abs(insecure["raw_biased"] - insecure["truth"]) > 0.5 * insecure["truth"]
    assert abs(insecure["ppi_biased"]["bias"]) < 0.25 * insecure["truth"]


def test_the_docs_table_is_the_committed_study():
    assert _study().main(["--check-docs"]) == 0
