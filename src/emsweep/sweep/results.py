"""Reading a sweep's outputs: its judgments and its spec snapshot (`spec.json`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from emsweep import progress
from emsweep.dag import Node, NodeStatus, status_table
from emsweep.fileio import join, read_text_at, write_json_atomic
from emsweep.redact import redact_uri
from emsweep.spec import SpecError, SweepSpec, parse_spec
from emsweep.store import Store
from emsweep.sweep.manifest import manifest_nodes, read_manifest


def judgments_of(out_dir: Path) -> pa.Table:
    """All judgments of a sweep's judge nodes, as its manifest lists them (every one must be done)."""
    store = Store(Path(out_dir))
    judge_nodes = [node for node in manifest_nodes(read_manifest(out_dir)) if node.stage == "judge"]
    missing = [node.id for node in judge_nodes if not store.is_done(node.stage, node.name, node.key)]
    if missing:
        raise FileNotFoundError(f"{out_dir}: judge nodes not done: {missing}")
    return read_judgments(store, judge_nodes)


def read_judgments(store: Store, judge_nodes: list[Node]) -> pa.Table:
    # Judge nodes written before a column existed (judge_templates) read as null there.
    return pa.concat_tables([pq.read_table(store.node_dir(n.stage, n.name, n.key) / "judgments.parquet")
                             for n in judge_nodes], promote_options="default")


def write_spec_snapshot(spec: SweepSpec, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "spec.json", spec.model_dump(mode="json"))


def read_spec_snapshot(out_dir: str | Path) -> SweepSpec:
    """The spec a sweep ran with (its `spec.json`), from a local output dir or one on an object
    store: the one reader of this record. Errors name the file (a store URI without its query)."""
    location = join(str(out_dir), "spec.json")
    shown = redact_uri(location)
    text = read_text_at(location)
    if text is None:
        raise FileNotFoundError(f"{redact_uri(str(out_dir))} has no spec.json: not an emsweep output directory")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{shown}: not a spec snapshot: {err}") from None
    try:
        return parse_spec(raw, source=shown)
    except SpecError as err:  # e.g. a field an older emsweep wrote and this one no longer knows
        raise SpecError(f"{err} (is this output dir from another emsweep version?)") from None


@dataclass
class SweepStatus:
    """What `emsweep status` shows of an output dir, local or on a store."""

    spec: SweepSpec
    rows: list[NodeStatus]  # one per node of the plan: done, partial, failed, skipped, running or missing
    owner: dict | None  # the running sweep's lease record (pid, host), or None when none runs
    jobs: list[dict]  # its running jobs' progress records (progress.py)


def sweep_status(out: str | Path) -> SweepStatus:
    """The node table of the sweep in `out` (a local dir or an object-store URI), read where it
    is: the nodes from its manifest (no input file needed), their records and the lease from the
    store itself, not a pulled copy. While a sweep runs,
    a node its jobs' progress records name is "running"."""
    spec = read_spec_snapshot(out)
    records = Store.at(out).readers_view()
    owner = records.held_by()
    jobs = progress.read_records(out) if owner else []
    running = {node for job in jobs for node in job["nodes"]}
    rows = [dataclasses.replace(row, status="running") if row.status == "missing" and row.node.id in running else row
            for row in status_table(manifest_nodes(read_manifest(out)), records)]
    return SweepStatus(spec, rows, owner, jobs)


def local_copy(out: str | Path) -> Path:
    """A local dir holding the sweep's outputs: `out` itself, or for an object store this
    machine's staging dir for it, with every done node and the spec snapshot pulled in (nodes
    already there are not fetched again)."""
    store = Store.at(out)
    store.pull()
    return store.root
