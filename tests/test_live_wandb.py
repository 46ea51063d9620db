"""A finetune's live W&B run (tracking.LiveRun), offline and real: steps logged once per run,
the marker written only once a run is finished, and an earlier attempt's unfinished run in the
same process (Ray reuses worker processes) finished rather than blocking the new one. The whole
path through a real killed-and-resumed finetune is in tests/reliability/test_worker_loss.py."""

import wandb_offline

import dataclasses

from emsweep.spec import WandbSpec
from emsweep.tracking import LiveRun, LiveRunSettings, run_id


def _live(tmp_path):
    return LiveRunSettings(wandb=WandbSpec(mode="offline", project="live"), out_dir=str(tmp_path), sweep="s",
                           node_id="finetune/n", key="k", config={"lr": 1e-5})


def _segments(tmp_path):
    return [[row["_step"] for row in wandb_offline.rows(next(d.glob("*.wandb")))]
            for d in wandb_offline.segments(tmp_path / "wandb", run_id("s", "finetune/n", "k"))]


def test_an_unfinished_run_of_an_earlier_attempt_in_this_process_does_not_block_the_next(tmp_path):
    marker = tmp_path / "wandb_logged_step"
    killed = LiveRun(_live(tmp_path), marker)
    killed.log({"step": 1, "loss": 1.0, "tokens": 100, "step_seconds": 2.0})  # its actor is torn down here
    assert not marker.exists()  # nothing counts as logged before a run is finished
    resumed = LiveRun(_live(tmp_path), marker)
    assert resumed.run is not None
    for step, loss in ((1, 1.0), (2, 0.5), (2, 0.4), (3, 0.25)):  # a repeated step is not logged twice
        resumed.log({"step": step, "loss": loss, "tokens": 100, "step_seconds": 2.0})
    resumed.finish()
    assert _segments(tmp_path) == [[1], [1, 2, 3]]
    assert marker.read_text() == "3"
    last = wandb_offline.segments(tmp_path / "wandb", run_id("s", "finetune/n", "k"))[-1]
    rows = wandb_offline.rows(next(last.glob("*.wandb")))
    assert [row["loss"] for row in rows] == [1.0, 0.5, 0.25] and all(row["tokens_per_s"] == 50.0 for row in rows)
    # A later attempt (the node's commit) knows steps 1-3 are logged.
    assert LiveRun.logged_steps(marker) == 3


def test_disabled_wandb_logs_nothing(tmp_path):
    live = dataclasses.replace(_live(tmp_path), wandb=WandbSpec(mode="disabled"))
    run = LiveRun(live, tmp_path / "marker")
    run.log({"step": 1, "loss": 1.0})
    run.finish()
    assert run.run is None and not (tmp_path / "wandb").exists() and not (tmp_path / "marker").exists()


