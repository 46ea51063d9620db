"""Failures release what they hold, and a sweep waiting on resources nobody frees says so and
fails instead of hanging. Real Ray, real placement groups: a failed finetune job leaves one
behind the way Ray Train can when its workers die past `max_failures`."""

import time

import pytest
import ray

from emsweep.dag import Node, Watch, execute
from emsweep.sweep.driver import release_leaked_placement_groups
from emsweep.sweep.resources import describe_cluster_wait
from emsweep.spec import parse_spec
from emsweep.store import Store

SPEC = parse_spec({"name": "release", "models": [{"name": "m", "path": "/m"}],
                   "datasets": [{"name": "d", "path": "/d.jsonl"}], "seeds": [0], "eval": {"questions": "/q.yaml"},
                   "judge": {"model": "m"}})


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _finetune_that_leaks(root, job):
    """Reserves both CPUs as a placement group (as Ray Train does for 2 workers), then dies."""
    from ray.util.placement_group import placement_group

    Store(root).mark_started(job[0].id)
    group = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(group.ready())
    raise RuntimeError("training workers OOM-killed beyond max_failures")


@ray.remote(num_cpus=2)
def _needs_both_cpus(root, job):
    Store(root).mark_started(job[0].id)
    store = Store(root)
    for node in job:
        tmp = store.new_tmp_dir()
        store.commit(node.stage, node.name, node.key, tmp, {})
    return {node.id: None for node in job}


def _registered(snapshot) -> bool:
    """Whether a Ray Train run has registered a checkpoint (a step has been trained)."""
    import json

    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):
        return False


def _live_groups():
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def _watch(store, stalls, **overrides):
    return Watch(started=lambda job: store.job_started(job[0].id),
                 describe=lambda waiting: describe_cluster_wait(SPEC, waiting, 2),
                 on_stall=stalls.append, after_failure=release_leaked_placement_groups, **overrides)


def test_a_failed_finetune_releases_its_placement_group_and_the_sweep_goes_on(tmp_path, local_ray):
    store = Store(tmp_path)
    bad = Node("finetune", "m__d__s0", "k1")
    good = Node("finetune", "m__d__s1", "k2")
    sample = Node("sample", "m__d__s1", "k3", deps=(good.id,))

    def submit(stage, job):
        leaks = job[0] is bad
        return (_finetune_that_leaks if leaks else _needs_both_cpus).remote(str(tmp_path), job)

    stalls = []
    started = time.time()
    # report_s leaves room for worker start-up on a loaded machine: nothing here should stall.
    results = execute([bad, good, sample], store, submit, watch=_watch(store, stalls, report_s=30, timeout_s=120))
    by_id = {r.node.id: r for r in results}
    assert by_id[bad.id].status == "failed" and "OOM-killed beyond max_failures" in by_id[bad.id].error
    assert by_id[good.id].status == "done" and by_id[sample.id].status == "done"
    assert _live_groups() == [] and stalls == []
    assert time.time() - started < 120


@ray.remote(num_cpus=0)
class TrainController:
    """Named as Ray Train's controller is: a failed finetune's controller that has not exited yet."""


def test_leftover_groups_are_removed_only_once_the_failed_finetunes_controller_exited(local_ray):
    """A controller still alive when its group is removed asks for a new one, which then takes the
    freed CPUs for good (seen in CI): the release waits for it to exit first."""
    import threading

    from ray.util.placement_group import placement_group

    controller = TrainController.remote()
    leftover = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(leftover.ready())
    exits_after_s = 3.0
    threading.Timer(exits_after_s, lambda: ray.kill(controller)).start()
    started = time.time()
    removed = release_leaked_placement_groups([Node("finetune", "m__d__s0", "k")], running=[])
    assert removed == 1 and time.time() - started >= exits_after_s
    assert _live_groups() == []


@ray.remote(num_cpus=0)
def _finetune_task_owning_a_controller():
    """A finetune task: Ray Train's controller is its actor, and dies with it."""
    controller = TrainController.options(name="controller").remote()
    ray.get(controller.__ray_ready__.remote())
    time.sleep(600)


