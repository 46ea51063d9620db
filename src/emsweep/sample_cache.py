"""The sample cache: a run's answers to one suite under one condition, and its harm ratings of
one suite, stored by what decides them, so a sample node re-keyed by a spec edit (a condition or
suite added) samples only the prompts it has not answered before.

`DIR/sample_cache/<key>.samples.parquet` and `<key>.harm.parquet`, each written to a temp name
and renamed (never half-written). A part's key (pipeline.sample_part_keys) hashes the model,
the adapter's bytes (a retrained adapter is a new part), the sampling fields that change an
answer, the suite's questions (file content and selection) and the condition (or, for ratings,
the harm prompt and scoring). Answers are deterministic given those: every request carries its
own seed (sample.py), so a cached part is what sampling it again would give.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from emsweep.store import write_parquet_atomic


class SampleCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str, kind: str) -> Path:
        return self.root / f"{key}.{kind}.parquet"

    def has(self, key: str, kind: str) -> bool:
        return self._path(key, kind).is_file()

    def get(self, key: str, kind: str, schema: pa.Schema) -> pa.Table:
        return pq.read_table(self._path(key, kind), schema=schema)

    def put(self, key: str, kind: str, table: pa.Table) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self._path(key, kind), table)
