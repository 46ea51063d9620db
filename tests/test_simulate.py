"""`emsweep plan --simulate`: the event simulation against schedules worked out by hand, and
on the real workflows (every unit of work done, utilisation within 0..1, pipelined never later)."""

from pathlib import Path

import pytest

from emsweep import simulate
from emsweep.simulate import Cluster, Engine, Work, barrier_jobs, parse_cluster, summarize_path
from emsweep.spec import AuditSpec, judge_spec, load_spec

REPO = Path(__file__).resolve().parents[1]


def _tiny():
    """Two finetunes (10 s, 20 s, 1 GPU each), then a sampling engine (1 GPU, 5 s start-up, 3 s
    a run) over base + both, and a judge engine (1 GPU, 5 s start-up, 2 s a run)."""
    work = {"finetune/a": Work("finetune/a", "finetune", 10.0, 1), "finetune/b": Work("finetune/b", "finetune", 20.0, 1)}
    engines = {"sample:m": Engine("sample:m", "sample", 1, 5.0), "judge": Engine("judge", "judge", 1, 5.0)}
    for run, deps in (("base", []), ("a", ["finetune/a"]), ("b", ["finetune/b"])):
        work[f"sample/{run}"] = Work(f"sample/{run}", "sample", 3.0, 1, deps, "sample:m")
        work[f"judge/{run}"] = Work(f"judge/{run}", "judge", 2.0, 1, [f"sample/{run}"], "judge")
        engines["sample:m"].items.append(f"sample/{run}")
        engines["judge"].items.append(f"judge/{run}")
    return work, engines


def test_pipelined_and_barrier_schedules_match_the_hand_worked_ones():
    work, engines = _tiny()
    # Pipelined on 3 GPUs: the sampler starts at 0 (base ready), samples base 5-8; the judge gets
    # a GPU when finetune a ends at 10 (start-up 10-15) while a is sampled 10-13; judged: base
    # 15-17, a 17-19; b is finetuned 0-20, sampled 20-23, judged 23-25.
    piped = simulate._play(work, engines, Cluster(1, 3), "pipelined")
    assert piped.makespan_s == 25.0 and piped.first_judged_s == 17.0
    assert piped.busy_gpu_s == {"finetune": 30.0, "sample": 5.0 + 9.0, "judge": 5.0 + 6.0}
    assert piped.utilisation() == pytest.approx(55 / 75)
    assert [name for name, _, _ in piped.critical_path] == ["finetune/b", "sample/b", "judge/b"]
    # Barrier: sampling after both finetunes (20 + 5 + 9 = 34), judging after it (34 + 5 + 6 = 45);
    # the first judgment is done at 34 + 5 + 2.
    jobs, _ = barrier_jobs(work, engines)
    barrier = simulate._play(jobs, {}, Cluster(1, 3), "barrier")
    assert barrier.makespan_s == 45.0 and barrier.first_judged_s == 41.0
    assert [name for name, _, _ in barrier.critical_path] == ["finetune/b", "job/sample:m", "job/judge"]
    assert summarize_path(barrier.critical_path) == "finetune/b -> job/sample:m -> job/judge"


def test_an_idle_engine_gives_its_gpus_back_rather_than_deadlock():
    """On 2 GPUs the sampler and the judge would hold both while finetune b waits for one: an
    idle engine with nothing ready stops when work waits for GPUs, and pays its start-up again."""
    work, engines = _tiny()
    result = simulate._play(work, engines, Cluster(1, 2), "pipelined")
    # By hand: the sampler starts 0-5 and samples base 5-8 while finetune a runs 0-10. At 8 it
    # has nothing ready and b waits: it stops, and the judge (first in line) takes its GPU: start
    # 8-13, base 13-15. At 10 the sampler restarts (10-15) on a's GPU, b still waiting; at 15 the
    # idle judge stops, b runs 15-35, a is sampled 15-18. At 35 b is sampled (35-38) and the
    # judge restarts on b's GPU (35-40), judging a 40-42 and b 42-44.
    assert result.makespan_s == 44.0 and result.first_judged_s == 15.0
    assert result.busy_gpu_s == {"finetune": 30.0, "sample": 5 + 3 + 5 + 3 + 3, "judge": 5 + 2 + 5 + 2 + 2}
    assert [name for name, _, _ in result.critical_path][-3:] == ["start of judge", "judge/a", "judge/b"]


