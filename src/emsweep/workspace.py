"""A saved W&B workspace per sweep, built with wandb-workspaces (W&B's library for saved views).

W&B opens a project on its automatic workspace: one panel per logged key, every run mixed
together. This builds the view an EM sweep needs instead, from the spec and the names the sweep
logs under (tracking.py):

- run set: this sweep's runs only (W&B group = the sweep's name), grouped by the run's dataset
  (config `dataset`: every finetune, sample and judge node run carries it), so W&B's own grouping
  shows means over seeds;
- Finetunes: loss (per seed, and by dataset with the range over seeds), learning rate, tokens/s
  and grad norm per optimizer step; only finetune runs log these keys;
- Sampling and judging: requests done of total and output tokens/s of the sampling engines,
  judgments done of total and cache hits of the judge, per job;
- Results: each judge node's run rates (`misaligned_rate/<suite>/<condition>`, one run per seed)
  as bars per dataset with the standard error over seeds, coherent rates beside them; the
  summary run's means over seeds (`misaligned_rate/<suite>/<condition>/<dataset>`); the per-run
  rates table the summary run logs (`misaligned_rate_so_far`).

Conditions are in the metric names, not in run configs: a sample node answers every condition.
Offline (no W&B server) the workspace's own serialised form (the library's view model, as JSON)
is written to `DIR/wandb/workspace.json`; online it is saved to the project and has a URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emsweep.fileio import write_text_atomic
from emsweep.questions import load_suite
from emsweep.spec import BASE_LABEL, SweepSpec
from emsweep.tracking import RUN_RATE_METRICS, run_rate_key, summary_rate_key

WORKSPACE_FILE = "workspace.json"  # under DIR/wandb/
# What the finetune's rank 0 logs per step (finetune.train, tracking.LiveRun).
FINETUNE_STEP_METRICS = ("loss", "learning_rate", "tokens_per_s", "grad_norm")
# What sample and judge jobs log while they run (tracking.LiveCounters: <phase>/<unit>_done, ...).
ENGINE_METRICS = (("answers/requests_done", "answers/requests_total"), ("answers/output_tokens_per_s",),
                  ("judging/judgments_done", "judging/judgments_total"), ("judging/cache_hits",))
PER_RUN_TABLE = "misaligned_rate_so_far"  # the summary run's table (tracking.LiveSummary)


def em_suite_conditions(spec: SweepSpec) -> list[tuple[str, str]]:
    """(suite, condition) of every EM rate the sweep produces: suites whose questions are judged
    for both `aligned` and `coherent`, under each condition that applies to them."""
    pairs = []
    for suite in spec.eval.suites:
        if any({"aligned", "coherent"} <= set(question.judge_prompts) for question in load_suite(suite)):
            pairs += [(suite.name, condition.name) for condition in spec.eval.conditions_for(suite.name)]
    return pairs


def datasets_of(spec: SweepSpec) -> list[str]:
    return [dataset.name for dataset in spec.datasets] + ([BASE_LABEL] if spec.eval.include_base_model else [])


def build_workspace(spec: SweepSpec, entity: str | None = None, project: str | None = None):
    """The sweep's workspace (a wandb_workspaces Workspace), for `entity`/`project` (default: the
    spec's `wandb` section; a workspace needs an entity only to be saved)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def lines(metrics: tuple[str, ...], title: str, **options) -> wr.LinePlot:
        return wr.LinePlot(x="Step", y=list(metrics), title=title, **options)

    finetunes = ws.Section(name="Finetunes", is_open=True, panels=[
        lines(("loss",), "loss per step, one line per seed", aggregate=False,
              legend_template="${config:dataset} seed ${config:seed}"),
        lines(("loss",), "loss by dataset (mean and range over seeds)", groupby="dataset", groupby_aggfunc="mean",
              groupby_rangefunc="minmax"),
        *(lines((metric,), f"{metric} per step", groupby="dataset") for metric in FINETUNE_STEP_METRICS[1:]),
    ])
    engines = ws.Section(name="Sampling and judging", is_open=True, panels=[
        lines(metrics, " / ".join(metrics) + " (per job)") for metrics in ENGINE_METRICS])
    pairs = em_suite_conditions(spec)
    results = ws.Section(name="Results", is_open=True, panels=[
        *(wr.BarPlot(metrics=[run_rate_key(metric, suite, condition)], groupby="dataset", groupby_aggfunc="mean",
                     groupby_rangefunc="stderr",
                     title=f"{metric} {suite}/{condition} by dataset (mean over seeds, error bar: standard error)")
          for suite, condition in pairs for metric in RUN_RATE_METRICS),
        *(wr.BarPlot(metrics=[summary_rate_key(suite, condition, dataset) for dataset in datasets_of(spec)],
                     title=f"summary run: misaligned rate {suite}/{condition}, mean over seeds per dataset")
          for suite, condition in pairs),
        wr.WeavePanelSummaryTable(table_name=PER_RUN_TABLE),
    ])
    return ws.Workspace(
        entity=entity or spec.wandb.entity or "", project=project or spec.wandb.project,
        name=f"emsweep: {spec.name}", sections=[results, finetunes, engines],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == spec.name],
                                          groupby=[ws.Config("dataset")]),
    )


