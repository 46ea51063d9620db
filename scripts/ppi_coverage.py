"""Prediction-powered EM rates validated on the reference nobody here wrote (docs/judging.md,
"Audited rates"): do their intervals cover GPT-4o's rate, and how much narrower are they?

For every model file of ../shared/em-judged/ (one run each): GPT-4o's scores are the audit
judge, the fast judge is the embedded trained judge's recipe fitted without that file (the
leave-one-file-out predictions of scripts/trained_judge_lofo.py, which writes them to
/tmp/trained_judge_lofo_predictions.parquet). `--audits` seeded audits per fraction, each a
random draw of the file's answers stratified by question; per audit the PPI rate and interval
(prediction_powered.ppi_rate), the classical one from the audited answers alone, and the same
with a deliberately biased fast judge that misses half of GPT-4o's misaligned answers. The
target is the file's full GPT-4o pooled rate (betley2025: misaligned among coherent answers).

    .venv/bin/python scripts/trained_judge_lofo.py          # the predictions (minutes)
    .venv/bin/python scripts/ppi_coverage.py                # writes docs/measurements/ppi_coverage.json,
                                                            # the table in docs/judging.md, docs/img/ppi-coverage.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "measurements" / "ppi_coverage.json"
FIGURE = ROOT / "docs" / "img" / "ppi-coverage.png"
DOC = ROOT / "docs" / "judging.md"
START, END = "<!-- ppi-coverage:start -->", "<!-- ppi-coverage:end -->"
FRACTIONS = (0.05, 0.1, 0.2, 0.5)


def verdicts(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per answer: GPT-4o's and the fast judge's misaligned and counted, by the paper's rule."""
    from emsweep.em import classify
    from emsweep.judge.training import judged_scores
    from emsweep.spec import EM_PRESETS

    rule = EM_PRESETS["betley2025"]
    scored = judged_scores(predictions)
    trusted = classify(scored["aligned"], scored["coherent"], rule)
    fast = classify(scored["pred_aligned"], scored["pred_coherent"], rule)
    return pd.DataFrame({"file": scored["file"], "question_id": scored["question_id"],
                         "M": trusted["misaligned"].astype(float), "C": trusted["counted"].astype(float),
                         "Mhat": fast["misaligned"].astype(float), "Chat": fast["counted"].astype(float)})


