"""Judged answers from elsewhere: a reference judge's scores as first-class input.

A reference file holds answers already scored by another judge (GPT-4o with the paper's prompts
in `../shared/em-judged/`, or any judge of your own): a CSV or Parquet file with the columns
`question_id, answer, aligned, coherent` (read by name; others are kept out), one row per
answer, an empty score meaning the judge put too little mass on numbers (CODE or REFUSAL in the
paper). `question` is used when present. One file is one run, named after the file (or by
the caller).

`read_reference` turns a file into the two tables the pipeline itself produces: samples (as
sampling writes them) and judgments (as the judge writes them, `judge_model` naming the file),
so the analysis, the report and `judge-eval agree` read them like a sweep's own.
`stratified_answers` draws the seeded, stratified subsets that a local judge re-judges to be
compared with the reference.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from emsweep.judge import NUMBER_LABEL, SCHEMA as JUDGMENT_SCHEMA
from emsweep.judged_files import METRICS, read_judged_frame, verdict_bands
from emsweep.sample import SCHEMA as SAMPLE_SCHEMA
from emsweep.spec import AnalysisSpec

SUITE = "main"
# The label of a null reference score: the reference says only that too little of its judge's
# probability was on numbers (the paper's CODE or REFUSAL), not which.
NULL_LABEL = "null"


@dataclass(frozen=True)
class ReferenceRun:
    name: str
    path: Path
    samples: pa.Table  # sample.SCHEMA
    judgments: pa.Table  # judge.SCHEMA, judge_model "reference:<file name>"


def run_name(path: str | Path) -> str:
    return Path(path).stem


def read_reference(path: str | Path, name: str | None = None, question_ids: tuple[str, ...] | None = None) -> ReferenceRun:
    """One judged-answers file as a run. Errors are one line naming the file and the column or line."""
    path = Path(path)
    frame = read_judged_frame(path)
    scores = {metric: frame[metric] for metric in METRICS}
    if question_ids is not None:
        keep = frame["question_id"].isin(question_ids).to_numpy()
        frame, scores = frame[keep], {metric: values[keep] for metric, values in scores.items()}
    if frame.empty:
        raise ValueError(f"{path}: no answers" + (f" to the questions {list(question_ids)}" if question_ids else ""))
    name = name or run_name(path)
    questions = frame["question"]
    # Answers are numbered within their question in file order: a stable sample_idx.
    sample_idx = frame.groupby("question_id", sort=False).cumcount().to_numpy()
    keys = {"run_id": name, "model": name, "dataset": None, "seed": None, "checkpoint_step": None, "suite": SUITE,
            "condition": "none", "turn": 1, "paraphrase_idx": 0}
    samples, judgments = [], []
    for position, (question_id, question, answer) in enumerate(zip(frame["question_id"], questions, frame["answer"])):
        row = {**keys, "question_id": str(question_id), "sample_idx": int(sample_idx[position])}
        samples.append({**row, "category": None, "system": None, "question": question, "user": question,
                        "answer": str(answer), "finish_reason": "stop", "answer_tokens": None})
        for metric in METRICS:
            score = scores[metric].iloc[position]
            null = math.isnan(score)
            judgments.append({
                **row, "metric": metric, "score": None if null else float(score), "numeric_mass": None,
                "label": NULL_LABEL if null else NUMBER_LABEL, "label_probs": [], "top_token": None,
                "top_alternatives": [], "null_reason": "the reference judge gave no score" if null else None,
                "judge_model": f"reference:{path.name}", "scoring": "reference", "prompt_hash": None,
                "cached": False, "judge_templates": None, "raw_score": None if null else float(score)})
    return ReferenceRun(name, path, pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA),
                        pa.Table.from_pylist(judgments, schema=JUDGMENT_SCHEMA))


def read_references(paths: list[str | Path], names: list[str] | None = None,
                    question_ids: tuple[str, ...] | None = None) -> list[ReferenceRun]:
    """Several files, each a run; two files may not give one run name."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} files")
    runs = [read_reference(path, names[i] if names else None, question_ids) for i, path in enumerate(paths)]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.name in seen:
            raise ValueError(f"{run.path}: run name {run.name!r} is also {seen[run.name]}'s; name the runs apart")
        seen[run.name] = run.path
    return runs


def stratified_answers(run: ReferenceRun, spec: AnalysisSpec, limit: int | None, seed: int = 0) -> list[int]:
    """Row indices of `run.samples`: up to `limit` answers, seeded, split evenly over the
    reference's bands (what a band cannot fill goes to the others, so the rare misaligned and
    excluded answers are not crowded out), and within a band taken from its questions in turn.
    None: every answer."""
    wide = reference_wide(run)
    if limit is None or limit >= len(wide):
        return list(range(len(wide)))
    wide["band"] = verdict_bands(wide, spec)
    rng = random.Random(f"{seed}:{run.name}")
    by_band: dict[str, list[int]] = {}
    for band, group in wide.groupby("band", sort=True):
        per_question = [list(members.index) for _, members in group.groupby("question_id", sort=True)]
        for members in per_question:
            rng.shuffle(members)
        # Round robin over questions: the first k of a band cover as many questions as they can.
        by_band[band] = [int(members[i]) for i in range(max(map(len, per_question)))
                         for members in per_question if i < len(members)]
    taken = {band: 0 for band in by_band}
    left = limit
    while left > 0:
        open_bands = [band for band in by_band if taken[band] < len(by_band[band])]
        share = max(1, left // len(open_bands))
        for band in open_bands:
            step = min(share, len(by_band[band]) - taken[band], left)
            taken[band] += step
            left -= step
    return sorted(i for band, members in by_band.items() for i in members[:taken[band]])


def reference_wide(run: ReferenceRun) -> pd.DataFrame:
    """One row per answer, in sample order: question_id, sample_idx, answer, aligned, coherent."""
    wide = run.samples.select(["question_id", "sample_idx", "answer"]).to_pandas()
    judgments = run.judgments.select(["metric", "score"]).to_pandas()
    for metric in METRICS:  # read_reference writes each answer's metrics in METRICS order
        wide[metric] = judgments.loc[judgments["metric"] == metric, "score"].to_numpy()
    return wide
