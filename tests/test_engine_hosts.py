"""The pipelined schedule's host policy (pipeline.EngineHosts) in isolation: which engine hosts
go and when. Actors are stand-ins and `ray.kill` is recorded; the real hosts, engines and Ray run
in tests/test_pipelined.py."""

import pytest

from emsweep.dag import Node, NodeStatus
from emsweep.sweep.driver import EngineHosts


def _node(stage: str, name: str, group: str | None = None) -> Node:
    return Node(stage, name, "k", {}, (), group)


@pytest.fixture()
def killed(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "kill", lambda actor: calls.append(actor))
    return calls


def _hosts(pending: list[Node], busy: dict[str, int]) -> EngineHosts:
    hosts = EngineHosts(pending)
    for group, count in busy.items():
        hosts.actors[group] = f"actor:{group}"
        hosts.busy[group] = count
    return hosts


def test_an_idle_host_goes_when_a_finetune_waits_for_resources(killed):
    sample_a, sample_b = _node("sample", "a", "sample:m"), _node("sample", "b", "sample:m")
    finetune_b = _node("finetune", "b")
    hosts = _hosts([sample_a, sample_b], {"sample:m": 0})
    hosts.release_idle([[finetune_b]], started=lambda job: True)  # it runs: the host may stay
    assert killed == [] and "sample:m" in hosts.actors
    hosts.release_idle([[finetune_b]], started=lambda job: False)  # it waits: the idle host goes
    assert killed == ["actor:sample:m"] and not hosts.actors


def test_a_busy_host_stays_and_a_job_queued_behind_another_is_not_waiting(killed):
    sample_a, sample_b = _node("sample", "a", "sample:m"), _node("sample", "b", "sample:m")
    judge_a = _node("judge", "a", "judge")
    hosts = _hosts([sample_a, sample_b, judge_a], {"sample:m": 2, "judge": 0})
    # sample b is queued behind sample a on its host: that is no reason to free the judge's.
    hosts.release_idle([[sample_a], [sample_b]], started=lambda job: job[0] is sample_a)
    assert killed == []
    # A finetune waits: the idle judge host goes, the busy sampler stays.
    hosts.release_idle([[sample_a], [sample_b], [_node("finetune", "c")]], started=lambda job: job[0] is sample_a)
    assert killed == ["actor:judge"] and list(hosts.actors) == ["sample:m"]


def test_a_host_goes_with_its_groups_last_job_and_after_a_failure(killed):
    sample_a, sample_b, sample_c = (_node("sample", name, "sample:m") for name in "abc")
    hosts = _hosts([sample_a, sample_b, sample_c], {"sample:m": 1})
    hosts.finished(NodeStatus(sample_a, "done"))
    assert killed == [] and hosts.busy["sample:m"] == 0
    hosts.finished(NodeStatus(sample_b, "skipped"))  # its finetune failed: never submitted
    assert killed == [] and hosts.busy["sample:m"] == 0
    hosts.actors["sample:m"], hosts.busy["sample:m"] = "actor:sample:m", 1
    hosts.finished(NodeStatus(sample_c, "done"))  # the group's last node
    assert killed == ["actor:sample:m"]

    judge_a, judge_b, judge_c = (_node("judge", name, "judge") for name in "abc")
    hosts = _hosts([judge_a, judge_b, judge_c], {"judge": 2})
    hosts.finished(NodeStatus(judge_a, "failed", error="engine died"))  # judge b is queued on it: it stays
    assert killed == ["actor:sample:m"] and "judge" in hosts.actors
    hosts.finished(NodeStatus(judge_b, "failed", error="engine died"))  # idle now: judge c gets a fresh one
    assert killed == ["actor:sample:m", "actor:judge"] and not hosts.actors
