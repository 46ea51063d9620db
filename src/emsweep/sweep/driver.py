"""The sweep's driver: runs the plan's jobs on Ray (run_sweep, for an output dir wherever the store
puts it), the pipelined schedule's engine hosts, the clean-up after failed finetunes, and the
live rates of the W&B summary run."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from emsweep import analyze, tracking
from emsweep.dag import Node, NodeStatus, Watch, execute, nodes_to_run
from emsweep.engine import node_cpus
from emsweep.fileio import DONE
from emsweep.remote import SHARED_ENTRIES, staging_dir
from emsweep.spec import SweepSpec
from emsweep.store import Store
from emsweep.sweep.jobs import run_job
from emsweep.sweep.manifest import MANIFEST, changed_inputs, read_manifest, write_manifest
from emsweep.sweep.plan import ENGINE_STAGES, STAGES, plan
from emsweep.sweep.resources import autoscaler_scaling_up, describe_cluster_wait, finetune_slots, job_task_options
from emsweep.sweep.results import write_spec_snapshot


def worker_env() -> dict[str, str]:
    """Environment emsweep gives Ray workers (the `runtime_env` of its `ray.init`): the driver's
    HF_HUB_OFFLINE where it is set (the CLI sets it for local runs only: a laptop has no hub, a
    cluster loads hub ids), quiet tokenizers; no secrets are added here.

    Inside a Ray job (`emsweep submit`), variables the job's own runtime_env sets (`-e NAME=...`)
    are left out: the job passes them to every worker already, and Ray refuses a driver
    runtime_env that repeats one of the job's keys ("Failed to merge the Job's runtime env").

    Ray Train's controller checks on its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    default) and takes a few checks to wind a finished run down: 4.7 s from the workers' end to
    `fit()` returning, measured on 2 CPUs, 0.8 s at 0.2 s. Every finetune paid that; at 0.5 s a
    check is one call per worker twice a second, nothing beside a training step."""
    env = {"TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    job_env = _job_env_vars()
    return {name: value for name, value in env.items() if name not in job_env}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (Ray passes the job's config to its
    driver as JSON in RAY_JOB_CONFIG_JSON_ENV_VAR); empty outside a job."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


class EngineHost:
    """A pipelined schedule's long-lived engine process (a Ray actor; see EngineHosts)."""

    def run(self, *args) -> dict[str, str | None]:
        return run_job(*args)


class EngineHosts:
    """The pipelined schedule's engines: one long-lived Ray actor per engine group (a model's
    sampling engine or replica, the judge) that runs the group's jobs, one run each, one at a
    time in one process, so the engine the first job starts serves the next (sample.py and
    judge/local.py keep it) and takes each new run's adapters as they arrive.

    A host goes when its group has no job left; after a job of it failed, if no other job is
    queued on it (its engine may be broken: the next job starts a fresh one); and whenever it is
    idle while another job waits for resources, since an idle engine holding the GPUs (or a CPU
    machine's cores) that a finetune needs would otherwise wait forever for that very finetune."""

    def __init__(self, pending: list[Node]):
        from collections import Counter

        self.left = Counter(node.group for node in pending if node.stage in ENGINE_STAGES)
        self.busy: Counter = Counter()
        self.actors: dict[str, object] = {}

    def submit(self, group: str, options: dict, args: tuple):
        import ray

        if group not in self.actors:
            host = ray.remote(max_restarts=0)(EngineHost)
            self.actors[group] = host.options(**options, name=None).remote()
        self.busy[group] += 1
        return self.actors[group].run.remote(*args)

    def finished(self, status) -> None:
        node = status.node
        if node.stage not in ENGINE_STAGES:
            return
        self.left[node.group] -= 1
        if status.status != "skipped":  # a skipped node was never submitted
            self.busy[node.group] -= 1
        # After a failure a fresh engine serves the next job, unless jobs already wait on this one.
        if self.left[node.group] <= 0 or status.status == "failed" and self.busy[node.group] == 0:
            self.release(node.group)

    def release_idle(self, running: list[list[Node]], started) -> None:
        """Release idle hosts if a job waits for resources (not started, and not merely queued
        behind another job on its host)."""
        waiting = [job for job in running if not started(job)
                   and (job[0].stage not in ENGINE_STAGES or self.busy[job[0].group] == 1)]
        if waiting:
            for group in [group for group in self.actors if self.busy[group] == 0]:
                self.release(group)

    def release(self, group: str) -> None:
        import ray

        actor = self.actors.pop(group, None)
        if actor is not None:
            ray.kill(actor)  # an engine's memory goes with its process

    def close(self) -> None:
        for group in list(self.actors):
            self.release(group)