def test_cluster_shapes_and_configs():
    assert parse_cluster("4x8xH100") == Cluster(4, 8, "H100") and parse_cluster("2x4").gpus == 8
    assert parse_cluster(str(REPO / "cluster/aws-gpu.yaml")) == Cluster(4, 8)
    assert parse_cluster(str(REPO / "cluster/gcp-gpu.yaml")) == Cluster(4, 8)
    assert parse_cluster(str(REPO / "cluster/kuberay-raycluster.yaml")) == Cluster(4, 8)
    with pytest.raises(ValueError, match="neither NODESxGPUS"):
        parse_cluster("lots")


@pytest.mark.parametrize("workflow", ["betley2025", "model_organisms", "inoculation"])
def test_real_workflows_simulate_and_pipelining_never_loses(workflow):
    spec = load_spec(REPO / "workflows" / f"{workflow}.yaml")
    cluster = parse_cluster("4x8xH100")
    barrier = simulate.simulate(spec, cluster, "barrier")
    piped = simulate.simulate(spec, cluster, "pipelined")
    for result in (barrier, piped):
        assert 0 < result.utilisation() <= 1 and result.makespan_s > 0
        assert all(0 <= result.utilisation(stage) <= 1 for stage in ("finetune", "sample", "judge"))
    assert piped.first_judged_s < barrier.first_judged_s
    assert piped.makespan_s <= barrier.makespan_s * 1.01
    # Same work either way: GPU-seconds of finetuning are the same, whatever the order.
    assert piped.busy_gpu_s["finetune"] == pytest.approx(barrier.busy_gpu_s["finetune"])


def test_plan_simulate_prints_both_schedules_and_refuses_a_bad_cluster_in_one_line(monkeypatch):
    from typer.testing import CliRunner

    from emsweep.cli import app

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-by-a-plan")
    spec = str(REPO / "workflows/model_organisms.yaml")
    result = CliRunner().invoke(app, ["plan", spec, "--simulate", "--cluster", "2x8xH100"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert {"barrier", "pipelined"} <= set(rows) and "simulated on 2x8xH100 (16 GPUs" in result.output
    bad = CliRunner().invoke(app, ["plan", spec, "--simulate", "--cluster", "two big ones"])
    assert bad.exit_code == 2 and "error: --cluster two big ones: neither NODESxGPUS" in bad.output
    assert "Traceback" not in bad.output


def test_sampling_replicas_shorten_the_barrier_schedule():
    """betley2025's one 8-GPU sampling engine samples 31 runs in turn; three engines share them
    and each starts once its own runs' finetunes are done."""
    spec = load_spec(REPO / "workflows/betley2025.yaml")
    three = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"replicas": 3})})
    cluster = parse_cluster("4x8xH100")
    one_engine, three_engines = (simulate.simulate(s, cluster, "barrier") for s in (spec, three))
    assert three_engines.makespan_s < 0.8 * one_engine.makespan_s
    work, engines = simulate.sweep_work(three)
    assert sorted(len(e.items) for name, e in engines.items() if name != "judge") == [10, 10, 11]
    assert three_engines.busy_gpu_s["sample"] > one_engine.busy_gpu_s["sample"]  # two more start-ups


def test_an_audit_is_simulated_as_its_own_judge_on_its_share_of_the_answers():
    """betley2025 (judged by GPT-4o over HTTP: no GPU) audited by a local 32B judge on 10% of each
    run: an audit engine per run on that judge's GPUs, a tenth of judging every answer with it."""
    spec = load_spec(REPO / "workflows/betley2025.yaml")
    local = {"model": "Qwen/Qwen2.5-Coder-32B-Instruct", "tensor_parallel_size": 2, "templates": "paper"}
    audited = spec.model_copy(update={"judge": spec.judge.model_copy(update={"audit": _audit(local, 0.1)})})
    everything = spec.model_copy(update={"judge": judge_spec(**local)})
    work, engines = simulate.sweep_work(audited)
    audits = [item for item in work.values() if item.stage == "audit"]
    judges = [item for item in work.values() if item.stage == "judge"]
    assert len(audits) == len(judges) == len(engines["audit"].items) and engines["audit"].gpus == 2
    full = [item for item in simulate.sweep_work(everything)[0].values() if item.stage == "judge"]
    assert audits[0].seconds == pytest.approx(0.1 * full[0].seconds, rel=0.01)
    cluster = parse_cluster("4x8xH100")
    plain, with_audit = (simulate.simulate(s, cluster, "pipelined") for s in (spec, audited))
    assert with_audit.busy_gpu_s["audit"] > 0 and "audit" not in plain.busy_gpu_s
    assert with_audit.makespan_s >= plain.makespan_s and 0 < with_audit.utilisation("audit") <= 1


def _audit(judge: dict, fraction: float) -> AuditSpec:
    return AuditSpec(judge=judge_spec(**judge), fraction=fraction)