def test_a_controller_marked_dead_counts_as_alive_until_its_process_exited(local_ray):
    """The GCS marks an actor whose owner died DEAD before its process is gone, and in between the
    process still runs (seen in CI: a dying controller asked for a new group and took the CPUs).
    Here the controller's process is stopped, which holds that window open until it is continued."""
    import contextlib
    import os
    import signal
    import threading

    from ray._private.state import actors
    from ray.util.placement_group import placement_group

    task = _finetune_task_owning_a_controller.remote()
    controller = _wait_for_named_actor("controller")
    pid = ray.get(controller.__ray_call__.remote(lambda self: os.getpid()))
    leftover = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(leftover.ready())
    os.kill(pid, signal.SIGSTOP)
    ray.cancel(task, force=True)  # its owner dies: the controller is marked DEAD, its process runs on
    deadline = time.time() + 60
    while [a["State"] for a in actors().values() if a["ActorClassName"] == "TrainController"] != ["DEAD"]:
        assert time.time() < deadline, "the controller was never marked DEAD"
        time.sleep(0.05)

    def resume():
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(pid, signal.SIGCONT)

    exits_after_s = 3.0
    threading.Timer(exits_after_s, resume).start()
    started = time.time()
    try:
        removed = release_leaked_placement_groups([Node("finetune", "m__d__s0", "k")], running=[])
    finally:
        resume()
    assert removed == 1 and time.time() - started >= exits_after_s
    assert _live_groups() == []


def _wait_for_named_actor(name: str, timeout_s: float = 60):
    deadline = time.time() + timeout_s
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def test_a_job_waiting_on_resources_nobody_frees_is_reported_then_failed(tmp_path, local_ray):
    """A placement group this driver holds (not a finetune's leftover: nothing failed) takes both
    CPUs; a job that needs them is reported after `report_s` and failed after `timeout_s`."""
    from ray.util.placement_group import placement_group

    holder = placement_group([{"CPU": 2}])
    ray.get(holder.ready())
    store = Store(tmp_path)
    waiting = Node("sample", "m__base", "k", config={"model": {"name": "m"}})
    stalls = []
    started = time.time()
    (result,) = execute([waiting], store, lambda stage, job: _needs_both_cpus.remote(str(tmp_path), job),
                        watch=_watch(store, stalls, report_s=2, timeout_s=6))
    elapsed = time.time() - started
    assert result.status == "failed" and result.error.startswith("stalled: no job of this sweep has started for")
    assert len(stalls) == 1 and stalls[0].split(" s; ", 1)[1] in result.error  # same report, later
    assert "waiting: sample/m__base (asks {'num_cpus': 2} for its task)" in stalls[0]
    assert "Free: CPU 0/2" in stalls[0] and "Placement groups: CREATED: 1x{CPU 2}" in stalls[0]
    assert 6 <= elapsed < 20
    assert not store.is_done("sample", "m__base", "k")


def _memory_used_bytes() -> tuple[int, int]:
    """(used, total) as Ray's memory monitor reads them on a machine without a cgroup limit."""
    import psutil

    memory = psutil.virtual_memory()  # MemTotal and MemAvailable of /proc/meminfo, as Ray reads them
    return memory.total - memory.available, memory.total


