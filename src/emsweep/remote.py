"""Output dirs on an object store (`s3://bucket/prefix`, any pyarrow filesystem URI).

The pipeline always works in a local staging dir (`~/.cache/emsweep/staging/<hash of URI>`).
Before a run, every node that is done on the store is pulled into staging, so it is reused; each
node that finishes is pushed as soon as it is done, its `_DONE.json` uploaded LAST: on the store,
as locally, a node is done only when its marker is there, so an upload cut short never leaves a
half node that looks done. The spec snapshot, failure records, judgment cache parts, the Ray
Train run dirs (finetune checkpoints and adapter snapshots) and the report are pushed too.

Credentials come from the environment as pyarrow reads them (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL); they are never written anywhere.
An endpoint may also be given in the URI: `s3://bucket/prefix?endpoint_override=http://host:port`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs

from emsweep.store import DONE

# Top-level entries of an output dir that are not nodes, pushed after the run.
SHARED_ENTRIES = ("spec.json", "failures", "judge_cache", "train", "report")


def is_remote(location: str | os.PathLike) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


class RemoteDir:
    """An output dir on a pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except Exception as err:  # pyarrow's message names the scheme or option it rejects
            # ... and may echo the whole URI, whose query can hold credentials.
            message = str(err).replace(uri, _redacted(uri))
            raise ValueError(f"output dir {_redacted(uri)}: {message}") from None
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
        _rmtree(tmp)
        self._download_dir(self._path(relative), tmp)
        _rmtree(final)
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


def push_shared(remote: RemoteDir, staging: Path) -> None:
    for entry in SHARED_ENTRIES:
        remote.push_tree(staging / entry, entry)


def run_sweep_remote(spec, uri: str, on_start=None, on_finish=None, connect=None, staging: Path | None = None,
                     until: str | None = None):
    """`pipeline.run_sweep` with the output dir on an object store (see the module doc)."""
    from emsweep.pipeline import run_sweep
    from emsweep.store import Store

    remote = RemoteDir(uri)
    staging = staging or staging_dir(uri)
    pull(remote, staging)
    store = Store(staging.resolve())
    # Nodes finished in staging whose upload was cut short (a crash mid-push) go up now.
    on_store = set(remote.done_node_dirs())
    for marker in sorted(store.root.glob(f"nodes/*/*/{DONE}")):
        relative = marker.parent.relative_to(store.root).as_posix()
        if relative not in on_store:
            remote.push_node(marker.parent, relative)

    def finished(status):
        if status.status == "done":
            node = status.node
            local = store.node_dir(node.stage, node.name, node.key)
            remote.push_node(local, local.relative_to(store.root).as_posix())
        if on_finish is not None:
            on_finish(status)

    try:
        return run_sweep(spec, staging, on_start=on_start, on_finish=finished, connect=connect, until=until)
    finally:
        push_shared(remote, staging)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _redacted(uri: str) -> str:
    """A URI without its query (which may carry credentials such as access_key/secret_key)."""
    return uri.split("?", 1)[0]
