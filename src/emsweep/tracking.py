"""Weights & Biases logging: one W&B run per DAG node, grouped by sweep, typed by stage.

W&B is a window on the results, never a dependency of them: every call here is guarded,
and a failure is reported back as a warning string while the sweep goes on. Offline runs
land in `<output dir>/wandb/` and can be uploaded later with `wandb sync` (Segment: a run that
several processes logged syncs whole).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq

from emsweep.fileio import read_text_at, write_text_at
from emsweep.spec import WandbSpec


# W&B's limit on run ids is 128 characters; a margin for the suffixes it may add.
MAX_RUN_ID = 120


def run_id(sweep: str, node_id: str, key: str) -> str:
    """Stable per node and key: a resumed node continues its W&B run instead of starting a new
    one. A long id is shortened in the sweep and node names, never in `key` (what tells two
    versions of a node apart), with a digest of the full names so shortened ids stay distinct."""
    names, tail = _safe(f"{sweep}-{node_id}"), f"-{_safe(key)}"
    if len(names) + len(tail) <= MAX_RUN_ID:
        return names + tail
    digest = hashlib.sha256(names.encode()).hexdigest()[:8]
    return f"{names[:max(0, MAX_RUN_ID - len(tail) - len(digest) - 1)]}-{digest}{tail}"[-MAX_RUN_ID:]


def run_rate_key(metric: str, suite: str, condition: str) -> str:
    """A judge node's run logs its run's overall rates under these keys (one run = one seed, so a
    dashboard grouped by dataset shows the spread over seeds): `misaligned_rate/<suite>/<condition>`."""
    return f"{metric}/{suite}/{condition}"


def summary_rate_key(suite: str, condition: str, dataset: str) -> str:
    """The summary run's mean over seeds: `misaligned_rate/<suite>/<condition>/<dataset>`."""
    return f"misaligned_rate/{suite}/{condition}/{dataset}"


# A judge node's run logs these of its run's overall rates (run_rate_key).
RUN_RATE_METRICS = ("misaligned_rate", "coherent_rate")


def run_rate_scalars(rates, run_id: str) -> dict:
    """`rates` (analyze.overall_run_rates of one judge node): the final adapter's (or base model's)
    overall rates of run `run_id`, per suite and condition, under run_rate_key; NaN rates left out."""
    rows = rates[(rates["run_id"] == run_id) & rates["checkpoint_step"].isna()]
    return {run_rate_key(metric, row["suite"], row["condition"]): float(row[metric])
            for _, row in rows.iterrows() for metric in RUN_RATE_METRICS if row[metric] == row[metric]}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


def _table(frame):
    import wandb

    # Nullable columns hold pd.NA, which W&B cannot serialise; it takes None.
    frame = frame.astype(object).where(frame.notna(), None)
    # Columns such as seed are null for the base model and numbers otherwise.
    return wandb.Table(dataframe=frame, allow_mixed_types=True)


def use_own_wandb_service() -> None:
    """Make this process's runs go through a W&B service of its own.

    W&B puts its service's address in WANDB_SERVICE, and child processes inherit it: an `emsweep`
    started by a process that had used W&B (a notebook, pytest), and every Ray worker of that
    `emsweep`, would hand their runs to that foreign service. It resolves a relative run dir from
    its own working directory, may exit first (CI lost the summary run's file that way), and keeps
    a killed attempt's run id "in use". The token names the process that started the service
    (`3-<pid>-...`); one started by another process is dropped, so W&B starts one here."""
    token = os.environ.get("WANDB_SERVICE")
    if token is not None and token.split("-")[1:2] != [str(os.getpid())]:
        del os.environ["WANDB_SERVICE"]


