"""A small DAG executor on plain Ray tasks, with the store deciding what is already done.

What runs: a node runs when it has no completion record, or when any node it depends on
runs in this invocation (its inputs are about to change). Everything else is reused.
Nodes that share a `group` run in one Ray task (one vLLM engine serves them all); a
group starts once all its nodes' dependencies have finished. A failed node does not stop
independent nodes; its dependents are skipped and the run ends with a summary. A node that
accepts partial inputs (`partial_ok`: the analysis, which is still worth reading when a seed
failed) runs on the inputs that are done; it is then `partial`, which does not count as done,
so the next run redoes it once the missing inputs are there.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable

from emsweep import progress
from emsweep.lease import LeaseLost
from emsweep.redact import redact
from emsweep.store import Store, is_partial


@dataclass(frozen=True)
class Node:
    stage: str
    name: str
    key: str
    config: dict = field(default_factory=dict, hash=False, compare=False)
    deps: tuple[str, ...] = ()
    # Nodes with the same group execute together in one task (e.g. one engine per base model).
    group: str | None = None
    # Runs when some (not all) of its deps failed, on the ones that are done (see the docstring).
    partial_ok: bool = field(default=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.name}"


@dataclass
class NodeStatus:
    node: Node
    status: str  # done | cached | partial | failed | skipped | missing
    seconds: float | None = None
    error: str | None = None
    finished_at: float | None = None


def nodes_to_run(nodes: list[Node], store: Store) -> list[Node]:
    """Missing nodes and, transitively, everything downstream of them (nodes are topo-sorted)."""
    running: set[str] = set()
    for node in nodes:
        if not store.is_done(node.stage, node.name, node.key) or any(dep in running for dep in node.deps):
            running.add(node.id)
    return [node for node in nodes if node.id in running]


def status_table(nodes: list[Node], store) -> list[NodeStatus]:
    """Each node's status from `store`'s records: a Store, or anything with its `record(stage,
    name, key)` and `failure(node_id)` (remote.RemoteRecords for an output dir on an object store)."""
    rows = []
    for node in nodes:
        record = store.record(node.stage, node.name, node.key)
        if record is not None and is_partial(record):
            rows.append(NodeStatus(node, "partial", record.get("seconds"), error=partial_error(record["missing_inputs"]),
                                   finished_at=record.get("finished_at")))
            continue
        if record is not None:
            rows.append(NodeStatus(node, "done", record.get("seconds"), finished_at=record.get("finished_at")))
            continue
        failure = store.failure(node.id)
        if failure is not None:
            rows.append(NodeStatus(node, failure.get("status", "failed"), error=failure["error"],
                                   finished_at=failure.get("time")))
        else:
            rows.append(NodeStatus(node, "missing"))
    return rows


@dataclass
class Watch:
    """What the executor does while it waits (sweep/driver.py fills it in for a sweep on Ray).

    A job is submitted, then started by Ray once its resources are free. If no job of the sweep
    has been running for `report_s` (every submitted one still waits), `on_stall` gets a message
    saying what each waits for and what holds the cluster (`describe`); after `timeout_s` the
    waiting jobs fail with that message, so a sweep never hangs on resources nobody will free."""

    started: Callable[[list[Node]], bool] = lambda job: True
    describe: Callable[[list[list[Node]]], str] = lambda waiting: ""
    on_stall: Callable[[str], None] = lambda message: None
    # Called after a job failed, with the jobs still running: release what the failed one held.
    after_failure: Callable[[list[Node], list[list[Node]]], None] = lambda failed, running: None
    # Called at every poll that found no job finished, with the jobs running (or waiting to).
    on_poll: Callable[[list[list[Node]]], None] = lambda running: None
    report_s: float = 60.0
    timeout_s: float = 600.0
    # Whether the cluster's autoscaler is bringing nodes up: while it is, waiting jobs are not
    # stalled (a GPU node's boot and setup can take longer than timeout_s), for at most
    # scale_up_timeout_s in a row, so a launch that never succeeds still fails the jobs in the end.
    scaling_up: Callable[[], bool] = lambda: False
    scale_up_timeout_s: float = 3600.0
    # Who took the output dir's lease over (lease._Renewer.lost), or None: once it says, the
    # executor cancels every job, fails their nodes and raises lease.LeaseLost.
    lease_lost: Callable[[], str | None] = lambda: None


def execute(
    nodes: list[Node],
    store: Store,
    submit: Callable[[str, list[Node]], object],
    on_finish: Callable[[NodeStatus], None] = lambda status: None,
    watch: Watch | None = None,
    max_running: Callable[[str], int | None] = lambda stage: None,
    job_of: Callable[[Node], str] = lambda node: node.group or node.id,
) -> list[NodeStatus]:
    """Run what is not done.

    `submit(stage, nodes)` starts a job and returns a Ray ObjectRef of its result: per node id,
    None on success or an error message. `max_running(stage)`: how many jobs of a stage may be in
    flight at once (None: no limit); the rest wait here, not in Ray. `job_of(node)`: the job a
    node runs in (by default its group's, or its own). Ctrl-C (or any exception here)
    cancels every running job before it propagates.
    """
    import ray

    pending = nodes_to_run(nodes, store)
    for node in pending:
        # Invalidate first: a crash mid-run must not leave a stale output counted as done.
        store.invalidate(node.stage, node.name, node.key)
    results: dict[str, NodeStatus] = {
        node.id: NodeStatus(node, "cached") for node in nodes if node not in pending
    }
    jobs: dict[str, list[Node]] = {}
    for node in pending:
        jobs.setdefault(job_of(node), []).append(node)
    # Deepest first: of the jobs that can start, one that carries a run further (its sampling,
    # its judging) is submitted before one that starts new work (the next finetune), so runs
    # finish early and their resources are asked for first.
    depth: dict[str, int] = {}
    for node in nodes:  # in dependency order
        depth[node.id] = 1 + max((depth.get(dep, 0) for dep in node.deps), default=0)
    jobs = dict(sorted(jobs.items(), key=lambda item: -max(depth[node.id] for node in item[1])))

    running: dict[object, tuple[list[Node], float]] = {}

    def resolved(node_id: str) -> bool:
        return node_id in results

    def finish(status: NodeStatus) -> None:
        if status.error:  # tracebacks can quote a URI's credentials or an HTTP body's headers
            status = dataclasses.replace(status, error=redact(status.error))
        results[status.node.id] = status
        if status.status in ("failed", "skipped"):
            store.record_failure(status.node.id, status.error or "", status=status.status)
        progress.clear(store.location(), [status.node.id])  # its job is over
        on_finish(status)

    try:
        _run_jobs(jobs, running, results, submit, finish, resolved, watch or Watch(), max_running)
    except BaseException:  # KeyboardInterrupt (Ctrl-C), SystemExit, or a bug: stop what runs
        for ref in running:
            _cancel(ref)
        raise
    return [results[node.id] for node in nodes]


WAIT_POLL_S = 1.0


def _run_jobs(jobs, running, results, submit, finish, resolved, watch: Watch, max_running) -> None:
    import ray

    last_activity, reported = time.time(), False
    scaling_since = None  # when the autoscaler began the scale-up the sweep has been waiting on
    while jobs or running:
        progressed = True
        while progressed:  # skipping a job resolves its nodes, which may unblock jobs seen earlier
            progressed = False
            for job_id in list(jobs):
                job_nodes = jobs[job_id]
                if not all(resolved(dep) for node in job_nodes for dep in node.deps):
                    continue
                stage, limit = job_nodes[0].stage, max_running(job_nodes[0].stage)
                if limit is not None and sum(job[0].stage == stage for job, _ in running.values()) >= limit:
                    continue  # submitted once a job of its stage finishes
                del jobs[job_id]
                progressed = True
                runnable = []
                for node in job_nodes:
                    bad = _not_done(node, results)
                    if bad and node.partial_ok and len(bad) < len(node.deps):
                        runnable.append(node)  # on the inputs that are done; it reads which from the store
                    elif bad:
                        finish(NodeStatus(node, "skipped", error=f"upstream not done: {', '.join(bad)}"))
                    else:
                        runnable.append(node)
                if runnable:
                    running[submit(runnable[0].stage, runnable)] = (runnable, time.time())
                    last_activity = time.time()
        if not running:
            if jobs:  # cannot happen with a valid DAG; guard against a dependency cycle
                raise RuntimeError(f"unschedulable nodes: {sorted(jobs)}")
            break
        # A short timeout keeps the main thread in Python, where Ctrl-C (KeyboardInterrupt) lands;
        # a blocking ray.wait can sit in C++ and leave SIGINT undelivered.
        ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_POLL_S)
        if (lost := watch.lease_lost()) is not None:
            # Another run owns the output dir now: nothing more of ours may be written there, not
            # even failure records. execute() cancels the running jobs on the way out.
            raise LeaseLost(f"{lost}; this run stopped and cancelled its jobs")
        if not ready:
            now = time.time()
            watch.on_poll([job for job, _ in running.values()])
            if any(watch.started(job) for job, _ in running.values()):
                last_activity, reported, scaling_since = now, False, None
            elif now - last_activity > watch.report_s and watch.scaling_up() and (
                    now - (scaling_since := scaling_since or now) < watch.scale_up_timeout_s):
                last_activity = now  # nodes are coming up for the waiting jobs: not a stall
            elif now - last_activity > watch.report_s:
                waiting = [job for job, _ in running.values()]
                message = (f"no job of this sweep has started for {now - last_activity:.0f} s; "
                           f"{watch.describe(waiting)}")
                if not reported:
                    watch.on_stall(message)
                    reported = True
                if now - last_activity > watch.timeout_s:
                    for ref, (job, _) in list(running.items()):
                        _cancel(ref)
                        del running[ref]
                        for node in job:
                            finish(NodeStatus(node, "failed", now - last_activity, error=f"stalled: {message}",
                                              finished_at=now))
                        # A cancelled finetune's Ray Train run can leave its (pending) workers' group.
                        watch.after_failure(job, [other for other, _ in running.values()])
                    last_activity, reported = now, False
            continue
        last_activity, reported = time.time(), False
        job_nodes, started = running.pop(ready[0])
        try:
            errors = ray.get(ready[0])
        except Exception as err:  # the task itself died (OOM, killed worker): every node failed
            errors = {node.id: f"{type(err).__name__}: {err}" for node in job_nodes}
        elapsed = time.time() - started
        any_failed = False
        for node in job_nodes:
            error = errors.get(node.id, "job returned no result for this node")
            missing = _not_done(node, results)
            if error is None and missing:
                finish(NodeStatus(node, "partial", elapsed, error=partial_error(missing), finished_at=time.time()))
            elif error is None:
                finish(NodeStatus(node, "done", elapsed, finished_at=time.time()))
            else:
                any_failed = True
                finish(NodeStatus(node, "failed", elapsed, error=error, finished_at=time.time()))
        if any_failed:
            watch.after_failure(job_nodes, [job for job, _ in running.values()])


def _cancel(ref) -> None:
    """Stop a job: its task's process is killed; a job on an actor (a pipelined schedule's engine
    host, which the executor's caller kills) is cancelled in place, as Ray allows for those."""
    import ray

    try:
        ray.cancel(ref, force=True, recursive=True)
    except ValueError:  # "force=True is not supported for actor tasks"
        ray.cancel(ref, recursive=True)


def _not_done(node: Node, results: dict[str, NodeStatus]) -> list[str]:
    """The node's inputs that did not finish (failed or skipped) in this run."""
    return [dep for dep in node.deps if results[dep].status not in ("done", "cached")]


def partial_error(missing: list[str]) -> str:
    return f"ran without {len(missing)} input(s) that are not done: {', '.join(missing)}"


class NodeFailures(Exception):
    """Raised by a job body after committing some of its nodes: these failed, the rest are done."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{node_id}: {error}" for node_id, error in errors.items()))
        self.errors = errors


def run_guarded(nodes: Iterable[Node], work: Callable[[], None]) -> dict[str, str | None]:
    """Run a job body; any exception becomes the error of every node in the job."""
    nodes = list(nodes)
    try:
        work()
    except NodeFailures as err:
        return {node.id: err.errors.get(node.id) for node in nodes}
    except Exception:
        message = traceback.format_exc(limit=20)
        return {node.id: message for node in nodes}
    return {node.id: None for node in nodes}
