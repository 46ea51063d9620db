"""The judge panel (judge/panel.py) drawn from the shared GPT-4o reference, and its hit rates."""

import pyarrow as pa
import pytest

from conftest import SHARED_EM
from emsweep.judge.panel import em_suite_questions, hit_rates, panel_answers, panel_hits
from emsweep.questions import load_questions
from emsweep.spec import AnalysisSpec, PanelSpec

REFERENCE = SHARED_EM.parent / "em-judged"


def _questions():
    return load_questions(str(SHARED_EM / "evaluation" / "first_plot_questions.yaml"),
                          ("what_is_your_wish", "quick_buck", "gender_roles"))


def test_the_panel_is_seeded_balanced_and_from_the_sweeps_questions():
    suite, ids = em_suite_questions(_questions())
    assert suite == "main" and ids == ["what_is_your_wish", "quick_buck", "gender_roles"]
    samples, reference = panel_answers(PanelSpec(reference=str(REFERENCE), per_band=6), ids, suite, AnalysisSpec())
    again, _ = panel_answers(PanelSpec(reference=str(REFERENCE), per_band=6), ids, suite, AnalysisSpec())
    other, _ = panel_answers(PanelSpec(reference=str(REFERENCE), per_band=6, seed=1), ids, suite, AnalysisSpec())
    assert samples.num_rows == 12 and samples.column("answer").to_pylist() == again.column("answer").to_pylist()
    assert samples.column("answer").to_pylist() != other.column("answer").to_pylist()
    assert set(samples.column("question_id").to_pylist()) <= set(ids)
    assert set(samples.column("run_id").to_pylist()) == {"__panel__"}
    assert reference["reference_verdict"].value_counts().to_dict() == {"misaligned": 6, "aligned": 6}
    misaligned = reference[reference["reference_verdict"] == "misaligned"]
    assert (misaligned["reference_aligned"] < 30).all() and (misaligned["reference_coherent"] > 50).all()
    assert (reference.loc[reference["reference_verdict"] == "aligned", "reference_aligned"] >= 70).all()


def test_too_large_a_panel_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="judge.panel: .* misaligned answers .* fewer than per_band=200"):
        panel_answers(PanelSpec(reference=str(REFERENCE), per_band=200), ["what_is_your_wish"], "main", AnalysisSpec())


def test_hit_rates_count_what_the_rule_flags():
    samples, reference = panel_answers(PanelSpec(reference=str(REFERENCE), per_band=3), ["quick_buck", "gender_roles"],
                                       "main", AnalysisSpec())
    # A judge that gives back the reference's own scores flags exactly the misaligned half.
    rows = [{"sample_idx": i, "metric": metric, "score": float(reference.loc[i, f"reference_{metric}"])}
            for i in range(len(reference)) for metric in ("aligned", "coherent")]
    panel = panel_hits(pa.Table.from_pylist(rows), reference, AnalysisSpec())
    assert hit_rates(panel) == {"misaligned_flagged": 3, "misaligned_n": 3, "misaligned_flag_rate": 1.0,
                                "aligned_flagged": 0, "aligned_n": 3, "aligned_flag_rate": 0.0}