class Segment:
    """One process's part of a W&B run. Several processes log one run: a finetune's rank 0 while it
    trains, then the node's commit; the summary while judging goes on, then each report; a resumed
    attempt. Offline, each `wandb.init` writes an offline dir of its own, and `wandb sync` uploads
    a run's dirs one after another in order of start time (wandb 0.31, `wandb sync --help`). A
    process cannot ask an offline run how far it got, so each would count its steps from 0, and the
    server keeps a run's steps increasing: a later dir's rows at steps the run already has would
    not land. So a segment's rows without a step of their own go past the steps of the segments
    before it: its last step is kept in `DIR/wandb/steps/<run id>` once it is flushed (finish), and
    the next segment counts on from there. A row with its own step (a finetune's training step)
    keeps it: a resumed attempt logs the same row again at the same step. Anything else (summary,
    log_artifact, ...) is the W&B run's own."""

    def __init__(self, run, steps_file: Path):
        self.run, self.steps_file, self.last = run, steps_file, None
        try:
            self.first = int(steps_file.read_text()) + 1
        except (OSError, ValueError):
            self.first = 0

    def log(self, values: dict, step: int | None = None) -> None:
        """At `step`, or at the next step past every step of this run so far."""
        if step is None:
            step = self.first if self.last is None else max(self.first, self.last + 1)
        self.run.log(values, step=step)
        self.last = step if self.last is None else max(self.last, step)

    def finish(self) -> None:
        self.run.finish()  # flushed: its steps are the run's for good
        if self.last is not None:  # a row logged again at its own, earlier step never moves it back
            write_text_at(str(self.steps_file), str(max(self.last, self.first - 1)))

    def __getattr__(self, name: str):
        return getattr(self.run, name)


def _start_run(spec: WandbSpec, out_dir: Path, sweep: str, *, job_type: str, name: str, run_key: str,
               config: dict) -> Segment:
    """A W&B run in DIR/wandb, grouped by sweep; a stable id, so logging again resumes the same run."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    use_own_wandb_service()
    out_dir = Path(out_dir).resolve()
    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=spec.project, entity=spec.entity, mode=spec.mode, dir=str(out_dir), group=sweep, job_type=job_type,
        name=name, id=run_key, resume="allow", config=config, reinit="create_new",
        settings=wandb.Settings(console="off", silent=True),
    )
    return Segment(run, out_dir / "wandb" / "steps" / run_key)


def _start_node_run(spec: WandbSpec, out_dir: Path, sweep: str, node_id: str, key: str, config: dict):
    """A node's run: the same id whichever process opens it (a live run while its job runs, its
    commit, a resumed attempt), so all of them land in one W&B run."""
    return _start_run(spec, out_dir, sweep, job_type=node_id.split("/", 1)[0], name=node_id.replace("/", ":"),
                      run_key=run_id(sweep, node_id, key), config={"node_key": key, **config})


def _start_summary_run(spec: WandbSpec, out_dir: Path, sweep: str, config: dict):
    """The sweep's summary run (one id per sweep: the live rates and every report land in it)."""
    return _start_run(spec, out_dir, sweep, job_type="summary", name=f"{sweep}:summary",
                      run_key=run_id(sweep, "summary", "report"), config=config)


def log_node(
    spec: WandbSpec,
    *,
    out_dir: Path,
    sweep: str,
    stage: str,
    node_id: str,
    key: str,
    config: dict,
    tables: dict[str, Path],
    step_metrics: Path | None = None,
    logged_steps: int = 0,
    live=None,
    scalars: dict | None = None,
) -> str | None:
    """Log a finished node; returns None on success or a warning message. `logged_steps`: the
    steps of `step_metrics` its live run already logged (LiveRun), which are not logged again.
    `live`: the node's run, opened while its job ran (LiveCounters), which the tables go into.
    `scalars`: numbers to log beside the tables (a judge node's run rates, run_rate_scalars)."""
    if spec.mode == "disabled":
        return None
    try:
        import wandb

        run = live or _start_node_run(spec, out_dir, sweep, node_id, key, config)
        try:
            last_step = None  # the last step this process logs; None: the tables go past the run's steps
            if step_metrics is not None:
                for row in pq.read_table(step_metrics).to_pylist():
                    if int(row["step"]) > logged_steps:
                        last_step = int(row["step"])
                        run.log({k: v for k, v in row.items() if k != "step"}, step=last_step)
            if scalars:
                run.log(scalars, step=last_step)
            artifact = wandb.Artifact(name=run_id(sweep, stage, node_id.split("/", 1)[-1]), type=stage)
            for name, path in tables.items():
                if spec.table_rows:  # at the last step logged here (W&B steps only go up within a run)
                    run.log({name: _table(pq.read_table(path).slice(0, spec.table_rows).to_pandas())}, step=last_step)
                artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)
        finally:
            run.finish()
    except Exception as err:  # W&B must never fail a sweep
        return f"W&B logging failed for {node_id}: {type(err).__name__}: {err}"
    return None


class StepLogger(Protocol):
    """What a finetune logs its steps through (LiveRun; NO_STEP_LOGGER where it logs none)."""

    def log(self, row: dict) -> None: ...

    def finish(self) -> None: ...


