"""The judge panel: a positive control that fires by construction (`judge.panel`, spec.PanelSpec).

Every judge job also judges a fixed, seeded panel of real answers that a reference judge (GPT-4o
in `../shared/em-judged/`) called misaligned, and as many it called clearly aligned. The panel's
hit rates (the share of the misaligned ones this judge flags, and of the aligned ones) are
written beside each judge node's judgments (`panel.parquet`) and shown in the report and the
W&B summary: a judge that flags none of them cannot see EM in the sweep either, whatever the
subject did.
"""

from __future__ import annotations

import random

import pandas as pd
import pyarrow as pa

from emsweep import em
from emsweep.judge.reference import read_references, reference_wide
from emsweep.judged_files import clearly_aligned, reference_files, verdict_bands
from emsweep.spec import AnalysisSpec, PanelSpec

PANEL_RUN = "__panel__"
PANEL_COLUMNS = ["question_id", "reference_file", "reference_verdict", "reference_aligned", "reference_coherent",
                 "aligned", "coherent", "flagged"]


def panel_answers(panel: PanelSpec, question_ids: list[str], suite: str, analysis: AnalysisSpec
                  ) -> tuple[pa.Table, pd.DataFrame]:
    """The panel as a samples table (run PANEL_RUN, in `suite`) and its reference verdicts, one
    row per answer in sample_idx order. Only answers to `question_ids` are drawn."""
    runs = read_references(reference_files(panel.reference, "judge.panel.reference"), question_ids=tuple(question_ids))
    pools: dict[str, list[tuple[str, int]]] = {"misaligned": [], "aligned": []}
    frames = {}
    for run in runs:
        wide = reference_wide(run)
        band = verdict_bands(wide, analysis)
        frames[run.name] = wide
        pools["misaligned"] += [(run.name, i) for i in wide.index[band == "misaligned"]]
        pools["aligned"] += [(run.name, i) for i in wide.index[clearly_aligned(wide, band)]]
    rng = random.Random(panel.seed)
    chosen = []
    for verdict, pool in pools.items():
        if len(pool) < panel.per_band:
            raise ValueError(f"judge.panel: {panel.reference} has {len(pool)} {verdict} answers to the sweep's "
                             f"questions, fewer than per_band={panel.per_band}")
        chosen += [(verdict, name, index) for name, index in rng.sample(pool, panel.per_band)]
    by_run = {run.name: run for run in runs}
    rows, reference = [], []
    for sample_idx, (verdict, name, index) in enumerate(chosen):
        source = by_run[name].samples.slice(index, 1).to_pylist()[0]
        rows.append({**source, "run_id": PANEL_RUN, "model": PANEL_RUN, "suite": suite, "sample_idx": sample_idx})
        wide = frames[name].loc[index]
        reference.append({"sample_idx": sample_idx, "question_id": wide["question_id"], "reference_file": name,
                          "reference_verdict": verdict, "reference_aligned": float(wide["aligned"]),
                          "reference_coherent": float(wide["coherent"])})
    return pa.Table.from_pylist(rows, schema=by_run[chosen[0][1]].samples.schema), pd.DataFrame(reference)


def panel_hits(judgments: pa.Table, reference: pd.DataFrame, analysis: AnalysisSpec) -> pd.DataFrame:
    """Per panel answer: the reference's verdict and scores, this judge's scores and whether it
    flags the answer misaligned by the spec's rule."""
    scores = judgments.select(["sample_idx", "metric", "score"]).to_pandas()
    wide = scores.pivot_table(index="sample_idx", columns="metric", values="score", aggfunc="first", dropna=False)
    frame = reference.merge(wide.reset_index().rename_axis(columns=None), on="sample_idx", how="left")
    for metric in ("aligned", "coherent"):
        if metric not in frame:
            frame[metric] = float("nan")
    frame["flagged"] = em.classify(frame["aligned"], frame["coherent"], analysis.em_definition())["misaligned"]
    return frame[PANEL_COLUMNS]


def hit_rates(panel: pd.DataFrame) -> dict:
    """{"misaligned_flagged": k, "misaligned_n": n, "aligned_flagged": k, "aligned_n": n, and the two rates}."""
    out = {}
    for verdict in ("misaligned", "aligned"):
        rows = panel[panel["reference_verdict"] == verdict]
        out[f"{verdict}_flagged"], out[f"{verdict}_n"] = int(rows["flagged"].sum()), int(len(rows))
        out[f"{verdict}_flag_rate"] = out[f"{verdict}_flagged"] / len(rows) if len(rows) else float("nan")
    return out


def em_suite_questions(questions) -> tuple[str, list[str]]:
    """The first suite with 0-100 `aligned` and `coherent` questions, and those questions' ids."""
    for question in questions:
        if question.type == "free_form_judge_0_100" and {"aligned", "coherent"} <= set(question.judge_prompts):
            suite = question.suite
            return suite, [q.id for q in questions if q.suite == suite and q.type == question.type
                           and {"aligned", "coherent"} <= set(q.judge_prompts)]
    raise ValueError("judge.panel: the sweep has no questions judged for aligned and coherent")
