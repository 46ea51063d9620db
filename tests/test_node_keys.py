"""Every workflow's node keys, recorded in tests/fixtures/workflow_node_keys.json: a refactor
that moves code must not move a key (an output dir written before must still resume).

Keys hash the absolute paths of local files beside their content (spec fields such as a
dataset's `path`), so the workflows are planned from a fixed place: copies of the repository's
workflows and suites and of ../shared's EM files under FIXED_ROOT. Rewrite the fixture only
when a key is meant to change: EMSWEEP_WRITE_KEY_FIXTURE=1 pytest tests/test_node_keys.py.
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
FIXED_ROOT = Path("/tmp/emsweep-node-keys")


@pytest.fixture(scope="module")
def fixed_checkout(shared_em) -> Path:
    shutil.rmtree(FIXED_ROOT, ignore_errors=True)
    for name in ("em", "em-judged"):
        shutil.copytree(shared_em.parent / name, FIXED_ROOT / "shared" / name)
    shutil.copytree(REPO / "workflows", FIXED_ROOT / "main" / "workflows")
    shutil.copytree(REPO / "src" / "emsweep" / "suites", FIXED_ROOT / "main" / "src" / "emsweep" / "suites")
    yield FIXED_ROOT / "main"
    shutil.rmtree(FIXED_ROOT, ignore_errors=True)


def test_every_workflows_node_keys_are_unchanged(fixed_checkout, monkeypatch):
    rewrite = os.environ.get("EMSWEEP_WRITE_KEY_FIXTURE") == "1"
    for name in [name for name in os.environ if name.startswith("EMSWEEP_") and name != "EMSWEEP_SHARED"]:
        monkeypatch.delenv(name)
    keys = {path.name: {node.id: node.key for node in plan(load_spec(path))}
            for path in sorted((fixed_checkout / "workflows").glob("*.yaml"))}
    if rewrite:
        FIXTURE.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(FIXTURE.read_text())
    assert sorted(keys) == sorted(recorded)
    for workflow, nodes in keys.items():
        assert nodes == recorded[workflow], workflow
