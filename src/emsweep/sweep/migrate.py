"""`emsweep migrate DIR`: carry an output dir written with key schema 1 (keys hashed the absolute
paths of local inputs beside their content) across to schema 2 (content only, keys.py).

The sweep is planned twice from its spec snapshot: with schema 1, which gives exactly the keys its
node dirs were written under (tests/test_node_keys.py checks this against keys recorded before the
change), and with schema 2. Each done node dir at its schema 1 key is renamed to its schema 2 key,
its record rewritten to match; nothing is recomputed or copied. Node dirs of earlier versions of
the spec (keys the snapshot does not plan) stay where they are, as they were. Then the manifest
(sweep/manifest.py) is written, which is what marks the dir as schema 2.

Schema 1 keys need the inputs where the snapshot says they were (their content is hashed with
their path), so migrate runs on the machine and path where the sweep ran, before moving it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from emsweep.dag import NodeStatus, status_table
from emsweep.fileio import DONE
from emsweep.keys import is_local
from emsweep.spec import SweepSpec
from emsweep.store import Store
from emsweep.sweep.manifest import MANIFEST, read_manifest, write_manifest
from emsweep.sweep.plan import plan
from emsweep.sweep.results import read_spec_snapshot


@dataclass
class Migration:
    moved: list[str] = field(default_factory=list)  # node ids whose dir was renamed to its new key
    not_done: list[str] = field(default_factory=list)  # planned nodes with no done dir at the old key
    left: list[str] = field(default_factory=list)  # node dirs the snapshot does not plan (left alone)
    already: bool = False  # the dir had a schema 2 manifest: nothing to do


def missing_inputs(spec: SweepSpec) -> list[str]:
    """Local inputs the snapshot names that are not there (schema 1 keys hash them with their path)."""
    locations = [("models", m.path) for m in spec.models] + [("datasets", d.path) for d in spec.datasets] + [
        ("datasets.backdoor", d.backdoor.clean_path) for d in spec.datasets if d.backdoor is not None] + [
        ("eval.suites", s.questions) for s in spec.eval.suites] + [("judge.model", spec.judge.model)] + (
        [("judge.panel", spec.judge.panel.reference)] if spec.judge.panel is not None else [])
    return [f"{what}: {path}" for what, path in locations if is_local(path) and not Path(path).exists()]


def migrate(out_dir: Path) -> Migration:
    out_dir = Path(out_dir)
    store = Store(out_dir)
    with store.lock():  # no run may write the dir meanwhile
        if (out_dir / MANIFEST).exists():
            read_manifest(out_dir)  # refuses another schema
            return Migration(already=True)
        spec = read_spec_snapshot(out_dir)
        if missing := missing_inputs(spec):
            raise FileNotFoundError(
                f"{out_dir}: its inputs are not where the sweep ran ({'; '.join(missing[:3])}"
                f"{'; ...' if len(missing) > 3 else ''}): migrate where it ran, or put them back at those paths first")
        old, new = plan(spec, key_schema=1), plan(spec)
        migration = Migration()
        for before, after in zip(old, new, strict=True):
            assert before.id == after.id, (before.id, after.id)
            source = store.node_dir(before.stage, before.name, before.key)
            record = store.record(before.stage, before.name, before.key)
            if record is None:
                migration.not_done.append(before.id)
                continue
            target = store.node_dir(after.stage, after.name, after.key)
            if target.exists():  # a half-finished earlier migrate: the new dir wins, the old stays
                continue
            os.replace(source, target)
            store.annotate(after.stage, after.name, after.key, {"key": after.key, "migrated_from_key": before.key})
            migration.moved.append(after.id)
        current = {store.node_dir(node.stage, node.name, node.key) for node in new}
        migration.left = sorted(str(path.parent.relative_to(out_dir)) for path in out_dir.glob(f"nodes/*/*/{DONE}")
                                if path.parent not in current)
        rows = {row.node.id: row for row in status_table(new, store)}
        write_manifest(out_dir, spec.name, new,
                       {node_id: row for node_id, row in rows.items() if row.status in ("done", "partial")})
        return migration
