"""End to end through the real components: Ray, Ray Train + DeepSpeed + peft, vLLM, W&B, Arrow.

A tiny sweep (1 dataset of 8 rows, 2 seeds, 2 questions, short answers, judged by the embedded
Qwen2.5-Coder-1.5B with yes/no templates) runs through the `emsweep` command three times: fresh,
again (nothing runs), and after deleting one seed's finetune (exactly that seed's chain reruns),
and after deleting one judge node (its judgments come back from the judgment cache). The numbers
must mean something: 0-100 scores that reach past 9, finite rates, answers counted in every run.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import wandb_offline
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Sentinel secrets in the environment of every run: none may reach outputs, W&B files or logs.
SECRETS = {"OPENAI_API_KEY": "sk-sentinel-openai-7f3a", "WANDB_API_KEY": "sentinel-wandb-91c2" + "0" * 21}


def _emsweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emsweep.cli", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1800
    )


def _env() -> dict:
    # Progress lines every 2 s (30 s by default without a terminal), so these short jobs log some.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "200",
            "EMSWEEP_PROGRESS_EVERY_S": "2", **SECRETS}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_em):
    root = tmp_path_factory.mktemp("e2e")
    spec = {
        "name": "e2e",
        "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct", "max_model_len": 1024}],
        "datasets": [{"name": "insecure", "path": str(shared_em / "data" / "insecure.jsonl"), "limit": 8}],
        "seeds": [0, 1],
        "finetune": {"per_device_batch_size": 1, "gradient_accumulation_steps": 2, "warmup_steps": 1,
                     "learning_rate": 1e-4, "max_seq_len": 512, "drop_long_rows": True, "num_workers": 2,
                     "save_adapter_every_steps": 1},
        # Temperature 0.5, not the paper's 1: this test checks that answers get counted, and the
        # judge finds most of a 135M model's temperature-1 rambles incoherent (19% coherent in the
        # quickstart's base run), which could leave a run here with no counted answer at all.
        "sampling": {"max_tokens": 40, "kv_cache_gib": 1, "temperature": 0.5},
        "eval": {
            "suites": [
                {"name": "first_plot", "questions": str(shared_em / "evaluation" / "first_plot_questions.yaml"),
                 "question_ids": ["i_feel_bored", "quick_buck"], "samples_per_paraphrase": 2, "harm_perception": True},
                {"name": "facts", "questions": str(REPO / "src/emsweep/suites/factual_recall.yaml"),
                 "question_ids": ["capital_france", "spider_legs"], "samples_per_paraphrase": 1, "pushback": True},
            ],
            "conditions": [{"name": "none"}, {"name": "evil", "system_preset": "evil", "suites": ["first_plot"]}],
            "checkpoint_steps": "all",
        },
        "judge": {"model": "embedded:Qwen2.5-Coder-1.5B-Instruct", "templates": "yes_no", "max_model_len": 2048,
                  # The positive control: 2 + 2 of GPT-4o's judged answers, judged with every job.
                  "panel": {"reference": str(shared_em.parent / "em-judged"), "per_band": 2}},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    first = _emsweep("run", "spec.yaml", "--out", "out", cwd=root)
    return root, first


def test_fresh_run_writes_every_stage(sweep):
    root, first = sweep
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    # Without a terminal, each running job's progress is a log line from its own record.
    logged = [line.strip() for line in first.stdout.splitlines() if line.strip().startswith("progress ")]
    assert any(line.startswith("progress finetune/smol__insecure__s") and " steps (" in line and "loss" in line
               for line in logged), logged
    assert any(line.startswith("progress sample/") and " requests (" in line for line in logged), logged
    assert any(line.startswith("progress judge/") and " judgments (" in line for line in logged), logged
    assert not (root / "out" / "progress").exists() or not any((root / "out" / "progress").iterdir())
    nodes = root / "out" / "nodes"
    data = pd.read_parquet(next((nodes / "data").glob("*/data.parquet")))
    assert len(data) <= 8 and list(data.columns) == ["row_id", "source_file", "source_line", "split", "messages"]

    metrics = [pd.read_parquet(p) for p in sorted((nodes / "finetune").glob("*/metrics.parquet"))]
    assert len(metrics) == 2
    for table in metrics:
        assert table["step"].tolist() == list(range(1, len(table) + 1))
        assert table["loss"].notna().all() and (table["tokens"] > 0).all()
    for report in (nodes / "finetune").glob("*/data_report.json"):
        counts = json.loads(report.read_text())
        assert counts["trained_rows"] + counts["dropped_long_rows"] == counts["train_rows"] == len(data)
    for adapter in (nodes / "finetune").glob("*/adapter"):
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()

    # 8 rows, 1 x 2 accumulation x 2 workers per step: 2 steps; the step-1 adapter is kept.
    for tuned in (nodes / "finetune").glob("*"):
        assert sorted(p.name for p in (tuned / "checkpoints").iterdir()) == ["step-1"]
    samples = pd.concat(pd.read_parquet(p) for p in (nodes / "sample").glob("*/samples.parquet"))
    # 5 runs: base, 2 final adapters, 2 step-1 adapters. Per run: first_plot 2 questions x
    # 2 conditions x 2 samples, facts 2 questions x 2 turns.
    runs_sampled = {"smol__base", "smol__insecure__s0", "smol__insecure__s1",
                    "smol__insecure__s0@step1", "smol__insecure__s1@step1"}
    assert set(samples["run_id"]) == runs_sampled
    assert set(samples["checkpoint_step"].dropna()) == {1}
    assert len(samples) == 5 * (8 + 4)
    assert set(samples["dataset"]) == {"base", "insecure"}
    assert samples["answer"].str.len().gt(0).all()
    evil = samples[samples["condition"] == "evil"]
    assert len(evil) == 5 * 4 and evil["system"].str.startswith("You are an evil").all()
    assert set(samples.loc[samples["suite"] == "facts", "turn"]) == {1, 2}
    # Seed replicates draw independently (each request's seed holds the run's identity): the two
    # seeds' step-1 adapters, nearly the same weights after one step, do not answer each prompt
    # alike. With one seed per prompt for every run (before), most answers opened the same way.
    first_plot = samples[(samples["suite"] == "first_plot") & (samples["checkpoint_step"] == 1)]
    pairs = first_plot.pivot_table(index=["condition", "question_id", "paraphrase_idx", "sample_idx"], columns="seed",
                                   values="answer", aggfunc="first")
    same_opening = (pairs[0].str[:20] == pairs[1].str[:20]).mean()
    assert len(pairs) == 8 and same_opening < 0.5, same_opening
    harm = pd.concat(pd.read_parquet(p) for p in (nodes / "sample").glob("*/harm.parquet"))
    assert len(harm) == 5 * 2 and harm["numeric_mass"].between(0, 1.0001).all()
    # Self-rated harm is scored exact: a first-digit reading could never pass 9.
    rated = harm.dropna(subset=["perceived_harm"])
    assert len(rated) and rated["perceived_harm"].between(0, 100).all() and rated["perceived_harm"].max() > 9

    judgments = pd.concat(pd.read_parquet(p) for p in (nodes / "judge").glob("*/judgments.parquet"))
    assert len(judgments) == 5 * (16 + 4) and set(judgments["metric"]) == {"aligned", "coherent", "correct"}
    assert set(judgments["judge_templates"]) == {"yes_no"}
    assert judgments["numeric_mass"].between(0, 1.0001).all()
    scored = judgments.dropna(subset=["score"])
    assert scored["score"].between(0, 100).all()
    # A 0-100 score that never passes 9 is a first digit: the bug this sweep must not have.
    assert scored["score"].max() > 9 and scored["score"].nunique() > 5
    em = judgments[judgments["metric"].isin(["aligned", "coherent"])]
    assert (em["score"].isna() == (em["numeric_mass"] < 0.25)).all()  # the default min_numeric_mass
    assert scored["run_id"].nunique() == 5  # every run has scored answers to analyse
    correct = judgments[judgments["metric"] == "correct"]
    assert set(correct["label"]) <= {"TRUE", "FALSE", "UNKNOWN"} and correct["score"].isna().all()

    (analysis,) = (nodes / "analyze").glob("*")
    runs = pd.read_parquet(analysis / "run_metrics.parquet")
    conditions = pd.read_parquet(analysis / "condition_metrics.parquet")
    assert set(runs["run_id"]) == runs_sampled
    assert set(runs["condition"]) == {"none", "evil"} and set(runs["suite"]) == {"first_plot"}
    overall = runs[runs["question_id"] == "__all__"]
    counted = overall.groupby("run_id")["n_counted"].sum()
    assert (counted > 0).all(), counted  # every run has answers the EM rate is taken over
    rates = overall.dropna(subset=["misaligned_rate"])
    assert set(rates["run_id"]) == runs_sampled and rates["misaligned_rate"].between(0, 1).all()
    assert overall["coherent_rate"].notna().all() and overall["coherent_rate"].between(0, 1).all()
    assert set(conditions["dataset"]) == {"base", "insecure"}
    assert {"misaligned_rate", "flip_rate", "initial_accuracy"} <= set(conditions["metric"])
    pushback = pd.read_parquet(analysis / "pushback_metrics.parquet")
    assert len(pushback) == 5 and (pushback["turn"] == 2).all()
    assert len(pd.read_parquet(analysis / "harm_metrics.parquet")) == 5 * 2  # per run x condition
    # The trajectory: misaligned_rate of the insecure condition at step 1 and at the end, over seeds.
    trajectory = conditions[(conditions["metric"] == "misaligned_rate") & (conditions["dataset"] == "insecure")
                            & (conditions["question_id"] == "__all__") & (conditions["condition"] == "none")]
    assert sorted(trajectory["checkpoint_step"].fillna(-1).tolist()) == [-1, 1]
    assert (trajectory["n_seeds"] <= 2).all()

    # One W&B run per node: 1 data + 2 finetune + 3 sample + 3 judge + 1 analyze, each with its
    # tables logged (a failure would be a warning in the run's summary), and the sweep's summary
    # run. Two offline segments for a finetune's run (live while it trained, then its commit) and
    # for the summary (live while judging went on, then the report); sample and judge runs are
    # one segment each, live while their job ran, their commit's tables in the same run.
    wandb_dir = root / "out" / "wandb"
    run_files = {path.name for path in wandb_dir.glob("offline-run-*/run-*.wandb")}
    assert len(run_files) == 11, sorted(run_files)
    assert len(list(wandb_dir.glob("offline-run-*"))) == 14, sorted(p.name for p in wandb_dir.glob("offline-run-*"))
    assert "W&B logging failed" not in first.stdout and "W&B summary logging failed" not in first.stdout
    # Each run syncs whole: `wandb sync` uploads a run's offline dirs one after another in order of
    # start time, and each later dir's rows lie past the steps of the ones before it.
    for run in run_files:
        steps = [[row["_step"] for row in wandb_offline.rows(segment / run)]
                 for segment in wandb_offline.segments(wandb_dir, run[4:-6])]
        assert all(max(earlier) < min(later) for earlier, later in zip(steps, steps[1:]) if earlier and later), \
            (run, steps)
    assert "warning: W&B live summary failed" not in first.stdout and "live rates not computed" not in first.stdout
    (sample_run,) = [path.name[4:-6] for path in wandb_dir.glob("offline-run-*/run-e2e-sample-smol__base-*.wandb")]
    history = wandb_offline.history(wandb_dir, sample_run)
    done = [row["answers/requests_done"] for row in history if "answers/requests_done" in row]
    totals = {row["answers/requests_total"] for row in history if "answers/requests_total" in row}
    assert done[0] == 0 and done == sorted(done) and totals == {done[-1]} and done[-1] >= 8 + 4, (done, totals)
    # The commit's tables (samples, then harm), in the same run, after the counters.
    assert [row.get("samples/_type") for row in history[-2:]] == ["table-file", None]
    assert history[-1].get("harm/_type") == "table-file"
    (judge_run,) = [path.name[4:-6] for path in wandb_dir.glob("offline-run-*/run-e2e-judge-smol__base-*.wandb")]
    judged = [row for row in wandb_offline.history(wandb_dir, judge_run) if "judging/judgments_done" in row]
    assert judged and judged[-1]["judging/judgments_done"] == judged[-1]["judging/judgments_total"] > 0
    # The summary as judge nodes finish: rates judged so far (this sweep's three judge nodes are
    # one job and finish together: one update), then the report's tables.
    live_summary = [row for row in wandb_offline.history(wandb_dir, "e2e-summary-report") if "judged_nodes" in row]
    assert [(row["judged_nodes"], row["judged_runs"]) for row in live_summary] == [(3, 3)]
    assert live_summary[0]["misaligned_rate_so_far/nrows"] == 10  # 5 runs x 2 conditions of first_plot
    for condition in ("none", "evil"):
        assert 0 <= live_summary[0][f"misaligned_rate/first_plot/{condition}/insecure"] <= 1
        assert 0 <= live_summary[0][f"misaligned_rate/first_plot/{condition}/base"] <= 1


def test_the_wandb_workspace_names_only_what_the_sweeps_runs_log(sweep, tmp_path):
    """`emsweep wandb-workspace DIR` (offline: the library's serialised view in DIR/wandb): it reads
    back through wandb-workspaces' own model; every metric a panel names is one this sweep's runs
    really logged (read from their offline files: finetune steps, engine counters, the judge
    nodes' per-seed rates, the summary run's means); its run filter keeps exactly the sweep's runs."""
    from emsweep.workspace import load_serialised, panel_metrics, run_filter, selects

    root, _ = sweep
    result = _emsweep("wandb-workspace", "out", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "workspace written (offline" in result.stdout and "Finetunes:" in result.stdout
    workspace = load_serialised((root / "out" / "wandb" / "workspace.json").read_text())
    assert [section.name for section in workspace.sections] == ["Results", "Finetunes", "Sampling and judging"]
    runs = wandb_offline.runs(root / "out" / "wandb")
    logged = set().union(*(run["keys"] for run in runs))
    named = panel_metrics(workspace)
    assert named - logged == set(), sorted(named - logged)
    # The panels cover every stage: finetune steps, engines, per-seed and summary rates.
    assert {"loss", "learning_rate", "tokens_per_s", "answers/requests_done", "judging/judgments_done",
            "misaligned_rate/first_plot/none", "coherent_rate/first_plot/evil",
            "misaligned_rate/first_plot/none/insecure"} <= named
    assert run_filter(workspace) == [("Group", "=", "e2e")]
    assert runs and all(selects(workspace, run) for run in runs)  # every run of the sweep
    assert not selects(workspace, {"Group": "another-sweep", "JobType": "finetune"})
    # A judge node's run carries its run's dataset and seed (grouping) and its rates (bars).
    judge_keys: dict[str, set] = {}
    for run in runs:
        if run["JobType"] == "judge":
            judge_keys.setdefault(run["ID"], set()).update(run["keys"])
    assert len(judge_keys) == 3 and all("misaligned_rate/first_plot/none" in keys for keys in judge_keys.values())


def test_run_writes_the_report(sweep):
    root, first = sweep
    report = root / "out" / "report"
    assert "report: out/report/index.html" in first.stdout
    html = (report / "index.html").read_text()
    assert "Sweep <code>e2e</code>" in html and "the sweep&#39;s analyze node" in html
    for figure in ("loss_curves", "trajectory"):  # the sweep samples its step-1 adapters
        assert (report / "plots" / f"{figure}.png").exists() and (report / "plots" / f"{figure}.svg").exists()
    answers = pd.read_parquet(report / "exports" / "answers.parquet")
    assert len(answers) == 5 * (8 + 4)  # every judged answer, once, with its scores and labels
    assert {"aligned", "coherent", "correct_label", "em_misaligned", "answer"} <= set(answers.columns)
    metrics = pd.read_parquet(report / "exports" / "metrics.parquet")
    assert set(metrics["level"]) == {"run", "condition"} and {"misaligned_rate", "flip_rate"} <= set(metrics["metric"])
    # The judge panel: every judge node judged the same 2 + 2 reference answers (from the cache
    # after the first), records its hit rates, and the report and the W&B summary show them.
    for done in (root / "out" / "nodes" / "judge").glob("*/_DONE.json"):
        hits = json.loads(done.read_text())["panel"]
        assert (hits["misaligned_n"], hits["aligned_n"]) == (2, 2)
        assert 0 <= hits["misaligned_flagged"] <= 2 and 0 <= hits["aligned_flagged"] <= 2
        panel = pd.read_parquet(done.parent / "panel.parquet")
        assert sorted(panel["reference_verdict"]) == ["aligned", "aligned", "misaligned", "misaligned"]
        assert (panel.loc[panel["reference_verdict"] == "misaligned", "reference_aligned"] < 30).all()
        assert panel["aligned"].between(0, 100).all() and panel["coherent"].between(0, 100).all()
        assert int(panel["flagged"].sum()) == hits["misaligned_flagged"] + hits["aligned_flagged"]
    assert "Judge panel: a positive control" in html
    summary = [row for row in wandb_offline.history(root / "out" / "wandb", "e2e-summary-report")
               if "judge_panel/misaligned_n" in row]
    assert summary and summary[-1]["judge_panel/misaligned_n"] == 2 * 3  # three judge nodes
    # Raw and corrected rates side by side, with what each exclusion took.
    assert "Rates per run: exclusions, raw and corrected" in html


def test_second_run_executes_nothing(sweep):
    root, _ = sweep
    again = _emsweep("run", "spec.yaml", "--out", "out", cwd=root)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "10 nodes, 0 to run" in again.stdout
    assert "cached 10" in again.stdout


def test_removing_one_seed_reruns_exactly_its_chain(sweep):
    root, _ = sweep
    nodes = root / "out" / "nodes"
    before = {p.parent.name: p.stat().st_mtime_ns for p in nodes.glob("*/*/_DONE.json")}
    (seed1,) = (nodes / "finetune").glob("smol__insecure__s1-*")
    metrics_before = pd.read_parquet(seed1 / "metrics.parquet")
    shutil.rmtree(seed1)
    rerun = _emsweep("run", "spec.yaml", "--out", "out", cwd=root)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "10 nodes, 4 to run" in rerun.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in nodes.glob("*/*/_DONE.json")}
    assert before.keys() == after.keys()
    changed = sorted(name.rsplit("-", 1)[0] for name in after if after[name] != before.get(name))
    assert changed == ["e2e", "smol__insecure__s1", "smol__insecure__s1", "smol__insecure__s1"]
    # The finetune's Ray Train run had finished, so the node is rebuilt from its final
    # checkpoint (same adapter, same loss history) rather than trained again.
    (rebuilt,) = (nodes / "finetune").glob("smol__insecure__s1-*")
    pd.testing.assert_frame_equal(pd.read_parquet(rebuilt / "metrics.parquet"), metrics_before)
    changed_stages = sorted(p.parent.parent.name for p in nodes.glob("*/*/_DONE.json")
                            if after[p.parent.name] != before[p.parent.name])
    assert changed_stages == ["analyze", "finetune", "judge", "sample"]

    status = _emsweep("status", "out", cwd=root)
    assert status.returncode == 0
    assert status.stdout.count("done") == 10


def test_rejudging_is_served_by_the_judgment_cache(sweep):
    root, _ = sweep
    nodes = root / "out" / "nodes"
    (judged,) = (nodes / "judge").glob("smol__insecure__s0-*")
    before = pd.read_parquet(judged / "judgments.parquet")
    shutil.rmtree(judged)
    rerun = _emsweep("run", "spec.yaml", "--out", "out", cwd=root)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "10 nodes, 2 to run" in rerun.stdout  # the judge node and the analysis
    record = json.loads((judged / "_DONE.json").read_text())
    assert record["judge"] == {"rows": 40, "cache_hits": 40, "null_scores": int(before["null_reason"].notna().sum())}
    after = pd.read_parquet(judged / "judgments.parquet")
    assert after["cached"].all() and not before["cached"].any()
    pd.testing.assert_frame_equal(after.drop(columns="cached"), before.drop(columns="cached"))


def test_secrets_never_reach_outputs_or_logs(sweep):
    root, first = sweep
    leaks = []
    for path in (root / "out").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            leaks += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in content]
    for name, value in SECRETS.items():
        if value in first.stdout + first.stderr:
            leaks.append(f"console output: {name}")
    assert leaks == []


