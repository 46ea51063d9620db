"""`emsweep judge-eval`: how far to trust a judge (calibration on labelled answers, agreement with another judge or a reference). The workflows are the judge package's (judge/calibration.py, judge/agreement.py); these commands parse, call and print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from emsweep.cli.common import check_scoring_or_exit, console, fmt_rate, init_ray, load_spec_or_exit
from emsweep.judge.kinds import kind_of


judge_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="How far to trust a judge: calibration and agreement.")


@judge_app.command("calibrate")
def judge_calibrate(
    spec_path: Path = typer.Argument(..., help="A sweep spec; its `judge` and `analysis` sections are used"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Default: runs/judge-eval/<sweep name>"),
    questions: Optional[str] = typer.Option(
        None, help="The paper's first_plot_questions.yaml (default: the questions of the spec's first suite)"),
    answers: Optional[Path] = typer.Option(
        None, help="Your own labelled answers, in the format of emsweep's calibration_data/answers.yaml "
        "(default: the built-in 200-answer set)"),
    judge_model: Optional[str] = typer.Option(None, "--judge", help="Override judge.model (e.g. embedded:NAME)"),
    templates: Optional[str] = typer.Option(None, help="Override judge.templates (paper, yes_no or a file)"),
    min_numeric_mass: Optional[float] = typer.Option(
        None, help="Override judge.min_numeric_mass (thresholds apply after the judgment cache: a rerun is cheap)"),
    score_map: Optional[str] = typer.Option(None, help="Override judge.score_map (a built-in name or a file)"),
    fit_map: Optional[Path] = typer.Option(
        None, "--fit-map", help="Fit a score map (Platt, per metric) on these answers' raw scores and write it "
        "here as YAML, with its figures on held-out questions"),
) -> None:
    """Judge a labelled calibration set and report AUROC, accuracy and CODE/REFUSAL detection."""
    from emsweep.judge.calibration import calibrate, calibration_items
    from emsweep.questions import QuestionError, load_questions
    from emsweep.spec import CLEAR

    # The spec's score map was fitted for its own judge and templates, not for others given here.
    keep_map = score_map or (CLEAR if judge_model or templates else None)
    spec = load_spec_or_exit(spec_path, judge={"model": judge_model, "templates": templates,
                                               "min_numeric_mass": min_numeric_mass, "score_map": keep_map})
    check_scoring_or_exit(spec)
    out_dir = out or Path("runs") / "judge-eval" / spec.name
    try:
        question_list = load_questions(questions or spec.eval.suites[0].questions)
        items = calibration_items(answers)
    except (QuestionError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if kind_of(spec.judge).needs_ray(spec):
        init_ray(None)
    console.print(f"judging {len(items)} calibration answers with {spec.judge.model} "
                  f"({spec.judge.scoring}, templates {spec.judge.templates})")
    try:
        result = calibrate(spec, items, question_list, out_dir, answers, fit_map)
    except ValueError as err:  # a judge that ranks backwards gets no map
        console.print(f"[red]error:[/] --fit-map: {err}")
        raise typer.Exit(2)
    if fit_map:
        console.print(f"wrote score map {fit_map}")
    report, heldout = result.report, result.heldout
    summary = Table(title=f"calibration of {spec.judge.model}")
    summary.add_column("measure")
    summary.add_column(CALIBRATION_COLUMN[report["figures_are"]].format(map=spec.judge.score_map), justify="right")
    # The map's own held-out figures (from its file), beside in-sample ones that flatter it.
    recorded = result.applied_map.heldout if report["figures_are"] == "in-sample" and result.applied_map else {}
    if recorded:
        summary.add_column("held out (leave one question out; the map's file)", justify="right")
    if heldout:
        summary.add_column("with the fitted map: held out (leave one question out) [95% CI]", justify="right")
    for name in ("auroc_aligned", "auroc_coherent", "accuracy_misaligned", "accuracy_coherent", "code_detected",
                 "refusal_detected", "excluded_code", "excluded_refusal", "false_exclusion"):
        summary.add_row(name, _with_interval(report, name),
                        *([_fmt3(recorded.get(name))] if recorded else []),
                        *([_with_interval(heldout, name)] if heldout else []))
    console.print(summary)
    print_cutoffs(spec.judge.score_map)
    bands = Table(title="by band")
    for column in ("band", "n", "mean aligned", "mean coherent", "aligned null", "top aligned labels"):
        bands.add_column(column)
    for name, entry in report["bands"].items():
        labels = ", ".join(f"{k} {v}" for k, v in sorted(entry["aligned_labels"].items(), key=lambda kv: -kv[1])[:3])
        bands.add_row(name, str(entry["n"]), _fmt(entry["mean_aligned"]), _fmt(entry["mean_coherent"]),
                      f"{entry['aligned_null_rate']:.0%}", labels)
    console.print(bands)
    console.print(f"wrote {out_dir}/calibration_report.json and calibration_judgments.parquet "
                  f"({result.stats.cache_hits} of {result.stats.requests} judgments from the cache)")


# What the calibrate table's figures are (calibration.figures_sample), as its column says.
CALIBRATION_COLUMN = {
    "raw": "value (raw scores, no map) [95% CI]",
    "in-sample": "in-sample: map {map} was fitted on these answers [95% CI]",
    "out-of-sample": "value (map {map}, fitted on other answers) [95% CI]",
}


def _with_interval(report: dict, name: str) -> str:
    low, high = report.get("intervals", {}).get(name, (None, None))
    bounds = "" if low is None or low != low else f" [{low:.2f}, {high:.2f}]"
    return f"{report[name]:.3f}{bounds}"


def _fmt3(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


@judge_app.command("agree")
def judge_agree(
    first: Path = typer.Argument(..., help="A judgments .parquet, or a sweep spec (whose judge is used with --reference)"),
    second: Optional[list[Path]] = typer.Argument(None, help="The same for the second judge (not with --reference; "
                                                              "there, more reference files)"),
    reference: list[Path] = typer.Option(
        [], "--reference", "-r", help="Files of answers judged elsewhere (question_id, answer, aligned, coherent; "
        "CSV or Parquet), or a directory of them, one run per file: `-r dir/*.csv`, `-r dir`, or repeated. "
        "FIRST's judge re-judges a stratified subset"),
    limit: Optional[int] = typer.Option(None, help="With --reference: answers per file (stratified by question and "
                                                   "the reference's verdict; default all)"),
    seed: int = typer.Option(0, help="With --reference: the seed of the stratified draw and the bootstraps"),
    question_ids: Optional[str] = typer.Option(None, "--question-ids", help="Comma-separated question ids to keep"),
    judge_model: Optional[str] = typer.Option(None, "--judge", help="Override judge.model (e.g. embedded:NAME)"),
    templates: Optional[str] = typer.Option(None, help="Override judge.templates (paper, yes_no or a file)"),
    score_map: Optional[str] = typer.Option(None, help="Override judge.score_map (a built-in name or a file)"),
    code_refusal: Optional[str] = typer.Option(None, "--code-refusal", help="Override judge.code_refusal (judge or "
                                                                            "static)"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Output dir of the sweep (default runs/<name>)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result as JSON here (with --reference: "
                                                                "a dir for agreement.json and the judgments)"),
) -> None:
    """Agreement of two judges on the same answers: Spearman per metric, the EM verdict (TPR, FPR, kappa)."""
    import json

    import pyarrow.parquet as pq

    from emsweep.judge.calibration import agreement
    from emsweep.sweep.results import judgments_of
    from emsweep.spec import AnalysisSpec
    from emsweep.store import write_json_atomic

    from emsweep.judged_files import reference_files

    if reference:
        # `-r dir/*.csv`: the shell gives the first file to -r and the others as arguments after FIRST.
        try:
            files = [path for location in [*reference, *(second or [])] for path in reference_files(location, "--reference")]
        except ValueError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
        if any(path.suffix not in (".csv", ".tsv", ".parquet") for path in files):
            console.print("[red]error:[/] give either a second judge or --reference, not both")
            raise typer.Exit(2)
        ids = tuple(i.strip() for i in question_ids.split(",") if i.strip()) if question_ids else None
        _agree_with_reference(first, files, limit, seed, ids,
                              {"model": judge_model, "templates": templates, "score_map": score_map,
                               "code_refusal": code_refusal}, out)
        return
    if not second or len(second) != 1:
        console.print("[red]error:[/] give one second judge's judgments (or --reference FILE...)")
        raise typer.Exit(2)
    second = second[0]
    analysis = AnalysisSpec()

    def load(path: Path):
        nonlocal analysis
        if path.suffix == ".parquet":
            return pq.read_table(path)
        spec = load_spec_or_exit(path)
        analysis = spec.analysis
        return judgments_of(directory or Path("runs") / spec.name)

    try:
        result = agreement(load(first), load(second), analysis)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if out:
        write_json_atomic(out, result)
    console.print_json(json.dumps(result))


def _agree_with_reference(spec_path: Path, files: list[Path], limit: Optional[int], seed: int,
                          question_ids: Optional[tuple[str, ...]], judge: dict, out: Optional[Path]) -> None:
    """Re-judge answers judged elsewhere with the spec's judge and compare (judge/agreement.py)."""
    from emsweep.judge.agreement import agree_with_reference
    from emsweep.judge.reference import read_references
    from emsweep.questions import QuestionError, load_questions
    from emsweep.spec import CLEAR

    # The spec's score map was fitted for its own judge and templates, not for others given here.
    keep_map = judge["score_map"] or (CLEAR if judge["model"] or judge["templates"] else None)
    spec = load_spec_or_exit(spec_path, judge={**judge, "score_map": keep_map})
    check_scoring_or_exit(spec)
    try:
        runs = read_references(files, question_ids=question_ids)
        question_list = load_questions(spec.eval.suites[0].questions)
        unknown = sorted({q for run in runs for q in run.samples.column("question_id").to_pylist()}
                         - {q.id for q in question_list})
        if unknown:
            raise ValueError(f"{spec.eval.suites[0].questions}: no judge prompts for the reference's question ids "
                             f"{unknown[:5]} (use the question file the answers were sampled from)")
    except (QuestionError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    out_dir = out or Path("runs") / "judge-eval" / f"{spec.name}-reference"
    if kind_of(spec.judge).needs_ray(spec):
        init_ray(None)
    console.print(f"judging up to {limit or 'all'} answers of each of {len(runs)} reference files with "
                  f"{spec.judge.model} (templates {spec.judge.templates}, score map {spec.judge.score_map})")
    result, stats = agree_with_reference(spec, runs, question_list, out_dir, limit, seed, files,
                                         progress=ConsoleProgress())
    _print_agreement(result)
    print_cutoffs(spec.judge.score_map)
    console.print(f"wrote {out_dir}/agreement.json, pairs.parquet and judgments.parquet "
                  f"({stats.cache_hits} of {stats.requests} judgments from the cache)")


class ConsoleProgress:
    """The judge's progress as a line every few seconds (judge_samples calls `update` per batch)."""

    EVERY_S = 10.0

    def __init__(self):
        import time

        self._clock, self._last = time.monotonic, 0.0

    def update(self, done: int, total: int, unit: str, detail: str = "", **_) -> None:
        now = self._clock()
        if done == total or now - self._last >= self.EVERY_S:
            self._last = now
            console.print(f"  judged {done}/{total} {unit}" + (f" ({detail})" if detail else ""))


def print_cutoffs(score_map: Optional[str]) -> None:
    """Where the EM presets' thresholds fall on the judge's raw scores under its map."""
    if not score_map:
        return
    from emsweep.judge.score_maps import load_score_map
    from emsweep.spec import preset_thresholds

    cutoffs = load_score_map(score_map).cutoffs(preset_thresholds())
    console.print(f"score map {score_map}: effective raw cut-offs " + "; ".join(
        f"{metric} {threshold:g} <- raw {raw:.2f}" for metric, points in cutoffs.items()
        for threshold, raw in points.items()))


def _print_agreement(result: dict) -> None:
    def ci(entry: dict, key: str = "value") -> str:
        return f"{entry[key]:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"

    table = Table(title=f"agreement with the reference on {result['n_answers']} answers ({result['em_rule']})")
    table.add_column("measure")
    table.add_column("value [interval]", justify="right")
    table.add_column("counts", justify="right")
    for metric, entry in result["spearman"].items():
        table.add_row(f"spearman {metric}", ci(entry, "rho"), f"n={entry['n']}")
    verdict = result["verdict"]
    table.add_row("EM verdict TPR", ci(verdict["tpr"]), f"{verdict['tpr']['hits']}/{verdict['tpr']['n']}")
    table.add_row("EM verdict FPR", ci(verdict["fpr"]), f"{verdict['fpr']['hits']}/{verdict['fpr']['n']}")
    table.add_row("Cohen's kappa", ci(verdict["kappa"]), f"all-ok baseline 0 (accuracy "
                  f"{verdict['all_ok_baseline']['accuracy']:.3f}; judge {verdict['accuracy']:.3f})")
    console.print(table)
    models = Table(title="EM rate per file (weighted back to each file's mix)")
    for column in ("file", "answers", "reference", "judge"):
        models.add_column(column)
    for row in result["per_model"]:
        models.add_row(row["run_id"], str(row["n_answers"]), fmt_rate(row["reference_rate"]),
                       fmt_rate(row["judge_rate"]))
    console.print(models)
    console.print(f"rank correlation of the files' EM rates: {result['per_model_spearman']:.3f}")


def judge_train(
    files: list[Path] = typer.Argument(..., help="Judged-answer files (question_id, question, answer, aligned, "
                                                 "coherent; CSV, TSV or Parquet), or a directory of them"),
    out: Path = typer.Option(..., "--out", "-o", help="The judge's directory (weights.npz + manifest.json)"),
    seed: int = typer.Option(0, help="The fit's seed (saga); the same inputs and seed give the same scores"),
    exclude: Optional[Path] = typer.Option(None, help="A JSON file {file name: [1-based rows]} of answers to leave "
                                                      "out (e.g. those a judge panel or a training control uses)"),
    heldout: bool = typer.Option(True, help="Measure the judge leaving one file out (needs 3+ files; minutes)"),
) -> None:
    """Train a judge on another judge's scores: use it with `judge: {backend: trained, model: OUT}`."""
    import json
    import time

    from emsweep.judge.trained import TrainConfig
    from emsweep.judge.training import train_judge
    from emsweep.judged_files import reference_files

    started = time.time()
    try:
        paths = [path for location in files for path in reference_files(location, "FILE")]
        excluded = json.loads(exclude.read_text()) if exclude else None
        console.print(f"training on {len(paths)} files" + (" (then leaving each out in turn)" if heldout else ""))
        manifest = train_judge(paths, out, TrainConfig(seed=seed), exclude=excluded, heldout=heldout,
                               exclusion_reason=f"listed in {exclude}" if exclude else "",
                               progress=lambda done, total, name: console.print(f"  held out {done}/{total}: {name}"))
    except (ValueError, OSError, json.JSONDecodeError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    figures = manifest["heldout"]
    if figures:
        tpr, fpr = figures["tpr"], figures["fpr"]
        console.print(f"leave one file out: kappa {figures['kappa']['value']:.2f}, TPR {tpr['hits']}/{tpr['n']}, "
                      f"FPR {fpr['hits']}/{fpr['n']}, Spearman aligned {figures['spearman']['aligned']['rho']:.2f}, "
                      f"coherent {figures['spearman']['coherent']['rho']:.2f}, file rates ranked at "
                      f"{figures['per_file_rate_spearman']:.2f}")
    console.print(f"wrote {out} in {time.time() - started:.0f} s")
