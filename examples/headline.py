"""Redraw a sweep's headline figure from its Parquet exports, with pandas and with duckdb.

    .venv/bin/python examples/headline.py runs/quickstart [--out headline.png]

The headline is `misaligned_rate` per dataset and test-time condition: the mean over seeds (the
unit of the statistics) as a bar, each seed's own rate as a dot. It reads
`DIR/report/exports/metrics.parquet` (written by `emsweep run` and `emsweep report`; one long
table of every rate, per run and per condition, see docs/output.md) once with pandas and once
with duckdb's SQL over the same file, checks that the two agree, prints the table and saves the
figure. Either half is a starting point for your own analysis.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ALL = "__all__"  # the rows that pool every question (and every category)


def headline_pandas(metrics_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per condition: the mean over seeds and how many seeds; per seed: each run's rate)."""
    metrics = pd.read_parquet(metrics_path)
    pooled = metrics[(metrics["metric"] == "misaligned_rate") & (metrics["question_id"] == ALL)
                     & (metrics["category"] == ALL) & metrics["checkpoint_step"].isna()]
    conditions = (pooled[pooled["level"] == "condition"]
                  .rename(columns={"value": "misaligned_rate", "n": "seeds"})
                  [["dataset", "condition", "misaligned_rate", "seeds"]])
    seeds = (pooled[pooled["level"] == "run"].rename(columns={"value": "misaligned_rate"})
             [["dataset", "condition", "run_id", "misaligned_rate"]])
    return _sorted(conditions), _sorted(seeds)


def headline_duckdb(metrics_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same two tables as headline_pandas, in SQL."""
    import duckdb

    pooled = f"""
        SELECT * FROM read_parquet('{metrics_path}')
        WHERE metric = 'misaligned_rate' AND question_id = '{ALL}' AND category = '{ALL}'
          AND checkpoint_step IS NULL"""
    with duckdb.connect() as db:
        conditions = db.sql(f"""SELECT dataset, condition, value AS misaligned_rate, n AS seeds
                                FROM ({pooled}) WHERE level = 'condition'""").df()
        seeds = db.sql(f"""SELECT dataset, condition, run_id, value AS misaligned_rate
                           FROM ({pooled}) WHERE level = 'run'""").df()
    return _sorted(conditions), _sorted(seeds)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [column for column in ("dataset", "condition", "run_id") if column in frame]
    return frame.sort_values(keys).reset_index(drop=True)


def agree(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Same rows and values (up to float noise), whatever dtypes each library chose."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    for column in a.columns:
        left, right = a[column].astype(object).tolist(), b[column].astype(object).tolist()
        for x, y in zip(left, right):
            if pd.isna(x) and pd.isna(y):
                continue
            if isinstance(x, float) or isinstance(y, float):
                if abs(float(x) - float(y)) > 1e-12:
                    return False
            elif str(x) != str(y):
                return False
    return True


def draw(conditions: pd.DataFrame, seeds: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(dict.fromkeys(conditions["dataset"]))
    names = sorted(conditions["condition"].unique())
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(datasets), 3.4))
    for i, condition in enumerate(names):
        positions = np.arange(len(datasets)) + (i - (len(names) - 1) / 2) * width
        rows = conditions[conditions["condition"] == condition].set_index("dataset").reindex(datasets)
        rates = rows["misaligned_rate"].to_numpy(float)
        ax.bar(positions, np.nan_to_num(rates), width, label=condition)
        for position, rate in zip(positions, rates):  # a rate not computed is no bar of height 0
            if np.isnan(rate):
                ax.annotate("n/a", (position, 0), ha="center", va="bottom", fontsize=7)
        for position, dataset in zip(positions, datasets):
            rates = seeds[(seeds["dataset"] == dataset) & (seeds["condition"] == condition)]["misaligned_rate"]
            ax.scatter([position] * len(rates), rates, color="black", s=10, zorder=3)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("misaligned_rate")
    ax.set_title("misaligned_rate: mean over seeds (bars), each seed (dots)", fontsize=9)
    ax.legend(title="condition", fontsize=7, title_fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a finished sweep's output dir (holds report/exports/)")
    parser.add_argument("--out", type=Path, default=Path("headline.png"))
    args = parser.parse_args()
    metrics_path = args.sweep_dir / "report" / "exports" / "metrics.parquet"
    if not metrics_path.is_file():
        raise SystemExit(f"error: {metrics_path} not found: run `emsweep report {args.sweep_dir}` first")
    conditions, seeds = headline_pandas(metrics_path)
    sql_conditions, sql_seeds = headline_duckdb(metrics_path)
    if not (agree(conditions, sql_conditions) and agree(seeds, sql_seeds)):
        raise SystemExit("error: pandas and duckdb disagree on the headline table")
    print(conditions.to_string(index=False))
    draw(conditions, seeds, args.out)
    print(f"figure: {args.out} (pandas and duckdb agree on {len(conditions)} conditions, {len(seeds)} runs)")


if __name__ == "__main__":
    main()
