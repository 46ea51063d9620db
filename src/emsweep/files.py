"""The bottom of the file layer: atomic writes, and the names of an output dir's layout.

Everything that writes a file other stages read writes it here, atomically (a temp file beside
it, then os.replace): readers see the old file or the new one, never a partial write. The local
store (store.py) and the object-store layer (remote.py) share the layout names below.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

DONE = "_DONE.json"
LOCK, OWNER = "emsweep.lock", "emsweep.owner.json"
# What a run leaves that the next run clears at its start: half-written work and started markers
# (tmp/), and its jobs' progress records (progress/).
RUN_SCRATCH = ("tmp", "progress")


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
    import pyarrow.parquet as pq

    tmp = tmp_path_beside(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