def panel_metrics(workspace) -> set[str]:
    """Every metric key a panel of `workspace` names (line plots' y, bar plots' metrics)."""
    names = set()
    for section in workspace.sections:
        for panel in section.panels:
            for metric in [*(getattr(panel, "y", None) or []), *(getattr(panel, "metrics", None) or [])]:
                names.add(metric if isinstance(metric, str) else metric.name)  # read back: expr.Metric
    return names


def run_filter(workspace) -> list[tuple[str, str, object]]:
    """The run set's filter as (run field, operator, value) triples, ANDed (e.g. [("Group", "=",
    "quickstart")]): read back through the library's own parser."""
    from wandb_workspaces.expr import string_to_filterexpr_list

    filters = workspace.runset_settings.filters
    parsed = string_to_filterexpr_list(filters) if isinstance(filters, str) else filters
    return [(item.key.name, item.op, item.value) for item in parsed]


def selects(workspace, run: dict) -> bool:
    """Whether the run set's filter keeps a run, given its W&B fields (`Group`, `JobType`, ...):
    equality and inequality, the only operators this workspace uses."""
    checks = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b}
    return all(checks[op](run.get(field), value) for field, op, value in run_filter(workspace))


def serialise(workspace) -> str:
    """The workspace as the library's own view model (what it sends to W&B), as JSON."""
    return workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def load_serialised(text: str):
    """A serialised workspace read back through the library's model (validates it)."""
    from wandb_workspaces.workspaces import Workspace, internal

    return Workspace._from_model(internal.View.model_validate_json(text))


@dataclass
class Saved:
    where: str  # the file written (offline) or the workspace's URL (online)
    online: bool
    workspace: object  # the wandb_workspaces Workspace saved


def save_workspace(spec: SweepSpec, local_dir: Path, entity: str | None = None, project: str | None = None,
                   online: bool | None = None) -> Saved:
    """Online (the spec's W&B mode, unless `online` says otherwise): save the view to the
    project and return its URL. Otherwise write its serialised form to DIR/wandb/workspace.json."""
    workspace = build_workspace(spec, entity, project)
    if online if online is not None else spec.wandb.mode == "online":
        if not workspace.entity:
            raise ValueError("saving a W&B workspace needs an entity: give --entity or set wandb.entity in the spec")
        workspace.save()
        return Saved(workspace.url, True, workspace)
    path = Path(local_dir) / "wandb" / WORKSPACE_FILE
    write_text_atomic(path, serialise(workspace))
    return Saved(str(path), False, workspace)


def describe(workspace) -> list[str]:
    """One line per section: its name and its panels' titles (for the CLI and the docs)."""
    return [f"{section.name}: " + "; ".join(getattr(panel, "title", None) or type(panel).__name__
                                             for panel in section.panels) for section in workspace.sections]