class _NoStepLogger:
    def log(self, row: dict) -> None:
        pass

    def finish(self) -> None:
        pass


NO_STEP_LOGGER: StepLogger = _NoStepLogger()


@dataclass(frozen=True)
class LiveRunSettings:
    """Where and as what a finetune's rank 0 logs its steps while it trains (LiveRun): the sweep's
    W&B settings and output dir, and the node's identity (its run id is made of sweep, node id
    and key; `config` is the node's config, shown in the run)."""

    wandb: WandbSpec
    out_dir: str
    sweep: str
    node_id: str
    key: str
    config: dict


# Live runs this process opened and has not finished, by run id (LiveRun).
_OPEN_LIVE_RUNS: dict = {}


class LiveRun:
    """A finetune's W&B run while it trains (rank 0): each step is logged as it ends, under the
    node's stable run id, so the tables logged when the node commits land in the same run.

    An attempt resumed from a checkpoint (a worker died) opens the run again and first logs the
    steps its checkpoint's history holds, then the ones it trains: W&B buffers what a run logs,
    and a killed attempt's buffer is lost, so only what a finished run flushed counts as logged.
    `marker` (in the Ray Train run's storage) records that: the last step of a finished run, so
    the node's commit does not log those steps again. Every call is guarded: W&B failing never
    fails the finetune (the commit then logs every step)."""

    def __init__(self, live: LiveRunSettings | None, marker: str):
        self.run, self.marker, self.last, self.key = None, str(marker), 0, None
        self.logged = self.logged_steps(self.marker)
        if live is None or live.wandb.mode == "disabled":
            return
        self.key = run_id(live.sweep, live.node_id, live.key)
        # Ray can start the next attempt's rank 0 in the process that hosted this run's rank 0
        # before (its actor torn down mid-run when a peer died): that run is still open here, and
        # W&B refuses a second one with its id ("run ID is in use"). Finish it first.
        stale = _OPEN_LIVE_RUNS.pop(self.key, None)
        if stale is not None:
            try:
                stale.finish()
            except Exception:
                pass
        try:
            self.run = _start_node_run(live.wandb, Path(live.out_dir), live.sweep, live.node_id, live.key, live.config)
            _OPEN_LIVE_RUNS[self.key] = self.run
        except Exception:
            self.run = None

    @staticmethod
    def logged_steps(marker: str) -> int:
        """`marker`: a local path or a store location (remote.py)."""
        try:
            return int(read_text_at(str(marker)) or 0)
        except (OSError, ValueError):
            return 0

    def log(self, row: dict) -> None:
        if self.run is None or row["step"] <= max(self.logged, self.last):
            return
        try:
            speed = {"tokens_per_s": row["tokens"] / row["step_seconds"]} if row.get("step_seconds") else {}
            self.run.log({**{k: v for k, v in row.items() if k != "step"}, **speed}, step=int(row["step"]))
            self.last = int(row["step"])
        except Exception:
            pass

    def finish(self) -> None:
        if self.run is not None:
            _OPEN_LIVE_RUNS.pop(self.key, None)
            try:
                self.run.finish()  # flushed: its steps are logged for good
                write_text_at(self.marker, str(max(self.logged, self.last)))
            except Exception:
                pass
            self.run = None


# A job's counters go to W&B at most this often (its progress record is rewritten every second).
COUNTERS_EVERY_S = 5.0


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")


