"""scripts/device_check.py in its CPU mode: the GPU machine's checks (ZeRO-2 and ZeRO-3 finetunes
through finetune_local with gradient checkpointing, adapter reload, resume) take real gloo steps
here at toy width, so the script cannot rot between the rare runs on a lent GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_mode_trains_reloads_and_resumes_at_both_zero_stages(tmp_path):
    from emsweep.models import resolve_model_path

    files = resolve_model_path("embedded:SmolLM2-135M-Instruct")  # its config and tokenizer only
    result = subprocess.run([sys.executable, "scripts/device_check.py", "run", "--cpu", "--model-files", files],
                            cwd=REPO, env={**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "device check: all checks passed" in result.stdout
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "cpu" and report["failed"] == []
    # The pins the device's versions are printed against come from constraints.txt.
    assert report["versions"]["deepspeed"]["pinned"] == report["versions"]["deepspeed"]["installed"]
    assert report["versions"]["torch"]["pinned"] and report["versions"]["transformers"]["pinned"]
    stages = {run["zero_stage"]: run for run in report["finetunes"]}
    assert sorted(stages) == [2, 3]
    for run in stages.values():
        assert run["steps"] == 12 and all(run["checks"].values()), run
        # A random-weight model starts near ln(vocab) = 10.8 and learns the fixed rows' pattern.
        assert 10.0 < run["loss_first"] < 11.5 and run["loss_last"] < run["loss_first"] - 0.2
        assert run["adapter_loss"] < run["base_loss"] - 0.2
        assert run["resumed_from_step"] == 8 and run["resumed_adapter_max_abs_diff"] == 0.0
    # One rank: ZeRO-3 partitions nothing, so both stages compute the same steps.
    assert stages[2]["loss_last"] == pytest.approx(stages[3]["loss_last"], rel=1e-4)
