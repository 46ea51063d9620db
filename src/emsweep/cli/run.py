"""Commands that run a sweep and read its results: run, resume, status, report, analyze, check."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emsweep.cli.common import (
    RECEIVED, STATUS_STYLE, console, fmt_rate, init_ray, install_signal_handlers, load_spec_or_exit, one_line, preflight_or_exit, print_status)
from emsweep.cli.live import LiveJobs


def run(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="Output dir, a local path or an object-store URI such as s3://bucket/prefix "
        "(default: runs/<sweep name>)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="Write DIR/report (see `emsweep report`)"),
) -> None:
    """Run a sweep; nodes already done in the output dir are reused."""
    spec = load_spec_or_exit(spec_path)
    _run_spec(spec, out or Path("runs") / spec.name, address, make_report)


def resume(
    out_dir: str = typer.Argument(..., help="A sweep's output dir (holds spec.json): a path or s3://... URI"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="Write DIR/report (see `emsweep report`)"),
) -> None:
    """Re-run a sweep from its output dir's spec snapshot: only failed, skipped and missing nodes run."""
    from emsweep.spec import SpecError
    from emsweep.sweep.results import read_spec_snapshot

    try:
        spec = read_spec_snapshot(out_dir)
    except (FileNotFoundError, SpecError, ValueError, OSError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    _run_spec(spec, out_dir, address, make_report)


def _run_spec(spec, out: str | Path, address: Optional[str], make_report: bool) -> None:
    """Run a sweep; any error out of it is one redacted line, never a traceback with locals."""
    import signal

    from emsweep.redact import redact

    install_signal_handlers()
    try:
        _run_spec_unguarded(spec, out, address, make_report)
    except KeyboardInterrupt:
        _interrupted(128 + (RECEIVED[0] if RECEIVED else signal.SIGINT))
    except typer.Exit:
        raise
    except Exception as err:
        message = redact(f"{type(err).__name__}: {err}", [os.environ.get(spec.judge.api_key_env)])
        console.print("[red]error:[/] " + escape(one_line(message)), highlight=False)
        raise typer.Exit(1)


def _interrupted(exit_code: int) -> None:
    """Ctrl-C: the executor has cancelled its jobs and the lock is released (both on the way
    out); stop Ray, whose shutdown kills the jobs' workers. A second Ctrl-C exits at once."""
    console.print("[yellow]interrupted[/]: running jobs cancelled; nothing unfinished counts as done. "
                  "Re-run the same command to continue.")
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    finally:
        raise typer.Exit(exit_code)


def _run_spec_unguarded(spec, out: str | Path, address: Optional[str], make_report: bool) -> None:
    from emsweep.store import LockedError, Store, locked_error
    from emsweep.sweep.driver import publish_report, run_sweep_at

    # Files are worked on in out_dir: the output dir itself, or this machine's staging dir for
    # one on an object store (store.py).
    store = Store.at(out)
    out_dir = store.root
    # On a cluster the model paths are the cluster's; its engines check them there.
    preflight_or_exit(spec, store.location(), local_models=address is None)

    if spec.wandb.mode == "online":  # the sweep's W&B view, saved before its runs start logging
        _save_online_workspace(spec, out_dir)
    held = store.readers_view().held_by()
    if held:
        # Checked before starting Ray for a quick answer; run_sweep takes the lock atomically.
        console.print(f"[red]error:[/] {escape(str(locked_error(store.where, held)))}")
        raise typer.Exit(2)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress, LiveJobs(store.location(), progress):
        task = progress.add_task("nodes", total=None)

        def on_start(nodes, to_run):
            progress.update(task, total=len(to_run))
            console.print(f"sweep [bold]{spec.name}[/]: {len(nodes)} nodes, {len(to_run)} to run -> {out_dir}")

        def on_finish(status):
            style = STATUS_STYLE.get(status.status, "")
            seconds = f" ({status.seconds:.0f}s)" if status.seconds else ""
            progress.console.print(f"  [{style}]{status.status:7}[/] {status.node.id}{seconds}")
            if status.error and status.status in ("failed", "partial"):
                progress.console.print(f"[red]{escape(status.error.strip().splitlines()[-1])}[/]")
            progress.advance(task)

        try:
            results = run_sweep_at(spec, out, on_start=on_start, on_finish=on_finish, connect=lambda: init_ray(address))
        except LockedError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
    counts: dict[str, int] = {}
    for row in results:
        counts[row.status] = counts.get(row.status, 0) + 1
    console.print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    _print_warnings(out_dir, [row.node for row in results if row.status == "done"])
    ran = any(row.status != "cached" for row in results)
    reported = True
    if make_report and (ran or not (out_dir / "report" / "index.html").exists()):
        reported = _write_report(out_dir)
        if reported:
            publish_report(out)
    elif make_report:
        console.print(f"report: {out_dir / 'report' / 'index.html'} (up to date: nothing ran)")
    failed = [row for row in results if row.status in ("failed", "skipped", "partial")]
    if failed:
        for row in failed:
            console.print(f"[red]{row.status}[/] {row.node.id}: {escape(((row.error or '').strip().splitlines() or [''])[-1])}")
        console.print("re-run the same command to retry only these nodes and their dependents")
    if failed or not reported:
        raise typer.Exit(1)


def _save_online_workspace(spec, out_dir: Path) -> None:
    """`emsweep wandb-workspace` at the start of an online run (`submit` runs `emsweep run` on the
    cluster, so it does too); a failure is a warning, never a failed sweep."""
    from emsweep.workspace import save_workspace

    try:
        console.print(f"W&B workspace: {save_workspace(spec, out_dir, online=True).where}")
    except Exception as err:  # W&B is a window on the sweep, never a dependency of it
        console.print(f"[yellow]warning[/] W&B workspace not saved: {type(err).__name__}: {escape(one_line(str(err)))}")


def _write_report(out_dir: Path) -> bool:
    """The report of what is done so far. A failure here leaves the nodes done (`emsweep report DIR`
    retries it) but fails the command: a sweep whose report step failed has not told its result."""
    from emsweep.report import build_report

    try:
        result = build_report(out_dir)
    except Exception as err:
        console.print(f"[red]error:[/] the report step failed after the sweep: {type(err).__name__}: "
                      f"{escape(one_line(str(err)))}; the nodes are done on disk, `emsweep report {out_dir}` retries it",
                      highlight=False)
        return False
    console.print(f"report: {result.html}")
    if result.wandb_warning:
        console.print(f"[yellow]warning[/] {result.wandb_warning}")
    return True


def _print_warnings(out_dir: Path, nodes) -> None:
    """Warnings recorded by nodes of this run (W&B not reachable, ...): the sweep went on."""
    from emsweep.store import Store

    store = Store(out_dir)
    warnings = [(node.id, w) for node in nodes for w in (store.record(node.stage, node.name, node.key) or {}).get("warnings", [])]
    for node_id, warning in warnings:
        console.print(f"[yellow]warning[/] {node_id}: {warning}")
    if warnings:
        console.print(f"[yellow]{len(warnings)} warning(s)[/]: the nodes finished; W&B runs that failed "
                      "can be logged later from the Parquet outputs (offline runs: `wandb sync DIR/wandb/offline-run-*`), "
                      "and a judge warning means those runs' scores need a different judge or scoring")


def status(out_dir: str = typer.Argument(..., help="A sweep's output dir: a path or an s3://... URI")) -> None:
    """Print the node table of a sweep (stage, key, status, time) and, while it runs, its jobs' progress."""
    from emsweep import progress
    from emsweep.spec import SpecError
    from emsweep.sweep.results import sweep_status

    try:
        found = sweep_status(out_dir)
    except (FileNotFoundError, SpecError, ValueError, OSError) as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False)
        raise typer.Exit(2)
    print_status(found.rows)
    if found.owner:
        console.print(f"run in progress: pid {found.owner.get('pid')} on {found.owner.get('host')}")
        now = time.time()
        for record in found.jobs:
            console.print(f"  {escape(progress.describe(record, now))}", highlight=False)


