"""The sample cache: a run's answers to one suite under one condition, and its harm ratings of
one suite, stored by what decides them, so a sample node re-keyed by a spec edit (a condition or
suite added) samples only the prompts it has not answered before.

`DIR/sample_cache/<key>.samples.parquet` and `<key>.harm.parquet`, each written whole or not
at all (a temp name and a rename; one object put on an object store, where the cache lives on
the store). A part's key (sweep.plan.sample_part_keys) hashes the model,
the adapter's bytes (a retrained adapter is a new part), the sampling fields that change an
answer, the suite's questions (file content and selection) and the condition (or, for ratings,
the harm prompt and scoring). Answers are deterministic given those: every request carries its
own seed (sample.py), so a cached part is what sampling it again would give.
"""

from __future__ import annotations

import os

import pyarrow as pa

from emsweep import fileio


class SampleCache:
    """`location`: a local dir, or a dir on the sweep's object store (shared by every machine)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)

    def _location(self, key: str, kind: str) -> str:
        return fileio.join(self.location, f"{key}.{kind}.parquet")

    def has(self, key: str, kind: str) -> bool:
        return fileio.exists_at(self._location(key, kind))

    def get(self, key: str, kind: str, schema: pa.Schema) -> pa.Table:
        return fileio.read_parquet_at(self._location(key, kind), schema=schema)

    def put(self, key: str, kind: str, table: pa.Table) -> None:
        fileio.write_parquet_at(self._location(key, kind), table)
