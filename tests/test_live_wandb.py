"""A finetune's live W&B run (tracking.LiveRun), offline and real: steps logged once per run,
the marker written only once a run is finished, and an earlier attempt's unfinished run in the
same process (Ray reuses worker processes) finished rather than blocking the new one. The whole
path through a real killed-and-resumed finetune is in tests/reliability/test_worker_loss.py."""

import wandb_offline

from emsweep.tracking import LiveRun, run_id


def _live(tmp_path):
    return {"wandb": {"mode": "offline", "project": "live"}, "out_dir": str(tmp_path), "sweep": "s",
            "node_id": "finetune/n", "key": "k", "config": {"lr": 1e-5}}


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
    live = {**_live(tmp_path), "wandb": {"mode": "disabled"}}
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