def report(
    out_dir: str = typer.Argument(..., help="A sweep's output dir: a path or an s3://... URI"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report dir (default: DIR/report)"),
    wandb: bool = typer.Option(True, "--wandb/--no-wandb", help="Also log a W&B summary run (mode from the spec)"),
    examples: int = typer.Option(10, help="Example answers to show"),
) -> None:
    """Write DIR/report/index.html (self-contained), figures (PNG, SVG) and tidy Parquet exports.
    For an output dir on an object store the done nodes are pulled into this machine's staging dir
    first, and the report is pushed to DIR/report there."""
    from emsweep.report import build_report
    from emsweep.spec import SpecError
    from emsweep.sweep.driver import publish_report
    from emsweep.sweep.results import local_copy

    try:
        local = local_copy(out_dir)
        result = build_report(local, out, log_to_wandb=wandb, example_count=examples)
    except (FileNotFoundError, SpecError, ValueError, OSError) as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False)
        raise typer.Exit(2)
    if out is None:
        publish_report(out_dir)
    console.print(f"report: {result.html}")
    if local != Path(out_dir) and out is None:
        console.print(f"pushed to {out_dir.split('?')[0]}/report", soft_wrap=True)
    console.print(f"figures: {', '.join(f.name for f in result.figures) or 'none'} (PNG and SVG in {result.html.parent / 'plots'})")
    console.print("exports: " + ", ".join(str(p) for p in result.exports.values()))
    if result.wandb_warning:
        console.print(f"[yellow]warning[/] {result.wandb_warning}")


