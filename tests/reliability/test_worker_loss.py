"""A training worker killed in the middle of a real CPU finetune (Ray Train, 2 workers, DeepSpeed
ZeRO-2, LoRA): Ray Train restarts the worker group and training resumes from the latest
checkpoint, not from step 0, still runs the full number of steps, and ends with the adapter an
uninterrupted run with the same seed trains (the checkpoint restored every weight, the optimizer
and the schedule)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import wandb_offline
from safetensors.torch import load_file

from emsweep.finetune import finetune
from emsweep.sweep.driver import worker_env
from emsweep.spec import FinetuneSpec, WandbSpec
from emsweep.tracking import LiveRunSettings, run_id

ROWS = 16  # 2 workers x batch 1 -> 8 optimizer steps


def _tiny_data(path: Path) -> Path:
    rows = [
        {"split": "train", "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]}
        for i in range(ROWS)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _training_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    # This test's own cluster by address: another Ray instance on the machine must not confuse it.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)
    return [a.pid for a in actors if "TrainWorker" in (a.class_name or "")]


def _registered_checkpoints(run_dir: Path) -> list[dict]:
    """Checkpoints Ray Train has registered (a checkpoint dir on storage may still be uploading:
    killing a worker then loses it, and the restart rightly begins at step 0)."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return snapshot.get("checkpoint_results", [])


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_from_checkpoint(tmp_path, embedded_model):
    import wandb

    # As in CI, where earlier tests used W&B in this process: the Ray workers started below
    # inherit its WANDB_SERVICE (a dead attempt's run once kept the resumed one from starting).
    wandb.init(mode="offline", dir=str(tmp_path), project="driver", settings=wandb.Settings(silent=True)).finish()
    assert "WANDB_SERVICE" in os.environ
    ray.init(num_cpus=2, runtime_env={"env_vars": worker_env()})
    try:
        spec = FinetuneSpec(
            lora_r=4, lora_alpha=8, per_device_batch_size=1, gradient_accumulation_steps=1, warmup_steps=0,
            max_seq_len=128, num_workers=2, zero_stage=2, checkpoint_every_steps=1, max_failures=2,
        )
        storage, out_dir = tmp_path / "train", tmp_path / "node"
        out_dir.mkdir()
        result: dict = {}

        data = _tiny_data(tmp_path / "data.parquet")
        # The node's W&B run is live while it trains (offline here, in tmp_path/wandb).
        live = LiveRunSettings(wandb=WandbSpec(mode="offline", project="kill-test"), out_dir=str(tmp_path),
                               sweep="kill", node_id="finetune/kill", key="k", config={})

        def train():
            try:
                result["metrics"] = finetune(
                    run_name="kill-test", storage_path=storage, model_path=embedded_model,
                    data_path=data, seed=0, spec=spec, use_gpu=False, out_dir=out_dir, live_run=live,
                )
            except BaseException as error:  # surfaced by the assertion below
                result["error"] = error

        thread = threading.Thread(target=train)
        thread.start()
        # Kill one training worker once a resumable checkpoint is on storage.
        killed = None
        deadline = time.monotonic() + 240
        while killed is None and thread.is_alive() and time.monotonic() < deadline:
            if _registered_checkpoints(storage / "kill-test"):
                pids = _training_worker_pids()
                if pids:
                    killed = pids[-1]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
        # The live run's steps reach disk while the resumed attempt trains, not only at its end.
        logged_while_training = False
        while thread.is_alive() and not logged_while_training:
            logged_while_training = bool(wandb_offline.history(tmp_path / "wandb", run_id("kill", "finetune/kill", "k")))
            time.sleep(0.5)
        thread.join(timeout=300)

        assert killed is not None, "training ended before a worker could be killed"
        assert "error" not in result, result.get("error")
        metrics = result["metrics"].to_pylist()
        steps = [row["step"] for row in metrics]
        assert steps == list(range(1, ROWS // 2 + 1)), steps  # full step count, each step once
        resumed = sorted({row["resumed_from_step"] for row in metrics})
        # Steps before the kill ran in the first attempt (from 0); the rest in a restarted attempt
        # that loaded a checkpoint: it began at a step > 0, not from scratch.
        assert resumed[0] == 0 and len(resumed) >= 2 and resumed[-1] > 0, resumed
        first_resumed = min(row["step"] for row in metrics if row["resumed_from_step"] == resumed[-1])
        assert first_resumed == resumed[-1] + 1
        assert (out_dir / "adapter" / "adapter_config.json").exists()

        # W&B: the resumed attempt's run holds every step once (those before its checkpoint from
        # the checkpoint's history, as the killed attempt's unflushed buffer is lost), with its loss.
        wandb_id = run_id("kill", "finetune/kill", "k")
        segments = wandb_offline.segments(tmp_path / "wandb", wandb_id)  # one per attempt
        resumed_rows = wandb_offline.rows(segments[-1] / f"run-{wandb_id}.wandb")
        assert [row["_step"] for row in resumed_rows] == steps, [row["_step"] for row in resumed_rows]
        assert [row["loss"] for row in resumed_rows] == pytest.approx([row["loss"] for row in metrics])
        assert all(row["tokens_per_s"] > 0 for row in resumed_rows)
        assert logged_while_training, "no W&B step was on disk before the finetune ended"

        uninterrupted = tmp_path / "uninterrupted"
        uninterrupted.mkdir()
        reference = finetune(run_name="reference", storage_path=storage, model_path=embedded_model, data_path=data,
                             seed=0, spec=spec, use_gpu=False, out_dir=uninterrupted).to_pylist()
        assert [row["resumed_from_step"] for row in reference] == [0] * len(steps)
        assert [row["loss"] for row in metrics] == pytest.approx([row["loss"] for row in reference], rel=1e-4)
        resumed_weights, reference_weights = (load_file(d / "adapter" / "adapter_model.safetensors")
                                              for d in (out_dir, uninterrupted))
        assert resumed_weights.keys() == reference_weights.keys() and len(resumed_weights) > 0
        for name, tensor in reference_weights.items():
            assert torch.allclose(resumed_weights[name], tensor, rtol=1e-4, atol=1e-6), name
        lora_b = [t for name, t in reference_weights.items() if "lora_B" in name]
        assert any(t.abs().max() > 0 for t in lora_b)  # trained: LoRA's B starts at zero
    finally:
        ray.shutdown()
