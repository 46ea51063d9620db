"""The EM sweep as a DAG: which nodes a spec expands to, and how each stage's job runs.

    data/<dataset> -> finetune/<model>__<dataset>__s<seed> -> sample/<run> -> judge/<run> -> analyze/<sweep>
                                           (base model) ----> sample/<model>__base ----^

A node's key hashes its config and its inputs' keys (store.config_key), so a spec edit
re-runs exactly the nodes that read the edited fields, and their dependents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emsweep import analyze, data, finetune, judge, progress, sample, tracking
from emsweep.dag import Node, NodeFailures, run_guarded
from emsweep.engine import GIB
from emsweep.judge.cache import JudgmentCache
from emsweep.judge import panel
# data_node_key: re-exported, the key plan() gives a data node.
from emsweep.keys import (  # noqa: F401
    data_config, data_node_key, fingerprint, judge_build, judge_model_ref, reference_fingerprint)
from emsweep.judge.errors import judge_error
from emsweep.models import resolve_model_path
from emsweep.progress import ProgressWriter
from emsweep.questions import load_suite
from emsweep.sample_cache import SampleCache
from emsweep.spec import BASE_LABEL, SweepSpec, WandbSpec
from emsweep.store import DONE, Store, config_key, write_started_marker

STAGES = ("data", "finetune", "sample", "judge", "analyze")
ENGINE_STAGES = ("sample", "judge")


def run_name(model: str, dataset: str | None, seed: int | None) -> str:
    return f"{model}__{BASE_LABEL}" if dataset is None else f"{model}__{dataset}__s{seed}"


def plan(spec: SweepSpec) -> list[Node]:
    """All nodes of the sweep in dependency order."""
    nodes: list[Node] = []

    def add(stage: str, name: str, config: dict, deps: list[Node], group: str | None = None,
            partial_ok: bool = False) -> Node:
        node = Node(stage, name, config_key(stage, config, [d.key for d in deps]), config,
                    tuple(d.id for d in deps), group, partial_ok)
        nodes.append(node)
        return node

    data_nodes = {
        ds.name: add("data", ds.name, data_config(ds), []) for ds in spec.datasets
    }
    eval_config = {
        "eval": spec.eval.key_config(),
        "questions_content": {suite.name: fingerprint(suite.questions) for suite in spec.eval.suites},
        "sampling": spec.sampling.key_config(),
    }
    judge_config = {
        "judge": spec.judge.score_config(),
        "judge_model": judge_model_ref(spec),
        "questions_content": eval_config["questions_content"],
    }
    # Template sets and score maps given as files: editing one re-judges (built-in names are
    # pinned by the package version; left out when absent so earlier keys stay valid).
    judge_files = {name: fingerprint(ref) for name, ref in
                   (("templates", spec.judge.templates), ("score_map", spec.judge.score_map))
                   if ref and Path(ref).is_file()}
    if judge_files:
        judge_config["judge_files"] = judge_files
    if (build := judge_build(spec)) is not None and json.loads(build)["weights"] is not None:
        # A local judge's weights, dtype and engine: left out where no local weights can be
        # hashed (a hub id, resolved on the cluster), so those keys stay as they were.
        judge_config["judge_build"] = build
    if spec.judge.panel is not None:  # left out when absent so earlier keys stay valid
        # By content, not path: the same reference files anywhere give the same panel.
        judge_config["panel"] = {**spec.judge.panel.model_dump(mode="json", exclude={"reference"}),
                                 "content": reference_fingerprint(spec.judge.panel.reference)}
    judge_nodes = []
    for model in spec.models:
        sample_nodes = []
        replicas = spec.sampling_for(model.name).replicas

        def engine(index: int) -> str:
            # The model's runs dealt out among its engines in turn (one job each), base model first.
            return f"sample:{model.name}" if replicas == 1 else f"sample:{model.name}:{index % replicas}"

        if spec.eval.include_base_model:
            sample_nodes.append(
                add("sample", run_name(model.name, None, None),
                    {"model": model.key_config(), "dataset": None, "seed": None, **eval_config},
                    [], group=engine(0))
            )
        for ds in spec.datasets:
            for seed in spec.seeds:
                name = run_name(model.name, ds.name, seed)
                tune = add("finetune", name,
                           {"model": model.key_config(), "dataset": ds.name, "seed": seed,
                            "finetune": spec.finetune.key_config(), "use_gpu": spec.use_gpu},
                           [data_nodes[ds.name]])
                sample_nodes.append(
                    add("sample", name,
                        {"model": model.key_config(), "dataset": ds.name, "seed": seed, **eval_config},
                        [tune], group=engine(len(sample_nodes)))
                )
        for sampled in sample_nodes:
            judge_nodes.append(add("judge", sampled.name, judge_config, [sampled], group="judge"))
    # A failed seed should not hide the other runs' numbers: the analysis runs on what is judged,
    # records what is missing, and is redone when the rest arrives.
    analysis_config = {"analysis": spec.analysis.model_dump(mode="json"),
                       "pushback": spec.eval.pushback.model_dump(mode="json"),
                       "harm_min_numeric_mass": spec.eval.harm_perception.min_numeric_mass}
    # The judge's measured error corrects the rates: new figures redo the (cheap) analysis.
    if (error := judge_error(spec.judge)) is not None:
        analysis_config["judge_error"] = dataclasses.asdict(error)
    add("analyze", spec.name, analysis_config, judge_nodes, partial_ok=True)
    return nodes


def sample_part_keys(spec: SweepSpec, node: Node, runs: list[sample.SampleRun]
                     ) -> tuple[dict[tuple[str, str, str], str], dict[tuple[str, str], str]]:
    """The sample cache's keys (sample_cache.py) of every part of these runs: answers per (run_id,
    suite, condition) and harm ratings per (run_id, suite), in the order the tables list them."""
    adapters = {run.run_id: _fingerprint_dir(run.adapter_path) if run.adapter_path else None for run in runs}
    base_only = {c.name for c in spec.eval.conditions if c.base_model_only}
    parts, harm_parts = {}, {}
    for run in runs:
        for suite in spec.eval.suites:
            asked = {"model": node.config["model"], "adapter": adapters[run.run_id], "run": run.columns(),
                     "suite": suite.model_dump(mode="json", exclude={"harm_perception"}),
                     "questions_content": node.config["questions_content"][suite.name]}
            for condition in spec.eval.conditions_for(suite.name):
                if run.adapter_path and condition.name in base_only:
                    continue
                parts[run.run_id, suite.name, condition.name] = config_key("sample_part", {
                    **asked, "sampling": spec.sampling.key_config(), "condition": condition.model_dump(mode="json"),
                    "pushback": list(spec.eval.pushback.messages) if suite.pushback else None}, [])
            if suite.harm_perception:
                rating = spec.eval.harm_perception.model_dump(mode="json", exclude={"min_numeric_mass"})
                harm_parts[run.run_id, suite.name] = config_key("harm_part", {**asked, "harm_perception": rating}, [])
    return parts, harm_parts


def _fingerprint_dir(path: str) -> str:
    """Content hash of an adapter folder (every file), so a retrained adapter is a new part."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return ",".join(f"{p.relative_to(path)}:{data.sha256_file(p)}" for p in files)