def migrate(out_dir: Path = typer.Argument(..., help="A local output dir written before key schema 2")) -> None:
    """Carry an output dir written before keys were location-free (key schema 1) across, once, where
    the sweep ran: done nodes are renamed to their new keys, nothing is recomputed (sweep/migrate.py)."""
    from emsweep.spec import SpecError
    from emsweep.store import LockedError
    from emsweep.sweep.migrate import migrate as migrate_dir

    try:
        result = migrate_dir(out_dir)
    except (FileNotFoundError, SpecError, ValueError, OSError, LockedError) as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False)
        raise typer.Exit(2)
    if result.already:
        console.print(f"{out_dir}: already at key schema 2; nothing to do")
        return
    console.print(f"{out_dir}: {len(result.moved)} done node(s) carried to their new keys, "
                  f"{len(result.not_done)} planned node(s) not done (they run at the next `emsweep run`)")
    if result.left:
        console.print(f"left as they were ({len(result.left)}, outputs of earlier versions of the spec): "
                      + ", ".join(result.left[:5]) + (", ..." if len(result.left) > 5 else ""))


def wandb_workspace(
    out_dir: str = typer.Argument(..., help="A sweep's output dir: a path or an s3://... URI"),
    entity: Optional[str] = typer.Option(None, help="W&B entity (default: the spec's wandb.entity)"),
    project: Optional[str] = typer.Option(None, help="W&B project (default: the spec's wandb.project)"),
    online: Optional[bool] = typer.Option(None, "--online/--offline", help="Save it to W&B, or write its "
                                          "serialised form to DIR/wandb/workspace.json (default: the spec's wandb.mode)"),
) -> None:
    """A saved W&B workspace made for this sweep: its runs only, grouped by dataset; finetune
    curves, sampling and judging counters, and the EM rates with their spread over seeds."""
    from emsweep.spec import SpecError
    from emsweep.store import Store
    from emsweep.sweep.results import read_spec_snapshot
    from emsweep.workspace import describe, save_workspace

    try:
        spec = read_spec_snapshot(out_dir)
        saved = save_workspace(spec, Store.at(out_dir).root, entity, project, online)
    except (FileNotFoundError, SpecError, ValueError, OSError) as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False)
        raise typer.Exit(2)
    for line in describe(saved.workspace):
        console.print(f"  {escape(line)}", highlight=False)
    if saved.online:
        console.print(f"workspace saved: {saved.where}")
    else:
        console.print(f"workspace written (offline; no W&B server): {saved.where}. Once the runs are synced "
                      "(`wandb sync DIR/wandb/offline-run-*`), `emsweep wandb-workspace DIR --online --entity E` "
                      "saves it to the project.")


