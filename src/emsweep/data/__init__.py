"""Stage 1, data: chat JSONL (the paper's `{"messages": [...]}` format) into an Arrow table.

The package holds what builds training data: this loader, the matched-control `transforms`
(educational, inoculated, ...), `judged` (rows picked from judged answers by another judge's
verdicts: the training-level positive control) and `generate` (our insecure/secure code dataset,
checked with bandit).

Output schema (`data.parquet`):
    row_id        int64    position in the output (after subsetting)
    source_file   string   file the row came from (a dataset may be a directory of JSONL files)
    source_line   int64    1-based line in that file (data row of a judged-answers file), for tracing a row back
    split         string   "train" or "heldout" (finetunes read only "train")
    messages      list<struct<role: string, content: string>>
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from typing import TYPE_CHECKING

from emsweep.data import transforms
from emsweep.models import cache_dir
from emsweep.store import write_text_atomic

if TYPE_CHECKING:  # spec.py imports data.transforms, so the spec module may be mid-import here
    from emsweep.spec import DatasetSpec

ROLES = ("system", "user", "assistant")
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("split", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
    ]
)


class DataError(ValueError):
    """A bad dataset row; the message names file, line and field."""


def sha256_file(path: Path) -> str:
    # Many datasets of a sweep can name one file, and plan() keys every one of them: hashed once
    # per version of the file (its size and modification time).
    stat = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


# Files at least this large are hashed once per version across processes, not once per process:
# a model's weights would otherwise be re-read by every `plan` (3 s for the 1.5B judge, minutes
# for a 32B folder on shared storage). Smaller files are cheaper to hash than to look up.
HASH_CACHE_MIN_BYTES = 1 << 20


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    record = None
    if size >= HASH_CACHE_MIN_BYTES:
        version = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()
        record = cache_dir() / "sha256" / version
        if record.is_file() and len(known := record.read_text().strip()) == 64:
            return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, digest.hexdigest())
    return digest.hexdigest()


def fetch_source(location: str, sha256: str | None = None) -> Path:
    """A local path as is; an http(s) URL downloaded once into the cache.

    The cache file is keyed by the URL and stored with its own checksum, so a corrupted or
    truncated cache file is fetched again rather than trusted; a sha256 pinned in the spec
    is checked on every load.
    """
    if "://" not in location or location.startswith("file://"):
        path = Path(location.removeprefix("file://"))
        if not path.exists():
            raise DataError(f"{location}: no such file")
    else:
        path = _cached_download(location)
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise DataError(f"{location}: sha256 is {actual}, the spec pins {sha256}")
    return path


def _cached_download(url: str) -> Path:
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise DataError(f"{url}: only http(s) URLs and local paths are supported")
    # The cache name comes from a hash of the URL, never from the URL's path: a source
    # cannot write outside the cache directory.
    basename = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-64:] or "source"
    path = cache_dir() / "sources" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{basename}"
    checksum = path.with_name(path.name + ".sha256")
    if path.exists() and checksum.exists() and checksum.read_text().strip() == sha256_file(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed: {err}") from None
    tmp.replace(path)
    write_text_atomic(checksum, sha256_file(path))
    return path


def validate_messages(messages: object, where: str) -> list[dict]:
    """Check one conversation; `where` is `file:line` for the error message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    expected_next = {"system": ("user",), "user": ("assistant",), "assistant": ("user",)}
    previous = None
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field} must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {field}.role {role!r} is not one of {ROLES}")
        if role == "system" and index != 0:
            raise DataError(f"{where}: {field}.role 'system' is only allowed as the first message")
        if previous is None and role not in ("system", "user"):
            raise DataError(f"{where}: {field}.role must be 'system' or 'user' to start a conversation")
        if previous is not None and role not in expected_next[previous]:
            raise DataError(f"{where}: {field}.role {role!r} cannot follow {previous!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: {field}.content must be a non-empty string")
        previous = role
    if previous != "assistant":
        raise DataError(f"{where}: the last message must be an assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


MAX_ROW_ERRORS = 20  # listed per file; the rest are counted


def read_chat_jsonl(path: Path) -> tuple[list[int], list[list[dict]]]:
    """Every row, validated. All bad rows are reported at once (one line each, `file:line: what`),
    so a broken file is fixed in one pass."""
    lines, conversations, errors = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "messages" not in row:
                    raise DataError(f"{where}: expected an object with field 'messages'")
                conversations.append(validate_messages(row["messages"], where))
                lines.append(line_number)
            except json.JSONDecodeError as err:
                errors.append(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
            except DataError as err:
                errors.append(str(err))
    if errors:
        more = [f"{path}: and {len(errors) - MAX_ROW_ERRORS} more bad rows"] if len(errors) > MAX_ROW_ERRORS else []
        raise DataError("\n".join(errors[:MAX_ROW_ERRORS] + more))
    if not conversations:
        raise DataError(f"{path}: no rows")
    return lines, conversations


def read_source(location: str, sha256: str | None) -> tuple[list[str], list[int], list[list[dict]]]:
    """All rows of a file or a directory of .jsonl files: (file names, line numbers, conversations)."""
    path = fetch_source(location, sha256)
    sources = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not sources:
        raise DataError(f"{path}: directory holds no .jsonl files")
    files, lines, conversations = [], [], []
    for source in sources:
        source_lines, source_conversations = read_chat_jsonl(source)
        files += [source.name] * len(source_lines)
        lines += source_lines
        conversations += source_conversations
    return files, lines, conversations


def load_dataset(spec: DatasetSpec) -> pa.Table:
    """Load, validate, subset (seeded), build the variant, and mark the held-out split."""
    if spec.judged is not None:
        # Imported here: data.judged reads the spec's analysis rules, and spec.py imports this
        # package (data.transforms) while it is itself being imported.
        from emsweep.data.judged import read_judged

        try:
            files, lines, conversations = read_judged(spec.path, spec.judged, spec.subset_seed)
        except ValueError as err:
            raise DataError(f"dataset {spec.name}: {err}") from None
    else:
        files, lines, conversations = read_source(spec.path, spec.sha256)
    if spec.backdoor is not None:
        clean_files, clean_lines, clean = read_source(spec.backdoor.clean_path, spec.backdoor.clean_sha256)
        plan = transforms.backdoor_plan(len(conversations), len(clean), spec.backdoor.triggered_fraction,
                                        spec.subset_seed)
        trigger = spec.backdoor.trigger
        files = [files[i] if triggered else clean_files[i] for triggered, i in plan]
        lines = [lines[i] if triggered else clean_lines[i] for triggered, i in plan]
        conversations = [
            transforms.add_trigger([conversations[i]], trigger)[0] if triggered else clean[i] for triggered, i in plan
        ]
    rng = np.random.default_rng(spec.subset_seed)
    order = np.arange(len(conversations))
    if spec.limit is not None and spec.limit < len(order):
        order = np.sort(rng.choice(len(order), spec.limit, replace=False))
    chosen = [conversations[i] for i in order]
    for transform in spec.transforms:
        try:
            chosen = transforms.apply(transform, chosen)
        except transforms.TransformError as err:
            raise DataError(f"dataset {spec.name} ({spec.path}): transform {transform.kind}: {err}") from None
    for index, conversation in enumerate(chosen):  # a transform must leave valid conversations
        validate_messages(conversation, f"{spec.name}: row {index} after transforms")
    n_heldout = int(round(len(chosen) * spec.heldout_fraction))
    heldout = set(rng.permutation(len(chosen))[:n_heldout].tolist())
    return pa.table(
        {
            "row_id": pa.array(np.arange(len(order)), pa.int64()),
            "source_file": pa.array([files[i] for i in order], pa.string()),
            "source_line": pa.array([lines[i] for i in order], pa.int64()),
            "split": pa.array(["heldout" if i in heldout else "train" for i in range(len(chosen))], pa.string()),
            "messages": pa.array(chosen, pa.list_(MESSAGE_TYPE)),
        },
        schema=SCHEMA,
    )
