"""Reading W&B offline runs back, for tests: the history rows a run's `.wandb` files hold.

A `.wandb` file is a LevelDB-style log (W&B's datastore): a 7-byte header, then records in
32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: full, first, middle, last),
each record a serialized `wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = Path(path).read_bytes(), HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 1:
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)


def rows(path: Path, wait_s: float = 30.0) -> list[dict]:
    """The history rows of one offline run's `.wandb` file, in the order they were logged. A
    record cut short is one W&B's service is still writing (seen once under load, just after
    `run.finish()` returned): read again, for up to `wait_s`."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                    for record in records(path) if record.HasField("history")]
        except DecodeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def segments(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline run dirs of `run_id`, oldest first (W&B names a second one started in the same
    second `offline-run-<time>-<id>-1`)."""
    return sorted(path.parent for path in Path(wandb_dir).glob(f"offline-run-*/run-{run_id}.wandb"))


def finished(path: Path) -> bool:
    """Whether a run's `.wandb` file holds its exit record (the run finished, and W&B's service has
    written everything before it)."""
    from google.protobuf.message import DecodeError

    try:
        return any(record.WhichOneof("record_type") == "exit" for record in records(path))
    except (DecodeError, FileNotFoundError):
        return False


def history(wandb_dir: Path, run_id: str, wait_finished_s: float = 0.0) -> list[dict]:
    """Every history row logged under `run_id` in the offline runs of `wandb_dir`, oldest run first.
    `wait_finished_s`: for a run that was finished, wait up to that long for W&B's service, which
    writes the file in the background (under load it lagged `run.finish()`), to write its end."""
    deadline = time.monotonic() + wait_finished_s
    while time.monotonic() < deadline:
        found = segments(wandb_dir, run_id)
        if found and finished(found[-1] / f"run-{run_id}.wandb"):
            break
        time.sleep(0.2)
    return [row for segment in segments(wandb_dir, run_id) for row in rows(segment / f"run-{run_id}.wandb")]


def runs(wandb_dir: Path) -> list[dict]:
    """Every offline run of `wandb_dir` (one per `.wandb` file): its id, W&B fields as a filter
    sees them (`Group`, `JobType`) and every key it logged (history rows and summary)."""
    found = []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        keys, fields = set(), {}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                fields = {"ID": record.run.run_id, "Group": record.run.run_group, "JobType": record.run.job_type}
            elif kind == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
            elif kind == "summary":
                keys.update(item.key or "/".join(item.nested_key) for item in record.summary.update)
        found.append({**fields, "keys": keys, "path": path})
    return found
