"""Which nodes run: the store decides, and a rerun flows to dependents only."""

from pathlib import Path

import pytest

from emsweep.dag import nodes_to_run
from emsweep.sweep.plan import plan
from emsweep.spec import load_spec
from emsweep.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quickstart_nodes():
    return plan(load_spec(REPO / "workflows" / "quickstart.yaml"))


def _mark_all_done(store, nodes):
    for node in nodes:
        store.commit(node.stage, node.name, node.key, store.new_tmp_dir(), {})


def test_plan_shape(quickstart_nodes):
    by_stage = {}
    for node in quickstart_nodes:
        by_stage.setdefault(node.stage, []).append(node)
    # 2 datasets, 2 seeds, 1 model (+ the base model's runs)
    assert {k: len(v) for k, v in by_stage.items()} == {"data": 2, "finetune": 4, "sample": 5, "judge": 5, "analyze": 1}
    assert {n.group for n in by_stage["sample"]} == {"sample:smollm2-135m"}  # one engine per base model
    ids = [n.id for n in quickstart_nodes]
    for index, node in enumerate(quickstart_nodes):  # topological order
        assert all(ids.index(dep) < index for dep in node.deps)


def test_everything_runs_on_an_empty_store_and_nothing_when_done(tmp_path, quickstart_nodes):
    store = Store(tmp_path)
    assert nodes_to_run(quickstart_nodes, store) == quickstart_nodes
    _mark_all_done(store, quickstart_nodes)
    assert nodes_to_run(quickstart_nodes, store) == []


def test_removing_one_seeds_finetune_reruns_exactly_its_chain(tmp_path, quickstart_nodes):
    store = Store(tmp_path)
    _mark_all_done(store, quickstart_nodes)
    target = next(n for n in quickstart_nodes if n.id == "finetune/smollm2-135m__insecure__s1")
    import shutil

    shutil.rmtree(store.node_dir(target.stage, target.name, target.key))
    assert [n.id for n in nodes_to_run(quickstart_nodes, store)] == [
        "finetune/smollm2-135m__insecure__s1",
        "sample/smollm2-135m__insecure__s1",
        "judge/smollm2-135m__insecure__s1",
        "analyze/quickstart",
    ]


def test_a_config_change_changes_keys_downstream_only():
    spec = load_spec(REPO / "workflows" / "quickstart.yaml")
    before = {n.id: n.key for n in plan(spec)}
    changed = spec.model_copy(update={"judge": spec.judge.model_copy(update={"min_numeric_mass": 0.5})})
    after = {n.id: n.key for n in plan(changed)}
    differing = sorted(i for i in before if before[i] != after[i])
    assert all(i.startswith(("judge/", "analyze/")) for i in differing)
    assert len(differing) == 6


def test_judge_resources_do_not_change_keys():
    spec = load_spec(REPO / "workflows" / "quickstart.yaml")
    before = {n.id: n.key for n in plan(spec)}
    resources = {"replicas": 4, "batch_size": 64, "kv_cache_gib": 8.0, "max_concurrency": 3, "timeout_s": 5.0}
    changed = spec.model_copy(update={"judge": spec.judge.model_copy(update=resources)})
    assert {n.id: n.key for n in plan(changed)} == before
