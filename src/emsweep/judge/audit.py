"""Which answers the audit judge scores (spec.AuditSpec): per run (a run id and checkpoint), a
seeded random draw stratified by question.

The run's K audited answers (K = round(fraction x N) of its N answers, or min(count, N)) are dealt
out among its strata (suite, condition, question, turn) in proportion to their sizes, the
remainders to the largest fractions (ties broken at random), then drawn uniformly without
replacement within each stratum. Proportional allocation keeps every question's share of the
audit what it is of the run, so the audited answers are a random sample of the run's answers as
prediction-powered inference assumes, with no more variance than a simple random sample of the
same size. The draw depends on the seed and the run's identity only, not on any judge's scores.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

STRATUM = ["suite", "condition", "question_id", "turn"]


def audited_rows(samples: pa.Table, fraction: float | None, count: int | None, seed: int) -> pa.Table:
    """The rows of `samples` (a sample node's samples.parquet) the audit judge scores."""
    frame = samples.select(["run_id", "checkpoint_step", *STRATUM]).to_pandas()
    frame["row"] = np.arange(len(frame))
    keep: list[int] = []
    for (run_id, step), run in frame.groupby(["run_id", "checkpoint_step"], dropna=False, sort=True):
        step_label = -1 if step is None or step != step else int(step)  # NaN: the final adapter
        rng = np.random.default_rng([seed, zlib.crc32(f"{run_id}@{step_label}".encode())])
        total = len(run)
        wanted = min(total, count) if count is not None else int(round(fraction * total))
        strata = [group["row"].to_numpy() for _, group in run.groupby(STRATUM, dropna=False, sort=True)]
        for rows, quota in zip(strata, _allocate(wanted, [len(rows) for rows in strata], rng)):
            keep += rng.choice(rows, size=quota, replace=False).tolist()
    return samples.take(sorted(keep))


def _allocate(wanted: int, sizes: list[int], rng: np.random.Generator) -> list[int]:
    """`wanted` draws over strata of `sizes`, in proportion (largest remainders, random ties)."""
    total = sum(sizes)
    if total == 0 or wanted == 0:
        return [0] * len(sizes)
    exact = np.array(sizes, dtype=float) * wanted / total
    quotas = np.floor(exact).astype(int)
    remainder = exact - quotas
    order = np.lexsort((rng.random(len(sizes)), -remainder))  # largest remainder first, ties at random
    for index in order[:wanted - int(quotas.sum())]:
        quotas[index] += 1
    return np.minimum(quotas, sizes).tolist()
