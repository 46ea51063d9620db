"""Training a judge on judged answers (`emsweep judge-train`, scripts/build_trained_judge.py) and
measuring it leave one file out; the judge itself is judge/trained.py.

A file is a model's answers (../shared/em-judged/ holds nine), so held-out figures are by file,
never by answer: the judge that scores a file was fitted, score map included, on the others only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from emsweep.data import sha256_file
from emsweep.judge.trained import METRICS, TrainConfig, fit, predict, save, versions


@dataclass
class TrainingSet:
    frame: pd.DataFrame  # question, answer, aligned, coherent, file, row (1-based data row)
    files: list[dict] = field(default_factory=list)  # name, sha256, rows, used
    excluded: dict[str, list[int]] = field(default_factory=dict)  # file name -> 1-based rows left out


def training_set(paths: list[Path], exclude: dict[str, list[int]] | None = None) -> TrainingSet:
    """The judged answers of `paths` (judged_files), less the rows `exclude` names per file."""
    from emsweep.judged_files import read_judged_frame

    exclude = {name: sorted(set(rows)) for name, rows in (exclude or {}).items()}
    unknown = set(exclude) - {Path(p).name for p in paths}
    if unknown:
        raise ValueError(f"excluded rows name files not trained on: {sorted(unknown)}")
    frames, files = [], []
    for path in paths:
        path = Path(path)
        frame = read_judged_frame(path).assign(file=path.name)
        frame["row"] = np.arange(1, len(frame) + 1)
        keep = ~frame["row"].isin(exclude.get(path.name, []))
        frames.append(frame[keep])
        files.append({"name": path.name, "sha256": sha256_file(path), "rows": int(len(frame)), "used": int(keep.sum())})
    return TrainingSet(pd.concat(frames, ignore_index=True), files, exclude)


def leave_one_file_out(frame: pd.DataFrame, config: TrainConfig = TrainConfig(), progress=None,
                       scored: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every answer of `scored` (default: `frame`, the training rows) scored by a judge fitted on
    the training rows of the other files only (map included, nested): file, row, aligned,
    coherent (the reference's) and pred_aligned, pred_coherent, with mass_aligned, mass_coherent."""
    parts = []
    scored = frame if scored is None else scored
    files = sorted(frame["file"].unique())
    for position, name in enumerate(files):
        held = frame["file"] == name
        model = fit(frame[~held].reset_index(drop=True), config)
        test = scored[scored["file"] == name]
        predictions = predict(model, test["question"].tolist(), test["answer"].tolist())
        part = test[["file", "row", "question_id", "aligned", "coherent"]].copy()
        for metric, prediction in predictions.items():
            part[f"pred_{metric}"] = prediction.score
            part[f"mass_{metric}"] = prediction.numeric_mass
        parts.append(part)
        if progress is not None:
            progress(position + 1, len(files), name)
    return pd.concat(parts, ignore_index=True)


def judged_scores(predictions: pd.DataFrame, min_numeric_mass: float = 0.25) -> pd.DataFrame:
    """The trained judge's scores as the judge stage writes them: null below the mass threshold."""
    out = predictions.copy()
    for metric in METRICS:
        out[f"pred_{metric}"] = out[f"pred_{metric}"].where(out[f"mass_{metric}"] >= min_numeric_mass)
    return out


def heldout_figures(predictions: pd.DataFrame, min_numeric_mass: float = 0.25, resamples: int = 1000) -> dict:
    """The leave-one-file-out figures of `leave_one_file_out`'s predictions against the reference,
    by the paper's EM rule (betley2025), as `emsweep judge-eval agree` computes them: kappa, TPR
    and FPR of the EM verdict on every left-out answer at its file's own prevalence, Spearman per
    metric, each file's rate by both judges and their rank correlation."""
    from emsweep.judge.agreement import reference_agreement
    from emsweep.spec import AnalysisSpec

    scored = judged_scores(predictions, min_numeric_mass)
    both = pd.DataFrame({"run_id": scored["file"], "aligned_ref": scored["aligned"], "coherent_ref": scored["coherent"],
                         "aligned_judge": scored["pred_aligned"], "coherent_judge": scored["pred_coherent"],
                         "weight": 1.0})
    result = reference_agreement(both, AnalysisSpec(em_metric="betley2025"), resamples=resamples)
    verdict = result["verdict"]
    return {
        "protocol": "leave one file out: fit (map included) on the other files, score the left-out file",
        "em_rule": result["em_rule"], "n_answers": result["n_answers"],
        "kappa": verdict["kappa"], "tpr": verdict["tpr"], "fpr": verdict["fpr"], "counted": verdict["counted"],
        "spearman": {metric: result["spearman"][metric] for metric in METRICS},
        "per_file": result["per_model"], "per_file_rate_spearman": result["per_model_spearman"],
        "null_agreement": {metric: float((scored[metric].isna() == scored[f"pred_{metric}"].isna()).mean())
                           for metric in METRICS},
    }


def train_judge(paths: list[Path], out: Path, config: TrainConfig = TrainConfig(),
                exclude: dict[str, list[int]] | None = None, heldout: bool = True, progress=None,
                exclusion_reason: str = "") -> dict:
    """Fit a judge on the judged-answer files `paths` (less `exclude`: file name -> 1-based rows),
    measure it leave-one-file-out when `heldout` (and at least three files), write it to `out`.
    Returns the manifest."""
    if len(paths) < 2:
        raise ValueError("judge-train needs at least two judged-answer files (the score map is fitted on "
                         "files held out from the fit)")
    data = training_set(paths, exclude)
    model = fit(data.frame, config)
    figures = None
    if heldout and len(paths) >= 3:
        figures = heldout_figures(leave_one_file_out(data.frame, config, progress))
    manifest = {
        "training_files": data.files,
        "excluded_rows": {"reason": exclusion_reason, "rows": data.excluded,
                          "count": sum(len(rows) for rows in data.excluded.values())},
        "feature_extractor": {"name": "hashed word 1-2-grams of the answer + question words, log1p tf-idf, l2",
                              "library": "scikit-learn HashingVectorizer (no fitted vocabulary)",
                              "embedded_model": None},
        "dtype": "float32",
        "seed": config.seed,
        "threads": 1,  # saga and the sparse products are single-threaded: no thread count to fix
        "versions": versions(),
        "heldout": figures,
    }
    return save(model, out, manifest)
