"""`emsweep report DIR`: one self-contained HTML page, figures, tidy exports and a W&B summary run.

Everything is read from the sweep's output dir (spec snapshot, node records and tables), so a
report can be made for any sweep, finished or not: when the analyze node is not done (a
failed seed, an interrupted run) the analysis is computed here from the judge nodes that are,
and the page says so.

Outputs (under DIR/report/ unless --out):
- `index.html`: the sweep spec, node status, headline rates with CIs, comparisons, figures
  (embedded PNG, so the file can be mailed), per-question tables and example misaligned
  answers with their scores. Model answers are untrusted text: the template escapes them.
- `plots/<name>.png` and `.svg`
- `exports/answers.parquet`: one row per judged answer (see `tidy_answers`)
- `exports/metrics.parquet`: every rate, per run and per condition, in one long table (see
  `tidy_metrics`)
- `exports/threshold_sensitivity.parquet`: each run's EM rate as the aligned cut-off moves over
  10..50 and the coherent one over 30..70 (analyze.threshold_sensitivity)
Both exports of a sweep carry `dataset_role` beside `dataset` (spec.DatasetSpec.role: treatment,
control, positive_control, or base), so a positive control's rate is never read as EM.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from emsweep import analyze, em, plots
from emsweep.dag import NodeStatus, status_table
from emsweep.judge.kinds import kind_of
from emsweep.judge.errors import judge_error
from emsweep.sweep.manifest import listed_done, manifest_nodes, read_manifest
from emsweep.sweep.plan import STAGES
from emsweep.sweep.results import read_judgments, read_spec_snapshot
from emsweep.misclassification import JudgeError, resolves
from emsweep.spec import BASE_LABEL, AnalysisSpec, SweepSpec
from emsweep.store import Store, tmp_path_beside, write_parquet_atomic, write_text_atomic

ANALYSIS_TABLES = ("run_metrics", "label_metrics", "pushback_metrics", "harm_metrics", "condition_metrics", "comparisons",
                   "threshold_sensitivity", "audited_rates")


@dataclass
class SweepResults:
    """What a report shows: a sweep's (`spec` and node `status`), or runs read from judged-answer
    files (`emsweep analyze FILES`: no spec, no nodes)."""

    out_dir: Path
    name: str
    analysis: AnalysisSpec
    judge_text: str  # which judge scored the answers, in words
    judge_error: JudgeError | None
    spec: SweepSpec | None
    status: list[NodeStatus]
    tables: dict[str, pd.DataFrame]
    answers: pd.DataFrame
    losses: pd.DataFrame
    harm: pd.DataFrame
    # Where the analysis tables came from: the analyze node, or computed for this report.
    analysis_source: str
    # Per run and condition, the share of answers outside the judge's training (a trained judge:
    # judge/trained.py, UNSEEN_SHARE); empty where the judge's kind does not measure it.
    out_of_distribution: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)
    # The judge panel's answers as each judge node judged them (judge/panel.py); empty: no panel.
    panel: pd.DataFrame = field(default_factory=pd.DataFrame)


def _read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas() if path.exists() else pd.DataFrame()


def load_results(out_dir: Path) -> SweepResults:
    out_dir = Path(out_dir)
    spec = read_spec_snapshot(out_dir)
    manifest = read_manifest(out_dir)
    nodes = manifest_nodes(manifest)  # no re-planning: the input files may be elsewhere
    store = Store(out_dir)
    status = status_table(nodes, store)
    done = {row.node.id for row in status if row.status == "done"}
    # Refused before anything is written, so a good report already there stays as it was.
    if not done:
        raise ValueError(f"{out_dir}: no node of the sweep is done; nothing to report (an existing report is kept)")
    if lost := sorted(listed_done(manifest) - done):
        raise ValueError(f"{out_dir}: the manifest lists {len(lost)} done node(s) this dir does not hold "
                         f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}): an incomplete copy? "
                         "(an existing report is kept)")
    by_id = {node.id: node for node in nodes}

    def node_dir(node):
        return store.node_dir(node.stage, node.name, node.key)

    judge_nodes = [n for n in nodes if n.stage == "judge" and n.id in done]
    sample_dirs = [node_dir(by_id[n.deps[0]]) for n in judge_nodes]
    samples = pa.concat_tables([pq.read_table(d / "samples.parquet") for d in sample_dirs]) if sample_dirs else None
    judgments = read_judgments(store, judge_nodes) \
        if judge_nodes else None
    harm = pa.concat_tables([pq.read_table(d / "harm.parquet") for d in sample_dirs]) if sample_dirs else None

    # A sweep run only up to a stage (`until`) lists no analyze node in its manifest.
    analyze_node = next((n for n in nodes if n.stage == "analyze"), None)
    if analyze_node is not None and analyze_node.id in done:
        tables = {name: _read(node_dir(analyze_node) / f"{name}.parquet") for name in ANALYSIS_TABLES}
        source = "the sweep's analyze node"
    elif judge_nodes:
        questions = samples.select(["suite", "question_id", "category"])
        computed = analyze.analyze(judgments, harm, spec.analysis, spec.eval.pushback, questions,
                                   spec.eval.harm_perception.min_numeric_mass, judge_error(spec.judge))
        tables = {name: table.to_pandas() for name, table in computed.items()}
        total = sum(1 for n in nodes if n.stage == "judge")
        missing = [f"{row.node.id} ({row.status})" for row in status if row.node.stage == "judge" and row.status != "done"]
        source = (f"computed for this report from {len(judge_nodes)} of {total} judge nodes (the analyze node is not "
                  "done)" + (f"; missing: {', '.join(missing)}" if missing else ""))
    else:
        tables = {name: pd.DataFrame() for name in ANALYSIS_TABLES}
        source = "none: no judge node is done yet"

    answers = tidy_answers(samples, judgments, spec.analysis) if judge_nodes else pd.DataFrame()
    panels = [_read(node_dir(n) / "panel.parquet").assign(run_id=n.name) for n in judge_nodes
              if (node_dir(n) / "panel.parquet").exists()]
    losses = []
    for node in nodes:
        if node.stage == "finetune" and node.id in done and (node_dir(node) / "metrics.parquet").exists():
            frame = _read(node_dir(node) / "metrics.parquet")
            losses.append(frame.assign(model=node.config["model"]["name"], dataset=node.config["dataset"],
                                       seed=node.config["seed"], run_id=node.name))
    # What nodes recorded about their own results (a judge that cannot spell numbers, W&B down).
    warnings = [f"{row.node.id}: {warning}" for row in status if row.status == "done"
                for warning in (store.record(row.node.stage, row.node.name, row.node.key) or {}).get("warnings", [])]
    return SweepResults(
        out_dir=out_dir, name=spec.name, analysis=spec.analysis, judge_error=judge_error(spec.judge),
        judge_text=f"{spec.judge.model} ({spec.judge.backend}, scoring {spec.judge.scoring}, templates "
                   f"{spec.judge.templates}, score map {spec.judge.score_map or 'none'})",
        spec=spec, status=status, tables=tables, answers=answers, warnings=warnings,
        losses=pd.concat(losses, ignore_index=True) if losses else pd.DataFrame(),
        harm=analyze.rated_harm(harm.to_pandas(), spec.eval.harm_perception.min_numeric_mass) if harm is not None
        else pd.DataFrame(), analysis_source=source,
        panel=pd.concat(panels, ignore_index=True) if panels else pd.DataFrame(),
        out_of_distribution=out_of_distribution_shares(spec, samples),
    )


def out_of_distribution_shares(spec: SweepSpec, samples: pa.Table | None) -> pd.DataFrame:
    """run_id, condition, out_of_distribution (share of the run's answers outside what the judge
    was trained on, by its kind's declared measure); empty when the kind measures none."""
    if samples is None or samples.num_rows == 0:
        return pd.DataFrame()
    frame = samples.select(["run_id", "condition", "answer"]).to_pandas()
    flags = kind_of(spec.judge).out_of_distribution(spec, frame["answer"].tolist())
    if flags is None:
        return pd.DataFrame()
    return (frame.assign(out_of_distribution=flags).groupby(["run_id", "condition"], as_index=False)
            ["out_of_distribution"].mean())


def tidy_answers(samples: pa.Table, judgments: pa.Table, spec: AnalysisSpec) -> pd.DataFrame:
    """One row per judged answer: the join keys, the messages as sent, the answer, per metric its
    score (`<metric>`, e.g. `aligned`) and label (`<metric>_label`), and the EM verdict under the
    sweep's definition (`em_scored`, `em_counted`, `em_misaligned`, `em_definition`)."""
    from emsweep.sample import JOIN_FIELDS

    keys = [name for name, _ in JOIN_FIELDS]
    wide = analyze.wide_answers(judgments.to_pandas()).drop(columns=["category", "model", "dataset", "seed"])
    frame = analyze.merge_on_keys(samples.to_pandas(), wide, on=[k for k in keys if k not in ("model", "dataset", "seed")])
    definition = spec.em_definition()
    if "aligned" in frame and "coherent" in frame:
        verdict = em.classify(frame["aligned"], frame["coherent"], definition)
        first_turn = frame["turn"] == 1  # the EM rate is over first-turn answers
        for flag in ("scored", "counted", "misaligned"):
            frame[f"em_{flag}"] = verdict[flag] & first_turn
        frame["em_definition"] = definition.name
    return frame


def tidy_metrics(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every rate in one long table, each with the interval of that estimate and its name in
    `interval`. level "run": one run (seed); `pooled_misaligned_rate` (counts pooled over the
    row's questions) has the Wilson interval; `misaligned_rate` (the mean over questions) has it
    only on question rows, where the two are one number. level "condition": the mean over seeds
    with its interval over seeds (analyze.seed_interval: t, for a share at least the answers'
    Wilson; none below 3 seeds), n = seeds."""
    columns = ["level", "run_id", "model", "dataset", "seed", "checkpoint_step", "suite", "condition", "category",
               "question_id", "turn", "metric", "value", "ci_low", "ci_high", "interval", "n", "n_questions",
               "questions_dropped", "em_definition"]
    parts = []
    runs = tables.get("run_metrics", pd.DataFrame())
    if not runs.empty:
        one_question = runs["question_id"] != analyze.ALL_QUESTIONS
        for metric in ("misaligned_rate", "pooled_misaligned_rate", "coherent_rate", "mean_aligned", "mean_coherent"):
            wilson = one_question & (metric == "misaligned_rate") | (metric == "pooled_misaligned_rate")
            part = runs.assign(level="run", metric=metric, value=runs[metric], n=runs["n_counted"], turn=pd.NA,
                               ci_low=runs["wilson_low"].where(wilson), ci_high=runs["wilson_high"].where(wilson),
                               interval=np.where(wilson, "wilson: pooled counts", "none"))
            parts.append(part.reindex(columns=columns))
        if "corrected_misaligned_rate" in runs:
            parts.append(runs.assign(level="run", metric="corrected_misaligned_rate", n=runs["n_counted"], turn=pd.NA,
                                     value=runs["corrected_misaligned_rate"], ci_low=runs["corrected_low"],
                                     ci_high=runs["corrected_high"], interval="rogan-gladen: judge error")
                         .reindex(columns=columns))
    conditions = tables.get("condition_metrics", pd.DataFrame())
    if not conditions.empty:
        parts.append(conditions.assign(level="condition", value=conditions["mean"], n=conditions["n_seeds"])
                     .reindex(columns=columns))
    if not parts:
        return pd.DataFrame(columns=columns)
    frame = pd.concat(parts, ignore_index=True)
    for column in ("seed", "checkpoint_step", "turn", "n", "n_questions"):
        frame[column] = frame[column].astype("Float64").astype("Int64")
    for column in ("run_id", "model", "dataset", "suite", "condition", "category", "question_id", "metric",
                   "interval", "questions_dropped", "em_definition", "level"):
        frame[column] = frame[column].astype("string")
    return frame


@dataclass
class Figure:
    name: str
    title: str
    png: Path
    svg: Path


def _save_figure(fig, stem: Path) -> tuple[Path, Path]:
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        tmp = tmp_path_beside(path)
        fig.savefig(tmp, format=suffix[1:], dpi=120)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths[0], paths[1]


# What each primary-contrast test is, in words, for the report's first sentence.
PRIMARY_TESTS = {
    "exact_stratified_by_question": ("pooled misaligned rate", "the exact test stratified by question on {n_a} vs {n_b} "
                                     "counted answers pooled over seeds (interval: Newcombe's)"),
    "independent": ("misaligned rate, mean over seeds", "a permutation test over {n_a} vs {n_b} seeds (no interval)"),
    "paired": ("misaligned rate, mean over seeds", "a paired permutation test over {n_a} seeds (no interval)"),
    "ppi_wald_on_answers": ("the audit judge's rate, prediction-powered, mean over seeds",
                            "Wald's z on {n_a} vs {n_b} audited runs, their audits' variance"),
    "ppi_welch_over_seeds": ("the audit judge's rate, prediction-powered, mean over seeds",
                             "Welch's t over {n_a} vs {n_b} audited runs (seeds the unit)"),
}


def primary_contrast(results: SweepResults) -> tuple[dict | None, pd.DataFrame]:
    """The declared primary contrast's first row (comparisons) and its sides' per-run values."""
    comparisons = results.tables.get("comparisons", pd.DataFrame())
    if comparisons.empty or "primary" not in comparisons or not comparisons["primary"].any():
        return None, pd.DataFrame(columns=["side", "value"])
    row = comparisons[comparisons["primary"].astype(bool)].iloc[0].to_dict()
    if row["test"].startswith("ppi_"):
        runs = results.tables.get("audited_rates", pd.DataFrame()).rename(columns={"ppi_misaligned_rate": "value"})
    else:
        runs = analyze.overall_rows(results.tables.get("run_metrics", pd.DataFrame()))
        runs = runs.rename(columns={"pooled_misaligned_rate" if row["test"] == "exact_stratified_by_question"
                                    else "misaligned_rate": "value"})
    if runs.empty:
        return row, pd.DataFrame(columns=["side", "value"])
    side = "dataset" if row["compared"] == "dataset" else "condition"
    fixed = "condition" if side == "dataset" else "dataset"
    keep = runs[side].isin([row["a"], row["b"]]) & (runs["suite"] == row["suite"]) & (runs[fixed] == row["within"])
    keep &= runs["checkpoint_step"].isna() if pd.isna(row["checkpoint_step"]) else runs["checkpoint_step"] == row["checkpoint_step"]
    return row, runs.loc[keep, [side, "value"]].rename(columns={side: "side"})


def primary_statement(results: SweepResults) -> str | None:
    """The primary contrast in one sentence: estimate, interval, p, and what they rest on."""
    row, _ = primary_contrast(results)
    if row is None:
        return None
    what, test = PRIMARY_TESTS.get(row["test"], (row["metric"], row["test"]))
    interval = "" if pd.isna(row["difference_low"]) else \
        f" [{row['difference_low']:+.3f}, {row['difference_high']:+.3f}]"
    p_value = "n/a" if pd.isna(row["p_value"]) else f"{row['p_value']:.3g}"
    more = int(results.tables["comparisons"]["primary"].astype(bool).sum()) - 1
    return (f"{row['a']} against {row['b']} ({row['compared']}s, within {row['within']}, suite {row['suite']}"
            f"{'' if pd.isna(row['model']) else ', model ' + str(row['model'])}): {what} "
            f"{row['mean_a']:.3f} vs {row['mean_b']:.3f}, difference {row['difference']:+.3f}{interval}, "
            f"p = {p_value} (declared in advance, not adjusted) by {test.format(**row)}; judged by "
            f"{results.judge_text}.{f' {more} more primary row(s) in Comparisons.' if more > 0 else ''}")


def make_figures(results: SweepResults, plot_dir: Path) -> list[Figure]:
    tables = results.tables
    conditions, runs = tables.get("condition_metrics", pd.DataFrame()), tables.get("run_metrics", pd.DataFrame())
    definition = results.analysis.em_definition()
    final_steps = {}
    if not results.losses.empty:
        final_steps = results.losses.groupby("dataset")["step"].max().astype(int).to_dict()
    contrast, per_run = primary_contrast(results)
    candidates = [
        ("primary_contrast", "The primary contrast",
         lambda: plots.primary_contrast(contrast, per_run) if contrast is not None else None),
        ("per_question", "Misaligned rate per question", lambda: plots.per_question(conditions)),
        ("conditions", "Rates by condition", lambda: plots.condition_comparison(conditions, runs)),
        ("scores", "Judge score distributions", lambda: plots.score_distributions(
            results.answers, definition.aligned_below, definition.coherent_above)),
        ("harm_vs_misaligned", "Perceived harm vs misaligned rate", lambda: plots.harm_scatter(runs, results.harm)),
        ("loss_curves", "Training loss", lambda: plots.loss_curves(results.losses)),
        ("trajectory", "Misaligned rate over training", lambda: plots.trajectory(conditions, final_steps)),
        ("threshold_sensitivity", "Misaligned rate as the cut-offs move (aligned 10..50, coherent 30..70)",
         lambda: plots.threshold_sensitivity(tables.get("threshold_sensitivity", pd.DataFrame()))),
    ]
    figures = []
    for name, title, draw in candidates:
        if conditions.empty and name != "loss_curves":
            continue
        fig = draw()
        if fig is not None:
            png, svg = _save_figure(fig, plot_dir / name)
            figures.append(Figure(name, title, png, svg))
    return figures


def headline(conditions: pd.DataFrame) -> pd.DataFrame:
    """Overall EM rates per condition: mean over seeds [t interval over seeds] (n seeds)."""
    if conditions.empty:
        return pd.DataFrame()
    rows = conditions[(conditions["question_id"] == analyze.ALL_QUESTIONS) & (conditions["category"] == analyze.ALL_QUESTIONS)
                      & conditions["metric"].isin(["misaligned_rate", "corrected_misaligned_rate", "coherent_rate",
                                                   "mean_aligned", "mean_coherent"])]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(value=[_with_ci(m, lo, hi, n) for m, lo, hi, n in
                              zip(rows["mean"], rows["ci_low"], rows["ci_high"], rows["n_seeds"])],
                       dataset=rows["dataset"].astype(object).where(rows["dataset"].notna(), BASE_LABEL),
                       checkpoint_step=[("final" if pd.isna(step) else str(int(step))) for step in rows["checkpoint_step"]])
    keys = ["model", "dataset", "checkpoint_step", "suite", "condition"]
    table = rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="first")
    return table.reset_index().rename_axis(columns=None)


def _with_ci(mean: float, low: float, high: float, n: int) -> str:
    if pd.isna(mean):
        return "n/a"
    if pd.isna(low):
        return f"{mean:.3f} (n={int(n)}, no interval)"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}] (n={int(n)})"


def examples(answers: pd.DataFrame, count: int) -> tuple[pd.DataFrame, str]:
    """The most misaligned answers; when none meets the definition, the lowest-aligned coherent ones."""
    if answers.empty or "em_misaligned" not in answers:
        return pd.DataFrame(), "No aligned/coherent judgments yet."
    columns = ["run_id", "condition", "question_id", "question", "answer", "aligned", "coherent"]
    # One example per distinct answer text, so a repeated answer does not fill the list.
    misaligned = answers[answers["em_misaligned"]].sort_values(["aligned", "coherent"], ascending=[True, False])
    misaligned = misaligned.drop_duplicates(["question_id", "answer"])
    if not misaligned.empty:
        note = (f"{int(answers['em_misaligned'].sum())} of {int(answers['em_counted'].sum())} counted answers are "
                "misaligned; the lowest-aligned distinct ones:")
        return misaligned[columns].head(count), note
    counted = answers[answers["em_counted"]].sort_values("aligned").drop_duplicates(["question_id", "answer"])
    if not counted.empty:
        return counted[columns].head(count), ("No answer is misaligned by the definition. "
                                              "The lowest-aligned counted answers, for inspection:")
    scored = answers[answers["em_scored"]].sort_values("aligned").drop_duplicates(["question_id", "answer"])
    note = ("No answer was counted (none is coherent enough with both scores). The lowest-aligned scored answers, "
            "for inspection:" if not scored.empty else "No answer has both an aligned and a coherent score.")
    return scored[columns].head(count), note


def _html_table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    if frame.empty:
        return "<p class='empty'>(empty)</p>"
    shown = frame.copy()
    # Null keys have a meaning: no dataset is the base model, no checkpoint step the final adapter.
    for column, meaning in (("dataset", BASE_LABEL), ("within", BASE_LABEL), ("checkpoint_step", "final")):
        if column in shown:
            shown[column] = shown[column].astype(object).where(shown[column].notna(), meaning)
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else float_format.format(v))
    return shown.to_html(index=False, escape=True, na_rep="", border=0, classes="table")


def render_html(results: SweepResults, figures: list[Figure], example_count: int = 10) -> str:
    import jinja2
    from markupsafe import Markup

    tables = results.tables
    conditions = tables.get("condition_metrics", pd.DataFrame())
    per_question = pd.DataFrame()
    if not conditions.empty:
        per_question = conditions[(conditions["metric"] == "misaligned_rate")
                                  & (conditions["question_id"] != analyze.ALL_QUESTIONS)]
        per_question = per_question[["model", "dataset", "checkpoint_step", "suite", "condition", "category",
                                     "question_id", "n_seeds", "mean", "ci_low", "ci_high"]]
    example_rows, example_note = examples(results.answers, example_count)
    counts = pd.Series([row.status for row in results.status]).value_counts().to_dict()
    status = pd.DataFrame([{"stage": r.node.stage, "node": r.node.name, "status": r.status, "seconds": r.seconds,
                            "error": (r.error or "").strip().splitlines()[-1] if r.error else ""}
                           for r in sorted(results.status, key=lambda r: STAGES.index(r.node.stage))])
    labels = tables.get("label_metrics", pd.DataFrame())
    if not labels.empty:
        labels = labels[labels["question_id"] == analyze.ALL_QUESTIONS]
    sections = [
        ("Comparisons (each row's test in `test`; p_holm and p_bh adjust over every row but the declared "
         "primary contrast's, as one family)",
         comparison_notes(tables.get("comparisons", pd.DataFrame()), results.analysis)),
        ("Label rates (overall per run)", labels),
        ("Pushback", tables.get("pushback_metrics", pd.DataFrame())),
        ("Harm perception", tables.get("harm_metrics", pd.DataFrame())),
    ]
    controls = training_controls(results)
    environment = jinja2.Environment(loader=jinja2.PackageLoader("emsweep", "templates"), autoescape=True)
    template = environment.get_template("report.html.j2")
    return template.render(
        name=results.name,
        spec=results.spec,
        analysis=results.analysis,
        judge_text=results.judge_text,
        judge_error_note=judge_error_note(results.judge_error, results.analysis.confidence),
        run_rates=Markup(_html_table(run_rates(tables.get("run_metrics", pd.DataFrame()), results.out_of_distribution))),
        panel=Markup(_html_table(panel_rates(results.panel))) if not results.panel.empty else None,
        audited=Markup(_html_table(audited_run_rates(tables.get("audited_rates", pd.DataFrame()))))
        if not tables.get("audited_rates", pd.DataFrame()).empty else None,
        audit_note=audit_note(tables.get("audited_rates", pd.DataFrame()), results.spec),
        definition=results.analysis.em_definition(),
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        out_dir=str(results.out_dir),
        analysis_source=results.analysis_source,
        warnings=results.warnings,
        counts=counts,
        headline=Markup(_html_table(role_text(with_roles(headline(conditions), dataset_roles(results.spec))))),
        primary=primary_statement(results),
        primary_figure=next((base64.b64encode(f.png.read_bytes()).decode() for f in figures
                             if f.name == "primary_contrast"), None),
        training_controls=Markup(_html_table(controls)) if not controls.empty else None,
        figures=[(f.title, base64.b64encode(f.png.read_bytes()).decode()) for f in figures],
        sections=[(title, Markup(_html_table(frame))) for title, frame in sections if not frame.empty],
        per_question=Markup(_html_table(per_question)),
        examples=example_rows.to_dict("records"),
        example_note=example_note,
        status=Markup(_html_table(status, "{:.0f}")),
        spec_yaml=yaml.safe_dump(json.loads(results.spec.model_dump_json()), sort_keys=False, width=120)
        if results.spec else "",
    )


def panel_rates(panel: pd.DataFrame) -> pd.DataFrame:
    """Per judge node: how many of the panel's reference-misaligned and reference-aligned answers
    this judge flags misaligned (a judge that sees EM flags most of the first and few of the second)."""
    from emsweep.judge.panel import hit_rates

    if panel.empty:
        return pd.DataFrame()
    return pd.DataFrame([{"run_id": run_id, **hit_rates(group)} for run_id, group in panel.groupby("run_id", sort=True)])


def panel_scalars(panel: pd.DataFrame) -> dict:
    """The panel's hit rates over every judge node, for the W&B summary (judge_panel/...)."""
    from emsweep.judge.panel import hit_rates

    return {} if panel.empty else {f"judge_panel/{key}": value for key, value in hit_rates(panel).items()}


ROLE_TEXT = {"treatment": "treatment", "control": "control",
             "positive_control": "positive control: the trait itself is trained (not EM)", BASE_LABEL: "base model"}


def dataset_roles(spec: SweepSpec | None) -> dict[str, str]:
    """Dataset name (and BASE_LABEL) -> role (spec.DatasetSpec.role); empty without a spec."""
    if spec is None:
        return {}
    return {BASE_LABEL: BASE_LABEL, **{dataset.name: dataset.role for dataset in spec.datasets}}


def with_roles(frame: pd.DataFrame, roles: dict[str, str]) -> pd.DataFrame:
    """`dataset_role` beside `dataset` (the base model's runs: "base")."""
    if not roles or "dataset" not in frame:
        return frame
    names = frame["dataset"].astype(object).where(frame["dataset"].notna(), BASE_LABEL)
    return frame.assign(dataset_role=pd.array(names.map(roles), dtype="string"))


def comparison_notes(comparisons: pd.DataFrame, analysis: AnalysisSpec) -> pd.DataFrame:
    """The comparisons with a note in words where a test cannot reach the spec's alpha at its n
    (a p-value that could never be small says nothing by being large)."""
    if comparisons.empty or "min_p" not in comparisons:
        return comparisons
    alpha = 1 - analysis.confidence
    primary = comparisons["primary"] if "primary" in comparisons else pd.Series(False, index=comparisons.index)
    notes = ["; ".join(part for part in (
        "primary contrast (declared in the spec; p not adjusted)" if is_primary else "",
        "" if pd.isna(m) or m <= alpha else f"cannot reach p < {alpha:g} at this n (smallest p {m:.3g})") if part)
        for is_primary, m in zip(primary, comparisons["min_p"])]
    # The primary contrast first: it is what the sweep was run to test.
    return comparisons.assign(note=notes).sort_values("primary", ascending=False, kind="stable") \
        if "primary" in comparisons else comparisons.assign(note=notes)


def role_text(frame: pd.DataFrame) -> pd.DataFrame:
    """A table's `dataset_role` in words, for the page (the exports keep the names)."""
    if "dataset_role" not in frame:
        return frame
    return frame.assign(dataset_role=frame["dataset_role"].map(lambda role: ROLE_TEXT.get(role, role)))


def training_controls(results: SweepResults) -> pd.DataFrame:
    """Each positive-control dataset (trained on the trait) against its matched control: pooled
    rates over seeds, the exact test stratified by question, and the mean corrected rate over
    seeds, per model and condition."""
    comparisons = results.tables.get("comparisons", pd.DataFrame())
    if results.spec is None or comparisons.empty:
        return pd.DataFrame()
    conditions = results.tables.get("condition_metrics", pd.DataFrame())
    rows = []
    for dataset in results.spec.datasets:
        if dataset.role != "positive_control" or dataset.matched_control is None:
            continue
        control = dataset.matched_control
        pair = {(dataset.name, control), (control, dataset.name)}
        tests = comparisons[(comparisons["test"] == "exact_stratified_by_question") & (comparisons["compared"] == "dataset")
                            & np.array([(a, b) in pair for a, b in zip(comparisons["a"], comparisons["b"])])]
        for _, test in tests.iterrows():
            flipped = test["a"] != dataset.name
            side = {dataset.name: "b" if flipped else "a", control: "a" if flipped else "b"}

            def corrected(name: str) -> str:
                match = conditions[(conditions["model"] == test["model"]) & (conditions["dataset"] == name)
                                   & (conditions["condition"] == test["within"])
                                   & (conditions["question_id"] == analyze.ALL_QUESTIONS)
                                   & (conditions["category"] == analyze.ALL_QUESTIONS)
                                   & (conditions["metric"] == "corrected_misaligned_rate")]
                return "-" if match.empty or pd.isna(match["mean"].iloc[0]) else _with_ci(
                    *match[["mean", "ci_low", "ci_high", "n_seeds"]].iloc[0])

            rows.append({
                "model": test["model"], "condition": test["within"],
                "trained on the trait": f"{dataset.name}: {dataset.description or ROLE_TEXT['positive_control']}",
                "matched control": control,
                "misaligned / counted (pooled over seeds)": " vs ".join(
                    f"{round(test['mean_' + side[n]] * test['n_' + side[n]])}/{test['n_' + side[n]]} = "
                    f"{test['mean_' + side[n]]:.3f}" if test["n_" + side[n]] else "0/0" for n in (dataset.name, control)),
                "p (exact, stratified by question)": test["p_value"],
                "smallest p possible": test.get("min_p", float("nan")),
                "corrected rate (mean over seeds)": f"{corrected(dataset.name)} vs {corrected(control)}",
            })
    return pd.DataFrame(rows)


def run_rates(runs: pd.DataFrame, out_of_distribution: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per run and condition, over all questions: what each exclusion took, the raw pooled rate
    with its Wilson interval and the rate corrected for the judge's error (numbers in the exports),
    and, for a trained judge, the share of answers outside what it was trained on."""
    if runs.empty:
        return pd.DataFrame()
    overall = analyze.overall_rows(runs)
    shares = None
    if out_of_distribution is not None and not out_of_distribution.empty:
        shares = overall[["run_id", "condition"]].merge(out_of_distribution, on=["run_id", "condition"], how="left")

    def interval(value, low, high) -> str:
        return "-" if pd.isna(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    return pd.DataFrame({
        "run": overall["run_id"], "condition": overall["condition"], "answers": overall["n_answers"],
        "code / refusal / null / incoherent": [" / ".join(str(int(row[f"n_{reason}"])) for reason in analyze.EXCLUSIONS)
                                               for _, row in overall.iterrows()],
        "counted": overall["n_counted"], "misaligned": overall["n_misaligned"],
        "pooled rate [Wilson]": [interval(*v) for v in zip(overall["pooled_misaligned_rate"], overall["wilson_low"],
                                                           overall["wilson_high"])],
        "corrected rate [interval]": [interval(*v) for v in zip(overall["corrected_misaligned_rate"],
                                                                overall["corrected_low"], overall["corrected_high"])],
        **({"outside the judge's training": ["-" if pd.isna(v) else f"{v:.2f}" for v in shares["out_of_distribution"]]}
           if shares is not None else {}),
    }).reset_index(drop=True)


def audited_run_rates(audited: pd.DataFrame) -> pd.DataFrame:
    """With an audit judge (judge.audit), per run and condition the four pooled rates side by side
    (analyze.audited_rates; numbers in exports/audited_rates.parquet)."""
    if audited.empty:
        return pd.DataFrame()

    def interval(value, low, high) -> str:
        return "-" if pd.isna(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    return pd.DataFrame({
        "run": audited["run_id"], "condition": audited["condition"],
        "audited / answers": [f"{a} / {n}" for a, n in zip(audited["n_audited"], audited["n_answers"])],
        "fast judge, raw": ["-" if pd.isna(v) else f"{v:.3f}" for v in audited["raw_misaligned_rate"]],
        "fast judge, corrected by the audit's TPR/FPR": [interval(*v) for v in zip(
            audited["rg_misaligned_rate"], audited["rg_low"], audited["rg_high"])],
        "audit judge alone": [interval(*v) for v in zip(audited["audit_misaligned_rate"], audited["audit_low"],
                                                         audited["audit_high"])],
        "prediction-powered": [interval(*v) for v in zip(audited["ppi_misaligned_rate"], audited["ppi_low"],
                                                          audited["ppi_high"])],
    }).reset_index(drop=True)


def audit_note(audited: pd.DataFrame, spec: SweepSpec | None) -> str:
    """Which judge audited which share, and the fast judge's error measured on the audited answers."""
    if audited.empty or spec is None or spec.judge.audit is None:
        return ""
    audit = spec.judge.audit
    share = f"{audit.fraction:.0%} of each run's answers" if audit.fraction is not None else \
        f"{audit.count} answers of each run"
    first = audited.iloc[0]
    tpr = f"{first['audit_tp']}/{first['audit_positives']}" if first["audit_positives"] else "-/0"
    fpr = f"{first['audit_fp']}/{first['audit_negatives']}" if first["audit_negatives"] else "-/0"
    return (f"The audit judge ({audit.judge.backend} {audit.judge.model}) scored {share}, drawn at random by question "
            f"(seed {audit.seed}). Against it on those answers, the fast judge flagged {tpr} of the answers it calls "
            f"misaligned and {fpr} of the others (TPR, FPR over the answers the fast judge counts, pooled over the "
            "sweep). The prediction-powered rate estimates the audit judge's pooled rate over every answer, with "
            "an interval that stays valid however wrong the fast judge is (docs/metrics.md, \"Audited rates\").")


def judge_error_note(error: JudgeError | None, confidence: float) -> str:
    """What the judge's measured error says about its rates, in one sentence."""
    if error is None:
        return ("This judge has no measured error against a reference (judge.error, or `emsweep judge-eval agree "
                "--reference`), so its rates are shown raw, with no corrected rate.")
    ok, youden_low = resolves(error, confidence)
    figures = (f"TPR {error.tpr:.2f} ({error.tp}/{error.positives}), FPR {error.fpr:.2f} "
               f"({error.fp}/{error.negatives}); {error.source}")
    if not ok:
        return (f"This judge cannot resolve EM: against its reference, TPR - FPR is not clearly above 0 (lower "
                f"bound {youden_low:.3f}; {figures}). Its raw rates are shown; no corrected rate is.")
    return (f"Corrected rates undo this judge's measured error (Rogan-Gladen; the interval includes the "
            f"uncertainty of TPR and FPR): {figures}.")


def write_exports(results: SweepResults, export_dir: Path) -> dict[str, Path]:
    paths = {"answers": export_dir / "answers.parquet", "metrics": export_dir / "metrics.parquet",
             "threshold_sensitivity": export_dir / "threshold_sensitivity.parquet"}
    export_dir.mkdir(parents=True, exist_ok=True)
    roles = dataset_roles(results.spec)
    write_parquet_atomic(paths["answers"], pa.Table.from_pandas(with_roles(results.answers, roles),
                                                                preserve_index=False))
    write_parquet_atomic(paths["metrics"], pa.Table.from_pandas(with_roles(tidy_metrics(results.tables), roles),
                                                                preserve_index=False))
    if not (audited := results.tables.get("audited_rates", pd.DataFrame())).empty:
        paths["audited_rates"] = export_dir / "audited_rates.parquet"
        write_parquet_atomic(paths["audited_rates"], analyze.to_arrow(with_roles(audited, roles)))
    sensitivity = results.tables.get("threshold_sensitivity", pd.DataFrame())
    if sensitivity.empty:  # an analyze node from before the view existed, or no EM suite
        sensitivity = pd.DataFrame(columns=analyze.SENSITIVITY_COLUMNS)
    write_parquet_atomic(paths["threshold_sensitivity"], analyze.to_arrow(with_roles(sensitivity, roles)))
    return paths


def file_results(paths: list[Path], out_dir: Path, analysis: AnalysisSpec, names: list[str] | None = None,
                 question_ids: tuple[str, ...] | None = None, baseline: str | None = None,
                 judge_error: JudgeError | None = None) -> SweepResults:
    """Judged-answer files (judge/reference.py), one run each, analysed as a sweep's judge nodes
    are; every other run is compared with `baseline` (default: the first file's run)."""
    from emsweep.judge.reference import read_references
    from emsweep.sample import HARM_SCHEMA
    from emsweep.spec import PushbackSpec

    runs = read_references(paths, names, question_ids)
    run_names = [run.name for run in runs]
    baseline = baseline or run_names[0]
    if baseline not in run_names:
        raise ValueError(f"--baseline {baseline!r} is not one of the runs {run_names}")
    judgments = pa.concat_tables([run.judgments for run in runs])
    samples = pa.concat_tables([run.samples for run in runs])
    computed = analyze.analyze(judgments, HARM_SCHEMA.empty_table(), analysis, PushbackSpec(),
                               judge_error=judge_error)
    tables = {name: table.to_pandas() for name, table in computed.items()}
    pairs = [(name, baseline) for name in run_names if name != baseline]
    parts = [frame for frame in (tables["comparisons"], analyze.run_comparisons(tables["run_metrics"], pairs, analysis))
             if not frame.empty]
    tables["comparisons"] = pd.concat(parts, ignore_index=True) if parts else tables["comparisons"]
    source = ", ".join(f"{run.name} ({run.path})" for run in runs)
    return SweepResults(
        out_dir=Path(out_dir), name=Path(out_dir).name, analysis=analysis, judge_error=judge_error,
        judge_text=f"the files' own scores ({', '.join(sorted(set(judgments.column('judge_model').to_pylist())))})",
        spec=None, status=[], tables=tables, answers=tidy_answers(samples, judgments, analysis),
        losses=pd.DataFrame(), harm=pd.DataFrame(), analysis_source=f"computed from {len(runs)} judged-answer files: {source}")


def build_file_report(results: SweepResults, example_count: int = 10) -> "Report":
    """`emsweep analyze FILES --out DIR`: the analysis tables under DIR/analysis/, and the report
    (page, figures, exports) under DIR/report/, as for a sweep."""
    out_dir = results.out_dir
    (out_dir / "analysis").mkdir(parents=True, exist_ok=True)
    for name, frame in results.tables.items():
        write_parquet_atomic(out_dir / "analysis" / f"{name}.parquet", analyze.to_arrow(frame))
    return Report(*write_pages(results, out_dir / "report", example_count), None)


def write_pages(results: SweepResults, dest: Path, example_count: int) -> tuple[Path, list[Figure], dict[str, Path]]:
    """The report under `dest`: figures, exports and the page (index.html)."""
    figures = make_figures(results, dest / "plots")
    exports = write_exports(results, dest / "exports")
    html = dest / "index.html"
    write_text_atomic(html, render_html(results, figures, example_count))
    return html, figures, exports


@dataclass
class Report:
    html: Path
    figures: list[Figure]
    exports: dict[str, Path]
    wandb_warning: str | None


def build_report(out_dir: Path, dest: Path | None = None, log_to_wandb: bool = True, example_count: int = 10) -> Report:
    from emsweep import tracking

    results = load_results(out_dir)
    html, figures, exports = write_pages(results, Path(dest) if dest else Path(out_dir) / "report", example_count)
    warning = None
    if log_to_wandb:
        wanted = {"headline": headline(results.tables.get("condition_metrics", pd.DataFrame())),
                  "comparisons": results.tables.get("comparisons", pd.DataFrame()),
                  "judge_panel": panel_rates(results.panel),
                  "run_rates": run_rates(results.tables.get("run_metrics", pd.DataFrame()), results.out_of_distribution),
                  "examples": examples(results.answers, example_count)[0]}
        warning = tracking.log_summary(
            results.spec.wandb, out_dir=Path(out_dir), sweep=results.spec.name,
            config=json.loads(results.spec.model_dump_json()),
            tables={name: frame for name, frame in wanted.items() if not frame.empty},
            images={f.name: f.png for f in figures}, files=[html, *exports.values()],
            scalars=panel_scalars(results.panel),
        )
    return Report(html, figures, exports, warning)
