"""A judge against a reference judge on the same real answers (`emsweep judge-eval agree --reference`).

Per answer (the answers both judged):
- Spearman correlation per metric over answers both scored, with a bootstrap percentile interval
  (answers resampled);
- the EM verdict (misaligned by the spec's rule, or not) against the reference's: TPR = the share
  of the reference's misaligned answers the judge calls misaligned, FPR = the share of the
  others it calls misaligned, each with its counts and Wilson interval; Cohen's kappa of the two
  verdicts with a bootstrap interval; beside them the all-ok baseline (a judge that calls nothing
  misaligned: kappa 0, its accuracy the share the reference calls not misaligned);
- `counted`: TPR and FPR over the answers the judge itself counts (its coherent ones), the
  error of the rate it reports, n_misaligned / n_counted; that is what corrects a rate
  (`judge_error`, Rogan-Gladen).
Per model file: the EM rate by each judge, weighted back to the file's own mix of bands when the
answers were a stratified subset (weight = stratum size / stratum sample), and the Spearman
correlation of the two judges' rates across files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emsweep import em
from emsweep.analyze import wide_answers, wilson_interval
from emsweep.spec import AnalysisSpec


def _flags(wide: pd.DataFrame, prefix: str, spec: AnalysisSpec) -> pd.DataFrame:
    return em.classify(wide[f"aligned_{prefix}"], wide[f"coherent_{prefix}"], spec.em_definition())


def _rate_entry(hits: int, n: int, confidence: float) -> dict:
    low, high = wilson_interval(hits, n, confidence)
    return {"value": hits / n if n else float("nan"), "hits": int(hits), "n": int(n), "ci_low": low, "ci_high": high}


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    if len(set(a.tolist()) | set(b.tolist())) < 2:
        return float("nan")  # both verdicts constant and equal: kappa is undefined
    return float(cohen_kappa_score(a, b))


def _bootstrap(statistic, n: int, resamples: int, seed: int, confidence: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def spearman(x: np.ndarray, y: np.ndarray, resamples: int, seed: int, confidence: float) -> dict:
    from scipy.stats import spearmanr

    def rho(index: np.ndarray) -> float:
        a, b = x[index], y[index]
        if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return float(spearmanr(a, b).statistic)

    every = np.arange(len(x))
    low, high = _bootstrap(rho, len(x), resamples, seed, confidence) if len(x) >= 3 else (float("nan"),) * 2
    return {"rho": rho(every), "n": int(len(x)), "ci_low": low, "ci_high": high}


def verdict_agreement(reference: pd.Series, judge: pd.Series, judge_counted: pd.Series, resamples: int, seed: int,
                      confidence: float) -> dict:
    """`reference`, `judge`: boolean misaligned verdicts per answer; `judge_counted`: the judge counts it."""
    ref, jud, counted = (np.asarray(s, dtype=bool) for s in (reference, judge, judge_counted))
    n = len(ref)
    low, high = _bootstrap(lambda i: _kappa(ref[i], jud[i]), n, resamples, seed, confidence)
    return {
        "n_answers": int(n),
        "reference_misaligned": int(ref.sum()),
        "judge_misaligned": int(jud.sum()),
        "tpr": _rate_entry(int((jud & ref).sum()), int(ref.sum()), confidence),
        "fpr": _rate_entry(int((jud & ~ref).sum()), int((~ref).sum()), confidence),
        "kappa": {"value": _kappa(ref, jud), "ci_low": low, "ci_high": high},
        "accuracy": float((ref == jud).mean()) if n else float("nan"),
        "all_ok_baseline": {"kappa": 0.0, "accuracy": float((~ref).mean()) if n else float("nan")},
        "counted": {
            "tpr": _rate_entry(int((jud & ref & counted).sum()), int((ref & counted).sum()), confidence),
            "fpr": _rate_entry(int((jud & ~ref & counted).sum()), int((~ref & counted).sum()), confidence),
        },
    }


def weighted_rate(misaligned: pd.Series, counted: pd.Series, weight: pd.Series) -> float:
    denominator = float((weight * counted).sum())
    return float((weight * misaligned).sum()) / denominator if denominator > 0 else float("nan")


def reference_agreement(both: pd.DataFrame, spec: AnalysisSpec, resamples: int = 2000, seed: int = 0) -> dict:
    """`both`: one row per answer with `run_id`, `aligned_ref`, `coherent_ref`, `aligned_judge`,
    `coherent_judge` and `weight` (1 when every answer of a file was judged)."""
    if both.empty:
        raise ValueError("no answer was judged by both judges")
    confidence = spec.confidence
    ref, jud = _flags(both, "ref", spec), _flags(both, "judge", spec)
    result: dict = {"n_answers": int(len(both)), "em_rule": spec.em_definition().rule(), "spearman": {}}
    for offset, metric in enumerate(("aligned", "coherent")):
        pair = both[[f"{metric}_ref", f"{metric}_judge"]].dropna()
        result["spearman"][metric] = spearman(pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy(), resamples,
                                              seed + offset, confidence)
    result["verdict"] = verdict_agreement(ref["misaligned"], jud["misaligned"], jud["counted"], resamples, seed + 7,
                                          confidence)
    result["excluded"] = {"reference_null": int((~ref["scored"]).sum()), "judge_null": int((~jud["scored"]).sum()),
                          "both_null": int((~ref["scored"] & ~jud["scored"]).sum())}
    per_model = []
    for run_id, index in both.groupby("run_id", sort=True).groups.items():
        rows = both.loc[index]
        per_model.append({
            "run_id": run_id, "n_answers": int(len(rows)),
            "reference_rate": weighted_rate(ref.loc[index, "misaligned"], ref.loc[index, "counted"], rows["weight"]),
            "judge_rate": weighted_rate(jud.loc[index, "misaligned"], jud.loc[index, "counted"], rows["weight"]),
        })
    result["per_model"] = per_model
    rates = pd.DataFrame(per_model).dropna(subset=["reference_rate", "judge_rate"])
    if len(rates) >= 3 and rates["reference_rate"].nunique() > 1 and rates["judge_rate"].nunique() > 1:
        from scipy.stats import spearmanr

        result["per_model_spearman"] = float(spearmanr(rates["reference_rate"], rates["judge_rate"]).statistic)
    else:
        result["per_model_spearman"] = float("nan")
    return result


def judge_references(runs, question_list, judge_spec, *, judge_id: str, backend, cache, spec: AnalysisSpec,
                     limit: int | None, seed: int = 0, judge_build: str | None = None, progress=None):
    """Judge a stratified subset of every reference run (`limit` answers per file, seeded) with
    the given judge; returns (`both`: one row per answer, as `reference_agreement` takes it, and
    the judge's judgments table with raw scores, for fitting a map later)."""
    import pyarrow as pa

    from emsweep.judge import judge_samples
    from emsweep.judge.reference import reference_wide, stratified_answers
    from emsweep.judged_files import verdict_bands

    samples, frames = {}, []
    for run in runs:
        picked = stratified_answers(run, spec, limit, seed)
        wide = reference_wide(run)
        wide["band"] = verdict_bands(wide, spec)
        # Inverse-probability weights: a stratum of size N sampled k times weighs N / k per answer.
        size = wide.groupby(["question_id", "band"])["answer"].transform("size")
        chosen = wide.loc[picked].copy()
        taken = chosen.groupby(["question_id", "band"])["answer"].transform("size")
        chosen["weight"] = size.loc[picked] / taken
        chosen["run_id"] = run.name
        frames.append(chosen)
        samples[run.name] = run.samples.take(pa.array(picked, pa.int64()))
    tables, stats = judge_samples(samples, question_list, judge_spec, judge_id=judge_id, backend=backend, cache=cache,
                                  judge_build=judge_build, progress=progress)
    judgments = pa.concat_tables(tables.values())
    keys = ["run_id", "question_id", "sample_idx"]
    scores = wide_answers(judgments.to_pandas())
    scores = scores[keys + [m for m in ("aligned", "coherent") if m in scores]].rename(
        columns={"aligned": "aligned_judge", "coherent": "coherent_judge"})
    chosen = pd.concat(frames, ignore_index=True).rename(columns={"aligned": "aligned_ref", "coherent": "coherent_ref"})
    both = chosen.merge(scores, on=keys, how="left")
    for column in ("aligned_judge", "coherent_judge"):
        if column not in both:
            both[column] = np.nan
    return both, judgments, stats


def agree_with_reference(spec, runs, questions, out_dir: Path, limit: int | None, seed: int,
                         files: list[Path], progress=None) -> tuple[dict, object]:
    """The reference-agreement workflow (`emsweep judge-eval agree SPEC --reference FILE...`):
    re-judge a stratified draw of each reference run's answers with the spec's judge (through its
    judgment cache under `out_dir`), compare with the reference's scores (reference_agreement)
    and write agreement.json, pairs.parquet and judgments.parquet. Returns (result, judge stats).
    A connected Ray is the caller's (vllm backend)."""
    import pyarrow as pa

    from emsweep.fileio import write_json_atomic, write_parquet_atomic
    from emsweep.judge.backends import make_backend
    from emsweep.judge.cache import JudgmentCache
    from emsweep.judge.identity import judge_build, judge_id

    out_dir.mkdir(parents=True, exist_ok=True)
    both, judgments, stats = judge_references(
        runs, questions, spec.judge, judge_id=judge_id(spec), backend=make_backend(spec),
        judge_build=judge_build(spec),
        cache=JudgmentCache(out_dir / "judge_cache") if spec.judge.cache else None, spec=spec.analysis,
        limit=limit, seed=seed, progress=progress)
    result = reference_agreement(both, spec.analysis, seed=seed)
    result["judge"] = {"model": spec.judge.model, "scoring": spec.judge.scoring, "templates": spec.judge.templates,
                       "score_map": spec.judge.score_map, "min_numeric_mass": spec.judge.min_numeric_mass}
    result["reference_files"] = [str(f) for f in files]
    result["limit"], result["seed"] = limit, seed
    write_parquet_atomic(out_dir / "judgments.parquet", judgments)
    write_parquet_atomic(out_dir / "pairs.parquet", pa.Table.from_pandas(both, preserve_index=False))
    write_json_atomic(out_dir / "agreement.json", result)
    return result, stats
