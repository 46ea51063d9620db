"""ZeRO-3 finetunes load their weights partitioned (HfDeepSpeedConfig / zero.Init): no rank ever
holds, or moves to its device, the whole model. Real Ray Train + DeepSpeed on 2 CPU workers; then
the same job without Ray (`emsweep finetune` under torchrun, gloo) gives the same loss and adapter."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray

from emsweep import data, finetune
from emsweep.models import resolve_model_path
from emsweep.sweep.driver import worker_env
from emsweep.spec import DatasetSpec, FinetuneSpec


@pytest.mark.slow
def test_zero3_loads_each_ranks_share_of_the_weights_and_saves_the_whole_adapter(tmp_path, shared_em):
    table = data.load_dataset(DatasetSpec(name="d", path=str(shared_em / "data/insecure.jsonl"), limit=8))
    pq.write_table(table, tmp_path / "data.parquet")
    spec = FinetuneSpec(zero_stage=3, num_workers=2, per_device_batch_size=1, gradient_accumulation_steps=2,
                        warmup_steps=0, max_seq_len=384, drop_long_rows=True, lora_r=4, lora_alpha=8)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": worker_env()})
    try:
        metrics = finetune.finetune(run_name="zero3", storage_path=tmp_path / "train",
                                    model_path=resolve_model_path("embedded:SmolLM2-135M-Instruct"),
                                    data_path=tmp_path / "data.parquet", seed=0, spec=spec, use_gpu=False,
                                    out_dir=tmp_path / "out")
    finally:
        ray.shutdown()
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    # 2 ranks: each held half of the weights once loaded (ZeRO pads partitions, hence approx).
    assert report["loaded_weight_fraction"] == pytest.approx(0.5, abs=0.01)
    losses = metrics.column("loss").to_pylist()
    assert losses and all(0 < loss < 20 for loss in losses)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    lora_a = [t for name, t in adapter.items() if "lora_A" in name]
    # Gathered, not the rank's shard: every LoRA A matrix has its full rank-4 shape.
    assert lora_a and all(t.shape[0] == 4 and t.numel() > 4 for t in lora_a)
    assert all(t.abs().sum() > 0 for t in lora_a)

    # The same job as a plain torch.distributed program: 2 processes under torchrun, no Ray.
    (tmp_path / "spec.yaml").write_text(json.dumps({
        "name": "zero3", "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 8}],
        "seeds": [0], "finetune": spec.model_dump(mode="json"),
        "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml")}, "judge": {"model": "smol"}}))
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547",
         "-m", "emsweep.cli", "finetune", "spec.yaml", "--dataset", "d", "--out", "local"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "finetune done: 2 steps" in launched.stdout
    local = pq.read_table(tmp_path / "local" / "metrics.parquet")
    assert local.column("loss").to_pylist() == pytest.approx(losses, rel=1e-4)
    assert local.column("tokens").to_pylist() == metrics.column("tokens").to_pylist()
    local_adapter = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    assert local_adapter.keys() == adapter.keys()
    for name, tensor in adapter.items():
        assert (local_adapter[name] - tensor).abs().max() < 1e-5, name
    assert json.loads((tmp_path / "local" / "data_report.json").read_text()) == report