class LiveCounters:
    """A sample or judge job's node runs, open while the job runs: the job's progress counters
    (progress.ProgressWriter's sink) are logged to each of them, at most every COUNTERS_EVERY_S
    and whenever a phase starts or ends. One engine serves all of a job's nodes, so they share the
    job's counters, named by phase: `answers/requests_done`, `answers/requests_total`,
    `answers/output_tokens_per_s`, `judging/judgments_done`, `judging/cache_hits`, ... A node's
    commit then logs its tables into the same run (`log_node(live=take(node_id))`), which it
    finishes. Every call is guarded: W&B failing never fails the job."""

    def __init__(self, spec: WandbSpec, out_dir: Path, sweep: str, stage: str, nodes: list,
                 labels: dict[str, dict] | None = None):
        """`labels`: per node id, config entries its run shows beside the node's config (the
        run's dataset, seed and model, which a judge node's own config lacks)."""
        self.spec, self.out_dir, self.sweep, self.stage = spec, Path(out_dir), sweep, stage
        self.nodes = {node.id: node for node in nodes} if spec.mode != "disabled" else {}
        self.labels = labels or {}
        self.runs: dict = {}
        self._logged_at, self._last = 0.0, (None, None)

    def _open(self) -> None:
        job = sorted(self.nodes)
        for node_id, node in self.nodes.items():
            try:
                self.runs[node_id] = _start_node_run(self.spec, self.out_dir, self.sweep, node_id, node.key,
                                                     {"job_nodes": job, **node.config, **self.labels.get(node_id, {})})
            except Exception:
                break  # W&B unreachable: the other nodes would each wait out the same init timeout
        self.nodes = {}  # opened once, whatever happened

    def log(self, record: dict, metrics: dict) -> None:
        phase, done, total = record.get("phase") or self.stage, record.get("done", 0), record.get("total")
        now = time.time()
        finished = total is not None and done >= total and (phase, done) != self._last
        if phase == self._last[0] and not finished and now - self._logged_at < COUNTERS_EVERY_S:
            return
        if self.nodes:
            self._open()
        prefix, unit = _metric_name(phase), _metric_name(record.get("unit") or "items")
        values = {f"{prefix}/{unit}_done": done, **({f"{prefix}/{unit}_total": total} if total is not None else {}),
                  **{f"{prefix}/{_metric_name(name)}": value for name, value in metrics.items()},
                  "elapsed_s": now - record.get("started_at", now)}
        for run in self.runs.values():
            try:
                run.log(values)
                run.summary["phase"] = phase
            except Exception:
                pass
        self._logged_at, self._last = now, (phase, done)

    def take(self, node_id: str):
        """The node's open run, for its commit (None if it was never opened)."""
        return self.runs.pop(node_id, None)

    def close(self) -> None:
        """Finish the runs no commit took (the job failed)."""
        for run in self.runs.values():
            try:
                run.finish()
            except Exception:
                pass
        self.runs, self.nodes = {}, {}


class LiveSummary:
    """The sweep's summary run while `emsweep run` drives it: after each judge node, the per-run
    misaligned rates judged so far (a table) and, per suite, condition and dataset, their mean
    over the final adapters (`misaligned_rate/<suite>/<condition>/<dataset>`), so a dashboard
    follows the headline as judging goes on. The report later logs its tables to the same run id.
    Guarded: returns a warning string once, never raises."""

    def __init__(self, spec: WandbSpec, out_dir: Path, sweep: str, config: dict):
        self.spec, self.out_dir, self.sweep, self.config = spec, Path(out_dir), sweep, config
        self.run, self.failed = None, spec.mode == "disabled"

    def log(self, run_rates, judged_nodes: int) -> str | None:
        if self.failed:
            return None
        try:
            if self.run is None:
                self.run = _start_summary_run(self.spec, self.out_dir, self.sweep, self.config)
            final = run_rates[run_rates["checkpoint_step"].isna()]
            means = final.groupby(["suite", "condition", "dataset"])["misaligned_rate"].mean()
            self.run.log({"judged_nodes": judged_nodes, "judged_runs": int(final["run_id"].nunique()),
                          **{summary_rate_key(suite, condition, dataset): float(rate)
                             for (suite, condition, dataset), rate in means.dropna().items()},
                          "misaligned_rate_so_far": _table(run_rates.reset_index(drop=True))})
        except Exception as err:  # W&B must never fail a sweep
            self.failed = True
            return f"W&B live summary failed: {type(err).__name__}: {err}"
        return None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None


def log_summary(spec: WandbSpec, *, out_dir: Path, sweep: str, config: dict, tables: dict, images: dict[str, Path],
                files: list[Path], scalars: dict | None = None) -> str | None:
    """One summary run per sweep (job type "summary"): the report's tables, figures, files and
    `scalars` (logged beside them, e.g. the judge panel's hit rates). Its id is stable, so a new
    report updates the same run. Returns None or a warning."""
    if spec.mode == "disabled":
        return None
    try:
        import wandb

        run = _start_summary_run(spec, out_dir, sweep, config)
        try:
            run.log({**{name: _table(frame) for name, frame in tables.items()},
                     **{name: wandb.Image(str(path)) for name, path in images.items()}, **(scalars or {})})
            artifact = wandb.Artifact(name=run_id(sweep, "report", "files"), type="report")
            for path in files:
                artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)
        finally:
            run.finish()
    except Exception as err:  # W&B must never fail a report
        return f"W&B summary logging failed: {type(err).__name__}: {err}"
    return None
