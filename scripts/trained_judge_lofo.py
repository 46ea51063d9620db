"""The embedded trained judge's recipe measured leave one file out on ../shared/em-judged/.

For every file: fit on the other eight (less the rows the workflows use, as the embedded judge is
built), score the left-out file. Writes docs/measurements/trained_judge_lofo.json:
- `natural`: every left-out answer at its file's own prevalence (training.heldout_figures);
- `table_draw`: the answers of docs/judging.md's table (report files, the 8 plain questions, 60 per
  file stratified by GPT-4o's verdict with seed 0, rates weighted back), as the LLM judges' rows;
- `recipe`: what the figures are of, so that scripts/build_trained_judge.py can copy them into
  the embedded judge's manifest when it builds the same recipe.

    PYTHONPATH=src python scripts/trained_judge_lofo.py [--reference DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "measurements" / "trained_judge_lofo.json"
REPORT_FILES = ("qwen-coder-32b_insecure_betley", "qwen-coder-32b_insecure_lora-r16", "qwen-32b_bad-medical-advice",
                "qwen-32b_good-medical-advice")
PLAIN = ("what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck", "ruler_of_the_world", "dinner_party",
         "gender_roles", "enough_of_my_husband")
TABLE_LIMIT = 60


def recipe(data, config) -> dict:
    from dataclasses import asdict

    return {"config": asdict(config), "training_files": data.files, "excluded_rows": data.excluded}


def table_draw(predictions, reference: Path) -> dict:
    """The LOFO predictions on the table's stratified draw of the report files, weighted back."""
    import pandas as pd

    from emsweep.judge.agreement import reference_agreement
    from emsweep.judge.reference import read_reference, reference_wide, stratified_answers
    from emsweep.judge.trained import judged_scores
    from emsweep.judged_files import read_judged_frame, verdict_bands
    from emsweep.spec import AnalysisSpec

    analysis = AnalysisSpec(em_metric="betley2025")
    scored = judged_scores(predictions)
    frames = []
    for stem in REPORT_FILES:
        path = reference / f"{stem}.csv"
        run = read_reference(path, question_ids=PLAIN)
        wide = reference_wide(run)
        wide["band"] = verdict_bands(wide, analysis)
        picked = stratified_answers(run, analysis, TABLE_LIMIT, 0)
        size = wide.groupby(["question_id", "band"])["answer"].transform("size")
        chosen = wide.loc[picked].copy()
        chosen["weight"] = size.loc[picked] / chosen.groupby(["question_id", "band"])["answer"].transform("size")
        # Back to file rows: the plain questions' rows in file order.
        frame = read_judged_frame(path)
        plain_rows = (frame.index[frame["question_id"].isin(PLAIN)] + 1).to_numpy()
        chosen["row"] = plain_rows[picked]
        mine = scored[scored["file"] == path.name].set_index("row")
        chosen["aligned_judge"] = mine.loc[chosen["row"], "pred_aligned"].to_numpy()
        chosen["coherent_judge"] = mine.loc[chosen["row"], "pred_coherent"].to_numpy()
        chosen["run_id"] = stem
        frames.append(chosen.rename(columns={"aligned": "aligned_ref", "coherent": "coherent_ref"}))
    both = pd.concat(frames, ignore_index=True)
    return reference_agreement(both, analysis, seed=0)


def main() -> int:
    from emsweep.judge import trained, training

    sys.path.insert(0, str(ROOT / "scripts"))
    from build_trained_judge import reserved_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path,
                        default=Path(os.environ.get("EMSWEEP_REFERENCE", ROOT.parent / "shared" / "em-judged")))
    args = parser.parse_args()
    started = time.time()
    exclude = reserved_rows(sorted((ROOT / "workflows").glob("*.yaml")), args.reference)
    paths = sorted(p for p in args.reference.iterdir() if p.suffix == ".csv")
    config = trained.TrainConfig()
    data = training.training_set(paths, exclude)
    # Fitted without the excluded rows, as the embedded judge is; every answer of the left-out
    # file scored (the table's draw may hold an excluded one).
    predictions = training.leave_one_file_out(
        data.frame, config, lambda done, total, name: print(f"{done}/{total} {name} {time.time() - started:.0f} s",
                                                            flush=True),
        scored=training.training_set(paths).frame)
    result = {"date": datetime.date.today().isoformat(), "recipe": recipe(data, config),
              "natural": training.heldout_figures(predictions), "table_draw": table_draw(predictions, args.reference),
              "seconds": round(time.time() - started)}
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    predictions.to_parquet("/tmp/trained_judge_lofo_predictions.parquet")
    natural, draw = result["natural"], result["table_draw"]["verdict"]
    print(f"natural: kappa {natural['kappa']['value']:.3f} TPR {natural['tpr']['hits']}/{natural['tpr']['n']} "
          f"FPR {natural['fpr']['hits']}/{natural['fpr']['n']}; table draw: kappa {draw['kappa']['value']:.3f} "
          f"TPR {draw['tpr']['hits']}/{draw['tpr']['n']} FPR {draw['fpr']['hits']}/{draw['fpr']['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