def release_leaked_placement_groups(failed: list[Node], running: list[list[Node]]) -> int:
    """After a finetune job failed: remove this driver's placement groups once no finetune runs.

    Ray Train reserves a finetune's workers as a placement group. When the job dies abnormally
    (its workers OOM-killed past `max_failures`, the task killed) the group can outlive it: it is
    owned by the driver, so Ray frees it only when the driver exits, and the sweep's remaining jobs
    wait forever for the CPUs it holds. With no finetune running, every live group of this
    driver is such a leftover (sampling and judging reserve none)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if failed[0].stage != "finetune" or any(job[0].stage == "finetune" for job in running):
        return 0
    job_id = ray.get_runtime_context().get_job_id()
    # A failed finetune's Ray Train controller outlives its task by a moment (Ray kills an actor
    # once it learns its owner died). One still alive when its group is removed asks for a new
    # group and takes the CPUs it frees, so wait for them to exit first.
    alive = _wait_for_train_controllers_to_exit(job_id, CONTROLLER_EXIT_TIMEOUT_S)
    if alive:
        print(f"warning: {alive} Ray Train controller(s) of failed finetunes still alive after "
              f"{CONTROLLER_EXIT_TIMEOUT_S:.0f} s; removing their placement groups anyway", flush=True)
    removed = 0
    for pg_id, entry in ray.util.placement_group_table().items():
        # A placement group id ends with the id of the job (driver) that created it.
        if pg_id.endswith(job_id) and entry["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    if removed:
        print(f"released {removed} placement group(s) left by failed finetunes", flush=True)
    return removed


CONTROLLER_EXIT_TIMEOUT_S = 30.0


def _wait_for_train_controllers_to_exit(job_id: str, timeout_s: float) -> int:
    """Wait until this driver has no live Ray Train controller; return how many still live.

    A controller counts as live until its worker process has exited, not merely until its actor
    is marked DEAD: the GCS marks an actor whose owner died DEAD first and kills its process
    after, and in between the process still runs (seen in CI: it asked for a new group)."""
    deadline = time.time() + timeout_s
    while True:
        alive = _live_train_controllers(job_id)
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.5)


def _live_train_controllers(job_id: str) -> int:
    # Read from the GCS directly: the state API needs the dashboard, and ray._private.state.actors()
    # drops the worker id that links an actor to its process.
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData, WorkerTableData

    tables = state._connect_and_get_accessor()
    live_workers = {worker.worker_address.worker_id for worker in map(WorkerTableData.FromString,
                                                                       tables.get_worker_table())
                    if worker.is_alive}
    controllers = [actor for actor in map(ActorTableData.FromString, tables.get_actor_table(None, None))
                   if actor.job_id.hex() == job_id and actor.class_name == "TrainController"]
    return sum(1 for actor in controllers
               if actor.state != ActorTableData.DEAD or actor.address.worker_id in live_workers)


def run_sweep(spec: SweepSpec, out: Path | Store, on_start=None, on_finish=None, connect=None,
              until: str | None = None, on_stall=None) -> list:
    """Execute a sweep on the Ray cluster this process is connected to, into `out` (a local dir,
    or a Store: Store.at names an object store's).

    `connect()` (e.g. `ray.init`) is called before the first job only, so resuming a finished
    sweep never starts Ray (seconds instead of a cluster start). `until` (a stage) stops the
    sweep after that stage: only the nodes of it and the stages before it run. A run whose lease
    is taken over stops: lease.LeaseLost, its jobs cancelled."""
    import ray

    store = out if isinstance(out, Store) else Store(Path(out))
    # Jobs run in other processes and working directories: they get the dir as an absolute path.
    store = dataclasses.replace(store, root=store.root.resolve())
    out_dir = store.root
    nodes = plan(spec)
    if until is not None:
        nodes = [node for node in nodes if STAGES.index(node.stage) <= STAGES.index(until)]
    remote = ray.remote(max_retries=0)(run_job)
    # A fresh worker process per engine job: vLLM does not give all memory back in-process,
    # and the next engine (the judge after the sampler) needs it.
    remote_engine = ray.remote(max_retries=0, max_calls=1)(run_job)
    pipelined = spec.executor.schedule == "pipelined"
    with store.lock() as held:
        store.pull()  # what is done on an object store is reused here
        store.clean_tmp()
        previous = check_key_schema(out_dir)  # before anything of this run is written there
        write_spec_snapshot(spec, out_dir)
        store.publish("spec.json")  # `emsweep status` reads it while the sweep runs
        store.publish_unpublished()
        pending = nodes_to_run(nodes, store)
        # The manifest (sweep/manifest.py), before any job and as each node finishes: what readers
        # of this output dir take the nodes from, anywhere it is copied.
        statuses = {node.id: NodeStatus(node, "done") for node in nodes if node not in pending}
        written = [0.0]

        def record_manifest(every_s: float = 0.0) -> None:
            # The whole index is rewritten: on a sweep of thousands of nodes, at most every
            # MANIFEST_EVERY_S as nodes finish, and once more at the end. Its statuses may lag the
            # nodes' records meanwhile, never lead them (readers trust the records for status).
            if time.time() - written[0] < every_s:
                return
            write_manifest(out_dir, spec.name, nodes, statuses)
            store.publish(MANIFEST)
            written[0] = time.time()

        record_manifest()
        for node_id, reason in changed_inputs(previous, nodes).items():
            print(f"  changed {node_id}: {reason}", flush=True)
        if on_start is not None:
            on_start(nodes, pending)
        hosts = EngineHosts(pending if pipelined else [])
        spec_json = spec.model_dump_json()
        cluster: dict = {}

        def connected() -> dict:
            if not cluster:
                if connect is not None:
                    connect()
                cluster["nodes_ref"] = ray.put(nodes)
                # Engines on a CPU-only cluster take one node's cores.
                cluster["cpus"] = node_cpus()
                cluster["finetune_slots"] = finetune_slots(spec)
                cluster["node"] = ray.get_runtime_context().get_node_id()
            return cluster

        def submit(stage: str, job: list[Node]):
            connected()
            options = job_task_options(spec, job, cluster["cpus"])
            args = (spec_json, str(out_dir), cluster["nodes_ref"], stage, job, store.mirror, cluster["node"])
            if pipelined and stage in ENGINE_STAGES:
                return hosts.submit(job[0].group, options, args)
            function = remote_engine if stage in ENGINE_STAGES else remote
            return function.options(**options, name=f"{stage}:{job[0].name}").remote(*args)

        seen_started: set[str] = set()

        def started(job: list[Node]) -> bool:
            if job[0].id not in seen_started and store.job_started(job[0].id):
                seen_started.add(job[0].id)
            return job[0].id in seen_started

        watch = Watch(
            started=started,
            describe=lambda waiting: describe_cluster_wait(spec, waiting, cluster.get("cpus", 1)),
            on_stall=on_stall or (lambda message: print(f"warning: {message}", flush=True)),
            after_failure=release_leaked_placement_groups,
            report_s=spec.executor.stall_report_s, timeout_s=spec.executor.stall_timeout_s,
            scaling_up=autoscaler_scaling_up, scale_up_timeout_s=spec.executor.scale_up_timeout_s,
            lease_lost=held.lost,
            on_poll=lambda running: hosts.release_idle(running, started),
        )
        summary = LiveRates(spec, store, nodes)

        def finished(status) -> None:
            node = status.node
            statuses[node.id] = status
            record_manifest(MANIFEST_EVERY_S)
            if status.status == "done":
                # Committed by the job wherever it ran; here, the summary and the report read it.
                store.fetch(node.stage, node.name, node.key)
            hosts.finished(status)
            if node.stage == "judge" and status.status == "done":
                summary.update()
            if on_finish is not None:
                on_finish(status)

        # Pipelined: a run's engine jobs are its own, dealt to its group's host.
        job_of = (lambda node: node.id if node.stage in ENGINE_STAGES else node.group or node.id) if pipelined \
            else (lambda node: node.group or node.id)
        try:
            return execute(nodes, store, submit, finished, watch, job_of=job_of,
                           max_running=lambda stage: connected()["finetune_slots"] if stage == "finetune" else None)
        finally:
            if watch.lease_lost() is None:  # a run whose lease was taken writes nothing more there
                record_manifest()
                for entry in SHARED_ENTRIES:
                    store.publish(entry)
            hosts.close()
            summary.finish()


MANIFEST_EVERY_S = 5.0


def check_key_schema(out_dir: Path) -> dict | None:
    """The output dir's manifest (None for a new dir); refuses one written with another key
    schema, before anything runs: its nodes would all look missing and run again."""
    if (out_dir / MANIFEST).exists() or any((out_dir / "nodes").glob(f"*/*/{DONE}")):
        return read_manifest(out_dir)
    return None


RATE_COLUMNS = ["run_id", "dataset", "seed", "checkpoint_step", "suite", "condition", "n_counted", "n_misaligned",
                "misaligned_rate", "pooled_misaligned_rate", "n_questions"]


def judged_run_rates(spec: SweepSpec, store: Store, judge_node: Node) -> "pd.DataFrame":
    """A done judge node's runs, one row per run, suite and condition: the overall EM rates of
    the analysis itself (analyze.run_metrics, over all questions)."""
    long = pq.read_table(store.node_dir(judge_node.stage, judge_node.name, judge_node.key)
                         / "judgments.parquet").to_pandas()
    return analyze.overall_run_rates(long, spec.analysis)[RATE_COLUMNS]


class LiveRates:
    """The driver's view of rates judged so far, logged to the sweep's W&B summary run after each
    judge node (tracking.LiveSummary); judge nodes done before this run count too."""

    def __init__(self, spec: SweepSpec, store: Store, nodes: list[Node]):
        self.spec, self.store = spec, store
        self.judge_nodes = [node for node in nodes if node.stage == "judge"]
        self.wandb = tracking.LiveSummary(spec.wandb, store.root, spec.name, spec.model_dump(mode="json"))
        self.rates: dict = {}

    def update(self) -> None:
        import pandas as pd

        if self.wandb.failed:
            return
        try:
            new = [node for node in self.judge_nodes
                   if node.id not in self.rates and self.store.is_done(node.stage, node.name, node.key)]
            if not new:  # the nodes of one judge job finish together: logged once
                return
            for node in new:
                self.rates[node.id] = judged_run_rates(self.spec, self.store, node)
            frames = [frame for frame in self.rates.values() if not frame.empty]
            rates = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RATE_COLUMNS)
        except Exception as err:  # the summary is a window; the sweep goes on without it
            self.wandb.failed = True
            print(f"warning: live rates not computed: {type(err).__name__}: {err}", flush=True)
            return
        if warning := self.wandb.log(rates, judged_nodes=len(self.rates)):
            print(f"warning: {warning}", flush=True)

    def finish(self) -> None:
        self.wandb.finish()


def run_sweep_remote(spec, uri: str, on_start=None, on_finish=None, connect=None, staging: Path | None = None,
                     until: str | None = None):
    """`run_sweep` with the output dir on an object store, worked on in `staging` (this machine's
    staging dir for it by default; remote.py's module doc)."""
    store = Store((staging or staging_dir(uri)).resolve(), mirror=uri)
    return run_sweep(spec, store, on_start=on_start, on_finish=on_finish, connect=connect, until=until)


def run_sweep_at(spec: SweepSpec, out: str | Path, on_start=None, on_finish=None, connect=None) -> list:
    """`run_sweep` for an output dir anywhere: a local path, or an object-store URI."""
    return run_sweep(spec, Store.at(out), on_start=on_start, on_finish=on_finish, connect=connect)


def publish_report(out: str | Path) -> None:
    """After the report is written in the run's local dir: on the output dir's object store too."""
    Store.at(out).publish("report")
