"""The GPU check that fits the GPU machine this project can be lent (docs/cluster.md, "The device
check"): the finetune recipe's mechanics on one GPU, without Ray, vLLM or a model download.

That machine has torch, transformers, peft, accelerate and pyarrow but no DeepSpeed, pydantic or
hjson, reaches no package registry, and takes 64 MiB of this tree. So:

    python scripts/device_check.py prepare      # here: build/device/ (wheels, model config, tokenizer)
    python3 scripts/device_check.py run         # there, from the repository root (carry build/device)
    python scripts/device_check.py run --cpu    # here: the same checks with gloo at tiny size
                                                # (tests/test_device_check.py, in `make test`)
    python3.12 scripts/device_check.py run --cpu --install   # here, in a Python 3.12 venv holding the
                                                # device's torch and transformers: rehearse the install

`run` installs the carried wheels (pip --no-index; DeepSpeed's sdist with --no-build-isolation),
prints the installed versions beside the pinned ones, builds a small model with random weights
from the carried config and tokenizer, and for ZeRO-2 and ZeRO-3 finetunes it with peft LoRA and
gradient checkpointing (bf16 under NCCL on the GPU) through finetune.finetune_local: the loss must
fall, the saved adapter must reload into peft with the same weights and a lower loss than the
base model, and a run cut after its last resumable checkpoint must resume to the same adapter. One
process: the NCCL group has one rank, and ZeRO-3 partitions nothing (docs/cluster.md lists what
only a full node can check). Figures go to stdout and, where $OUT is set, $OUT/device_check.json;
the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "device"
CARRY_LIMIT_MIB = 40  # of the device tool's 64 MiB, the rest being this tree
DEVICE_PYTHON = "3.12"  # the device machine's interpreter (its KINDS.md), for compiled wheels
# What the finetune imports that the device machine lacks (deepspeed's sdist; the rest wheels).
CARRIED_PACKAGES = ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection"]
MODEL = "embedded:SmolLM2-135M-Instruct"
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja"]
VERSIONS = ["torch", "transformers", "peft", "deepspeed", "accelerate", "safetensors", "pyarrow", "pydantic"]
# The CPU mode's model: the carried config at toy width, so gloo steps take seconds.
CPU_SIZE = {"num_hidden_layers": 2, "hidden_size": 64, "head_dim": 16, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128}


def prepare() -> None:
    """Fill build/device/ (here, with the package registry): the wheels for the device's Python,
    the model's config and tokenizer files; list them with their sizes; fail over the limit."""
    sys.path.insert(0, str(REPO / "src"))
    from emsweep.models import resolve_model_path

    shutil.rmtree(BUILD, ignore_errors=True)
    wheels, model = BUILD / "wheels", BUILD / "model"
    wheels.mkdir(parents=True)
    model.mkdir()
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels)]
    pure = [f"{name}=={installed(name)}" for name in CARRIED_PACKAGES if name != "pydantic_core"]
    subprocess.run([*pip, *pure], check=True)
    subprocess.run([*pip, "--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--platform",
                    "manylinux_2_17_x86_64", f"pydantic_core=={installed('pydantic_core')}"], check=True)
    source = Path(resolve_model_path(MODEL))
    for name in MODEL_FILES:
        shutil.copy(source / name, model / name)
    files = sorted(p for p in BUILD.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for path in files:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(REPO)}")
    print(f"{total / 2**20:8.2f} MiB  in all (limit {CARRY_LIMIT_MIB} MiB)")
    if total > CARRY_LIMIT_MIB * 2**20:
        sys.exit(f"build/device/ is {total / 2**20:.1f} MiB, over the {CARRY_LIMIT_MIB} MiB carry limit")


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_carried() -> None:
    """pip install --no-index of what build/device/wheels holds (nothing is fetched there)."""
    wheels = BUILD / "wheels"
    found = sorted(wheels.iterdir()) if wheels.is_dir() else []
    if not found:
        sys.exit(f"{wheels}: no carried wheels (run `python scripts/device_check.py prepare` here first)")
    started = time.time()
    # --no-build-isolation: DeepSpeed's setup imports the machine's torch; --no-deps: the rest is there.
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                    *map(str, found)], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    print(f"installed {len(found)} carried packages in {time.time() - started:.0f} s", flush=True)


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def conversations(n: int = 16) -> list[list[dict]]:
    """A small fixed training set: a random-weight model learns its pattern within a few steps."""
    rows = []
    for i in range(n):
        rows.append([{"role": "user", "content": f"Write a Python function that returns {i} squared."},
                     {"role": "assistant", "content": f"def square_{i}():\n    return {i} * {i}  # {i * i}\n"}])
    return rows


