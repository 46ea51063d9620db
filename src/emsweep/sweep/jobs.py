"""One job of a sweep inside a Ray task: a list of nodes of one stage, each stage's body
(data, finetune, sample, judge, analyze) and per-node W&B logging. Every file goes through the
Store, which keeps an object store's copy in step (store.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emsweep import analyze, data, finetune, judge, progress, sample, tracking
from emsweep.dag import Node, NodeFailures, run_guarded
from emsweep.judge.cache import JudgmentCache
from emsweep.judge import panel
from emsweep.judge.audit import audited_rows
from emsweep.judge.identity import judge_build, judge_id
from emsweep.judge.backends import make_backend
from emsweep.judge.kinds import kind_of
from emsweep.judge.errors import judge_error
from emsweep.models import resolve_model_path
from emsweep.progress import ProgressWriter
from emsweep.questions import load_suite
from emsweep.sample_cache import SampleCache
from emsweep.spec import BASE_LABEL, SweepSpec, WandbSpec
from emsweep.store import Store, write_started_marker
from emsweep.sweep.plan import sample_part_keys
from emsweep.sweep.resources import finetune_memory_per_worker
from emsweep.sweep.results import read_judgments


DISABLED_WANDB = WandbSpec(mode="disabled")


class StageRunner:
    """Runs one job (a list of nodes of one stage) inside a Ray task."""

    def __init__(self, spec: SweepSpec, out_dir: Path, nodes: list[Node], store_uri: str | None = None):
        """`store_uri`: the object store whose staging dir on this machine out_dir is, if any."""
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.store = Store(self.out_dir, mirror=store_uri)
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
        """Whether a node is done (brought to this machine first if it was computed on another)."""
        return self.store.fetch(node.stage, node.name, node.key)

    def run_labels(self, node: Node) -> dict:
        """What a finetune, sample or judge node's W&B run shows of the run it belongs to (config
        `dataset`, `seed`, `model_name`), so a dashboard groups any stage's runs by dataset; a judge
        node's own config holds only the judge's settings, so these come from its sample node."""
        if node.stage in ("judge", "audit"):
            (node,) = [self.by_id[d] for d in node.deps if d.startswith("sample/")]
        if node.stage not in ("finetune", "sample"):
            return {}
        config = node.config
        return {"dataset": config.get("dataset") or BASE_LABEL, "seed": config.get("seed"),
                "model_name": config["model"]["name"]}

    def rate_scalars(self, node: Node, judgments: pa.Table) -> dict | None:
        """The run's overall rates for its judge node's W&B run (tracking.run_rate_scalars: one run
        per seed, so a dashboard shows the spread over seeds); None if they cannot be computed,
        which never fails the node (the analyze node computes them again)."""
        if self.spec.wandb.mode == "disabled":
            return None
        try:
            return tracking.run_rate_scalars(analyze.overall_run_rates(judgments.to_pandas(), self.spec.analysis),
                                             node.name)
        except Exception as err:
            print(f"warning: {node.id}: rates for W&B not computed: {type(err).__name__}: {err}", flush=True)
            return None

    def commit(self, node: Node, tmp: Path, started: float, tables: dict[str, str], step_metrics: str | None = None,
               extra: dict | None = None, logged_steps: int = 0, scalars: dict | None = None):
        final = self.store.commit(
            node.stage, node.name, node.key, tmp,
            {"seconds": time.time() - started, "finished_at": time.time(), "config": node.config,
             "inputs": list(node.deps), **(extra or {})},
        )
        warning = tracking.log_node(
            self.spec.wandb, out_dir=self.out_dir, sweep=self.spec.name, stage=node.stage, node_id=node.id,
            key=node.key, config={**node.config, **self.run_labels(node)}, tables={k: final / v for k, v in tables.items()},
            step_metrics=final / step_metrics if step_metrics else None, logged_steps=logged_steps,
            live=self.live.take(node.id), scalars=scalars,
        )
        if warning:
            # Recorded with the node so the run's summary can say what was not logged.
            warnings = [*(self.store.record(node.stage, node.name, node.key) or {}).get("warnings", []), warning]
            self.store.annotate(node.stage, node.name, node.key, {"warnings": warnings})
            print(f"warning: {warning}", flush=True)

    def questions(self):
        return [question for suite in self.spec.eval.suites for question in load_suite(suite)]

    # --- stages --------------------------------------------------------------------
    def run(self, stage: str, nodes: list[Node]) -> dict[str, str | None]:
        # What the job says about itself while it runs (progress.py): shown by `emsweep run/status`,
        # and logged to its nodes' W&B runs for sample and judge jobs (a finetune's rank 0 logs
        # its steps itself: tracking.LiveRun).
        self.live = tracking.LiveCounters(self.spec.wandb if stage in ("sample", "judge", "audit") else DISABLED_WANDB,
                                          self.out_dir, self.spec.name, stage, nodes,
                                          {node.id: self.run_labels(node) for node in nodes})
        self.progress = ProgressWriter(self.store.location(progress.record_relative(nodes[0].id)), stage,
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
            # Ray Train's run dirs: where every machine sees them, as its workers may run anywhere.
            storage_path = self.store.location("train")
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
                started=(self.store.started_location(node.id), node.id),
                progress_path=self.store.location(progress.record_relative(node.id)),
                live_run=tracking.LiveRunSettings(wandb=self.spec.wandb, out_dir=str(self.out_dir.resolve()),
                                                  sweep=self.spec.name, node_id=node.id, key=node.key,
                                                  config=node.config),
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
        cache = SampleCache(self.store.location("sample_cache"))
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

    def judge_with(self, spec: SweepSpec, nodes: list[Node], samples: dict[str, pa.Table]):
        """`samples` judged by `spec.judge` (the judge's, or the audit judge's: SweepSpec.audit_view)
        through the judgment cache: (tables by node name, stats)."""
        # Checked before the sweep started where the judge was on that machine (checks.py); on a
        # cluster the model may only be resolvable here.
        if problem := kind_of(spec.judge).runtime_problem(spec):
            raise ValueError(problem)
        cache = JudgmentCache(self.store.location("judge_cache")) if spec.judge.cache else None
        return judge.judge_samples(
            samples, self.questions(), spec.judge,
            judge_id=judge_id(spec), backend=make_backend(spec, keep=self.pipelined),
            # As the driver keyed the node (no second hash of the weights); computed here where
            # the driver had no local weights to hash.
            judge_build=nodes[0].config.get("judge_build") or judge_build(spec),
            cache=cache,
            progress=self.progress,
        )

    def run_judge(self, nodes: list[Node]) -> None:
        started = time.time()
        samples = {node.name: pq.read_table(self.input_dir(node, "sample") / "samples.parquet") for node in nodes}
        if self.spec.judge.panel is not None:  # the positive control (judge/panel.py), judged with the runs
            suite, question_ids = panel.em_suite_questions(self.questions())
            samples[panel.PANEL_RUN], panel_reference = panel.panel_answers(
                self.spec.judge.panel, question_ids, suite, self.spec.analysis)
        tables, stats = self.judge_with(self.spec, nodes, samples)
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
            self.commit(node, tmp, started, outputs, extra=extra, scalars=self.rate_scalars(node, tables[node.name]))
        if failures:
            raise NodeFailures(failures)

    def run_audit(self, nodes: list[Node]) -> None:
        """The audit judge (judge.audit) on each run's seeded draw of its answers (judge/audit.py)."""
        started, audit = time.time(), self.spec.judge.audit
        samples = {node.name: audited_rows(pq.read_table(self.input_dir(node, "sample") / "samples.parquet"),
                                           audit.fraction, audit.count, audit.seed) for node in nodes}
        tables, stats = self.judge_with(self.spec.audit_view(), nodes, samples)
        failures = {}
        for node in nodes:
            if message := stats.failure_message(node.name, tables[node.name].num_rows):
                failures[node.id] = message  # as a judge node: a rerun asks again for these only
                continue
            tmp = self.store.new_tmp_dir()
            pq.write_table(tables[node.name], tmp / "audit.parquet")
            self.commit(node, tmp, started, {"audit": "audit.parquet"},
                        extra={**judge_counts(tables[node.name]), "audited_answers": samples[node.name].num_rows,
                               "warnings": stats.warnings.get(node.name, [])})
        if failures:
            raise NodeFailures(failures)

    def run_analyze(self, nodes: list[Node]) -> None:
        (node,) = nodes
        started, tmp = time.time(), self.store.new_tmp_dir()
        # Only the judge nodes that are done: the executor runs this node when some failed.
        inputs = [self.by_id[i] for i in node.deps]
        done = [d for d in inputs if self.fetch(d)]
        missing = [d.id for d in inputs if d not in done]
        judge_nodes = [d for d in done if d.stage == "judge"]
        if not judge_nodes:
            raise RuntimeError("no judge node is done: nothing to analyze")
        judgments = read_judgments(self.store, judge_nodes)
        # The audit judge's scores of the runs whose judge node is done too (judge.audit).
        judged = {d.name for d in judge_nodes}
        audits = [pq.read_table(self.store.node_dir(d.stage, d.name, d.key) / "audit.parquet")
                  for d in done if d.stage == "audit" and d.name in judged]
        harm = pa.concat_tables([pq.read_table(self.input_dir(d, "sample") / "harm.parquet") for d in judge_nodes])
        # Categories are a property of the question; the samples carry them.
        questions = pa.concat_tables([
            pq.read_table(self.input_dir(d, "sample") / "samples.parquet", columns=["suite", "question_id", "category"])
            for d in judge_nodes])
        tables = analyze.analyze(judgments, harm, self.spec.analysis, self.spec.eval.pushback, questions,
                                 self.spec.eval.harm_perception.min_numeric_mass, judge_error(self.spec.judge),
                                 audits=pa.concat_tables(audits, promote_options="default") if audits else None)
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        self.commit(node, tmp, started, {name: f"{name}.parquet" for name in tables},
                    extra={"missing_inputs": missing} if missing else None)


def judge_counts(judgments: pa.Table) -> dict:
    """Recorded in the node's _DONE.json: how much of the judging was reused or failed."""
    cached = judgments.column("cached").to_pylist()
    reasons = judgments.column("null_reason").to_pylist()
    return {"judge": {"rows": len(cached), "cache_hits": sum(cached),
                      "null_scores": sum(r is not None for r in reasons)}}


def run_job(spec_json: str, out_dir: str, nodes: list[Node], stage: str, job: list[Node],
             store_uri: str | None = None, driver_node: str | None = None) -> dict[str, str | None]:
    """One job in a Ray worker. For an object-store sweep on another machine than the driver's,
    the job works in this machine's own staging dir (remote.py), sharing the driver's otherwise."""
    from emsweep import remote

    if store_uri is not None and driver_node != _ray_node_id():
        out_dir = str(remote.staging_dir(store_uri).resolve())
    spec = SweepSpec.model_validate_json(spec_json)
    runner = StageRunner(spec, Path(out_dir), nodes, store_uri)
    if stage != "finetune":  # a finetune is started once its training workers run (run_finetune)
        write_started_marker(runner.store.started_location(job[0].id), job[0].id)
    return runner.run(stage, job)


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
