"""Every workflow's node keys, recorded in tests/fixtures/workflow_node_keys.json: a refactor
that moves code must not move a key (an output dir written before must still resume).

Keys depend on what a node's inputs contain, never where they sit (key schema 2, keys.py): the
workflows are planned from two copies of the repository's workflows and suites and of ../shared's
EM files at two places, with the data at yet another path for the second, and give the same keys.
Schema 1 hashed the absolute paths beside the content; its keys, planned from FIXED_ROOT by the
code before the change, are in workflow_node_keys_schema1.json, and `plan(spec, key_schema=1)`
(what `emsweep migrate` reads old output dirs by) must reproduce them. Rewrite the schema 2
fixture only when a key is meant to change: EMSWEEP_WRITE_KEY_FIXTURE=1 pytest tests/test_node_keys.py.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from emsweep.sweep.plan import plan
from emsweep.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "workflow_node_keys.json"
SCHEMA1_FIXTURE = REPO / "tests" / "fixtures" / "workflow_node_keys_schema1.json"
FIXED_ROOT = Path("/tmp/emsweep-node-keys")
MOVED_ROOT = Path("/tmp/emsweep-node-keys-moved")
REWRITE = os.environ.get("EMSWEEP_WRITE_KEY_FIXTURE") == "1"  # read before the tests clear EMSWEEP_*


def _checkout(root: Path, shared_em: Path, data_root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for name in ("em", "em-judged"):
        shutil.copytree(shared_em.parent / name, data_root / name)
    shutil.copytree(REPO / "workflows", root / "main" / "workflows")
    shutil.copytree(REPO / "src" / "emsweep" / "suites", root / "main" / "src" / "emsweep" / "suites")
    return root / "main"


@pytest.fixture(scope="module")
def fixed_checkout(shared_em) -> Path:
    yield _checkout(FIXED_ROOT, shared_em, FIXED_ROOT / "shared")
    shutil.rmtree(FIXED_ROOT, ignore_errors=True)


@pytest.fixture(scope="module")
def moved_checkout(shared_em) -> Path:
    """Another checkout at another path, its data elsewhere again (named by EMSWEEP_DATA & co.)."""
    yield _checkout(MOVED_ROOT / "elsewhere", shared_em, MOVED_ROOT / "data")
    shutil.rmtree(MOVED_ROOT, ignore_errors=True)


def _keys(checkout: Path, key_schema: int = 2) -> dict:
    return {path.name: {node.id: node.key for node in plan(load_spec(path), key_schema=key_schema)}
            for path in sorted((checkout / "workflows").glob("*.yaml"))}


@pytest.fixture
def clean_env(monkeypatch):
    for name in [name for name in os.environ if name.startswith("EMSWEEP_") and name != "EMSWEEP_SHARED"]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_every_workflows_node_keys_are_unchanged(fixed_checkout, clean_env):
    keys = _keys(fixed_checkout)
    if REWRITE:
        FIXTURE.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(FIXTURE.read_text())
    assert sorted(keys) == sorted(recorded)
    for workflow, nodes in keys.items():
        assert nodes == recorded[workflow], workflow


def test_keys_do_not_move_with_the_checkout_or_the_data(fixed_checkout, moved_checkout, clean_env):
    here = _keys(fixed_checkout)
    data = MOVED_ROOT / "data"
    clean_env.setenv("EMSWEEP_DATA", str(data / "em" / "data"))
    clean_env.setenv("EMSWEEP_EVAL", str(data / "em" / "evaluation"))
    clean_env.setenv("EMSWEEP_REFERENCE", str(data / "em-judged"))
    clean_env.chdir(MOVED_ROOT)
    moved = _keys(moved_checkout)
    assert here == moved
    # What a key is made of still matters: other data bytes at the moved place move its data key.
    (data / "em" / "data" / "insecure.jsonl").write_text(
        (data / "em" / "data" / "insecure.jsonl").read_text().replace("def ", "def  ", 1))
    edited = _keys(moved_checkout)["quickstart.yaml"]
    assert edited["data/insecure"] != here["quickstart.yaml"]["data/insecure"]
    assert edited["data/jailbroken"] == here["quickstart.yaml"]["data/jailbroken"]


def test_schema_1_keys_are_those_the_code_before_wrote(fixed_checkout, clean_env):
    """The keys `emsweep migrate` looks old node dirs up by, as the code before schema 2 gave them
    (planned from FIXED_ROOT at the commit before the change); schema 2 moved every one."""
    recorded = json.loads(SCHEMA1_FIXTURE.read_text())
    old, new = _keys(fixed_checkout, key_schema=1), _keys(fixed_checkout)
    assert old == recorded
    moved = [node for workflow in new for node in new[workflow] if new[workflow][node] != old[workflow][node]]
    assert len(moved) == sum(len(nodes) for nodes in new.values())


def test_migrate_carries_a_schema_1_output_dir_across_with_nothing_recomputed(fixed_checkout, clean_env):
    """An output dir as the code before schema 2 wrote it: node dirs under the keys it recorded
    (workflow_node_keys_schema1.json, not recomputed here), the spec snapshot, and a node of an
    earlier spec version. `emsweep migrate` renames each to its new key; then nothing is left to
    run, every node reads as done from the manifest, and the old version's node stays as it was."""
    from typer.testing import CliRunner

    from emsweep.cli import app
    from emsweep.dag import nodes_to_run
    from emsweep.store import Store
    from emsweep.sweep.driver import check_key_schema
    from emsweep.sweep.manifest import ManifestError
    from emsweep.sweep.results import sweep_status, write_spec_snapshot

    spec = load_spec(fixed_checkout / "workflows" / "quickstart.yaml")
    out = FIXED_ROOT / "runs" / "quickstart"
    write_spec_snapshot(spec, out)
    recorded = json.loads(SCHEMA1_FIXTURE.read_text())["quickstart.yaml"]
    for node_id, key in recorded.items():
        stage, name = node_id.split("/")
        directory = out / "nodes" / stage / f"{name}-{key}"
        directory.mkdir(parents=True)
        (directory / "output.txt").write_text(node_id)
        (directory / "_DONE.json").write_text(json.dumps({"stage": stage, "name": name, "key": key, "seconds": 1.0}))
    stale = out / "nodes" / "data" / "insecure-0123456789abcdef"
    stale.mkdir()
    (stale / "_DONE.json").write_text("{}")

    with pytest.raises(ManifestError, match="emsweep migrate"):
        check_key_schema(out)  # `emsweep run` refuses it before anything runs
    result = CliRunner().invoke(app, ["migrate", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(recorded)} done node(s) carried" in result.output and "insecure-0123456789abcdef" in result.output

    nodes = plan(spec)
    assert nodes_to_run(nodes, Store(out)) == []
    for node in nodes:
        directory = out / "nodes" / node.stage / f"{node.name}-{node.key}"
        assert (directory / "output.txt").read_text() == node.id
        assert json.loads((directory / "_DONE.json").read_text())["migrated_from_key"] == recorded[node.id]
    assert (stale / "_DONE.json").exists()
    assert {row.status for row in sweep_status(out).rows} == {"done"}
    again = CliRunner().invoke(app, ["migrate", str(out)])
    assert again.exit_code == 0 and "nothing to do" in again.output
