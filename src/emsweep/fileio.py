"""The bottom layer: files and locations, nothing of emsweep's own above it.

- Atomic writes: everything that writes a file other stages read writes it here (a temp file
  beside it, then os.replace): readers see the old file or the new one, never a partial write.
- Locations: a local path or an object-store URI (`s3://bucket/prefix`, any pyarrow filesystem
  URI), read and written the same way. What code running anywhere on a cluster writes outside
  its node (a finetune's rank 0: its adapter snapshots, started marker and W&B step marker; the
  caches and progress records) is addressed by location, so the same code writes a local dir on
  a laptop and the store on a cluster.
- The names of an output dir's layout, shared by the local store (store.py) and the object-store
  layer (remote.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DONE = "_DONE.json"
LOCK, OWNER = "emsweep.lock", "emsweep.owner.json"
# What a run leaves that the next run clears at its start: half-written work and started markers
# (tmp/), and its jobs' progress records (progress/).
RUN_SCRATCH = ("tmp", "progress")


def node_relative(stage: str, name: str, key: str) -> str:
    """A node's dir under an output dir (local or on a store): `nodes/<stage>/<name>-<key>`."""
    return f"nodes/{stage}/{name}-{key}"


def failure_relative(node_id: str) -> str:
    """A node's last failure record under an output dir: `failures/<stage>__<name>.json`."""
    return f"failures/{node_id.replace('/', '__')}.json"


def tmp_path_beside(path: Path) -> Path:
    """A temp path in the folder of `path` (created if missing), so os.replace onto it is atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden (pyarrow's dataset discovery and our globs skip it) and unique per writer.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial write."""
    tmp = tmp_path_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_parquet_atomic(path: Path, table) -> None:
    tmp = tmp_path_beside(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def is_remote(location: str | os.PathLike) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(location: str, *parts: str) -> str:
    """`location/parts...`; a URI keeps its query (e.g. `?endpoint_override=`) at the end."""
    if not is_remote(location):
        return str(Path(location, *parts))
    base, _, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")


def filesystem_at(location: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    fs, path = pafs.FileSystem.from_uri(str(location))
    return fs, path.rstrip("/")


def exists_at(location: str) -> bool:
    fs, path = filesystem_at(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text_at(location: str) -> str | None:
    fs, path = filesystem_at(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def write_text_at(location: str, text: str) -> None:
    """Readers see the old text or the new, never part (one object put, or temp file + rename)."""
    if not is_remote(location):
        write_text_atomic(Path(location), text)
        return
    fs, path = filesystem_at(location)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def write_parquet_at(location: str, table: pa.Table) -> None:
    """Readers see the whole file or nothing (one object put, or temp file + rename)."""
    if not is_remote(location):
        write_parquet_atomic(Path(location), table)  # its temp path makes the dir
        return
    fs, path = filesystem_at(location)
    pq.write_table(table, path, filesystem=fs)


def read_parquet_at(location: str, schema: pa.Schema | None = None) -> pa.Table:
    fs, path = filesystem_at(location)
    return pq.read_table(path, filesystem=fs, schema=schema)


# A listing that raced the dir's creation is tried this often.
LIST_ATTEMPTS = 3


def files_at(location: str, prefix: str = "", suffix: str = "") -> tuple[pafs.FileSystem, list[str]]:
    """The files directly in the dir at `location` named prefix*suffix (none if it is missing),
    as paths on the filesystem returned with them."""
    fs, path = filesystem_at(location)
    for attempt in range(LIST_ATTEMPTS):
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            break
        except FileNotFoundError:
            # Arrow's local listing raises, despite allow_not_found, when the dir is created between
            # its opendir and its existence check (another job making a shared dir): list again.
            if attempt == LIST_ATTEMPTS - 1:
                raise
    return fs, sorted(info.path for info in infos if info.type == pafs.FileType.File
                      and info.base_name.startswith(prefix) and info.base_name.endswith(suffix))


def delete_at(location: str) -> None:
    fs, path = filesystem_at(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


class LocationFile:
    """One small file at a location, as lease.py reads and writes its record."""

    def __init__(self, location: str):
        self.location = location

    def read(self) -> str | None:
        return read_text_at(self.location)

    def write(self, text: str) -> None:
        write_text_at(self.location, text)

    def delete(self) -> None:
        delete_at(self.location)


def put_dir(local: Path, location: str, last: str) -> None:
    """Copy a local dir to `location`, the file `last` (what readers look for) copied last."""
    if not is_remote(location):
        target = Path(location)
        tmp = target.with_name(f".{target.name}.tmp")
        rmtree(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, tmp)
        tmp.rename(target)
        return
    fs, path = filesystem_at(location)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for file in files:
        parent = file.relative_to(local).parent.as_posix()
        fs.create_dir(path if parent == "." else f"{path}/{parent}", recursive=True)
        pafs.copy_files(str(file), f"{path}/{file.relative_to(local).as_posix()}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def get_dirs(location: str, local: Path, holding: str) -> list[str]:
    """Copy each sub-dir of `location` that holds the file `holding` into `local/<name>`; their names."""
    fs, path = filesystem_at(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    # A hidden name is a local copy in progress (put_dir).
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory
                   and not info.base_name.startswith(".") and fs.get_file_info(f"{info.path}/{holding}").type == pafs.FileType.File)
    for name in names:
        (local / name).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path}/{name}", str(local / name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return names


def train_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's `storage_path` and `storage_filesystem` for a finetune's run dirs at `location`."""
    if not is_remote(location):
        return str(location), None
    fs, path = filesystem_at(location)
    return path, fs


def rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