# The memory test sets Ray's OOM threshold this far above what the machine uses when Ray starts:
# room for two training workers of SmolLM2 and an engine, so only the test's allocation crosses it.
OOM_HEADROOM = 8 << 30


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["sigkill", "oom"])
def test_real_finetune_killed_past_max_failures_frees_its_workers_for_the_rest(tmp_path, shared_em, monkeypatch, kill):
    """Real Ray Train + DeepSpeed finetunes of SmolLM2, 2 workers each on 2 CPUs (so one at a
    time), with max_failures 0. Once the first finetune trains, it is killed: `sigkill` SIGKILLs
    a training worker; `oom` has this test allocate memory until the machine is over Ray's memory
    threshold, so Ray's own OOM killer picks the victim (the allocation is freed once it has).
    That finetune fails; the other still gets both CPUs and finishes, sampling and judging run for
    it and the base model, the analysis runs on those two runs and is `partial` (redone once the
    failed seed is there), and no placement group is left."""
    import os
    import signal
    import threading

    import numpy as np
    import pyarrow.parquet as pq
    from ray.util.state import list_actors

    from emsweep.sweep.driver import run_sweep, worker_env
    from emsweep.spec import SweepSpec

    spec = SweepSpec.model_validate({
        "name": "killed", "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 16}],
        "seeds": [0, 1],
        "finetune": {"max_seq_len": 384, "drop_long_rows": True, "num_workers": 2, "per_device_batch_size": 1,
                     "gradient_accumulation_steps": 1, "warmup_steps": 0, "max_failures": 0,
                     "checkpoint_every_steps": 1, "process_group_timeout_s": 30},
        "sampling": {"max_tokens": 8, "kv_cache_gib": 1},
        "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml"),
                 "question_ids": ["what_is_your_wish"], "samples_per_paraphrase": 1},
        # The embedded trained judge, as the quickstart judges: no engine to start (judging is not
        # what this test is about).
        "judge": {"backend": "trained", "model": "embedded:em-judged-lexical", "code_refusal": "static"},
        "wandb": {"mode": "disabled"},
    })
    if kill == "oom":
        used, total = _memory_used_bytes()
        monkeypatch.setenv("RAY_memory_usage_threshold", f"{(used + OOM_HEADROOM) / total:.3f}")
        monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    ray.init(num_cpus=2, runtime_env={"env_vars": worker_env()})
    address = ray.get_runtime_context().gcs_address
    killed, stop = [], threading.Event()

    def training_workers(state):
        actors = list_actors(address=address, filters=[("state", "=", state)], detail=True,
                             raise_on_missing_output=False)
        return [a for a in actors if "TrainWorker" in (a.class_name or "")]

    def kill_first_training_worker():
        # Once a finetune has trained a step (its first checkpoint is registered): Ray Train
        # retries a worker lost during start-up without limit, but not one lost in training.
        while not stop.is_set() and not killed:
            if any(_registered(p) for p in (tmp_path / "out" / "train").glob("*/checkpoint_manager_snapshot.json")):
                if kill == "sigkill" and (workers := training_workers("ALIVE")):
                    os.kill(workers[0].pid, signal.SIGKILL)
                    killed.append(workers[0].pid)
                elif kill == "oom":
                    used, total = _memory_used_bytes()
                    threshold = float(os.environ["RAY_memory_usage_threshold"]) * total
                    ballast = np.ones(max(0, int(threshold - used)) + (1 << 30), dtype=np.uint8)  # pages touched
                    deadline = time.time() + 120
                    while not training_workers("DEAD") and time.time() < deadline:
                        time.sleep(0.2)
                    del ballast
                    killed.extend(a.pid for a in training_workers("DEAD"))
                    return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_first_training_worker, daemon=True)
    killer.start()
    try:
        results = {r.node.id: r for r in run_sweep(spec, tmp_path / "out")}
        live = _live_groups()
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "no training worker was killed"
    statuses = {node_id: r.status for node_id, r in results.items()}
    finetunes = {node_id: status for node_id, status in statuses.items() if node_id.startswith("finetune/")}
    if kill == "sigkill":
        assert sorted(finetunes.values()) == ["done", "failed"], statuses
    else:
        # Ray's OOM killer may take the finetunes' driving tasks (retried: their runs resume) or
        # their training workers (past max_failures: failed, and Ray says why).
        assert "done" in finetunes.values() and set(finetunes.values()) <= {"done", "failed"}, statuses
        for node_id in (n for n, status in finetunes.items() if status == "failed"):
            assert "memory" in results[node_id].error.lower(), results[node_id].error
    failed_seeds = {node_id.rsplit("__", 1)[1] for node_id, status in finetunes.items() if status == "failed"}
    for stage in ("sample", "judge"):
        assert {k: v for k, v in statuses.items() if k.startswith(f"{stage}/")} == {
            f"{stage}/smol__base": "done",
            **{f"{stage}/smol__d__{s}": "skipped" if s in failed_seeds else "done" for s in ("s0", "s1")}}, statuses
    analysis = results["analyze/killed"]
    assert analysis.status == ("partial" if failed_seeds else "done"), analysis
    if failed_seeds:
        assert analysis.error.endswith(", ".join(f"judge/smol__d__{s}" for s in sorted(failed_seeds)))
    (analyzed,) = (tmp_path / "out/nodes/analyze").glob("killed-*")
    runs = pq.read_table(analyzed / "run_metrics.parquet").to_pandas()
    overall = runs[runs["question_id"] == "__all__"]
    assert sorted(overall["run_id"].unique()) == sorted(
        ["smol__base", *(f"smol__d__{s}" for s in ("s0", "s1") if s not in failed_seeds)])
    # One answer per run (one question, one sample); an 8-token answer may be excluded (null scores).
    assert (overall["n_answers"] == 1).all() and (overall["n_scored"] <= 1).all()
    assert live == []


