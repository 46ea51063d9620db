"""The run manifest (`manifest.json`, beside the spec snapshot): the index of a sweep's nodes that
readers trust.

For every node of the sweep's last run: its id, stage, key, inputs (ids and keys), config, output
dir, status and timing, with the key schema (keys.py) and the code version. The driver writes it
before the first job and again, atomically, as each node finishes. `status`, `report`, `judge-eval`
on a sweep and `doctor` take the nodes from it and re-plan nothing, so they need none of the
sweep's input files: an output dir copied to another machine or path reads the same there. A node
is done when its `_DONE.json` says so (the store's record); the manifest's status is what the
driver last saw, and a copy holding fewer done nodes than it lists is incomplete.

An output dir with node dirs and no manifest was written with key schema 1: `emsweep migrate DIR`
carries it across (sweep/migrate.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from emsweep import __version__
from emsweep.dag import Node, NodeStatus
from emsweep.fileio import join, node_relative, read_text_at, write_json_atomic
from emsweep.keys import KEY_SCHEMA
from emsweep.redact import redact_uri

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """An output dir whose manifest is missing or from another key schema (one line for the CLI)."""


def manifest_record(sweep: str, nodes: list[Node], statuses: dict[str, NodeStatus]) -> dict:
    keys = {node.id: node.key for node in nodes}
    return {
        "sweep": sweep, "key_schema": KEY_SCHEMA, "emsweep": __version__, "written_at": time.time(),
        "nodes": [{
            "id": node.id, "stage": node.stage, "name": node.name, "key": node.key,
            "inputs": {dep: keys.get(dep) for dep in node.deps}, "group": node.group,
            "partial_ok": node.partial_ok, "config": node.config,
            "output": node_relative(node.stage, node.name, node.key),
            **_status_fields(statuses.get(node.id)),
        } for node in nodes],
    }


def _status_fields(status: NodeStatus | None) -> dict:
    if status is None:
        return {"status": "pending"}
    return {"status": status.status if status.status != "cached" else "done", "seconds": status.seconds,
            "finished_at": status.finished_at}


def write_manifest(out_dir: Path, sweep: str, nodes: list[Node], statuses: dict[str, NodeStatus]) -> None:
    write_json_atomic(Path(out_dir) / MANIFEST, manifest_record(sweep, nodes, statuses))


def read_manifest(out: str | Path) -> dict:
    """The manifest of an output dir (a path or an object-store URI), checked for its key schema."""
    text = read_text_at(join(str(out), MANIFEST))
    shown = redact_uri(str(out))
    if text is None:
        if read_text_at(join(str(out), "spec.json")) is None:
            raise FileNotFoundError(f"{shown} has no spec.json: not an emsweep output directory")
        raise ManifestError(f"{shown} was written before run manifests (key schema 1, keys from file paths): "
                            f"run `emsweep migrate {shown}` once, where the sweep ran, to carry it across")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{shown}/{MANIFEST}: not a run manifest: {err}") from None
    if record.get("key_schema") != KEY_SCHEMA:
        raise ManifestError(f"{shown}/{MANIFEST}: key schema {record.get('key_schema')}, this emsweep reads "
                            f"{KEY_SCHEMA} (is this output dir from another emsweep version?)")
    return record


def manifest_nodes(record: dict) -> list[Node]:
    """The sweep's nodes as the manifest lists them, in dependency order (as planned)."""
    return [Node(entry["stage"], entry["name"], entry["key"], entry["config"], tuple(entry["inputs"]),
                 entry["group"], entry["partial_ok"]) for entry in record["nodes"]]


def listed_done(record: dict) -> set[str]:
    """The nodes the driver saw done (or reused) when it last wrote the manifest."""
    return {entry["id"] for entry in record["nodes"] if entry["status"] == "done"}


def changed_inputs(record: dict | None, nodes: list[Node]) -> dict[str, str]:
    """Per node whose key differs from the manifest's: what changed, in words (its config's
    top-level fields, or which of its inputs), for `run`/`resume` to say why it runs again."""
    if record is None:
        return {}
    before = {entry["id"]: entry for entry in record["nodes"]}
    keys = {node.id: node.key for node in nodes}
    reasons = {}
    for node in nodes:
        old = before.get(node.id)
        if old is None or old["key"] == node.key:
            continue
        fields = sorted(field for field in set(old["config"]) | set(node.config)
                        if json.dumps(old["config"].get(field), sort_keys=True, default=str)
                        != json.dumps(node.config.get(field), sort_keys=True, default=str))
        inputs = sorted(dep for dep in node.deps if old["inputs"].get(dep) != keys.get(dep))
        parts = ([f"config {', '.join(fields)}"] if fields else []) + ([f"input {', '.join(inputs)}"] if inputs else [])
        reasons[node.id] = "; ".join(parts) or "the key schema or code recipe"
    return reasons
