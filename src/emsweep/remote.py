"""Output dirs on an object store (`s3://bucket/prefix`, any pyarrow filesystem URI).

The store is the sweep's truth; every machine works in a local staging dir of its own
(`$EMSWEEP_STAGING` or `~/.cache/emsweep/staging`, then a hash of the URI):
- The driver takes the store's lease (`emsweep.owner.json` at the URI, lease.py) before it reads
  anything, so two drivers on two machines never both own a prefix; then it pulls every node that
  is done on the store into its staging, so it is reused.
- The job that computes a node pushes it from the machine it ran on, `_DONE.json` uploaded LAST:
  on the store, as locally, a node is done only when its marker is there, so an upload cut short
  never leaves a half node that looks done. A job on another machine than the driver's first
  pulls the inputs it reads into that machine's staging.
- The driver pulls each node that finishes, so its staging holds the whole sweep for the live
  summary and the report.
- Ray Train writes a finetune's checkpoints, adapter snapshots and W&B step marker straight to
  `<URI>/train/`, since its workers may run on yet other machines.
- Jobs mark themselves started on the store (`tmp/started/`), where the driver's stall watch
  looks. The judgment cache, the sample cache and the jobs' progress records live on the store
  too (`judge_cache/`, `sample_cache/`, `progress/`): every job reads and writes them there,
  whichever machine it runs on, and the driver's console reads the records there. The spec
  snapshot is pushed when the run starts (`emsweep status URI` reads it, and the node records
  and the lease, on the store itself: RemoteRecords); failure records and the report after it.

Credentials come from the environment as pyarrow reads them (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL); they are never written anywhere.
An endpoint may also be given in the URI: `s3://bucket/prefix?endpoint_override=http://host:port`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.fs as pafs

from emsweep import lease
from emsweep.fileio import DONE, OWNER, LocationFile, failure_relative, join, node_relative, rmtree
from emsweep.redact import redact_uri

# Top-level entries of an output dir that are not nodes, pushed after the run (the Ray Train run
# dirs under train/ are written to the store directly).
SHARED_ENTRIES = ("spec.json", "manifest.json", "failures", "report")


class RemoteDir:
    """An output dir on a pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except Exception as err:  # pyarrow's message names the scheme or option it rejects
            # ... and may echo the whole URI, whose query can hold credentials.
            message = str(err).replace(uri, redact_uri(uri))
            raise ValueError(f"output dir {redact_uri(uri)}: {message}") from None
        self.root = self.root.rstrip("/")

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self._path(relative)).type != pafs.FileType.NotFound

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self._path(relative)) as stream:
            return stream.read().decode()

    def done_node_dirs(self) -> list[str]:
        """Relative paths (`nodes/<stage>/<name>-<key>`) of nodes whose marker is on the store."""
        selector = pafs.FileSelector(self._path("nodes"), recursive=True, allow_not_found=True)
        prefix = self.root + "/"
        return sorted(
            info.path.removeprefix(prefix).rsplit("/", 1)[0]
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name == DONE and info.path.count("/") - prefix.count("/") == 3
        )

    def location(self, relative: str) -> str:
        return join(self.uri, relative)

    def clear(self, relative: str) -> None:
        """Delete everything under an entry of the output dir (it may not exist)."""
        self.fs.delete_dir_contents(self._path(relative), missing_dir_ok=True)

    def lease(self) -> lease.Lease:
        return lease.Lease(LocationFile(self.location(OWNER)))

    def push_node(self, local_node_dir: Path, relative: str) -> None:
        """Upload a finished node dir, marker last; a stale copy on the store is replaced."""
        target = self._path(relative)
        self.fs.delete_dir_contents(target, missing_dir_ok=True)
        for path in sorted(local_node_dir.rglob("*")):
            if path.is_file() and path.name != DONE:
                self._upload(path, f"{target}/{path.relative_to(local_node_dir).as_posix()}")
        self._upload(local_node_dir / DONE, f"{target}/{DONE}")

    def pull_node(self, relative: str, local_root: Path) -> None:
        """Download a done node into a temp dir beside its place, then rename it into place."""
        final = local_root / relative
        if (final / DONE).exists():
            return
        tmp = final.with_name(f".{final.name}.pull")
        rmtree(tmp)
        self._download_dir(self._path(relative), tmp)
        rmtree(final)
        tmp.rename(final)

    def push_tree(self, local: Path, relative: str) -> None:
        if local.is_file():
            self._upload(local, self._path(relative))
        elif local.is_dir():
            for path in sorted(local.rglob("*")):
                if path.is_file():
                    self._upload(path, f"{self._path(relative)}/{path.relative_to(local).as_posix()}")

    def pull_tree(self, relative: str, local: Path) -> None:
        info = self.fs.get_file_info(self._path(relative))
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.File:
            self._download(info.path, local)
        else:
            self._download_dir(info.path, local)

    def _download_dir(self, remote_dir: str, local: Path) -> None:
        local.mkdir(parents=True, exist_ok=True)
        prefix = remote_dir.rstrip("/") + "/"
        for info in self.fs.get_file_info(pafs.FileSelector(remote_dir, recursive=True)):
            if info.type == pafs.FileType.File:
                self._download(info.path, local / info.path.removeprefix(prefix))

    def _download(self, remote_path: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(remote_path, str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def _upload(self, local: Path, remote_path: str) -> None:
        # Object stores make one object visible whole or not at all; no temp+rename needed.
        self.fs.create_dir(remote_path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), remote_path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)


class RemoteRecords:
    """The node records of an output dir on a store, read where they are (no pull): what
    `emsweep status` and the report's node table need, as Store gives them for a local dir. One
    listing finds the done nodes; a done node's record is one read."""

    def __init__(self, remote: RemoteDir):
        self.remote = remote
        self.done = set(remote.done_node_dirs())

    def record(self, stage: str, name: str, key: str) -> dict | None:
        relative = node_relative(stage, name, key)
        return json.loads(self.remote.read_text(f"{relative}/{DONE}")) if relative in self.done else None

    def failure(self, node_id: str) -> dict | None:
        relative = failure_relative(node_id)
        return json.loads(self.remote.read_text(relative)) if self.remote.exists(relative) else None

    def held_by(self) -> dict | None:
        """The live owner of the output dir's lease (a running sweep), or None."""
        state, held, _ = self.remote.lease().state()
        return held if state == "live" else None


def staging_dir(uri: str) -> Path:
    base = Path(os.environ.get("EMSWEEP_STAGING", Path.home() / ".cache" / "emsweep" / "staging"))
    return base / hashlib.sha256(uri.encode()).hexdigest()[:16]


def pull(remote: RemoteDir, staging: Path) -> int:
    """Bring the store's done nodes and shared entries into staging; the number of nodes pulled."""
    staging.mkdir(parents=True, exist_ok=True)
    done = remote.done_node_dirs()
    for relative in done:
        remote.pull_node(relative, staging)
    for entry in SHARED_ENTRIES:
        if entry != "report":
            remote.pull_tree(entry, staging / entry)
    return len(done)