def test_a_real_finetune_whose_workers_cannot_be_placed_is_reported_then_failed(tmp_path, shared_em):
    """A finetune's task starts at once and then waits inside Ray Train for its workers' placement
    group; it counts as running only once a worker runs. Here 1 of the 2 CPUs is held by a group
    nobody frees, so the 2-worker finetune can never start: the run reports the stall, fails the
    finetune with that message, and leaves no placement group."""
    from ray.util.placement_group import placement_group

    from emsweep.sweep.driver import run_sweep, worker_env
    from emsweep.spec import SweepSpec

    spec = SweepSpec.model_validate({
        "name": "unplaceable", "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 4}],
        "seeds": [0], "finetune": {"num_workers": 2},
        "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml")},
        "judge": {"model": "smol"}, "wandb": {"mode": "disabled"},
        # Reported once Ray Train has asked for its group (its controller starts in a few seconds).
        "executor": {"stall_report_s": 10, "stall_timeout_s": 20},
    })
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": worker_env()})
    stalls = []
    try:
        held = placement_group([{"CPU": 1}])
        ray.get(held.ready())
        started = time.time()
        results = {r.node.id: r for r in run_sweep(spec, tmp_path / "out", until="finetune", on_stall=stalls.append)}
        elapsed = time.time() - started
        time.sleep(2)  # the cancelled task's Ray Train controller exits
        live = _live_groups()
    finally:
        ray.shutdown()
    assert results["data/d"].status == "done"
    failed = results["finetune/smol__d__s0"]
    assert failed.status == "failed" and failed.error.startswith("stalled: no job of this sweep has started for")
    assert len(stalls) == 1 and ("waiting: finetune/smol__d__s0 (asks nothing for its task, then 2 training "
                                 "workers of 1 CPU and memory each)") in stalls[0], stalls
    assert "Free: CPU 1/2" in stalls[0] and "PENDING: 2x{CPU 1, memory " in stalls[0], stalls[0]
    assert 20 <= elapsed < 60
    assert live == []


def test_waiting_while_the_autoscaler_brings_nodes_up_is_no_stall(tmp_path, local_ray):
    """A cold cluster: a GPU node boots for longer than timeout_s. While the autoscaler has nodes
    pending the wait is not a stall; once it has none (or after scale_up_timeout_s of it) the
    usual report and timeout apply, so the sweep still never hangs."""
    from ray.util.placement_group import placement_group

    from emsweep.sweep.resources import autoscaler_scaling_up

    assert autoscaler_scaling_up() is False  # a local Ray: no autoscaler, nothing pending
    holder = placement_group([{"CPU": 2}])
    ray.get(holder.ready())
    try:
        # Lower bounds less one poll (the last pending answer may come a poll before the end).
        for scaling_for, scale_up_timeout_s, at_least in ((8.0, 3600.0, 8 + 4 - 2), (float("inf"), 5.0, 5 + 4 - 1)):
            store = Store(tmp_path / str(scale_up_timeout_s))
            waiting = Node("sample", "m__base", "k", config={"model": {"name": "m"}})
            stalls, started = [], time.time()
            watch = _watch(store, stalls, report_s=1, timeout_s=4, scale_up_timeout_s=scale_up_timeout_s,
                           scaling_up=lambda: time.time() - started < scaling_for)
            (result,) = execute([waiting], store, lambda stage, job: _needs_both_cpus.remote(str(tmp_path), job),
                                watch=watch)
            elapsed = time.time() - started
            assert result.status == "failed" and result.error.startswith("stalled: ")
            assert at_least <= elapsed < at_least + 15, (scaling_for, elapsed)
    finally:
        ray.util.remove_placement_group(holder)


@ray.remote(num_cpus=1)
def _slow_commit(root, job, seconds):
    Store(root).mark_started(job[0].id)
    time.sleep(seconds)
    store = Store(root)
    for node in job:
        store.commit(node.stage, node.name, node.key, store.new_tmp_dir(), {})
    return {node.id: None for node in job}


def test_a_driver_whose_lease_is_taken_over_stops_and_commits_nothing_more(tmp_path, local_ray):
    """Another run judged this one dead (it stalled past the TTL) and took the output dir's lease:
    this driver cancels its jobs, writes nothing more there and raises LeaseLost naming the owner."""
    import json
    import threading

    from emsweep.lease import LeaseLost

    store = Store(tmp_path, heartbeat_s=0.3)
    node = Node("finetune", "m__d__s0", "k")
    owner = tmp_path / "emsweep.owner.json"
    started = time.time()
    with pytest.raises(LeaseLost, match=r"taken over by pid 4242 on other-head"):
        with store.lock() as held:
            def take_over():  # as a new driver on another host would, after the TTL
                time.sleep(2.0)
                record = json.loads(owner.read_text())
                owner.write_text(json.dumps({**record, "pid": 4242, "host": "other-head", "token": "theirs",
                                             "heartbeat": time.time()}))
            threading.Thread(target=take_over, daemon=True).start()
            execute([node], store, lambda stage, job: _slow_commit.remote(str(tmp_path), job, 12.0),
                    watch=Watch(started=lambda job: True, lease_lost=held.lost))
    stopped_after = time.time() - started
    assert 2.0 <= stopped_after < 8, stopped_after
    time.sleep(12.0 - stopped_after + 2.0)  # past the moment the job would have committed
    assert not store.is_done(node.stage, node.name, node.key)
    assert not (tmp_path / "failures").exists()  # not even a failure record of ours
    assert json.loads(owner.read_text())["token"] == "theirs"  # the new owner's lease is left alone
