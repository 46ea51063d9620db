"""Content-addressed store of node outputs under a sweep's output directory.

Layout (all under the output dir):

    nodes/<stage>/<node name>-<key>/   one node's outputs
        _DONE.json                     completion record; written last, so its presence means done
                                       (unless it lists `missing_inputs`: a partial analysis)
    failures/<node id>.json            the last failure of a node (removed when it succeeds)
    tmp/                               work in progress; anything here is garbage after a crash
    emsweep.lock                       flock held by a running `emsweep run`
    emsweep.owner.json                 its lease: who, renewed every few seconds (lease.py)

A node writes into a fresh directory under tmp/, which is renamed into place only once
every file is written, and only then gets its completion record. A crash at any point
leaves either no final directory or one without `_DONE.json`: both count as not done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from emsweep import lease
from emsweep.redact import redact_uri
from emsweep.remote import RemoteDir, RemoteRecords, pull, staging_dir

# The atomic writers and layout names are fileio's; re-exported, as the store's callers know them from here.
from emsweep.fileio import (  # noqa: F401
    DONE, LOCK, OWNER, RUN_SCRATCH, LocationFile, failure_relative, node_relative, tmp_path_beside, write_json_atomic,
    is_remote, write_parquet_atomic, write_text_at, write_text_atomic)


def config_key(stage: str, config: Any, input_keys: list[str]) -> str:
    """Stable short hash of what a node computes: its stage, config and inputs' keys."""
    canonical = json.dumps(
        {"stage": stage, "config": config, "inputs": sorted(input_keys)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class LockedError(RuntimeError):
    pass


# The lease's timing (lease.py), kept here under the names the store's callers know.
LEASE_HEARTBEAT_S = lease.HEARTBEAT_S
LEASE_TTL_S = lease.TTL_S




def is_partial(record: dict) -> bool:
    """A node record written by a node that ran without some of its inputs (it lists them)."""
    return bool(record.get("missing_inputs"))


@dataclass
class Store:
    """A sweep's output dir, wherever it is: the one file layer stage bodies and the driver use.

    `root` is a local dir. For an output dir on an object store (`mirror`, a URI; remote.py), root
    is this machine's staging dir for it: nodes are computed there, and the store keeps the mirror
    in step itself (a commit uploads the node, marker last; `fetch` downloads a node done
    elsewhere; `location` names where what every machine shares lives; `publish` uploads an
    entry). Callers never ask which kind of dir they hold."""

    root: Path
    heartbeat_s: float = LEASE_HEARTBEAT_S
    lease_ttl_s: float = LEASE_TTL_S
    lease_settle_s: float = lease.SETTLE_S
    mirror: str | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.remote = RemoteDir(self.mirror) if self.mirror else None

    @classmethod
    def at(cls, out: str | Path) -> "Store":
        """The store of an output dir given as a local path or an object-store URI (worked on in
        this machine's staging dir for it)."""
        if is_remote(out):
            return cls(staging_dir(str(out)), mirror=str(out))
        return cls(Path(out))

    @property
    def where(self) -> str:
        """The output dir as its user named it: the object store's URI (without its query, which
        may hold credentials) or the local dir."""
        return redact_uri(self.mirror) if self.mirror else str(self.root)

    def location(self, relative: str = "") -> str:
        """Where an entry of the output dir that every machine reads and writes lives (caches,
        progress records, started markers, Ray Train's run dirs): on the object store for a
        mirrored dir, as jobs and workers may run on other machines than the driver's."""
        if self.remote is not None:
            return self.remote.location(relative) if relative else self.remote.uri
        return str(self.root / relative)

    def fetch(self, stage: str, name: str, key: str) -> bool:
        """Whether a node is done, downloaded first when it is done on the mirror only (a node
        another machine computed)."""
        if self.is_done(stage, name, key):
            return True
        if self.remote is not None:
            relative = node_relative(stage, name, key)
            if self.remote.exists(f"{relative}/{DONE}"):
                self.remote.pull_node(relative, self.root)
        return self.is_done(stage, name, key)

    def pull(self) -> int:
        """Bring every node done on the mirror, and the shared entries, into root (the number of
        nodes on the mirror; 0 for a local dir)."""
        return pull(self.remote, self.root) if self.remote is not None else 0

    def publish(self, relative: str) -> None:
        """Upload a file or folder of root to the mirror (the manifest, the spec snapshot, the report)."""
        if self.remote is not None:
            self.remote.push_tree(self.root / relative, relative)

    def readers_view(self):
        """The node records and lease where they are, for readers that pull nothing (`status`):
        this store, or for a mirrored dir the records on the object store itself."""
        return RemoteRecords(self.remote) if self.remote is not None else self

    def node_dir(self, stage: str, name: str, key: str) -> Path:
        return self.root / node_relative(stage, name, key)

    def relative(self, path: Path) -> str:
        """A path under the output dir as the same relative key on an object store (remote.py)."""
        return Path(path).relative_to(self.root).as_posix()

    def is_done(self, stage: str, name: str, key: str) -> bool:
        """Committed with all its inputs: a node that ran on partial inputs (dag.Node.partial_ok)
        is kept for reading but is redone by the next run."""
        record = self.record(stage, name, key)
        return record is not None and not is_partial(record)

    def record(self, stage: str, name: str, key: str) -> dict | None:
        path = self.node_dir(stage, name, key) / DONE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def annotate(self, stage: str, name: str, key: str, extra: dict) -> None:
        """Add fields to a done node's record (e.g. warnings found after the commit)."""
        record = self.record(stage, name, key)
        if record is not None:
            write_json_atomic(self.node_dir(stage, name, key) / DONE, {**record, **extra})
            self.publish(f"{node_relative(stage, name, key)}/{DONE}")

    def invalidate(self, stage: str, name: str, key: str) -> None:
        """Mark a node not-done (its inputs are about to change) without deleting outputs yet."""
        (self.node_dir(stage, name, key) / DONE).unlink(missing_ok=True)

    def new_tmp_dir(self) -> Path:
        path = self.root / "tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def commit(self, stage: str, name: str, key: str, tmp: Path, record: dict) -> Path:
        """Move a fully written tmp dir into place, then write the completion record."""
        final = self.node_dir(stage, name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            # A rerun (its upstream changed): move the old outputs aside, never half-overwrite.
            trash = self.root / "tmp" / f"old-{uuid.uuid4().hex}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(final / DONE, {**record, "stage": stage, "name": name, "key": key})
        self.clear_failure(f"{stage}/{name}")
        if self.remote is not None:
            # From the machine that computed it (the driver's may not see this dir), marker last.
            self.remote.push_node(final, node_relative(stage, name, key))
        return final

    def _failure_path(self, node_id: str) -> Path:
        return self.root / failure_relative(node_id)

    def record_failure(self, node_id: str, error: str, **extra: Any) -> None:
        path = self._failure_path(node_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"node": node_id, "error": error, "time": time.time(), **extra})

    def failure(self, node_id: str) -> dict | None:
        try:
            return json.loads(self._failure_path(node_id).read_text())
        except FileNotFoundError:
            return None

    def clear_failure(self, node_id: str) -> None:
        self._failure_path(node_id).unlink(missing_ok=True)

    def started_path(self, job_id: str) -> Path:
        return self.root / "tmp" / "started" / hashlib.sha256(job_id.encode()).hexdigest()[:16]

    def mark_started(self, job_id: str) -> None:
        """Written once a job computes: the executor tells waiting from running by it. Most jobs
        write it first thing; a finetune's training worker writes it (finetune.py), because the
        finetune's task runs at once and then waits for its workers' resources."""
        write_started_marker(self.started_path(job_id), job_id)

    def started_location(self, job_id: str) -> str:
        """Where a job says it started (write_started_marker), on the mirror for a mirrored dir."""
        return self.location(self.relative(self.started_path(job_id)))

    def job_started(self, job_id: str) -> bool:
        if self.started_path(job_id).exists():
            return True
        return self.remote is not None and self.remote.exists(self.relative(self.started_path(job_id)))

    def clean_tmp(self) -> None:
        """At the start of a run (it holds the lock): what a dead run left half-written, and its
        jobs' progress records, go (RUN_SCRATCH), on the mirror too (a dead run's started markers
        would make this run's waiting jobs look started, its records show as running)."""
        for entry in RUN_SCRATCH:
            shutil.rmtree(self.root / entry, ignore_errors=True)
            if self.remote is not None:
                self.remote.clear(entry)

    def publish_unpublished(self) -> None:
        """Upload the nodes done in root but not on the mirror (a run that crashed mid-upload)."""
        if self.remote is None:
            return
        on_mirror = set(self.remote.done_node_dirs())
        for marker in sorted(self.root.glob(f"nodes/*/*/{DONE}")):
            relative = self.relative(marker.parent)
            if relative not in on_mirror:
                self.remote.push_node(marker.parent, relative)

    def lease(self) -> lease.Lease:
        # Holding the flock means any run of this host that wrote the lease is gone.
        return lease.Lease(LocationFile(str(self.root / OWNER)), same_host_dead=lambda held: True,
                           heartbeat_s=self.heartbeat_s, ttl_s=self.lease_ttl_s, settle_s=self.lease_settle_s)

    def held_by(self) -> dict | None:
        """The live owner of this dir's lock ({pid, host, since, heartbeat}), or None if it is free
        (or held by a dead run: on this host, or on another whose lease is running out)."""
        if not (self.root / LOCK).exists():
            return None
        probe = FileLock(self.root / LOCK, timeout=0, thread_local=False)
        try:
            probe.acquire()
        except Timeout:
            return self.lease().record() or {"pid": "?", "host": "?", "since": None}
        try:
            state, held, _ = self.lease().state()
            return held if state == "live" else None
        finally:
            probe.release()

    @contextmanager
    def lock(self) -> Iterator["Held"]:
        """One `emsweep run` per output dir: `_local_lock` on root, and for a mirrored dir then
        the object store's own lease (remote.py), so two drivers on two machines never both own
        its prefix. What is yielded says whether either was lost (`lost()`)."""
        with self._local_lock() as held:
            if self.remote is None:
                yield Held([held])
                return
            try:
                with self.remote.lease().hold() as mirror_held:
                    yield Held([held, mirror_held])
            except lease.LeaseTaken as taken:
                raise locked_error(self.where, taken.held, taken.age) from None

    @contextmanager
    def _local_lock(self) -> Iterator["lease._Renewer"]:
        """One `emsweep run` per local dir, on one host or many sharing it.

        On one host: an flock (the `filelock` package) on emsweep.lock; the kernel drops it when
        its owner exits or is killed, so a dead run's lock is never stale and no takeover race
        exists. Across hosts (a cluster's shared output dir, where a dead head's flock may never
        be dropped or never seen): the lease of lease.py in emsweep.owner.json, renewed every
        `heartbeat_s`, taken over once `lease_ttl_s` has passed since its last renewal, and taken by
        claim-then-confirm so two new drivers on two hosts never both win."""
        self.root.mkdir(parents=True, exist_ok=True)
        flock = FileLock(self.root / LOCK, timeout=0, thread_local=False)
        try:
            flock.acquire()
        except Timeout:
            raise locked_error(self.where, self.lease().record()) from None
        try:
            with self.lease().hold() as held:
                yield held
        except lease.LeaseTaken as taken:
            raise locked_error(self.where, taken.held, taken.age) from None
        finally:
            flock.release()


@dataclass
class Held:
    """The leases a running sweep holds on its output dir (Store.lock)."""

    leases: list

    def lost(self) -> str | None:
        """Why a lease was taken over by another run, or None while all are held."""
        return next((why for why in (held.lost() for held in self.leases) if why is not None), None)


def write_started_marker(location: str | Path, job_id: str) -> None:
    """`location`: a local path, or a URI on an object-store sweep's store (remote.py)."""
    write_text_at(str(location), json.dumps({"job": job_id, "pid": os.getpid(), "host": socket.gethostname(),
                                             "time": time.time()}))


def locked_error(root: Path | str, held: dict | None, lease_age: float | None = None) -> LockedError:
    """What a second run on a locked output dir is told (`held`: the owner record, if readable)."""
    return LockedError(f"{root} is in use by another `emsweep run` ({lease.describe(held, lease_age)}); "
                       "wait for it to finish")