def analyze_files(
    files: list[Path] = typer.Argument(..., help="Judged-answer files (question_id, answer, aligned, coherent; CSV or "
                                               "Parquet), one run per file"),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir: analysis/ tables and report/ (page, exports)"),
    name: list[str] = typer.Option([], "--name", help="Run names, one per file in order (default: file stems)"),
    question_ids: Optional[str] = typer.Option(None, "--question-ids", help="Comma-separated question ids to keep"),
    baseline: Optional[str] = typer.Option(None, help="The run every other is compared with (default: the first)"),
    em_metric: str = typer.Option("betley2025", "--em-metric", help="analysis.em_metric: a preset name"),
    judge_error: Optional[Path] = typer.Option(
        None, "--judge-error", help="The agreement.json of `judge-eval agree --reference` for the judge that scored "
        "these files: its `counted` TPR and FPR correct the rates"),
) -> None:
    """Analyse answers judged elsewhere as a sweep's: the same metrics, comparisons, exports and HTML report."""
    import json

    from emsweep.misclassification import JudgeError
    from emsweep.report import build_file_report, file_results
    from emsweep.spec import AnalysisSpec

    try:
        analysis = AnalysisSpec(em_metric=em_metric)
        error = None
        if judge_error:
            counted = json.loads(judge_error.read_text())["verdict"]["counted"]
            error = JudgeError(counted["tpr"]["hits"], counted["tpr"]["n"], counted["fpr"]["hits"],
                               counted["fpr"]["n"], f"measured in {judge_error}")
        ids = tuple(i.strip() for i in question_ids.split(",") if i.strip()) if question_ids else None
        results = file_results(files, out, analysis, names=name or None, question_ids=ids, baseline=baseline,
                               judge_error=error)
    except (OSError, KeyError, ValueError) as err:
        console.print(f"[red]error:[/] {one_line(str(err))}", highlight=False)
        raise typer.Exit(2)
    built = build_file_report(results)
    from emsweep.analyze import overall_rows

    overall = overall_rows(results.tables["run_metrics"])
    table = Table(title=f"EM rates ({analysis.em_definition().rule()})")
    for column in ("run", "answers", "counted", "misaligned", "pooled rate", "question-mean rate"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for row in overall.itertuples():
        table.add_row(row.run_id, str(row.n_answers), str(row.n_counted), str(row.n_misaligned),
                      fmt_rate(row.pooled_misaligned_rate), fmt_rate(row.misaligned_rate))
    console.print(table)
    comparisons = results.tables["comparisons"]
    for row in comparisons[comparisons["compared"] == "run"].itertuples():
        console.print(f"{row.a} vs {row.b}: {row.mean_a:.3f} vs {row.mean_b:.3f} (difference {row.difference:+.3f}), "
                      f"{row.test} p = {row.p_value:.3g}")
    console.print(f"wrote {out}/analysis/ and the report {built.html}")


def check(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output dir to check for writing (default: none)"),
    cluster: bool = typer.Option(False, help="Skip the models' local checks (their paths are a cluster's)"),
) -> None:
    """Preflight only: validate every dataset row, question file, model, judge and the output dir."""
    import time

    started = time.time()
    spec = load_spec_or_exit(spec_path)
    preflight_or_exit(spec, out, local_models=not cluster)
    console.print(f"ok: {spec_path}: {len(spec.datasets)} datasets, {len(spec.eval.suites)} question suites, "
                  f"{len(spec.models)} models, judge {spec.judge.model} ({time.time() - started:.1f}s)")
