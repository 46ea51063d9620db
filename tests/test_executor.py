"""The DAG executor on a real local Ray: failures stay local, reruns redo only what failed."""

import dataclasses

import pytest
import ray

from emsweep.dag import Node, execute, status_table
from emsweep.store import Store


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _diamond():
    """a -> b1 -> c1, a -> b2 -> c2, (c1, c2) -> d; b1 runs as a grouped job."""
    a = Node("data", "a", "ka")
    b1 = Node("sample", "b1", "kb1", deps=(a.id,), group="engine")
    b2 = Node("sample", "b2", "kb2", deps=(a.id,))
    c1 = Node("judge", "c1", "kc1", deps=(b1.id,))
    c2 = Node("judge", "c2", "kc2", deps=(b2.id,))
    d = Node("analyze", "d", "kd", deps=(c1.id, c2.id))
    return [a, b1, b2, c1, c2, d]


@ray.remote
def _job(root, job, fail, inputs=None):
    """Commits each node (fails those named in `fail`). A partial_ok node records which of its
    `inputs` (node id -> Node) are not done, as sweep.jobs.StageRunner.run_analyze does."""
    store = Store(root)
    errors = {}
    for node in job:
        if node.name in fail:
            errors[node.id] = "RuntimeError: boom"
            continue
        missing = [d for d in node.deps if node.partial_ok
                   and not store.is_done(inputs[d].stage, inputs[d].name, inputs[d].key)]
        tmp = store.new_tmp_dir()
        (tmp / "out.txt").write_text(node.name)
        store.commit(node.stage, node.name, node.key, tmp, {"seconds": 0.0, **({"missing_inputs": missing} if missing else {})})
        errors[node.id] = None
    return errors


def _run(root, nodes, fail=()):
    executed = []

    def submit(stage, job):
        executed.extend(node.name for node in job)
        return _job.remote(str(root), job, set(fail))

    results = execute(nodes, Store(root), submit)
    return {r.node.name: r.status for r in results}, executed


def test_a_failure_skips_dependents_only_and_a_rerun_redoes_just_them(tmp_path):
    nodes = _diamond()
    statuses, executed = _run(tmp_path, nodes, fail={"b2"})
    assert statuses == {"a": "done", "b1": "done", "b2": "failed", "c1": "done", "c2": "skipped", "d": "skipped"}
    assert sorted(executed) == ["a", "b1", "b2", "c1"]
    table = {row.node.name: row for row in status_table(nodes, Store(tmp_path))}
    assert table["b2"].status == "failed" and "boom" in table["b2"].error
    assert table["d"].status == "skipped"

    statuses, executed = _run(tmp_path, nodes)
    assert sorted(executed) == ["b2", "c2", "d"]
    assert statuses == {"a": "cached", "b1": "cached", "b2": "done", "c1": "cached", "c2": "done", "d": "done"}
    assert all(row.status == "done" for row in status_table(nodes, Store(tmp_path)))

    statuses, executed = _run(tmp_path, nodes)
    assert executed == [] and set(statuses.values()) == {"cached"}


def test_a_crashed_task_fails_its_nodes_without_stopping_the_sweep(tmp_path):
    nodes = _diamond()

    @ray.remote(max_retries=0)
    def crash(job):
        raise SystemExit(1)  # the worker process dies

    def submit(stage, job):
        if stage == "sample" and job[0].name == "b1":
            return crash.remote(job)
        return _job.remote(str(tmp_path), job, set())

    results = {r.node.name: r.status for r in execute(nodes, Store(tmp_path), submit)}
    assert results["b1"] == "failed" and results["c1"] == "skipped"
    assert results["b2"] == "done" and results["c2"] == "done"


def test_a_failed_root_skips_every_grouped_dependent_without_stalling(tmp_path):
    """Skips resolve nodes too: a grouped job whose deps were skipped later in the same pass
    must still be scheduled (skipped), not reported as unschedulable."""
    a = Node("data", "a", "ka")
    grouped = [Node("sample", f"s{i}", f"ks{i}", deps=(f"finetune/f{i}",), group="engine") for i in range(2)]
    tunes = [Node("finetune", f"f{i}", f"kf{i}", deps=(a.id,)) for i in range(2)]
    # The grouped job comes first in dict order, before the finetunes that block it.
    nodes = [a, *grouped, *tunes]
    statuses, executed = _run(tmp_path, nodes, fail={"a"})
    assert statuses == {"a": "failed", "s0": "skipped", "s1": "skipped", "f0": "skipped", "f1": "skipped"}
    assert executed == ["a"]


def test_a_partial_ok_node_runs_on_the_inputs_that_are_done_and_is_redone_when_they_arrive(tmp_path):
    """The analysis still runs when one seed failed, is `partial` (not done), and the next run
    redoes it together with the failed chain."""
    nodes = _diamond()
    nodes[-1] = dataclasses.replace(nodes[-1], partial_ok=True)
    by_id = {node.id: node for node in nodes}
    seen = []

    def run(fail=()):
        def submit(stage, nodes_):
            seen.extend(n.name for n in nodes_)
            return _job.remote(str(tmp_path), nodes_, set(fail), by_id)
        return {r.node.name: r for r in execute(nodes, Store(tmp_path), submit)}

    results = run(fail={"b2"})
    assert {k: r.status for k, r in results.items()} == {
        "a": "done", "b1": "done", "b2": "failed", "c1": "done", "c2": "skipped", "d": "partial"}
    assert results["d"].error == "ran without 1 input(s) that are not done: judge/c2"
    store = Store(tmp_path)
    assert not store.is_done("analyze", "d", "kd") and store.record("analyze", "d", "kd")["missing_inputs"] == ["judge/c2"]
    assert {row.node.name: row.status for row in status_table(nodes, store)}["d"] == "partial"

    seen.clear()
    results = run()
    assert sorted(seen) == ["b2", "c2", "d"]
    assert results["d"].status == "done" and store.is_done("analyze", "d", "kd")


def test_a_partial_ok_node_with_no_input_done_is_skipped(tmp_path):
    nodes = _diamond()
    nodes[-1] = dataclasses.replace(nodes[-1], partial_ok=True)
    statuses, executed = _run(tmp_path, nodes, fail={"a"})
    assert statuses["d"] == "skipped" and executed == ["a"]


def test_jobs_of_a_limited_stage_wait_in_the_executor_until_a_slot_frees(tmp_path):
    """`max_running` keeps surplus jobs out of Ray (a laptop's queued finetunes would each hold
    a process, and Ray's OOM killer takes idle ones first)."""
    a = Node("data", "a", "ka")
    tunes = [Node("finetune", f"f{i}", f"kf{i}", deps=(a.id,)) for i in range(3)]
    in_flight, most = [], []

    @ray.remote(num_cpus=0)
    def wait(seconds):
        import time

        time.sleep(seconds)

    def submit(stage, job):
        if stage == "finetune":
            in_flight.append(job[0].name)
            ray.get(wait.remote(0.5))  # holds the job "in flight" a while (its deps are done)
        return _job.remote(str(tmp_path), job, set())

    def finish(status):
        if status.node.stage == "finetune":
            most.append(len(in_flight))
            in_flight.remove(status.node.name)

    results = execute([a, *tunes], Store(tmp_path), submit, finish,
                      max_running=lambda stage: 1 if stage == "finetune" else None)
    assert [r.status for r in results] == ["done"] * 4
    assert most == [1, 1, 1]  # never two finetunes in Ray at once