def build_model(files: Path, directory: Path, cpu: bool) -> None:
    """A model with random weights from the carried config (toy width on CPU), and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(files)
    for name, value in (CPU_SIZE.items() if cpu else ()):
        setattr(config, name, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in MODEL_FILES:
        if name != "config.json":
            shutil.copy(files / name, directory / name)


def write_data(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = conversations()
    pq.write_table(pa.table({"split": ["train"] * len(rows), "messages": rows}), path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finetune_check(stage: int, model_dir: Path, data_path: Path, work: Path, use_gpu: bool) -> dict:
    """One ZeRO stage: train, reload the adapter, cut the run after its last checkpoint and resume."""
    import torch
    from safetensors.torch import load_file

    from emsweep.finetune import finetune_local
    from emsweep.spec import FinetuneSpec

    # 16 rows, 4 per step, 3 epochs: 12 steps; resumable checkpoints at steps 4 and 8, then the final one.
    spec = FinetuneSpec(zero_stage=stage, gradient_checkpointing=True, num_workers=1, per_device_batch_size=4,
                        gradient_accumulation_steps=1, epochs=3, learning_rate=2e-3, warmup_steps=0,
                        max_seq_len=256, lora_r=8, lora_alpha=16, checkpoint_every_steps=4)
    out = work / f"zero{stage}"
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    metrics = finetune_local(model_path=str(model_dir), data_path=data_path, seed=0, spec=spec, use_gpu=use_gpu,
                             out_dir=out).to_pylist()
    seconds = time.time() - started
    losses = [row["loss"] for row in metrics]
    result = {"zero_stage": stage, "steps": len(metrics), "seconds": round(seconds, 1),
              "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
              "tokens_per_s": round(sum(r["tokens"] for r in metrics) / sum(r["step_seconds"] for r in metrics), 1),
              "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_gpu else None}
    checks = {"loss falls": sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1}

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    reloaded_diff, base_loss, tuned_loss = reload_adapter(model_dir, out / "adapter", saved, data_path, use_gpu)
    result |= {"reloaded_max_abs_diff": reloaded_diff, "base_loss": base_loss, "adapter_loss": tuned_loss}
    checks["adapter reloads"] = reloaded_diff == 0.0 and any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)
    checks["reloaded adapter lowers the loss"] = tuned_loss < base_loss

    # Cut after the step-8 checkpoint: drop the final checkpoint and the outputs, run again.
    final = sorted((out / "train").glob("checkpoint_*"))[-1]
    shutil.rmtree(final)
    for name in ("adapter", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.parquet", "data_report.json"):
        (out / name).unlink()
    resumed = finetune_local(model_path=str(model_dir), data_path=data_path, seed=0, spec=spec, use_gpu=use_gpu,
                             out_dir=out).to_pylist()
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    resume_diff = max(float((again[name].float() - saved[name].float()).abs().max()) for name in saved)
    result |= {"resumed_from_step": resumed[-1]["resumed_from_step"], "resumed_adapter_max_abs_diff": resume_diff}
    checks["resumes from its last checkpoint"] = resumed[-1]["resumed_from_step"] == 8 and len(resumed) == 12
    # Bit-identical on CPU; bf16 GPU kernels may pick other reduction orders after a restart.
    checks["resumed adapter matches"] = resume_diff <= (1e-2 if use_gpu else 1e-6)
    result["checks"] = checks
    return result


def reload_adapter(model_dir: Path, adapter: Path, saved: dict, data_path: Path, use_gpu: bool):
    """Load the adapter into peft as a user would; its weights against the file, and the training
    rows' loss with and without it."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emsweep.finetune import collate, tokenize_dataset

    device = "cuda" if use_gpu else "cpu"
    dtype = torch.bfloat16 if use_gpu else torch.float32
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), adapter).to(device)
    state = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    diff = 0.0
    for name, tensor in saved.items():
        match = [value for key, value in state.items() if key.replace(".default", "") == name]
        diff = max(diff, float((match[0].float().cpu() - tensor.float()).abs().max()) if match else float("inf"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_dataset(tokenizer, pq.read_table(data_path).column("messages").to_pylist(), 256, True)
    input_ids, attention_mask, labels = (t.to(device) for t in collate(examples, tokenizer.pad_token_id))
    model.eval()
    with torch.no_grad():
        tuned = float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
        with model.disable_adapter():
            base = float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
    return diff, round(base, 4), round(tuned, 4)


def nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple (2, 27, 3) in recent torch, an int in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def run(cpu: bool, model_files: Path, install: bool) -> int:
    if install:
        install_carried()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO / "src"))
    import torch
    import torch.distributed as dist

    use_gpu = not cpu
    if use_gpu and not torch.cuda.is_available():
        sys.exit("no GPU visible to torch (use --cpu for the CPU mode)")
    report: dict = {"mode": "cpu" if cpu else "gpu", "python": sys.version.split()[0]}
    pins = pinned_versions()
    report["versions"] = {name: {"installed": installed(name), "pinned": pins.get(name)} for name in VERSIONS}
    if use_gpu:
        props = torch.cuda.get_device_properties(0)
        report["device"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "cuda": torch.version.cuda, "nccl": nccl_version()}
    for name, versions in report["versions"].items():
        print(f"{name:13s} installed {versions['installed'] or '-':14s} pinned {versions['pinned'] or '-'}", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "versions"}), flush=True)

    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(model_files, work / "model", cpu)
        write_data(work / "data.parquet")
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        if use_gpu:
            torch.cuda.set_device(0)
        # One process group for every check: NCCL on the GPU (one rank), gloo on CPU.
        dist.init_process_group("nccl" if use_gpu else "gloo")
        try:
            report["finetunes"] = []
            for stage in (2, 3):
                try:
                    result = finetune_check(stage, work / "model", work / "data.parquet", work, use_gpu)
                except Exception as err:  # a check that breaks is a figure too: report it, run the next
                    result = {"zero_stage": stage, "error": f"{type(err).__name__}: {err}"[:2000],
                              "checks": {"ran": False}}
                report["finetunes"].append(result)
                failed += [f"ZeRO-{stage}: {name}" for name, ok in result["checks"].items() if not ok]
                print(json.dumps(result), flush=True)
        finally:
            dist.destroy_process_group()
    # The embedded trained judge is a bag of words (judge/trained.py): no model forward pass to run on a GPU.
    report["trained_judge"] = "lexical features on CPU; no GPU forward pass to check"
    report["failed"] = failed
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "device_check.json").write_text(json.dumps(report, indent=2))
    print("device check: " + ("all checks passed" if not failed else "FAILED: " + "; ".join(failed)), flush=True)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="fill build/device/ (needs the package registry)")
    checking = commands.add_parser("run", help="run the checks (on the GPU machine, or --cpu here)")
    checking.add_argument("--cpu", action="store_true", help="gloo on CPU at toy width; installs nothing by default")
    checking.add_argument("--install", action=argparse.BooleanOptionalAction, default=None,
                          help="install the carried wheels first (default: on the GPU, not with --cpu)")
    checking.add_argument("--model-files", type=Path, default=BUILD / "model",
                          help="config and tokenizer files (default: the carried build/device/model)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    else:
        sys.exit(run(args.cpu, args.model_files, not args.cpu if args.install is None else args.install))


if __name__ == "__main__":
    main()