def task_options(spec: SweepSpec, stage: str, cluster_cpus: int = 1, model: str | None = None) -> dict:
    """Ray resources of a stage's task (`model`: the model a sample job serves)."""
    if stage == "finetune":
        # The task only drives Ray Train; the training workers ask for their own CPUs/GPUs. On a
        # GPU cluster it still asks for a CPU: Ray places a task that asks nothing on the node
        # that submits it, so a sweep's dozens of drivers (a process each, torch imported) would
        # all land on the head. On CPUs the training workers need every core, and a Ray that
        # emsweep started runs only as many finetunes as fit (finetune_slots).
        return {"num_cpus": 1 if spec.use_gpu else 0}
    if stage == "judge":
        # A local judge's engines are Ray actors that ask for their own CPUs/GPUs (judge/local.py).
        return {"num_cpus": 0 if spec.judge.backend == "vllm" else 1}
    if stage in ENGINE_STAGES:
        if spec.use_gpu:
            sampling = spec.sampling_for(model) if model else spec.sampling
            return {"num_cpus": 1, "num_gpus": sampling.tensor_parallel_size}
        # On CPUs an engine uses every core it is given (Ray sets OMP_NUM_THREADS from num_cpus);
        # engines wait for their inputs anyway, so they do not compete with finetunes.
        return {"num_cpus": max(1, cluster_cpus)}
    return {"num_cpus": 1}


def job_task_options(spec: SweepSpec, job: list[Node], cluster_cpus: int) -> dict:
    """Ray resources of one job's task (a sample job serves its model)."""
    model = job[0].config["model"]["name"] if job[0].stage == "sample" else None
    return task_options(spec, job[0].stage, cluster_cpus, model)


DISABLED_WANDB = WandbSpec(mode="disabled")