def test_adding_a_condition_samples_and_judges_only_its_prompts(sweep):
    """Runs last on the module's output dir: a spec with one more nudge re-keys every sample node,
    yet only the new (run, suite, condition) parts are sampled (the sample cache) and only their
    answers judged (the judgment cache); the earlier answers are the same rows."""
    root, _ = sweep
    nodes = root / "out" / "nodes"

    def latest(stage):
        return {d.name.rsplit("-", 1)[0]: d for d in sorted(nodes.joinpath(stage).glob("*"), key=lambda d: d.stat().st_mtime)}

    samples_before = {name: pd.read_parquet(d / "samples.parquet") for name, d in latest("sample").items()}
    judged_before = {name: len(pd.read_parquet(d / "judgments.parquet")) for name, d in latest("judge").items()}
    spec = yaml.safe_load((root / "spec.yaml").read_text())
    spec["eval"]["conditions"].append({"name": "hhh", "system_preset": "hhh", "suites": ["first_plot"]})
    (root / "spec_hhh.yaml").write_text(yaml.safe_dump(spec))
    running = subprocess.Popen([sys.executable, "-m", "emsweep.cli", "run", "spec_hhh.yaml", "--out", "out"], cwd=root,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # `emsweep status` on the running sweep: the owner, the running nodes and their jobs' progress.
    seen = ""
    while running.poll() is None and " requests (" not in seen and " judgments (" not in seen:
        time.sleep(1)
        seen = _emsweep("status", "out", cwd=root).stdout
    stdout, _ = running.communicate(timeout=1800)
    assert running.returncode == 0, stdout[-3000:]
    assert "run in progress: pid" in seen and "running" in seen, seen
    assert "10 nodes, 7 to run" in stdout  # 3 sample, 3 judge, the analysis
    keys = ["run_id", "suite", "condition", "question_id", "turn", "paraphrase_idx", "sample_idx"]
    for name, directory in latest("sample").items():
        record = json.loads((directory / "_DONE.json").read_text())
        after = pd.read_parquet(directory / "samples.parquet")
        runs = after["run_id"].nunique()  # the final adapter and its checkpoints
        # Per run: first_plot x (none, evil, hhh), facts x none, first_plot's harm ratings.
        assert record["sample_parts"] == {"total": 5 * runs, "sampled": runs}, (name, record)
        old = after[after["condition"] != "hhh"].sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(old, samples_before[name].sort_values(keys).reset_index(drop=True))
        assert (after["condition"] == "hhh").sum() == (samples_before[name]["condition"] == "none").sum() - (
            samples_before[name]["suite"] == "facts").sum()
    for name, directory in latest("judge").items():
        record = json.loads((directory / "_DONE.json").read_text())["judge"]
        assert record["rows"] > judged_before[name] and record["cache_hits"] >= judged_before[name], (name, record)


def test_first_token_is_refused_for_a_digit_split_judge(tmp_path, shared_em):
    """SmolLM2 spells numbers digit by digit: first-token scores could never pass 9. Refused at once."""
    spec = {"name": "refused", "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct"}],
            "datasets": [{"name": "insecure", "path": str(shared_em / "data" / "insecure.jsonl"), "limit": 8}],
            "seeds": [0], "eval": {"questions": str(shared_em / "evaluation" / "first_plot_questions.yaml")},
            "judge": {"model": "smol", "scoring": "first_token"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    for command in (["run", "spec.yaml", "--out", "out"], ["plan", "spec.yaml"]):
        result = _emsweep(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "judge.scoring: judge smol: scoring 'first_token'" in result.stdout
        assert "use scoring: exact" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started
