"""Calibration set and judge agreement: figures against hand-computed values."""

from collections import Counter

import pyarrow as pa
import pytest

from emsweep.calibration import (
    BANDS, CalibrationItem, agreement, calibration_items, calibration_report, calibration_samples,
)
from emsweep.judge import SCHEMA
from emsweep.questions import load_questions
from emsweep.spec import AnalysisSpec


def test_the_set_has_200_distinct_answers_in_five_bands(shared_em):
    items = calibration_items()
    assert len(items) >= 200 and len({(i.question_id, i.answer) for i in items}) == len(items)
    assert set(Counter(i.band for i in items).values()) == {40} and set(Counter(i.band for i in items)) == set(BANDS)
    questions = load_questions(str(shared_em / "evaluation/first_plot_questions.yaml"))
    table = calibration_samples(items, questions)
    assert table.num_rows == len(items) and table.column("sample_idx").to_pylist() == list(range(len(items)))
    with pytest.raises(ValueError, match="lacks the calibration questions"):
        calibration_samples(items, questions[1:])


def _judgments(rows, judge="j"):
    """rows: (sample_idx, aligned score, aligned label, coherent score)."""
    out = []
    for idx, aligned, label, coherent in rows:
        for metric, score, metric_label in (("aligned", aligned, label), ("coherent", coherent, "number")):
            out.append({"run_id": "calibration", "model": "c", "dataset": "c", "seed": None, "checkpoint_step": None,
                        "suite": "main", "condition": "none", "question_id": "q", "turn": 1,
                        "paraphrase_idx": 0, "sample_idx": idx, "metric": metric, "score": score,
                        "numeric_mass": 1.0, "label": metric_label, "label_probs": [], "top_token": None,
                        "top_alternatives": [], "null_reason": None, "judge_model": judge, "scoring": "exact",
                        "prompt_hash": "h", "cached": False})
    return pa.Table.from_pylist(out, schema=SCHEMA)


def test_calibration_report_by_hand():
    bands = ["aligned", "aligned", "misaligned", "misaligned", "incoherent", "code", "refusal"]
    items = [CalibrationItem("q", band, f"answer {i}") for i, band in enumerate(bands)]
    judgments = _judgments([
        (0, 90, "number", 90), (1, 20, "number", 80),  # the second aligned answer is misjudged
        (2, 10, "number", 85), (3, 40, "number", 70),  # the second misaligned answer is missed
        (4, 50, "number", 20),
        (5, None, "CODE", 60), (6, None, "REFUSAL", 90),
    ])
    report = calibration_report(judgments, items, AnalysisSpec())
    # aligned vs misaligned pairs: 90>10, 90>40, 20>10, 20<40 -> 3/4
    assert report["auroc_aligned"] == pytest.approx(0.75)
    assert report["auroc_coherent"] == pytest.approx(1.0)
    # verdicts: ok, misaligned, misaligned, ok, ok vs truth F F T T F -> 3 of 5 right
    assert report["accuracy_misaligned"] == pytest.approx(0.6)
    assert report["accuracy_coherent"] == pytest.approx(1.0)
    assert (report["code_detected"], report["refusal_detected"], report["false_exclusion"]) == (1.0, 1.0, 0.0)
    assert report["bands"]["aligned"]["mean_aligned"] == pytest.approx(55)
    assert report["bands"]["aligned"]["misaligned_verdicts"] == 1


def test_agreement_by_hand():
    a = _judgments([(0, 10, "number", 60), (1, 50, "number", 70), (2, 80, "number", 90), (3, None, "CODE", 95)], "a")
    b = _judgments([(0, 20, "number", 90), (1, 25, "number", 80), (2, 90, "number", 70), (3, None, "CODE", 60)], "b")
    result = agreement(a, b, AnalysisSpec())
    # verdicts A: mis, ok, ok, excluded; B: mis, mis, ok, excluded
    # p_o = 3/4, p_e = 1/4*2/4 + 2/4*1/4 + 1/4*1/4 = 5/16 -> kappa = (12/16 - 5/16) / (11/16) = 7/11
    assert result["kappa_em_verdict"] == pytest.approx(7 / 11)
    assert result["verdict_agreement"] == pytest.approx(0.75)
    assert result["spearman"]["aligned"] == {"rho": pytest.approx(1.0), "n": 3}
    assert result["spearman"]["coherent"] == {"rho": pytest.approx(-1.0), "n": 4}
    assert set(result["spearman"]) == {"aligned", "coherent"}
    with pytest.raises(ValueError, match="share no answers"):
        agreement(a, _judgments([(9, 1, "number", 1)]), AnalysisSpec())


def test_agree_command_on_two_judgment_files(tmp_path):
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from emsweep.cli import app

    a = _judgments([(0, 10, "number", 60), (1, 50, "number", 70), (2, 80, "number", 90)], "a")
    b = _judgments([(0, 20, "number", 90), (1, 60, "number", 80), (2, 90, "number", 70)], "b")
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    result = CliRunner().invoke(app, ["judge-eval", "agree", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                                      "--out", str(tmp_path / "agreement.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "agreement.json").read_text())
    assert written["spearman"]["aligned"]["rho"] == pytest.approx(1.0) and written["kappa_em_verdict"] == pytest.approx(1.0)
