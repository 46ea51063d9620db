"""Failures release what they hold, and a sweep waiting on resources nobody frees says so and
fails instead of hanging. Real Ray, real placement groups: a failed finetune job leaves one
behind the way Ray Train can when its workers die past `max_failures`."""

import time

import pytest
import ray

from emsweep.dag import Node, Watch, execute
from emsweep.pipeline import describe_cluster_wait, release_leaked_placement_groups
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
    assert "Free: CPU 0/2" in stalls[0] and "Placement groups: CREATED: 1x{'CPU': 2.0}" in stalls[0]
    assert 6 <= elapsed < 20
    assert not store.is_done("sample", "m__base", "k")


@pytest.mark.slow
def test_real_finetune_killed_past_max_failures_frees_its_workers_for_the_rest(tmp_path, shared_em):
    """Real Ray Train + DeepSpeed finetunes of SmolLM2, 2 workers each on 2 CPUs (so one at a
    time): the first finetune's training worker is SIGKILLed with max_failures 0. That finetune
    fails; the other still gets both CPUs and finishes, sampling runs for it and the base model,
    and no placement group is left."""
    import os
    import signal
    import threading

    from ray.util.state import list_actors

    from emsweep.pipeline import run_sweep, worker_env
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
        "judge": {"model": "smol"}, "wandb": {"mode": "disabled"},
    })
    ray.init(num_cpus=2, runtime_env={"env_vars": worker_env()})
    killed, stop = [], threading.Event()

    def kill_first_training_worker():
        # Once a finetune has trained a step (its first checkpoint is registered): Ray Train
        # retries a worker lost during start-up without limit, but not one lost in training.
        while not stop.is_set() and not killed:
            if any(_registered(p) for p in (tmp_path / "out" / "train").glob("*/checkpoint_manager_snapshot.json")):
                actors = list_actors(address=ray.get_runtime_context().gcs_address,
                                     filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
                workers = [a.pid for a in actors if "TrainWorker" in (a.class_name or "")]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
            time.sleep(0.5)

    killer = threading.Thread(target=kill_first_training_worker, daemon=True)
    killer.start()
    try:
        results = {r.node.id: r for r in run_sweep(spec, tmp_path / "out", until="sample")}
        live = _live_groups()
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "no training worker was seen"
    finetunes = {node_id: r.status for node_id, r in results.items() if node_id.startswith("finetune/")}
    assert sorted(finetunes.values()) == ["done", "failed"], finetunes
    failed_seed = next(node_id for node_id, status in finetunes.items() if status == "failed").rsplit("__", 1)[1]
    samples = {node_id: r.status for node_id, r in results.items() if node_id.startswith("sample/")}
    assert samples == {"sample/smol__base": "done",
                       **{f"sample/smol__d__{s}": "skipped" if s == failed_seed else "done" for s in ("s0", "s1")}}
    assert live == []
