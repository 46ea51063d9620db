"""`emsweep` command line: one thin module per group of commands over public functions (the sweep
driver, the report, the judge package's workflows), assembled here.

    run, resume, status, report, analyze, check,
    wandb-workspace, migrate                        cli/run.py
    plan, doctor, submit, logs, stop, fetch-model   cli/cluster.py
    data generate | check                           cli/data.py
    finetune (one finetune, without Ray)            cli/finetune.py
    judge-eval calibrate | agree, judge-train      cli/judge_eval.py
"""

from __future__ import annotations

import typer

from emsweep.cli import cluster, data, finetune, judge_eval, run

# No frame locals in tracebacks: they would print credentials (an API key, a URI's query).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Emergent-misalignment sweeps on Ray.")

for command, name in ((run.run, None), (run.resume, None), (run.status, None), (run.report, None),
                      (run.analyze_files, "analyze"), (run.check, None), (run.wandb_workspace, "wandb-workspace"), (run.migrate, None), (cluster.plan_command, "plan"),
                      (cluster.doctor, None), (cluster.submit, None), (cluster.logs, None), (cluster.stop, None),
                      (cluster.fetch_model, "fetch-model"), (judge_eval.judge_train, "judge-train"),
                      (finetune.finetune_command, "finetune")):
    app.command(name)(command)
app.add_typer(data.data_app, name="data")
app.add_typer(judge_eval.judge_app, name="judge-eval")
