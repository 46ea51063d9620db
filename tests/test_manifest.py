"""The run manifest (sweep/manifest.py): what readers take a sweep's nodes from, and what `run`
says changed when a key moved."""

import json
from pathlib import Path

import pytest

from emsweep.dag import NodeStatus
from emsweep.spec import load_spec
from emsweep.sweep.manifest import (ManifestError, changed_inputs, listed_done, manifest_nodes, manifest_record,
                                    read_manifest, write_manifest)
from emsweep.sweep.plan import plan

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "workflows" / "quickstart.yaml"


def test_the_manifest_gives_back_the_planned_nodes_and_their_statuses(tmp_path):
    spec = load_spec(QUICKSTART)
    nodes = plan(spec)
    finished = {nodes[0].id: NodeStatus(nodes[0], "done", 3.0, finished_at=1.0),
                nodes[1].id: NodeStatus(nodes[1], "cached")}
    write_manifest(tmp_path, spec.name, nodes, finished)
    record = read_manifest(tmp_path)
    assert manifest_nodes(record) == nodes  # ids, keys, deps, groups: what status_table reads
    assert [node.config for node in manifest_nodes(record)] == json.loads(json.dumps([n.config for n in nodes]))
    assert listed_done(record) == {nodes[0].id, nodes[1].id}
    entry = record["nodes"][2]
    assert entry["status"] == "pending" and entry["output"] == f"nodes/{nodes[2].stage}/{nodes[2].name}-{nodes[2].key}"
    assert set(entry["inputs"]) == set(nodes[2].deps) and all(entry["inputs"].values())


def test_changed_inputs_name_the_field_or_the_input_that_moved_a_key():
    spec = load_spec(QUICKSTART)
    before = manifest_record(spec.name, plan(spec), {})
    edited = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"max_tokens": 65})})
    reasons = changed_inputs(before, plan(edited))
    sample_nodes = {node.id for node in plan(spec) if node.stage == "sample"}
    assert {node for node, reason in reasons.items() if reason == "config sampling"} == sample_nodes
    assert reasons["judge/smollm2-135m__base"] == "input sample/smollm2-135m__base"
    assert "finetune/smollm2-135m__insecure__s0" not in reasons and "data/insecure" not in reasons
    assert changed_inputs(None, plan(edited)) == {}


def test_a_dir_without_a_manifest_or_from_another_key_schema_is_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an emsweep output directory"):
        read_manifest(tmp_path)
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"key schema 1.*emsweep migrate"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"key_schema": 1, "nodes": []}))
    with pytest.raises(ManifestError, match="key schema 1, this emsweep reads 2"):
        read_manifest(tmp_path)


def test_report_refuses_a_sweep_with_no_done_node_and_keeps_the_report_there(tmp_path):
    from emsweep.report import build_report
    from emsweep.sweep.results import write_spec_snapshot

    spec = load_spec(QUICKSTART)
    write_spec_snapshot(spec, tmp_path)
    write_manifest(tmp_path, spec.name, plan(spec), {})
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("the good report")
    with pytest.raises(ValueError, match="no node of the sweep is done"):
        build_report(tmp_path, log_to_wandb=False)
    assert (tmp_path / "report" / "index.html").read_text() == "the good report"
