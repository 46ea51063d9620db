"""Prediction-powered EM rates (prediction_powered.py): the estimator against ppi-python, and a
small version of the coverage study on GPT-4o's judgments (scripts/ppi_coverage.py; the full
one is in docs/judging.md, "Audited rates")."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emsweep.prediction_powered import classical_rate, ppi_mean, ppi_rate

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("ppi_coverage", REPO / "scripts" / "ppi_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ppi_python(cases: list[dict]) -> list[dict]:
    """ppi-python's own estimate and interval for each case, computed in a child process: it
    imports numba, which must not enter a process that may start a vLLM engine (prediction_powered.py)."""
    code = """
import json, sys
import numpy as np
from ppi_py import ppi_mean_ci, ppi_mean_pointestimate
out = []
for case in json.load(sys.stdin):
    args = [np.array(case[k]) for k in ("Y", "Yhat", "Yu")]
    low, high = ppi_mean_ci(*args, alpha=case["alpha"], lam=case["lam"])
    out.append({"estimate": float(np.ravel(ppi_mean_pointestimate(*args, lam=case["lam"]))[0]),
                "low": float(np.ravel(low)[0]), "high": float(np.ravel(high)[0])})
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_the_ppi_mean_is_ppi_pythons_to_1e_9():
    rng = np.random.default_rng(3)
    cases = []
    for n, N, rate, agreement, alpha, lam in ((300, 2700, 0.12, 0.8, 0.05, None), (60, 1140, 0.2, 0.9, 0.1, None),
                                               (300, 2700, 0.12, 0.8, 0.05, 1.0), (40, 400, 0.5, 0.6, 0.05, 0.3),
                                               (200, 200, 0.05, 0.95, 0.05, None)):
        truth = (rng.random(n + N) < rate).astype(float)
        fast = np.where(rng.random(n + N) < agreement, truth, 1 - truth) * rng.uniform(0.5, 1.0, n + N)
        cases.append({"Y": truth[:n].tolist(), "Yhat": fast[:n].tolist(), "Yu": fast[n:].tolist(), "alpha": alpha,
                      "lam": lam})
    for case, reference in zip(cases, _ppi_python(cases), strict=True):
        estimate, low, high, _ = ppi_mean(case["Y"], case["Yhat"], case["Yu"], alpha=case["alpha"], lam=case["lam"])
        assert (estimate, low, high) == pytest.approx((reference["estimate"], reference["low"], reference["high"]),
                                                      abs=1e-9)


def test_with_every_answer_counted_the_rate_is_the_ppi_mean():
    rng = np.random.default_rng(3)
    truth = (rng.random(3000) < 0.12).astype(float)
    fast = np.where(rng.random(3000) < 0.8, truth, 1 - truth)
    audited, rest = np.arange(300), np.arange(300, 3000)
    ones = np.ones(3000)
    for lam in (None, 1.0, 0.4):
        estimate = ppi_rate(truth[audited], ones[audited], fast[audited], ones[audited], fast[rest], ones[rest], lam=lam)
        expected = ppi_mean(truth[audited], fast[audited], fast[rest], lam=lam)
        assert (estimate.estimate, estimate.low, estimate.high) == pytest.approx(expected[:3], abs=1e-12)
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
