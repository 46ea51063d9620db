"""The EM sweep as a DAG: which nodes a spec expands to, and their keys.

    data/<dataset> -> finetune/<model>__<dataset>__s<seed> -> sample/<run> -> judge/<run> -> analyze/<sweep>
                                           (base model) ----> sample/<model>__base ----^
                                                      (judge.audit) sample/<run> -> audit/<run> --^

A node's key hashes its config and its inputs' keys (store.config_key), so a spec edit
re-runs exactly the nodes that read the edited fields, and their dependents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from emsweep import data, sample
from emsweep.dag import Node
from emsweep.judge.identity import judge_build, judge_id
from emsweep.judge.kinds import kind_of
from emsweep.keys import KEY_SCHEMA, data_config, is_local, fingerprint, model_identity, reference_fingerprint
from emsweep.judge.errors import judge_error
from emsweep.spec import BASE_LABEL, SweepSpec
from emsweep.store import config_key


STAGES = ("data", "finetune", "sample", "judge", "audit", "analyze")
ENGINE_STAGES = ("sample", "judge", "audit")


def run_name(model: str, dataset: str | None, seed: int | None) -> str:
    return f"{model}__{BASE_LABEL}" if dataset is None else f"{model}__{dataset}__s{seed}"


def plan(spec: SweepSpec, key_schema: int = KEY_SCHEMA) -> list[Node]:
    """All nodes of the sweep in dependency order. `key_schema` 1 gives the keys of output dirs
    written before keys were location-free (keys.py; only sweep/migrate.py asks for it)."""
    nodes: list[Node] = []
    located = key_schema == 1

    def add(stage: str, name: str, config: dict, deps: list[Node], group: str | None = None,
            partial_ok: bool = False) -> Node:
        node = Node(stage, name, config_key(stage, config, [d.key for d in deps]), config,
                    tuple(d.id for d in deps), group, partial_ok)
        nodes.append(node)
        return node

    def model_config(model) -> dict:
        return {**model.key_config(), **({"path": model.path} if located else {"weights": model_identity(model.path)})}

    data_nodes = {
        ds.name: add("data", ds.name, _located_data_config(ds) if located else data_config(ds), [])
        for ds in spec.datasets
    }
    eval_config = {
        "eval": _located_eval_config(spec) if located else spec.eval.key_config(),
        "questions_content": {suite.name: fingerprint(suite.questions) for suite in spec.eval.suites},
        "sampling": spec.sampling.key_config(),
    }
    judge_config = _judge_config(spec, eval_config["questions_content"], located)
    audited = spec.audit_view()
    if audited is not None:
        audit_config = {**_judge_config(audited, eval_config["questions_content"], located),
                        "draw": spec.judge.audit.draw_config()}
    judge_nodes, audit_nodes = [], []
    for model in spec.models:
        sample_nodes = []
        replicas = spec.sampling_for(model.name).replicas

        def engine(index: int) -> str:
            # The model's runs dealt out among its engines in turn (one job each), base model first.
            return f"sample:{model.name}" if replicas == 1 else f"sample:{model.name}:{index % replicas}"

        if spec.eval.include_base_model:
            sample_nodes.append(
                add("sample", run_name(model.name, None, None),
                    {"model": model_config(model), "dataset": None, "seed": None, **eval_config},
                    [], group=engine(0))
            )
        for ds in spec.datasets:
            for seed in spec.seeds:
                name = run_name(model.name, ds.name, seed)
                tune = add("finetune", name,
                           {"model": model_config(model), "dataset": ds.name, "seed": seed,
                            "finetune": spec.finetune.key_config(), "use_gpu": spec.use_gpu},
                           [data_nodes[ds.name]])
                sample_nodes.append(
                    add("sample", name,
                        {"model": model_config(model), "dataset": ds.name, "seed": seed, **eval_config},
                        [tune], group=engine(len(sample_nodes)))
                )
        for sampled in sample_nodes:
            judge_nodes.append(add("judge", sampled.name, judge_config, [sampled], group="judge"))
            if audited is not None:  # beside the judge node, not after it: the draw ignores the fast judge
                audit_nodes.append(add("audit", sampled.name, audit_config, [sampled], group="audit"))
    # A failed seed should not hide the other runs' numbers: the analysis runs on what is judged,
    # records what is missing, and is redone when the rest arrives.
    analysis_config = {"analysis": spec.analysis.model_dump(mode="json"),
                       "pushback": spec.eval.pushback.model_dump(mode="json"),
                       "harm_min_numeric_mass": spec.eval.harm_perception.min_numeric_mass}
    # The judge's measured error corrects the rates: new figures redo the (cheap) analysis.
    if (error := judge_error(spec.judge)) is not None:
        analysis_config["judge_error"] = dataclasses.asdict(error)
    add("analyze", spec.name, analysis_config, judge_nodes + audit_nodes, partial_ok=True)
    return nodes


def _judge_config(spec: SweepSpec, questions_content: dict, located: bool) -> dict:
    """What a judge node's key hashes of `spec.judge` (an audit node's: of the audit judge's)."""
    config = {
        "judge": _located_score_config(spec) if located else spec.judge.score_config(),
        "judge_model": _located_judge_id(spec) if located else judge_id(spec),
        "questions_content": questions_content,
    }
    # Template sets and score maps given as files: editing one re-judges (built-in names are
    # pinned by the package version; left out when absent so earlier keys stay valid).
    judge_files = {name: fingerprint(ref) for name, ref in
                   (("templates", spec.judge.templates), ("score_map", spec.judge.score_map))
                   if ref and Path(ref).is_file()}
    if judge_files:
        config["judge_files"] = judge_files
    if (build := judge_build(spec)) is not None and json.loads(build)["weights"] is not None:
        # A local judge's weights, dtype and engine: left out where no local weights can be
        # hashed (a hub id, resolved on the cluster), so those keys stay as they were.
        config["judge_build"] = build
    if spec.judge.panel is not None:  # left out when absent so earlier keys stay valid
        # By content, not path: the same reference files anywhere give the same panel.
        config["panel"] = {**spec.judge.panel.model_dump(mode="json", exclude={"reference"}),
                           "content": reference_fingerprint(spec.judge.panel.reference)}
    return config


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
                     "suite": suite.model_dump(mode="json", exclude={"harm_perception", "questions"}),
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


def _located_data_config(dataset) -> dict:
    """A data node's config as key schema 1 hashed it: with the files' resolved paths."""
    config = data_config(dataset)
    config["dataset"]["path"] = dataset.path
    if dataset.backdoor is not None:
        config["dataset"]["backdoor"]["clean_path"] = dataset.backdoor.clean_path
    return config


def _located_eval_config(spec: SweepSpec) -> dict:
    config = spec.eval.key_config()
    for suite, dumped in zip(spec.eval.suites, config["suites"]):
        dumped["questions"] = suite.questions
    return config


def _located_judge_id(spec: SweepSpec) -> str:
    """Schema 1 named a judge in a local folder by its path."""
    reference = kind_of(spec.judge).model_reference(spec)
    return reference if is_local(reference) else judge_id(spec)


def _located_score_config(spec: SweepSpec) -> dict:
    config = spec.judge.score_config()
    config["model"] = spec.judge.model
    for field in ("templates", "score_map"):
        if field in config:
            config[field] = getattr(spec.judge, field)
    return config


def _fingerprint_dir(path: str) -> str:
    """Content hash of an adapter folder (every file), so a retrained adapter is a new part."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return ",".join(f"{p.relative_to(path)}:{data.sha256_file(p)}" for p in files)