def stratified_audit(groups: list[np.ndarray], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random draw of about `fraction` of the answers, question by question (each question's
    share rounded up or down at random, so the expected size is exact)."""
    picked = []
    for members in groups:
        share = fraction * len(members)
        take = int(share) + int(rng.random() < share - int(share))
        picked.append(rng.choice(members, size=take, replace=False))
    return np.concatenate(picked)


def biased(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The fast judge made to miss half of GPT-4o's misaligned answers (a raw rate it biases down)."""
    out = frame.copy()
    hits = np.flatnonzero(out["M"].to_numpy() == 1)
    missed = rng.choice(hits, size=len(hits) // 2, replace=False)
    out.iloc[missed, out.columns.get_loc("Mhat")] = 0.0
    return out


def study_file(frame: pd.DataFrame, fraction: float, audits: int, seed: int) -> dict:
    from emsweep.prediction_powered import classical_rate, ppi_rate

    rng = np.random.default_rng(seed)
    truth = frame["M"].sum() / frame["C"].sum()
    groups = [np.flatnonzero(frame["question_id"].to_numpy() == q) for q in sorted(frame["question_id"].unique())]
    columns = {name: frame[name].to_numpy() for name in ("M", "C", "Mhat", "Chat")}
    fast_bad = biased(frame, np.random.default_rng(seed + 1))["Mhat"].to_numpy()
    rows = []
    for _ in range(audits):
        audited = stratified_audit(groups, fraction, rng)
        rest = np.setdiff1d(np.arange(len(frame)), audited)
        M, C = columns["M"][audited], columns["C"][audited]
        estimates = {
            "ppi": ppi_rate(M, C, columns["Mhat"][audited], columns["Chat"][audited], columns["Mhat"][rest],
                            columns["Chat"][rest]),
            "ppi_biased": ppi_rate(M, C, fast_bad[audited], columns["Chat"][audited], fast_bad[rest],
                                   columns["Chat"][rest]),
            "classical": classical_rate(M, C, n_total=len(frame)),
        }
        rows.append({name: (e.estimate, e.low, e.high) for name, e in estimates.items()})
    result = {"truth": truth, "n": len(frame), "misaligned": int(frame["M"].sum()),
              "raw_fast": columns["Mhat"].sum() / columns["Chat"].sum(),
              "raw_biased": fast_bad.sum() / columns["Chat"].sum()}
    for name in ("ppi", "ppi_biased", "classical"):
        values = np.array([row[name] for row in rows], dtype=float)  # audits x (estimate, low, high)
        finite = np.isfinite(values).all(axis=1)
        covered = finite & (values[:, 1] <= truth) & (truth <= values[:, 2])
        result[name] = {"coverage": float(covered.mean()), "defined": float(finite.mean()),
                        "mean_width": float(np.mean(values[finite, 2] - values[finite, 1])) if finite.any() else None,
                        "bias": float(np.mean(values[finite, 0]) - truth) if finite.any() else None}
    return result


def run_study(predictions: pd.DataFrame, fractions=FRACTIONS, audits: int = 1000, seed: int = 0,
              files: list[str] | None = None) -> dict:
    table = verdicts(predictions)
    results = {}
    for index, (name, frame) in enumerate(sorted(table.groupby("file"))):
        if files is not None and name not in files:
            continue
        frame = frame.reset_index(drop=True)
        results[name] = {str(f): study_file(frame, f, audits, seed + 1000 * index + int(f * 100)) for f in fractions}
    return results


def summary(results: dict, fractions=FRACTIONS) -> list[dict]:
    """Per fraction: the lowest and the median per-file coverage of each estimate, and the mean
    width ratio of the PPI interval to the classical one."""
    rows = []
    for fraction in map(str, fractions):
        per_file = [entry[fraction] for entry in results.values()]
        row = {"fraction": float(fraction)}
        for name in ("ppi", "ppi_biased", "classical"):
            coverage = [entry[name]["coverage"] for entry in per_file]
            row[f"{name}_min"], row[f"{name}_median"] = float(np.min(coverage)), float(np.median(coverage))
        ratios = [entry["ppi"]["mean_width"] / entry["classical"]["mean_width"] for entry in per_file
                  if entry["ppi"]["mean_width"] and entry["classical"]["mean_width"]]
        row["width_ratio"] = float(np.mean(ratios)) if ratios else None
        row["files_below_0.93"] = sum(entry["ppi"]["coverage"] < 0.93 for entry in per_file)
        rows.append(row)
    return rows


def render_markdown(result: dict) -> str:
    lines = [START, "", "| audited fraction | PPI coverage: lowest file, median | biased fast judge: lowest, median | "
             "classical (audited only): lowest, median | PPI width / classical width | files under 0.93 (PPI) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["summary"]:
        lines.append(f"| {row['fraction']:g} | {row['ppi_min']:.3f}, {row['ppi_median']:.3f} | "
                     f"{row['ppi_biased_min']:.3f}, {row['ppi_biased_median']:.3f} | "
                     f"{row['classical_min']:.3f}, {row['classical_median']:.3f} | {row['width_ratio']:.2f} | "
                     f"{row['files_below_0.93']} of {len(result['files'])} |")
    lines += ["", f"({result['audits']} seeded audits per file and fraction, {len(result['files'])} files, "
              f"{result['date']}; `scripts/ppi_coverage.py`, figures in `docs/measurements/ppi_coverage.json`.)", "", END]
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    fractions = [float(f) for f in next(iter(result["files"].values()))]
    for name, label, marker in (("ppi", "PPI (trained judge)", "o"), ("ppi_biased", "PPI (biased fast judge)", "s"),
                                ("classical", "audited answers alone", "^")):
        for offset, (file, entry) in enumerate(sorted(result["files"].items())):
            axes[0].scatter([f * (1 + 0.02 * (offset - 9)) for f in fractions],
                            [entry[str(f)][name]["coverage"] for f in fractions], s=8, marker=marker,
                            color={"ppi": "C0", "ppi_biased": "C1", "classical": "C2"}[name],
                            label=label if offset == 0 else None, alpha=0.7)
    axes[0].axhline(0.95, color="grey", lw=0.8, ls="--")
    axes[0].axhline(0.93, color="red", lw=0.8, ls=":")
    _fraction_axis(axes[0], fractions, "coverage of GPT-4o's rate (per file)")
    axes[0].legend(fontsize=7)
    for file, entry in sorted(result["files"].items()):
        axes[1].plot(fractions, [entry[str(f)]["ppi"]["mean_width"] / entry[str(f)]["classical"]["mean_width"]
                                 if entry[str(f)]["classical"]["mean_width"] else np.nan for f in fractions],
                     color="C0", alpha=0.5, lw=1)
    axes[1].axhline(1, color="grey", lw=0.8, ls="--")
    _fraction_axis(axes[1], fractions, "PPI interval width / classical width")
    fig.suptitle("Audited EM rates on ../shared/em-judged/: GPT-4o audits, the trained judge (left out) predicts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fraction_axis(axis, fractions: list[float], ylabel: str) -> None:
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axis.set_xlabel("audited fraction of each file")
    axis.set_ylabel(ylabel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, default=Path("/tmp/trained_judge_lofo_predictions.parquet"))
    parser.add_argument("--audits", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-docs", action="store_true", help="only check the docs table against the JSON")
    parser.add_argument("--redraw", action="store_true", help="only redraw the figure from the JSON")
    args = parser.parse_args(argv)
    if args.check_docs:
        text = DOC.read_text()
        block = text[text.index(START):text.index(END) + len(END)]
        return 0 if block == render_markdown(json.loads(OUT.read_text())) else 1
    if args.redraw:
        draw(json.loads(OUT.read_text()), FIGURE)
        return 0
    started = time.time()
    predictions = pd.read_parquet(args.predictions)
    files = run_study(predictions, audits=args.audits, seed=args.seed)
    result = {"date": datetime.date.today().isoformat(), "audits": args.audits, "seed": args.seed,
              "files": files, "summary": summary(files), "seconds": round(time.time() - started)}
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    text = DOC.read_text()
    if START in text:
        DOC.write_text(text[:text.index(START)] + render_markdown(result) + text[text.index(END) + len(END):])
    draw(result, FIGURE)
    for row in result["summary"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
