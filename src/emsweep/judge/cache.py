"""The judgment cache: what a judge said about (judge, scoring, template, question, answer).

Part files `DIR/judge_cache/part-*.parquet`, one per finished batch, each written to a
hidden temp name and renamed (one object put on an object store, where the cache lives on the
store for every machine), so a crash never leaves a half-written part that readers see. Keys are
`JudgeRequest.cache_key`; thresholds are applied after the cache, so changing
`min_numeric_mass` or the analysis re-judges nothing. Failed judgments are never cached.

Schema: cache_key string, expected_value float64, numeric_mass float64,
    label_probs list<struct<label, prob>>, top_alternatives list<struct<token, prob>>,
    judge_model string, created_at float64, longest_number_token int64 (null in parts written
    before it existed)
"""

from __future__ import annotations

import os
import time
import uuid

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


class JudgmentCache:
    """`location`: a local dir, or a dir on the sweep's object store (shared by every machine)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)

    def get(self, keys: set[str]) -> dict[str, Judgment]:
        fs, parts = fileio.files_at(self.location, "part-", ".parquet")
        if not keys or not parts:
            return {}
        dataset = ds.dataset(parts, filesystem=fs, format="parquet", schema=SCHEMA)
        table = dataset.to_table(filter=pc.field("cache_key").isin(pa.array(sorted(keys))))
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
