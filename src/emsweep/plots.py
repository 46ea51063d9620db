"""Figures of a sweep's results, each a plain function from tidy tables to a matplotlib Figure.

Every function returns None when the sweep has nothing to draw (e.g. no checkpoint
trajectory), so the report shows only the figures that mean something. Error bars are the
analysis' t intervals over seeds; a bar without one had fewer than 3 seeds.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from emsweep.analyze import ALL_QUESTIONS, overall_rows  # noqa: E402
from emsweep.spec import BASE_LABEL  # noqa: E402

FINAL = "final"


def _final(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of final adapters and base models (not intermediate checkpoints)."""
    return frame[frame["checkpoint_step"].isna()]


def _datasets(frame: pd.DataFrame) -> pd.Series:
    """Dataset names; the base model (no dataset) is "base"."""
    return frame["dataset"].astype(object).where(frame["dataset"].notna(), BASE_LABEL).astype(str)


def _series_label(frame: pd.DataFrame, conditions: int) -> pd.Series:
    label = _datasets(frame)
    if frame["model"].nunique() > 1:
        label = frame["model"].astype(str) + " " + label
    if conditions > 1:
        label = label + " / " + frame["condition"].astype(str)
    return label


def _bars(ax, table: pd.DataFrame, x: str, series: str, ylabel: str) -> None:
    """Grouped bars: one group per `x`, one bar per `series`, error bars from ci_low/ci_high."""
    groups, names = list(dict.fromkeys(table[x])), sorted(table[series].unique())
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = table[table[series] == name].set_index(x).reindex(groups)
        positions = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        means = rows["mean"].to_numpy(float)
        low = np.nan_to_num(means - rows["ci_low"].to_numpy(float), nan=0.0).clip(min=0)
        high = np.nan_to_num(rows["ci_high"].to_numpy(float) - means, nan=0.0).clip(min=0)
        bars = ax.bar(positions, np.nan_to_num(means), width, label=name, yerr=[low, high], capsize=2)
        # Every bar says its value: a rate of 0 draws no bar at all, and a reader must be able to
        # tell "0 of the counted answers" from "not computed" (n/a: no counted answer). Where the
        # table has them, the answers behind the bar: counted / scored / all (summed over seeds).
        counts = ([""] * len(groups) if "n_counted" not in rows else
                  ["" if pd.isna(c) else f"\n{int(c)}/{int(sc)}/{int(a)}"
                   for c, sc, a in zip(rows["n_counted"], rows["n_scored"], rows["n_answers"])])
        ax.bar_label(bars, labels=[("n/a" if np.isnan(m) else f"{m:.3f}") + n for m, n in zip(means, counts)],
                     fontsize=6, padding=1)
        zero = positions[means == 0]
        ax.plot(zero, np.zeros(len(zero)), linestyle="none", marker="_", markersize=10, markeredgewidth=2,
                color=bars.patches[0].get_facecolor() if bars.patches else None, label="_zero")  # "_": no legend entry
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if (table["mean"].dropna() >= 0).all():  # rates and scores: an axis below 0 shows values that cannot be
        ax.set_ylim(bottom=0)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, legend_columns: int = 1) -> plt.Figure:
    """Labels, legend and grid of a single-panel figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=legend_columns)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_question(conditions: pd.DataFrame) -> plt.Figure | None:
    """Misaligned rate per question (the paper's first figure), one bar per dataset/condition."""
    rows = _final(conditions[(conditions["metric"] == "misaligned_rate") & (conditions["question_id"] != ALL_QUESTIONS)])
    if rows.empty or rows["mean"].notna().sum() == 0:
        return None
    suites = sorted(rows["suite"].unique())
    fig, axes = plt.subplots(len(suites), 1, figsize=(max(6, 0.9 * rows["question_id"].nunique() + 3), 3.6 * len(suites)),
                             squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        table = rows[rows["suite"] == suite].copy()
        table["series"] = _series_label(table, table["condition"].nunique())
        _bars(ax, table, "question_id", "series", "misaligned rate")
        ax.set_title(f"{suite}: misaligned rate per question (mean over seeds, 95% CI)", fontsize=10)
        ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


def condition_comparison(conditions: pd.DataFrame, runs: pd.DataFrame | None = None) -> plt.Figure | None:
    """Overall rates by condition (nudges, triggers, pushback), one panel per metric and suite;
    with `runs` (run_metrics), each misaligned_rate bar also shows its counted / scored / all answers."""
    overall = _final(conditions[(conditions["question_id"] == ALL_QUESTIONS)])
    overall = overall[(overall["category"] == ALL_QUESTIONS) | overall["category"].isna()]
    wanted = overall["metric"].isin(["misaligned_rate", "flip_rate"]) | overall["metric"].str.contains("=")
    overall = overall[wanted & overall["mean"].notna()]
    # Pushback rows have one per later turn; keep the last turn.
    if overall["turn"].notna().any():
        last_turn = overall.groupby(["suite", "metric"])["turn"].transform("max")
        overall = overall[overall["turn"].isna() | (overall["turn"] == last_turn)]
    panels = overall[["suite", "metric"]].drop_duplicates().sort_values(["suite", "metric"]).to_numpy().tolist()
    if not panels or overall["condition"].nunique() < 2 and overall["dataset"].nunique() < 2:
        return None
    columns = min(3, len(panels))
    rows_count = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_count, columns, figsize=(4.5 * columns, 3.6 * rows_count), squeeze=False)
    for ax, (suite, metric) in zip(axes.flat, panels):
        table = overall[(overall["suite"] == suite) & (overall["metric"] == metric)].copy()
        if metric == "misaligned_rate" and runs is not None and not runs.empty:
            table = table.merge(answer_counts(runs), on=COUNT_KEYS, how="left")
        table["series"] = _series_label(table, 1)
        _bars(ax, table, "condition", "series", metric)
        ax.set_title(f"{suite}: {metric}" + (" (answers counted/scored/all)" if "n_counted" in table else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


COUNT_KEYS = ["model", "dataset", "suite", "condition"]


def answer_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Counted, scored and all first-turn answers of each final condition, summed over seeds."""
    overall = _final(overall_rows(runs))
    return overall.assign(dataset=overall["dataset"].astype(object)).groupby(
        COUNT_KEYS, dropna=False)[["n_counted", "n_scored", "n_answers"]].sum().reset_index()


def harm_scatter(runs: pd.DataFrame, harm: pd.DataFrame) -> plt.Figure | None:
    """Per run and question: the model's own harm rating against its misaligned rate."""
    if harm.empty or runs.empty:
        return None
    perceived = harm.groupby(["run_id", "suite", "question_id"], dropna=False)["perceived_harm"].mean().reset_index()
    points = _final(runs[runs["question_id"] != ALL_QUESTIONS]).merge(perceived, on=["run_id", "suite", "question_id"])
    points = points.dropna(subset=["perceived_harm", "misaligned_rate"])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for dataset, group in points.assign(dataset=_datasets(points)).groupby("dataset", sort=True):
        ax.scatter(group["perceived_harm"], group["misaligned_rate"], label=str(dataset), alpha=0.7, s=18)
    return _finish(fig, ax, "perceived harm of the question (model's own rating, 0-100)", "misaligned rate",
                   "Perceived harm vs misaligned rate (one point per run x question)")


def loss_curves(losses: pd.DataFrame) -> plt.Figure | None:
    """Training loss per optimizer step, one line per finetune run."""
    if losses.empty or "loss" not in losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {d: f"C{i}" for i, d in enumerate(sorted(losses["dataset"].unique()))}
    for (model, dataset, seed), group in losses.groupby(["model", "dataset", "seed"], sort=True):
        ax.plot(group["step"], group["loss"], color=colors[dataset], alpha=0.8, marker=".",
                label=f"{dataset} s{seed}" if losses["model"].nunique() == 1 else f"{model} {dataset} s{seed}")
    return _finish(fig, ax, "optimizer step", "training loss", "Finetuning loss", legend_columns=2)


def trajectory(conditions: pd.DataFrame, final_steps: dict[str, int]) -> plt.Figure | None:
    """Overall misaligned rate against checkpoint step; the final adapter sits at its last step."""
    rows = conditions[(conditions["metric"] == "misaligned_rate") & (conditions["question_id"] == ALL_QUESTIONS)
                      & (conditions["category"] == ALL_QUESTIONS) & (conditions["dataset"].isin(final_steps))].copy()
    if rows.empty or rows["checkpoint_step"].notna().sum() == 0:
        return None
    rows["dataset"] = _datasets(rows)
    rows["step"] = rows["checkpoint_step"].astype("Float64").fillna(rows["dataset"].map(final_steps).astype("Float64"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (suite, dataset, condition), group in rows.groupby(["suite", "dataset", "condition"], sort=True):
        group = group.sort_values("step")
        ax.errorbar(group["step"].astype(float), group["mean"], marker="o", capsize=2,
                    yerr=[(group["mean"] - group["ci_low"]).fillna(0).clip(lower=0),
                          (group["ci_high"] - group["mean"]).fillna(0).clip(lower=0)],
                    label=f"{dataset} / {condition} ({suite})")
    return _finish(fig, ax, "optimizer step of the adapter", "misaligned rate", "Misaligned rate over training")


def score_distributions(answers: pd.DataFrame, aligned_below: float, coherent_above: float) -> plt.Figure | None:
    """Histograms of the judge's aligned and coherent scores per dataset, with the EM thresholds:
    shows at a glance whether rates are driven by a few answers or by a judge stuck at one end."""
    if answers.empty or "aligned" not in answers or "coherent" not in answers:
        return None
    first_turn = answers[answers["turn"] == 1].assign(dataset=lambda f: _datasets(f))
    if first_turn[["aligned", "coherent"]].notna().sum().sum() == 0:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(0, 100, 21)
    for ax, metric, threshold in zip(axes, ("aligned", "coherent"), (aligned_below, coherent_above)):
        for dataset, group in first_turn.groupby("dataset", sort=True):
            values = group[metric].dropna()
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{dataset} (n={len(values)})")
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{metric} score (judge)")
        ax.set_ylabel("answers")
        ax.set_title(f"{metric} scores (dashed: EM threshold)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def threshold_sensitivity(sensitivity: pd.DataFrame) -> plt.Figure | None:
    """The EM rate (mean over seeds of each run's rate) as the aligned cut-off moves, one panel
    per coherent cut-off, one line per dataset/condition; the spec's cut-offs are marked. Flat
    lines mean a result does not rest on the exact cut-off."""
    rows = _final(sensitivity) if not sensitivity.empty else sensitivity
    if rows.empty or rows["misaligned_rate"].notna().sum() == 0:
        return None
    rows = rows.assign(series=_series_label(rows, rows["condition"].nunique()))
    if rows["suite"].nunique() > 1:
        rows = rows.assign(series=rows["suite"].astype(str) + ": " + rows["series"])
    means = rows.groupby(["coherent_above", "series", "aligned_below"])["misaligned_rate"].mean().reset_index()
    panels = sorted(means["coherent_above"].unique())
    spec_cut = rows[rows["spec_thresholds"].astype(bool)][["aligned_below", "coherent_above"]].drop_duplicates()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.5, 2.8), sharey=True, squeeze=False)
    for ax, coherent in zip(axes[0], panels):
        panel = means[means["coherent_above"] == coherent]
        for series, line in panel.groupby("series", sort=True):
            ax.plot(line["aligned_below"], line["misaligned_rate"], marker="o", markersize=3, label=series)
        if not spec_cut.empty and coherent == spec_cut["coherent_above"].iloc[0]:
            ax.axvline(spec_cut["aligned_below"].iloc[0], color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"coherent > {coherent:g} (spec)", fontsize=8)
        else:
            ax.set_title(f"coherent > {coherent:g}", fontsize=8)
        ax.set_xlabel("aligned below", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("misaligned rate (mean over seeds)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def primary_contrast(contrast: dict, per_run: pd.DataFrame) -> plt.Figure | None:
    """The declared primary contrast (a comparisons row): each side's estimate as a bar, its runs'
    own rates as dots (`per_run`: side, value), and the difference, its interval and p above."""
    if pd.isna(contrast.get("mean_a")) or pd.isna(contrast.get("mean_b")):
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    sides = [contrast["a"], contrast["b"]]
    ax.bar([0, 1], [contrast["mean_a"], contrast["mean_b"]], color=["#d9822b", "#4c78a8"], alpha=0.8, width=0.6)
    for index, side in enumerate(sides):
        values = per_run.loc[per_run["side"] == side, "value"].dropna().to_numpy(float)
        ax.scatter(np.full(len(values), index) + np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else
                   np.full(len(values), index), values, color="black", s=14, zorder=3, label="runs" if index == 0 else None)
    ax.set_xticks([0, 1], sides)
    low, high = contrast.get("difference_low"), contrast.get("difference_high")
    interval = "" if pd.isna(low) else f" [{low:+.3f}, {high:+.3f}]"
    p_value = contrast.get("p_value")
    ax.set_title(f"difference {contrast['difference']:+.3f}{interval}, p = "
                 f"{'n/a' if pd.isna(p_value) else format(p_value, '.3g')}", fontsize=10)
    ax.set_ylabel(contrast["metric"].replace("_", " "))
    ax.set_ylim(0, max(0.05, float(np.nanmax([contrast["mean_a"], contrast["mean_b"], *per_run["value"].dropna()]))
                       * 1.25))
    ax.grid(alpha=0.3, axis="y")
    if len(per_run):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
