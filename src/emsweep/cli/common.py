"""What every command shares: the console, spec loading and preflight that exit with one line, Ray's start, and signal handling."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


# Wide enough for node names when output goes to a file or CI log (rich defaults to 80 there).
console = Console(width=None if os.isatty(1) else 160)

STATUS_STYLE = {"done": "green", "cached": "green", "partial": "yellow", "failed": "red", "skipped": "yellow",
                "missing": "dim", "running": "cyan"}


def init_ray(address: Optional[str]) -> None:
    import ray

    from emsweep.sweep.driver import worker_env

    if ray.is_initialized():  # `doctor` connects before its smoke sweep does
        return
    if address is None:  # a laptop: no hub, models are embedded or cached (a cluster loads hub ids)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        # No address: a Ray of our own. A bare ray.init() would join whatever cluster this machine
        # last recorded in /tmp/ray/ray_current_cluster (a `ray start`, or a dead one that crashed,
        # where it hangs). $RAY_ADDRESS, as a Ray job's driver has, still chooses the cluster.
        address=address or os.environ.get("RAY_ADDRESS") or "local",
        runtime_env={"env_vars": worker_env()},
        logging_level="WARNING",
        log_to_driver=os.environ.get("EMSWEEP_WORKER_LOGS", "0") == "1",
        include_dashboard=False if address is None else None,
    )
    if SIGNALS_HANDLED:  # a run (not `doctor`): keep unwinding on SIGTERM after Ray's own handler
        install_signal_handlers()


def print_status(rows) -> None:
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


def load_spec_or_exit(spec_path: Path, **overrides: dict):
    """The spec, validated; `overrides` (section -> field -> value, None = keep) go in before validation."""
    from emsweep.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)  # one line each, however long (a path)
        raise typer.Exit(2)


def exit_on_problems(problems: list[str]) -> None:
    """Print every problem, one line each, and exit 2 if there is any."""
    for problem in problems:
        console.print(f"[red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(2)


def preflight_or_exit(spec, out=None, *, local_models: bool = True, missing_ok: bool = False) -> None:
    """Check every input of the spec (checks.preflight) before anything starts; exit 2 listing all."""
    from emsweep.checks import preflight

    exit_on_problems(preflight(spec, out, local_models=local_models, missing_ok=missing_ok))


def check_scoring_or_exit(spec, missing_ok: bool = False) -> None:
    """Refuse scoring that cannot produce 0-100 scores (checks.py) before anything starts."""
    from emsweep.checks import scoring_problems

    exit_on_problems(scoring_problems(spec, missing_ok=missing_ok))


# The signal that interrupted this run (the exit code is 128 + it), set by _on_signal; and
# whether this process handles signals that way (a run does, from the main thread).
RECEIVED: list[int] = []
SIGNALS_HANDLED: list[bool] = []


def _on_signal(signum, frame):
    """The first Ctrl-C (or SIGTERM: `ray job stop`, a deleted pod, a preempted node) unwinds:
    jobs cancelled, lock and lease released, Ray stopped. A second one exits without unwinding,
    as soon as Python runs its handler (Ray defers SIGINT while the main thread is in its calls)."""
    import signal

    RECEIVED.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: os._exit(128 + number))
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Also called after ray.init, which installs a SIGTERM handler of its own (it logs a stack
    and exits 1, skipping the unwinding)."""
    import signal
    import threading

    if not RECEIVED and threading.current_thread() is threading.main_thread():
        SIGNALS_HANDLED.append(True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


def one_line(text: str) -> str:
    """A multi-line message (a pyarrow or Ray error) joined into one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:3]) if lines else "unknown error"


def fmt_rate(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"
