"""The judgment cache: what a judge said about (judge, scoring, template, question, answer).

Each finished batch is a part file, `DIR/judge_cache/part-*.parquet`, written whole or not at all
(a hidden temp name and a rename locally; one object put on an object store, where the cache lives
on the store for every machine), so a crash never leaves a half-written part that readers see.
Keys are `JudgeRequest.cache_key`; thresholds are applied after the cache, so changing
`min_numeric_mass` or the analysis re-judges nothing. Failed judgments are never cached.

Compaction keeps a lookup's cost bounded whatever the number of batches ever written: once a
writer sees more than `compact_after` part files it merges every part and compacted file it
listed into one `compact-*.parquet` (written whole, as parts are), and only then deletes exactly
the files it merged. A lookup lists the dir once and reads at most `compact_after` parts plus the
compacted files (one, or a few while two writers compact at once), not one read per batch ever
judged. Two jobs writing at once lose nothing: a file is deleted only by a writer whose own
compacted file, already written, holds its rows; a compaction that finds a file gone (another
writer merged it first) gives up and deletes nothing; a reader that finds a listed file gone
lists again. The same key in two files is the same judgment (a duplicate, never a conflict).

Schema: cache_key string, expected_value float64, numeric_mass float64,
    label_probs list<struct<label, prob>>, top_alternatives list<struct<token, prob>>,
    judge_model string, created_at float64, longest_number_token int64 (null in parts written
    before it existed)
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from emsweep import fileio
from emsweep.judge import ALTERNATIVE, PAIR, Judgment

SCHEMA = pa.schema(
    [
        ("cache_key", pa.string()),
        ("expected_value", pa.float64()),
        ("numeric_mass", pa.float64()),
        ("label_probs", pa.list_(PAIR)),
        ("top_alternatives", pa.list_(ALTERNATIVE)),
        ("judge_model", pa.string()),
        ("created_at", pa.float64()),
        ("longest_number_token", pa.int64()),
    ]
)


# Part files a writer leaves before it compacts them (and so the most a lookup reads besides the
# compacted files).
COMPACT_AFTER = 16
# A lookup lists again this often when files it listed were merged away meanwhile.
READ_ATTEMPTS = 5


class JudgmentCache:
    """`location`: a local dir, or a dir on the sweep's object store (shared by every machine)."""

    def __init__(self, location: str | os.PathLike, compact_after: int = COMPACT_AFTER):
        self.location = str(location)
        self.compact_after = compact_after

    def _files(self) -> tuple[object, list[str], list[str]]:
        """(filesystem, part files, compacted files) in the cache dir: one listing."""
        fs, files = fileio.files_at(self.location, suffix=".parquet")
        names = [(path, path.rsplit("/", 1)[-1]) for path in files]
        return (fs, [path for path, name in names if name.startswith("part-")],
                [path for path, name in names if name.startswith("compact-")])

    def _read(self, keys: set[str] | None) -> pa.Table | None:
        """Every cached row (of `keys`, if given), or None if the dir holds nothing yet."""
        for attempt in range(READ_ATTEMPTS):
            fs, parts, compacted = self._files()
            if not parts and not compacted:
                return None
            try:
                dataset = ds.dataset(compacted + parts, filesystem=fs, format="parquet", schema=SCHEMA)
                if keys is None:
                    return dataset.to_table()
                return dataset.to_table(filter=pc.field("cache_key").isin(pa.array(sorted(keys))))
            except (FileNotFoundError, OSError):
                # A writer merged listed files away between the listing and the read: list again.
                if attempt == READ_ATTEMPTS - 1:
                    raise
        return None

    def get(self, keys: set[str]) -> dict[str, Judgment]:
        if not keys:
            return {}
        table = self._read(keys)
        if table is None:
            return {}
        found = {}
        for row in table.to_pylist():
            found[row["cache_key"]] = Judgment(
                row["expected_value"],
                row["numeric_mass"],
                {pair["label"]: pair["prob"] for pair in row["label_probs"]},
                [(alt["token"], alt["prob"]) for alt in row["top_alternatives"]],
                longest_number_token=row["longest_number_token"],
            )
        return found

    def compact(self) -> bool:
        """Merge every part and compacted file of one listing into one compacted file, then
        delete those files; False (nothing deleted) if one was gone already (another writer
        merged it: its compacted file holds the rows)."""
        fs, parts, compacted = self._files()
        merged = compacted + parts
        if len(merged) < 2:
            return False
        try:
            table = ds.dataset(merged, filesystem=fs, format="parquet", schema=SCHEMA).to_table()
        except (FileNotFoundError, OSError):
            return False
        # One row per key (the newest), whatever duplicates concurrent writers left.
        table = table.sort_by([("created_at", "descending")])
        _, first = np.unique(np.asarray(table.column("cache_key").to_pylist(), dtype=object), return_index=True)
        table = table.take(pa.array(np.sort(first)))
        now = time.time()
        fileio.write_parquet_at(fileio.join(self.location, f"compact-{int(now * 1000)}-{uuid.uuid4().hex[:8]}.parquet"),
                                table)
        for path in merged:  # only now: the new file holds every row of these
            try:
                fs.delete_file(path)
            except FileNotFoundError:
                pass
        return True

    def put(self, judgments: dict[str, Judgment], judge_model: str) -> None:
        if not judgments:
            return
        now = time.time()
        table = pa.Table.from_pylist(
            [
                {
                    "cache_key": key,
                    "expected_value": j.expected_value,
                    "numeric_mass": j.numeric_mass,
                    "label_probs": [{"label": k, "prob": v} for k, v in j.label_probs.items()],
                    "top_alternatives": [{"token": t, "prob": p} for t, p in j.top_alternatives],
                    "judge_model": judge_model,
                    "created_at": now,
                    "longest_number_token": j.longest_number_token,
                }
                for key, j in judgments.items()
            ],
            schema=SCHEMA,
        )
        fileio.write_parquet_at(fileio.join(self.location, f"part-{int(now * 1000)}-{uuid.uuid4().hex[:8]}.parquet"),
                                table)
        if len(self._files()[1]) > self.compact_after:
            self.compact()