class StageRunner:
    """Runs one job (a list of nodes of one stage) inside a Ray task."""

    def __init__(self, spec: SweepSpec, out_dir: Path, nodes: list[Node], store_uri: str | None = None):
        from emsweep.remote import RemoteDir

        self.spec = spec
        self.out_dir = Path(out_dir)
        self.store = Store(self.out_dir)
        # An object-store output dir (remote.py): out_dir is this machine's staging dir for it.
        self.remote = RemoteDir(store_uri) if store_uri else None
        # Engine jobs then run in a long-lived engine host, which keeps its engine for the next.
        self.pipelined = spec.executor.schedule == "pipelined"
        self.by_id = {node.id: node for node in nodes}
        self.live = tracking.LiveCounters(DISABLED_WANDB, self.out_dir, spec.name, "", [])  # set per job by run()

    # --- helpers -------------------------------------------------------------------
    def input_dir(self, node: Node, stage: str) -> Path:
        (dep,) = [self.by_id[d] for d in node.deps if d.startswith(stage + "/")]
        self.fetch(dep)
        return self.store.node_dir(dep.stage, dep.name, dep.key)

    def fetch(self, node: Node) -> bool:
        """Whether a node is done, pulled first from the store when this machine lacks it (a job
        on another machine than the driver's)."""
        if self.store.is_done(node.stage, node.name, node.key):
            return True
        if self.remote is not None:
            relative = self._relative(node)
            if self.remote.exists(f"{relative}/{DONE}"):
                self.remote.pull_node(relative, self.store.root)
        return self.store.is_done(node.stage, node.name, node.key)

    def _relative(self, node: Node) -> str:
        return self.store.relative(self.store.node_dir(node.stage, node.name, node.key))

    def shared_location(self, relative: str) -> str:
        """Where an entry of the output dir that every machine reads and writes lives: on the
        store for an object-store sweep (the driver and other jobs may be on other machines)."""
        return self.remote.location(relative) if self.remote else str(self.store.root / relative)

    def started_location(self, job_id: str) -> str:
        """Where a job says it started, for the driver's stall watch."""
        return self.shared_location(self.store.relative(self.store.started_path(job_id)))

    def commit(self, node: Node, tmp: Path, started: float, tables: dict[str, str], step_metrics: str | None = None,
               extra: dict | None = None, logged_steps: int = 0):
        final = self.store.commit(
            node.stage, node.name, node.key, tmp,
            {"seconds": time.time() - started, "finished_at": time.time(), "config": node.config,
             "inputs": list(node.deps), **(extra or {})},
        )
        warning = tracking.log_node(
            self.spec.wandb, out_dir=self.out_dir, sweep=self.spec.name, stage=node.stage, node_id=node.id,
            key=node.key, config=node.config, tables={k: final / v for k, v in tables.items()},
            step_metrics=final / step_metrics if step_metrics else None, logged_steps=logged_steps,
            live=self.live.take(node.id),
        )
        if warning:
            # Recorded with the node so the run's summary can say what was not logged.
            warnings = [*(self.store.record(node.stage, node.name, node.key) or {}).get("warnings", []), warning]
            self.store.annotate(node.stage, node.name, node.key, {"warnings": warnings})
            print(f"warning: {warning}", flush=True)
        if self.remote is not None:  # from the machine that computed it: the driver's may not see this dir
            self.remote.push_node(final, self._relative(node))

    def questions(self):
        return [question for suite in self.spec.eval.suites for question in load_suite(suite)]

    # --- stages --------------------------------------------------------------------
    def run(self, stage: str, nodes: list[Node]) -> dict[str, str | None]:
        # What the job says about itself while it runs (progress.py): shown by `emsweep run/status`,
        # and logged to its nodes' W&B runs for sample and judge jobs (a finetune's rank 0 logs
        # its steps itself: tracking.LiveRun).
        self.live = tracking.LiveCounters(self.spec.wandb if stage in ("sample", "judge") else DISABLED_WANDB,
                                          self.out_dir, self.spec.name, stage, nodes)
        self.progress = ProgressWriter(self.shared_location(progress.record_relative(nodes[0].id)), stage,
                                       [n.id for n in nodes], sink=self.live.log)
        try:
            return run_guarded(nodes, lambda: getattr(self, f"run_{stage}")(nodes))
        finally:
            self.live.close()

    def run_data(self, nodes: list[Node]) -> None:
        for node in nodes:
            started, tmp = time.time(), self.store.new_tmp_dir()
            table = data.load_dataset(next(d for d in self.spec.datasets if d.name == node.name))
            pq.write_table(table, tmp / "data.parquet")
            self.commit(node, tmp, started, {"data": "data.parquet"})

    def run_finetune(self, nodes: list[Node]) -> None:
        for node in nodes:
            started, tmp = time.time(), self.store.new_tmp_dir()
            model = self.spec.model(node.config["model"]["name"])
            resources = model.resources
            # Ray Train's run dirs: on the store for an object-store sweep, as its workers may run anywhere.
            storage_path = self.remote.location("train") if self.remote else str((self.out_dir / "train").resolve())
            run_name = f"{node.name}-{node.key}"
            finetune.finetune(
                run_name=run_name,
                storage_path=storage_path,
                model_path=resolve_model_path(model.path),
                data_path=self.input_dir(node, "data") / "data.parquet",
                seed=node.config["seed"],
                spec=self.spec.finetune_for(model.name),
                use_gpu=self.spec.use_gpu,
                out_dir=tmp,
                cpus_per_worker=resources.cpus_per_finetune_worker,
                placement_strategy=resources.placement_strategy,
                memory_per_worker=None if self.spec.use_gpu else finetune_memory_per_worker(
                    resolve_model_path(model.path), self.spec.finetune_for(model.name).num_workers),
                started=(self.started_location(node.id), node.id),
                progress_path=self.shared_location(progress.record_relative(node.id)),
                wandb_live={"wandb": self.spec.wandb.model_dump(mode="json"), "out_dir": str(self.out_dir.resolve()),
                            "sweep": self.spec.name, "node_id": node.id, "key": node.key, "config": node.config},
            )
            # Steps the live W&B run logged while training are not logged again.
            logged = tracking.LiveRun.logged_steps(finetune.live_wandb_marker(storage_path, run_name))
            self.commit(node, tmp, started, {"finetune_metrics": "metrics.parquet"}, step_metrics="metrics.parquet",
                        logged_steps=logged)

    def run_sample(self, nodes: list[Node]) -> None:
        started = time.time()
        model = self.spec.model(nodes[0].config["model"]["name"])
        runs_by_node = {node.name: self.sample_runs(node, model.name) for node in nodes}
        runs = [run for node_runs in runs_by_node.values() for run in node_runs]
        # Only the parts the sample cache lacks are sampled (all of them on a first run).
        cache = SampleCache(self.shared_location("sample_cache"))
        parts, harm_parts = sample_part_keys(self.spec, nodes[0], runs)
        todo = {part for part, key in parts.items() if not cache.has(key, "samples")}
        harm_todo = {part for part, key in harm_parts.items() if not cache.has(key, "harm")}
        if todo or harm_todo:
            tables, harm = sample.sample_runs(
                resolve_model_path(model.path), runs, self.questions(), self.spec.sampling_for(model.name),
                self.spec.eval, max_model_len=model.max_model_len, max_lora_rank=self.spec.finetune.lora_r,
                parts=todo, harm_parts=harm_todo, progress=self.progress, keep_engine=self.pipelined,
            )
            for (run_id, suite, condition) in todo:
                table = tables[run_id]
                rows = pc.and_(pc.equal(table["suite"], suite), pc.equal(table["condition"], condition))
                cache.put(parts[run_id, suite, condition], "samples", table.filter(rows))
            for (run_id, suite) in harm_todo:
                cache.put(harm_parts[run_id, suite], "harm", harm[run_id].filter(pc.equal(harm[run_id]["suite"], suite)))
        for node in nodes:
            tmp = self.store.new_tmp_dir()
            node_runs = {run.run_id for run in runs_by_node[node.name]}
            mine = [part for part in parts if part[0] in node_runs]
            mine_harm = [part for part in harm_parts if part[0] in node_runs]
            samples_table = pa.concat_tables([sample.SCHEMA.empty_table()] + [
                cache.get(parts[part], "samples", sample.SCHEMA) for part in mine])
            harm_table = pa.concat_tables([sample.HARM_SCHEMA.empty_table()] + [
                cache.get(harm_parts[part], "harm", sample.HARM_SCHEMA) for part in mine_harm])
            pq.write_table(samples_table, tmp / "samples.parquet")
            pq.write_table(harm_table, tmp / "harm.parquet")
            sampled = sum(part in todo for part in mine) + sum(part in harm_todo for part in mine_harm)
            self.commit(node, tmp, started, {"samples": "samples.parquet", "harm": "harm.parquet"},
                        extra={"sample_parts": {"total": len(mine) + len(mine_harm), "sampled": sampled}})

    def sample_runs(self, node: Node, model: str) -> list[sample.SampleRun]:
        """The final adapter (or the base model) of a sample node, and its selected checkpoints."""
        dataset, seed = node.config["dataset"] or BASE_LABEL, node.config["seed"]
        if not node.deps:
            return [sample.SampleRun(node.name, model, dataset, seed, adapter_path=None)]
        tuned = self.input_dir(node, "finetune")
        runs = [sample.SampleRun(node.name, model, dataset, seed, adapter_path=str(tuned / "adapter"))]
        wanted = self.spec.eval.checkpoint_steps
        for snapshot in sorted((tuned / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
            step = int(snapshot.name.split("-")[1])
            if wanted == "all" or step in wanted:
                runs.append(sample.SampleRun(f"{node.name}@step{step}", model, dataset, seed,
                                             adapter_path=str(snapshot), checkpoint_step=step))
        return runs

    def run_judge(self, nodes: list[Node]) -> None:
        started = time.time()
        if self.spec.judge.backend == "vllm" and self.spec.judge.scoring == "first_token":
            # Checked before the sweep started where the judge was on that machine (checks.py); on a
            # cluster the model may only be resolvable here.
            from emsweep.models import load_tokenizer
            from emsweep.scoring import first_token_problem

            tokenizer = load_tokenizer(resolve_model_path(judge_model_ref(self.spec)))
            if problem := first_token_problem(tokenizer, f"judge {self.spec.judge.model}"):
                raise ValueError(problem)
        samples = {node.name: pq.read_table(self.input_dir(node, "sample") / "samples.parquet") for node in nodes}
        questions = self.questions()
        if self.spec.judge.panel is not None:  # the positive control (judge/panel.py), judged with the runs
            suite, question_ids = panel.em_suite_questions(questions)
            samples[panel.PANEL_RUN], panel_reference = panel.panel_answers(
                self.spec.judge.panel, question_ids, suite, self.spec.analysis)
        cache = JudgmentCache(self.shared_location("judge_cache")) if self.spec.judge.cache else None
        tables, stats = judge.judge_samples(
            samples, questions, self.spec.judge,
            judge_id=judge_model_ref(self.spec), backend=make_judge_backend(self.spec, keep=self.pipelined),
            # As the driver keyed the node (no second hash of the weights); computed here where
            # the driver had no local weights to hash.
            judge_build=nodes[0].config.get("judge_build") or judge_build(self.spec),
            cache=cache,
            progress=self.progress,
        )
        panel_table = None
        if self.spec.judge.panel is not None:
            if message := stats.failure_message(panel.PANEL_RUN, tables[panel.PANEL_RUN].num_rows):
                raise RuntimeError(f"judge panel: {message}")
            panel_table = panel.panel_hits(tables.pop(panel.PANEL_RUN), panel_reference, self.spec.analysis)
        failures = {}
        for node in nodes:
            # Errored judgments (an outage, a 401) are failures, not null scores: the node is not
            # committed, so a rerun asks again, and only for those (the good ones are cached).
            if message := stats.failure_message(node.name, tables[node.name].num_rows):
                failures[node.id] = message
                continue
            tmp = self.store.new_tmp_dir()
            pq.write_table(tables[node.name], tmp / "judgments.parquet")
            # Warnings are per run, so the summary and the report name the runs whose scores are suspect.
            extra = {**judge_counts(tables[node.name]), "warnings": stats.warnings.get(node.name, [])}
            outputs = {"judgments": "judgments.parquet"}
            if panel_table is not None:
                pq.write_table(pa.Table.from_pandas(panel_table, preserve_index=False), tmp / "panel.parquet")
                outputs["panel"] = "panel.parquet"
                extra["panel"] = panel.hit_rates(panel_table)
            self.commit(node, tmp, started, outputs, extra=extra)
        if failures:
            raise NodeFailures(failures)

    def run_analyze(self, nodes: list[Node]) -> None:
        (node,) = nodes
        started, tmp = time.time(), self.store.new_tmp_dir()
        # Only the judge nodes that are done: the executor runs this node when some failed.
        inputs = [self.by_id[i] for i in node.deps]
        judge_nodes = [d for d in inputs if self.fetch(d)]
        missing = [d.id for d in inputs if d not in judge_nodes]
        if not judge_nodes:
            raise RuntimeError("no judge node is done: nothing to analyze")
        judgments = read_judgments(self.store, judge_nodes)
        harm = pa.concat_tables([pq.read_table(self.input_dir(d, "sample") / "harm.parquet") for d in judge_nodes])
        # Categories are a property of the question; the samples carry them.
        questions = pa.concat_tables([
            pq.read_table(self.input_dir(d, "sample") / "samples.parquet", columns=["suite", "question_id", "category"])
            for d in judge_nodes])
        tables = analyze.analyze(judgments, harm, self.spec.analysis, self.spec.eval.pushback, questions,
                                 self.spec.eval.harm_perception.min_numeric_mass, judge_error(self.spec.judge))
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        self.commit(node, tmp, started, {name: f"{name}.parquet" for name in tables},
                    extra={"missing_inputs": missing} if missing else None)


def make_judge_backend(spec: SweepSpec, keep: bool = False) -> judge.Backend:
    """`keep`: the caller judges again later in this process (an engine host), so local judge
    engines stay up between calls."""
    if spec.judge.backend == "openai":
        from emsweep.judge.http import HttpJudge

        return HttpJudge(spec.judge)
    from emsweep.judge.local import run_pool

    return functools.partial(run_pool, resolve_model_path(judge_model_ref(spec)), spec.judge,
                             use_gpu=spec.use_gpu, node_cpus=node_cpus(), keep=keep)


def finetune_memory_per_worker(model_path: str, num_workers: int) -> int:
    """What each CPU training worker reserves of Ray's `memory` resource: the estimate
    (engine.finetune_worker_memory_bytes), capped so one finetune always fits on a node (an
    unsatisfiable request would wait forever)."""
    import ray

    from emsweep.engine import finetune_worker_memory_bytes

    node_memory = min((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    estimate = finetune_worker_memory_bytes(model_path)
    return int(min(estimate, node_memory / max(1, num_workers))) if node_memory else estimate


def finetune_slots(spec: SweepSpec) -> int | None:
    """How many finetune jobs to have in flight on a Ray this process started (a laptop, a
    workstation: fixed resources); None (no limit) on a cluster it connected to, which may
    autoscale, where waiting finetunes' placement groups are what asks for more nodes.

    A finetune job beyond what fits would only wait in a process of its own (torch and Ray Train
    loaded), and Ray's OOM killer takes such idle tasks first: since Ray 2.56 all of them at once,
    so one memory spike would fail every queued finetune."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return None
    total = ray.cluster_resources()
    fits = []
    for model in spec.models:
        workers = spec.finetune_for(model.name).num_workers
        if spec.use_gpu:
            fits.append(total.get("GPU", 0) // workers)
            continue
        cpus = total.get("CPU", 0) // (workers * model.resources.cpus_per_finetune_worker)
        memory = total.get("memory", 0) // max(1, workers * finetune_memory_per_worker(
            resolve_model_path(model.path), workers))
        fits.append(min(cpus, memory))
    return max(1, int(min(fits)))


def node_cpus() -> int:
    """CPUs of one node of the connected Ray cluster, assuming the head node is typical."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1) // max(1, len(ray.nodes())))


def judge_counts(judgments: pa.Table) -> dict:
    """Recorded in the node's _DONE.json: how much of the judging was reused or failed."""
    cached = judgments.column("cached").to_pylist()
    reasons = judgments.column("null_reason").to_pylist()
    return {"judge": {"rows": len(cached), "cache_hits": sum(cached),
                      "null_scores": sum(r is not None for r in reasons)}}


def worker_env() -> dict[str, str]:
    """Environment emsweep gives Ray workers (the `runtime_env` of its `ray.init`): the driver's
    HF_HUB_OFFLINE where it is set (the CLI sets it for local runs only: a laptop has no hub, a
    cluster loads hub ids), quiet tokenizers; no secrets are added here.

    Inside a Ray job (`emsweep submit`), variables the job's own runtime_env sets (`-e NAME=...`)
    are left out: the job passes them to every worker already, and Ray refuses a driver
    runtime_env that repeats one of the job's keys ("Failed to merge the Job's runtime env")."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
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


def _run_job(spec_json: str, out_dir: str, nodes: list[Node], stage: str, job: list[Node],
             store_uri: str | None = None, driver_node: str | None = None) -> dict[str, str | None]:
    """One job in a Ray worker. For an object-store sweep on another machine than the driver's,
    the job works in this machine's own staging dir (remote.py), sharing the driver's otherwise."""
    from emsweep import remote

    foreign = store_uri is not None and driver_node != _ray_node_id()
    if foreign:
        out_dir = str(remote.staging_dir(store_uri).resolve())
    spec = SweepSpec.model_validate_json(spec_json)
    runner = StageRunner(spec, Path(out_dir), nodes, store_uri)
    if stage != "finetune":  # a finetune is started once its training workers run (run_finetune)
        write_started_marker(runner.started_location(job[0].id), job[0].id)
    return runner.run(stage, job)


class EngineHost:
    """A pipelined schedule's long-lived engine process (a Ray actor; see EngineHosts)."""

    def run(self, *args) -> dict[str, str | None]:
        return _run_job(*args)


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


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


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
    """Wait until this driver has no live Ray Train controller; return how many still live."""
    from ray._private.state import actors  # reads the GCS directly; the state API needs the dashboard

    deadline = time.time() + timeout_s
    while True:
        alive = sum(1 for actor in actors().values()
                    if actor["JobID"] == job_id and actor["ActorClassName"] == "TrainController"
                    and actor["State"] != "DEAD")
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.5)


def _bundle(resources: dict) -> str:
    """A placement-group bundle as a person reads it: `CPU 1, memory 4.0 GiB`."""
    return ", ".join(f"{name} {value / GIB:.1f} GiB" if name == "memory" else f"{name} {value:g}"
                     for name, value in sorted(resources.items()))


def autoscaler_scaling_up() -> bool:
    """Whether the connected cluster's autoscaler has launches or nodes pending (Ray's autoscaler
    state API); False where there is no autoscaler (a laptop, a fixed cluster) or no answer."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    except Exception:  # no autoscaler state: nothing is coming up
        return False
    return bool(status.pending_launches or status.pending_nodes)


def describe_cluster_wait(spec: SweepSpec, waiting: list[list[Node]], cpus: int) -> str:
    """What waiting jobs ask for and what holds the cluster: for a stall message."""
    import ray

    asks = []
    for job in waiting:
        options = {k: v for k, v in job_task_options(spec, job, cpus).items() if v}
        workers = ""
        if job[0].stage == "finetune":
            model = spec.model(job[0].config["model"]["name"])
            tune = spec.finetune_for(model.name)
            each = "1 GPU" if spec.use_gpu else f"{model.resources.cpus_per_finetune_worker} CPU and memory"
            workers = f", then {tune.num_workers} training workers of {each} each"
        asks.append(f"{job[0].id} (asks {options or 'nothing'} for its task{workers})")
    total, free = ray.cluster_resources(), ray.available_resources()
    shown = ", ".join(f"{name} {free.get(name, 0):g}/{total[name]:g}" for name in ("CPU", "GPU") if name in total)
    memory = f"memory {free.get('memory', 0) / GIB:.1f}/{total.get('memory', 0) / GIB:.1f} GiB"
    groups: dict[str, list[str]] = {}
    for entry in ray.util.placement_group_table().values():
        if entry["state"] != "REMOVED":
            bundles = list(entry["bundles"].values())
            groups.setdefault(entry["state"], []).append(f"{len(bundles)}x{{{_bundle(bundles[0] if bundles else {})}}}")
    held = "; ".join(f"{state}: {', '.join(items)}" for state, items in groups.items()) or "none"
    return f"waiting: {'; '.join(asks)}. Free: {shown}, {memory}. Placement groups: {held}"


def run_sweep(spec: SweepSpec, out_dir: Path, on_start=None, on_finish=None, connect=None,
              until: str | None = None, on_stall=None, store_uri: str | None = None, remote_lease=None) -> list:
    """Execute a sweep on the Ray cluster this process is connected to.

    `connect()` (e.g. `ray.init`) is called before the first job only, so resuming a finished
    sweep never starts Ray (seconds instead of a cluster start). `until` (a stage) stops the
    sweep after that stage: only the nodes of it and the stages before it run. `store_uri`: the
    object store whose staging dir out_dir is (run_sweep_remote, which holds its lease, `remote_lease`).
    A run whose lease is taken over stops: lease.LeaseLost, its jobs cancelled."""
    import ray

    from emsweep.dag import Watch, execute, nodes_to_run
    from emsweep.remote import RemoteDir

    remote_dir = RemoteDir(store_uri) if store_uri else None

    out_dir = Path(out_dir).resolve()
    store = Store(out_dir)
    nodes = plan(spec)
    if until is not None:
        nodes = [node for node in nodes if STAGES.index(node.stage) <= STAGES.index(until)]
    remote = ray.remote(max_retries=0)(_run_job)
    # A fresh worker process per engine job: vLLM does not give all memory back in-process,
    # and the next engine (the judge after the sampler) needs it.
    remote_engine = ray.remote(max_retries=0, max_calls=1)(_run_job)
    pipelined = spec.executor.schedule == "pipelined"
    with store.lock() as held:
        store.clean_tmp()
        write_spec_snapshot(spec, out_dir)
        pending = nodes_to_run(nodes, store)
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
            args = (spec_json, str(out_dir), cluster["nodes_ref"], stage, job, store_uri, cluster["node"])
            if pipelined and stage in ENGINE_STAGES:
                return hosts.submit(job[0].group, options, args)
            function = remote_engine if stage in ENGINE_STAGES else remote
            return function.options(**options, name=f"{stage}:{job[0].name}").remote(*args)

        seen_started: set[str] = set()

        def started(job: list[Node]) -> bool:
            if job[0].id not in seen_started and (store.job_started(job[0].id) or remote_dir is not None and (
                    remote_dir.exists(store.relative(store.started_path(job[0].id))))):
                seen_started.add(job[0].id)
            return job[0].id in seen_started

        watch = Watch(
            started=started,
            describe=lambda waiting: describe_cluster_wait(spec, waiting, cluster.get("cpus", 1)),
            on_stall=on_stall or (lambda message: print(f"warning: {message}", flush=True)),
            after_failure=release_leaked_placement_groups,
            report_s=spec.executor.stall_report_s, timeout_s=spec.executor.stall_timeout_s,
            scaling_up=autoscaler_scaling_up, scale_up_timeout_s=spec.executor.scale_up_timeout_s,
            lease_lost=lambda: held.lost() or (remote_lease.lost() if remote_lease is not None else None),
            on_poll=lambda running: hosts.release_idle(running, started),
        )
        summary = LiveRates(spec, store, nodes)

        def finished(status) -> None:
            node = status.node
            if remote_dir is not None and status.status == "done":
                # Pushed by the job from wherever it ran; here, the summary and the report read it.
                local = store.node_dir(node.stage, node.name, node.key)
                remote_dir.pull_node(store.relative(local), store.root)
            hosts.finished(status)
            if node.stage == "judge" and status.status == "done":
                summary.update()
            if on_finish is not None:
                on_finish(status)

        # Pipelined: a run's engine jobs are its own, dealt to its group's host.
        job_of = (lambda node: node.id if node.stage in ENGINE_STAGES else node.group or node.id) if pipelined \
            else (lambda node: node.group or node.id)
        try:
            return execute(nodes, store, submit, finished, watch, job_of=job_of, progress_dir=store_uri,
                           max_running=lambda stage: connected()["finetune_slots"] if stage == "finetune" else None)
        finally:
            hosts.close()
            summary.finish()


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


def judgments_of(spec: SweepSpec, out_dir: Path) -> pa.Table:
    """All judgments of a sweep's current judge nodes (every one must be done)."""
    store = Store(Path(out_dir))
    judge_nodes = [node for node in plan(spec) if node.stage == "judge"]
    missing = [node.id for node in judge_nodes if not store.is_done(node.stage, node.name, node.key)]
    if missing:
        raise FileNotFoundError(f"{out_dir}: judge nodes not done for spec {spec.name!r}: {missing}")
    return read_judgments(store, judge_nodes)


def read_judgments(store: Store, judge_nodes: list[Node]) -> pa.Table:
    # Judge nodes written before a column existed (judge_templates) read as null there.
    return pa.concat_tables([pq.read_table(store.node_dir(n.stage, n.name, n.key) / "judgments.parquet")
                             for n in judge_nodes], promote_options="default")


def write_spec_snapshot(spec: SweepSpec, out_dir: Path) -> None:
    from emsweep.store import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "spec.json", spec.model_dump(mode="json"))


def read_spec_snapshot(out_dir: Path) -> SweepSpec:
    path = Path(out_dir) / "spec.json"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} has no spec.json: not an emsweep output directory")
    import json

    from emsweep.spec import SpecError, parse_spec

    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not a spec snapshot: {err}") from None
    try:
        return parse_spec(raw, source=str(path))
    except SpecError as err:  # e.g. a field an older emsweep wrote and this one no longer knows
        raise SpecError(f"{err} (is this output dir from another emsweep version?)") from None


def run_sweep_remote(spec, uri: str, on_start=None, on_finish=None, connect=None, staging: Path | None = None,
                     until: str | None = None):
    """`run_sweep` with the output dir on an object store (remote.py's module doc): pull the done
    nodes into a local staging dir, run there, push each node as it finishes, under the store's lease."""
    from emsweep import lease
    from emsweep.files import DONE, RUN_SCRATCH
    from emsweep.remote import RemoteDir, _redacted, pull, push_shared, staging_dir
    from emsweep.store import locked_error

    remote = RemoteDir(uri)
    staging = staging or staging_dir(uri)
    try:
        with remote.lease().hold() as held:
            pull(remote, staging)
            store = Store(staging.resolve())
            # Nodes finished in staging whose upload was cut short (a crash mid-push) go up now.
            on_store = set(remote.done_node_dirs())
            for marker in sorted(store.root.glob(f"nodes/*/*/{DONE}")):
                relative = store.relative(marker.parent)
                if relative not in on_store:
                    remote.push_node(marker.parent, relative)
            # A dead run's started markers would make this run's waiting jobs look started, and
            # its jobs' progress records would show as running.
            for entry in RUN_SCRATCH:
                remote.fs.delete_dir_contents(remote._path(entry), missing_dir_ok=True)
            try:
                return run_sweep(spec, staging, on_start=on_start, on_finish=on_finish, connect=connect, until=until,
                                 store_uri=uri, remote_lease=held)
            finally:
                if held.lost() is None:  # a run whose lease was taken writes nothing more there
                    push_shared(remote, staging)
    except lease.LeaseTaken as taken:
        raise locked_error(_redacted(uri), taken.held, taken.age) from None