def test_a_process_started_by_one_that_used_wandb_logs_through_its_own_service(tmp_path, monkeypatch):
    """CI lost the summary run's file: pytest had used W&B, so `emsweep run` inherited its
    WANDB_SERVICE and handed runs to pytest's service, which resolved the relative run dir from
    its own working directory. Here the child logs a node with a relative out dir from another cwd."""
    import os
    import subprocess
    import sys

    import wandb

    monkeypatch.chdir(tmp_path)
    wandb.init(mode="offline", dir=str(tmp_path), project="parent", settings=wandb.Settings(silent=True)).finish()
    assert os.environ["WANDB_SERVICE"].startswith(f"3-{os.getpid()}-")
    child_cwd = tmp_path / "elsewhere"
    child_cwd.mkdir()
    code = ("from pathlib import Path; from emsweep.spec import WandbSpec; from emsweep.tracking import log_node;"
            "print(log_node(WandbSpec(mode='offline', project='child'), out_dir=Path('out'), sweep='s',"
            " stage='data', node_id='data/d', key='k', config={}, tables={}))")
    child = subprocess.run([sys.executable, "-c", code], cwd=child_cwd, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "None", child.stdout + child.stderr
    files = list((child_cwd / "out" / "wandb").glob("offline-run-*/run-s-data-d-k.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 1000
    assert not (tmp_path / "out").exists()  # nothing under the parent's cwd


def test_a_jobs_counters_reach_its_nodes_runs_while_it_runs_and_its_tables_the_same_run(tmp_path, monkeypatch):
    """A sample job of two nodes: counters logged (throttled) while it runs, under each node's
    run id; one node's commit logs its table into the same open run (one segment), the other
    node's run is finished when the job ends (its commit never came)."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from emsweep import tracking
    from emsweep.progress import ProgressWriter
    from emsweep.spec import WandbSpec

    from emsweep import progress

    clock = [1000.0]
    for module in (tracking, progress):  # their clock only: W&B keeps the real one
        monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: clock[0]))
    spec = WandbSpec(mode="offline", project="live")
    nodes = [SimpleNamespace(id=f"sample/{name}", key=f"k{name}", config={"model": "m"}) for name in ("a", "b")]
    live = tracking.LiveCounters(spec, tmp_path, "s", "sample", nodes)
    writer = ProgressWriter(tmp_path / "progress" / "job.json", "sample", [n.id for n in nodes], sink=live.log)
    for done in range(0, 41):  # one request finished every 0.5 s: a write every second, W&B every 5 s
        writer.update(done, 40, "requests", phase="answers", metrics={"output_tokens_per_s": 10.0 + done})
        clock[0] += 0.5
    writer.update(0, 4, "requests", phase="pushback turn 2", force=True)
    writer.update(4, 4, "requests", phase="pushback turn 2")
    table = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"answer": ["x", "y"]}), table)
    assert tracking.log_node(spec, out_dir=tmp_path, sweep="s", stage="sample", node_id="sample/a", key="ka",
                             config={}, tables={"samples": table}, live=live.take("sample/a")) is None
    live.close()

    for node in nodes:
        (segment,) = wandb_offline.segments(tmp_path / "wandb", run_id("s", node.id, node.key))
        rows = wandb_offline.rows(segment / f"run-{run_id('s', node.id, node.key)}.wandb")
        answers = [row["answers/requests_done"] for row in rows if "answers/requests_done" in row]
        # First write, then every 5 s of the 20 s (throttled from 41 updates), and the phase's end.
        assert answers == [0, 10, 20, 30, 40], answers
        assert {row["answers/requests_total"] for row in rows if "answers/requests_total" in row} == {40}
        assert [row["answers/output_tokens_per_s"] for row in rows if "answers/requests_done" in row][-1] == 50.0
        assert [row["pushback_turn_2/requests_done"] for row in rows if "pushback_turn_2/requests_done" in row] == [0, 4]
        assert (rows[-1].get("samples/_type") == "table-file") == (node.id == "sample/a")  # the commit's table, in the live run


def test_the_live_summary_logs_rates_judged_so_far_with_means_over_final_adapters(tmp_path):
    import pandas as pd

    from emsweep import tracking
    from emsweep.spec import WandbSpec

    summary = tracking.LiveSummary(WandbSpec(mode="offline", project="live"), tmp_path, "s", {"name": "s"})
    first = pd.DataFrame({"run_id": ["i0"], "dataset": ["insecure"], "seed": [0], "checkpoint_step": [None],
                          "suite": ["first_plot"], "condition": ["none"], "misaligned_rate": [0.2]})
    both = pd.concat([first, first.assign(run_id="i1", seed=1, misaligned_rate=0.4),
                      first.assign(run_id="i1@step1", seed=1, checkpoint_step=1, misaligned_rate=0.9)])
    assert summary.log(first, judged_nodes=1) is None and summary.log(both, judged_nodes=2) is None
    summary.finish()
    rows = wandb_offline.history(tmp_path / "wandb", run_id("s", "summary", "report"), wait_finished_s=30)
    assert [row["judged_nodes"] for row in rows] == [1, 2] and [row["judged_runs"] for row in rows] == [1, 2]
    # The mean over the final adapters (0.2, 0.4): the step-1 checkpoint's 0.9 is not in it.
    rates = [row["misaligned_rate/first_plot/none/insecure"] for row in rows]
    assert rates[0] == 0.2 and abs(rates[1] - 0.3) < 1e-12
    assert rows[1]["misaligned_rate_so_far/_type"] == "table-file" and rows[1]["misaligned_rate_so_far/nrows"] == 3


def _synced_in_order(wandb_dir, run):
    """What `wandb sync` uploads of a run: its offline dirs one after another in order of start
    time, each row at its step; a row at a step the run already has (from an earlier dir) is not
    taken. The rows taken, and the rows left out."""
    taken, left_out, last = [], [], -1
    for segment in wandb_offline.segments(wandb_dir, run):
        for row in wandb_offline.rows(segment / f"run-{run}.wandb"):
            (taken if row["_step"] > last or (taken and row["_step"] == taken[-1]["_step"] and segment == taken[-1]["_dir"])
             else left_out).append({**row, "_dir": segment})
            last = max(last, row["_step"])
    return taken, left_out


def test_a_run_logged_by_several_processes_syncs_whole(tmp_path):
    """A finetune's run (its rank 0 logs the steps while it trains, the node's commit its tables)
    and the summary run (live rates while judging goes on, then a report, then another report):
    each in offline dirs of its own. Every row of a later dir lies past the steps of the ones
    before it, so a sync in order of start time takes every row: the commit's table, each report's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pandas as pd

    from emsweep.tracking import LiveSummary, log_node, log_summary

    marker = tmp_path / "wandb_logged_step"
    live = LiveRun(_live(tmp_path), marker)
    for step in (1, 2, 3):
        live.log({"step": step, "loss": 1.0 / step, "tokens": 100, "step_seconds": 2.0})
    live.finish()
    metrics = tmp_path / "metrics.parquet"
    pq.write_table(pa.table({"step": [1, 2, 3], "loss": [1.0, 0.5, 1 / 3]}), metrics)
    spec = WandbSpec(mode="offline", project="live")
    assert log_node(spec, out_dir=tmp_path, sweep="s", stage="finetune", node_id="finetune/n", key="k", config={},
                    tables={"finetune_metrics": metrics}, step_metrics=metrics,
                    logged_steps=LiveRun.logged_steps(marker)) is None
    run = run_id("s", "finetune/n", "k")
    assert len(wandb_offline.segments(tmp_path / "wandb", run)) == 2
    taken, left_out = _synced_in_order(tmp_path / "wandb", run)
    assert left_out == [] and [row["_step"] for row in taken] == [1, 2, 3, 4]
    assert [row["loss"] for row in taken[:3]] == [1.0, 0.5, 1 / 3]
    assert taken[-1]["finetune_metrics/_type"] == "table-file"

    summary = LiveSummary(spec, tmp_path, "s", {})
    rates = pd.DataFrame({"run_id": ["a", "b"], "checkpoint_step": [None, None], "suite": ["q", "q"],
                          "condition": ["none", "none"], "dataset": ["d", "base"], "misaligned_rate": [0.2, 0.0]})
    for judged in (1, 2):
        assert summary.log(rates, judged_nodes=judged) is None
    summary.finish()
    for report in range(2):  # `emsweep run`'s report, then `emsweep report` again later
        assert log_summary(spec, out_dir=tmp_path, sweep="s", config={}, tables={"comparisons": rates}, images={},
                           files=[], scalars={"report": report}) is None
    taken, left_out = _synced_in_order(tmp_path / "wandb", run_id("s", "summary", "report"))
    assert left_out == [] and [row["_step"] for row in taken] == [0, 1, 2, 3]
    assert [row.get("judged_nodes") for row in taken] == [1, 2, None, None]
    assert [row.get("report") for row in taken] == [None, None, 0, 1]
    assert all(row["comparisons/_type"] == "table-file" for row in taken[2:])
