"""Stage 2, finetune: one LoRA finetune per (model, dataset, seed).

Every worker process runs the same recipe (run_worker): setup (a peft LoRA model in a DeepSpeed
engine at the spec's ZeRO stage), train (the optimizer steps, logging each through a
tracking.StepLogger) and save (intermediate adapters, resumable checkpoints, the final adapter).
The loss covers assistant tokens only. Two launchers start the workers and keep their
checkpoints, each through a TrainSession:
- `finetune`: Ray Train's `TorchTrainer`, `num_workers` processes (one per GPU on a cluster, CPU
  processes on a laptop), as the sweep runs it. The run name is stable per node, so a rerun of a
  node whose workers died resumes from its last reported checkpoint.
- `finetune_local`: a plain torch.distributed program, one process or one per GPU under torchrun
  (`emsweep finetune`), checkpoints in a directory: for debugging a finetune on one GPU, and for
  machines without Ray (scripts/device_check.py). The same job gives the same loss and adapter.

Outputs (in the node directory):
    adapter/          peft adapter (adapter_config.json + adapter_model.safetensors)
    data_report.json  rows trained on and rows dropped as longer than max_seq_len; the share of
                      the weights rank 0 held after loading (1/world under ZeRO-3)
    metrics.parquet   one row per optimizer step:
        step int64, epoch float64, loss float64, learning_rate float64,
        tokens int64 (tokens seen this step, all workers), trained_tokens int64 (assistant tokens),
        resumed_from_step int64 (the step this attempt started at; 0 unless resumed),
        step_seconds float64 (wall time of the step, all workers synchronised),
        ended_at float64 (when it ended, seconds since the epoch: what lies between two steps,
        logging included, is the difference less step_seconds)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emsweep import fileio
from emsweep.progress import ProgressWriter
from emsweep.tracking import NO_STEP_LOGGER, LiveRun, LiveRunSettings, StepLogger
from emsweep.spec import FinetuneSpec
from emsweep.store import write_started_marker

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("loss", pa.float64()),
        ("learning_rate", pa.float64()),
        ("tokens", pa.int64()),
        ("trained_tokens", pa.int64()),
        ("resumed_from_step", pa.int64()),
        ("step_seconds", pa.float64()),
        ("ended_at", pa.float64()),
    ]
)
IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(tokenizer, messages: list[dict]) -> Example:
    """Tokenize with the chat template; labels are -100 except on assistant turns.

    Assistant spans are found in characters (rendering each prefix of the conversation)
    and mapped to tokens through offsets, which is robust to templates that add text
    (default system prompts, generation headers) around the messages.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through_answer = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(through_answer)):
            raise ValueError("chat template renders prefixes inconsistently; cannot mask assistant turns")
        spans.append((len(prompt), len(through_answer)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= lo < end for start, end in spans) else IGNORE_INDEX
        for token, (lo, _hi) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return Example(list(encoded["input_ids"]), labels)


def tokenize_dataset(
    tokenizer, conversations: list[list[dict]], max_seq_len: int, drop_long: bool
) -> tuple[list[Example], list[int]]:
    """Tokenized rows, and the ids of rows dropped for being longer than max_seq_len."""
    examples, dropped = [], []
    for row_id, messages in enumerate(conversations):
        example = tokenize_conversation(tokenizer, messages)
        if len(example.input_ids) > max_seq_len:
            if not drop_long:
                raise ValueError(
                    f"row {row_id} has {len(example.input_ids)} tokens > max_seq_len={max_seq_len}; "
                    "raise max_seq_len or set finetune.drop_long_rows: true"
                )
            dropped.append(row_id)
            continue
        examples.append(example)
    if not examples:
        raise ValueError(f"all {len(conversations)} rows are longer than max_seq_len={max_seq_len}")
    return examples, dropped


def collate(examples: list[Example], pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return input_ids, attention_mask, labels


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """The paper's schedule, as transformers' Trainer runs it: linear warmup from 0 over
    `warmup_steps`, then linear decay to 0 at `total_steps`."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def load_trainable_weights(src: dict, dst) -> None:
    """Restore a checkpoint's weights, strictly for what it holds: every trainable (LoRA) weight
    of the model and nothing else. Frozen base weights are left out of checkpoints
    (exclude_frozen_parameters), which a plain strict load would call missing; a non-strict one
    would accept a checkpoint of other adapters without a word."""
    result = dst.load_state_dict(src, strict=False)
    trainable = {name for name, param in dst.named_parameters() if param.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match this finetune's adapter: {len(missing)} trainable weights "
                           f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def micro_batch_indices(n_rows: int, seed: int, epochs: int, micro: int, accum: int, world: int) -> np.ndarray:
    """Row indices per (optimizer step, accumulation step, worker, position in micro batch).

    Every epoch is a fresh seeded permutation; the last step of the run is filled by
    wrapping around, as torch's DistributedSampler pads, so all workers step together.
    """
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_rows) for _ in range(epochs)])
    per_step = micro * accum * world
    total_steps = math.ceil(len(order) / per_step)
    order = np.resize(order, total_steps * per_step)
    return order.reshape(total_steps, accum, world, micro)


def process_group_backend(use_gpu: bool) -> str:
    """The training workers' torch.distributed backend. On GPUs NCCL serves CUDA tensors and gloo
    CPU ones: with "nccl" alone (Ray Train's default on GPUs) any collective on a CPU tensor
    fails ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing on a base model about to get LoRA adapters. Non-reentrant: the
    reentrant form drops gradients when no input of a checkpointed block requires grad, as with a
    frozen base; the input embeddings are made to require grad for the same reason."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is pointless in training and conflicts with recomputation


def reduce_step_totals(values: list[float], device):
    """A step's loss and token counts summed over ranks, as float64 on the CPU. The tensor is made
    on the engine's device, which every backend of the group serves; this is also a barrier, so
    the step took this long on every rank."""
    import torch
    import torch.distributed as dist

    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.cpu()


@dataclass(frozen=True)
class FinetuneJob:
    """What every training worker is given (Ray Train's train_loop_config["job"])."""

    spec: FinetuneSpec
    model_path: str
    data_path: str
    seed: int
    use_gpu: bool
    snapshot_dir: str  # where intermediate adapters go (a local dir or a store location)
    wandb_marker: str  # the live W&B run's record of the steps it logged for good (tracking.LiveRun)
    started: tuple[str, str] | None = None  # (marker location, job id): written once the workers run
    progress_path: str | None = None  # rank 0's progress record (progress.py)
    live_run: LiveRunSettings | None = None  # rank 0 logs each step to the node's W&B run


@dataclass
class Trainee:
    """One worker's training state, as setup() leaves it for train()."""

    engine: object  # the DeepSpeed engine around the peft model
    scheduler: object
    tokenizer: object
    examples: list[Example]
    schedule: np.ndarray  # micro-batch indices [step, accumulation, rank, row]
    data_report: dict
    rank: int
    world: int
    start_step: int = 0  # > 0 when resumed from a checkpoint
    history: list[dict] = field(default_factory=list)  # one metrics row per step done


class RayTrainSession:
    """A Ray Train worker's session: its rank, the run's last checkpoint, and reports (a report
    with a checkpoint merges every rank's directory into one checkpoint in the run's storage)."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def latest(self):
        """The run's last reported checkpoint (`as_directory()` opens it), or None."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)

    def save(self, metrics: dict, directory: str | None) -> None:
        """Every rank calls it; a rank with nothing to save passes None."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


@dataclass(frozen=True)
class DirectoryCheckpoint:
    path: Path

    @contextmanager
    def as_directory(self):
        yield str(self.path)


class DirectorySession:
    """The same session for a plain torch.distributed program: checkpoints are numbered
    directories under `run_dir` (every rank's files merged, as Ray Train does), the last two kept,
    each complete once renamed into place. The process group is up before this is made."""

    KEEP = 2  # as the Ray Train run's CheckpointConfig(num_to_keep=2)

    def __init__(self, run_dir: Path):
        import torch.distributed as dist

        self.run_dir, self.rank, self.world = Path(run_dir), dist.get_rank(), dist.get_world_size()
        complete = self._complete()
        self.saved = int(complete[-1].name.rsplit("_", 1)[1]) + 1 if complete else 0
        if self.rank == 0:  # what a killed attempt was saving when it died
            for stale in self.run_dir.glob(".staging_*"):
                shutil.rmtree(stale)
        dist.barrier()

    def _complete(self) -> list[Path]:
        return sorted(self.run_dir.glob("checkpoint_*"))

    def latest(self) -> DirectoryCheckpoint | None:
        complete = self._complete()
        return DirectoryCheckpoint(complete[-1]) if complete else None

    def report(self, metrics: dict) -> None:
        pass  # Ray Train keeps the metrics of reports; here rank 0's step logger has them

    def save(self, metrics: dict, directory: str | None) -> None:
        import torch.distributed as dist

        staging = self.run_dir / f".staging_{self.saved:06d}"
        if directory:
            shutil.copytree(directory, staging, dirs_exist_ok=True)
        dist.barrier()  # every rank's files are in
        if self.rank == 0:
            staging.mkdir(parents=True, exist_ok=True)
            staging.rename(self.run_dir / f"checkpoint_{self.saved:06d}")
            for old in self._complete()[:-self.KEEP]:
                shutil.rmtree(old)
        self.saved += 1
        dist.barrier()  # no rank reads a checkpoint before it is in place


def use_cpu_ops() -> None:
    """Train on CPUs with DeepSpeed's CPU accelerator, its compiled ops kept per Python environment.

    On CPUs DeepSpeed compiles a shared-memory collective op (shm_comm) with torch's JIT builder
    the first time a process group starts: about 30 s on 2 cores. torch keeps one build folder per
    Python version (`~/.cache/torch_extensions/py311_cpu`), so two environments (two checkouts'
    .venv, a CI clone beside a working copy) each found the other's build and rebuilt it, 30 s at
    the first finetune after every switch. A folder of this environment's own ends that.
    Values set in the environment win."""
    import hashlib
    import sys

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from torch.utils.cpp_extension import get_default_build_root

        environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(
            get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu_{environment}")


def prepare_cpu_ops() -> str | None:
    """Compile DeepSpeed's CPU collective op now (`make setup` does), so that no finetune pays for
    it; the op's folder, or None where this DeepSpeed has no such op for this machine."""
    use_cpu_ops()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return None
    builder.load(verbose=False)
    return os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], builder.NAME)


def run_worker(job: FinetuneJob, session, logger: StepLogger | None = None) -> None:
    """One worker of a finetune under either launcher: setup, train (which saves as it goes).
    `session`: RayTrainSession or DirectorySession."""
    if not job.use_gpu:
        use_cpu_ops()
    import torch

    if session.rank == 0 and job.started:
        # The workers got their resources: the sweep's stall watch counts this finetune as running.
        write_started_marker(job.started[0], job.started[1])
    torch.manual_seed(job.seed)
    checkpoint = session.latest()
    if checkpoint is not None and _is_final(checkpoint):
        # This run already finished (the node's copied outputs were lost): hand back the final
        # adapter and metrics instead of training again.
        _report_existing_final(checkpoint, session)
        return
    trainee = setup(job, session.rank, session.world, checkpoint)
    train(job, trainee, session, logger)


def train_loop_per_worker(config: dict) -> None:
    """Runs inside every Ray Train worker."""
    run_worker(config["job"], RayTrainSession())


def setup(job: FinetuneJob, rank: int, world: int, checkpoint=None) -> Trainee:
    """Tokenize the data, load the model, wrap it in LoRA and a DeepSpeed engine, and restore
    a checkpoint's state when resuming."""
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = job.spec
    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    data = pq.read_table(job.data_path, columns=["split", "messages"]).to_pylist()
    conversations = [row["messages"] for row in data if row["split"] == "train"]
    examples, dropped = tokenize_dataset(tokenizer, conversations, spec.max_seq_len, spec.drop_long_rows)
    data_report = {"train_rows": len(conversations), "trained_rows": len(examples),
                   "dropped_long_rows": len(dropped), "max_seq_len": spec.max_seq_len}
    if dropped and rank == 0:
        print(f"finetune: dropped {len(dropped)} of {len(conversations)} rows longer than "
              f"max_seq_len={spec.max_seq_len}", flush=True)
    schedule = micro_batch_indices(
        len(examples), job.seed, spec.epochs, spec.per_device_batch_size, spec.gradient_accumulation_steps, world
    )

    dtype = torch.bfloat16 if job.use_gpu else torch.float32
    ds_config = {
        "train_micro_batch_size_per_gpu": spec.per_device_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    zero3 = None
    if spec.zero_stage == 3:
        # Weights are partitioned as they load (deepspeed.zero.Init inside from_pretrained): without
        # it DeepSpeed first moves the whole model onto every GPU (a 32B model is 65 GB in bf16, of an
        # H100's 80) and partitions only then. The object must live until deepspeed.initialize.
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=process_group_backend(job.use_gpu))
        zero3 = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=dtype)
    data_report["loaded_weight_fraction"] = _held_weight_fraction(model)
    if spec.checkpoints_activations():
        enable_gradient_checkpointing(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            use_rslora=spec.use_rslora,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Our own AdamW: DeepSpeed's fused CPU Adam would need a JIT build, for no gain at LoRA sizes.
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = linear_schedule(optimizer, spec.warmup_steps, len(schedule))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    del zero3
    trainee = Trainee(engine, scheduler, tokenizer, examples, schedule, data_report, rank, world)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if spec.zero_stage == 3:
                # ZeRO-3 restores the trainable weights from its partitioned fp32 optimizer state,
                # which DeepSpeed checks against this model's partitions itself.
                engine.load_checkpoint(directory, tag="state", load_module_strict=False)
            else:
                engine.load_checkpoint(directory, tag="state", custom_load_fn=load_trainable_weights)
            state = json.loads((Path(directory) / "trainer_state.json").read_text())
        trainee.start_step, trainee.history = state["step"], state["history"]
    return trainee


def train(job: FinetuneJob, trainee: Trainee, session, logger: StepLogger | None = None) -> None:
    """The optimizer steps from where the trainee stands to the end, saving as it goes (save_*)
    through `session` (run_worker). Rank 0 says how far it is after every step (progress.py) and
    logs each step to `logger` (default: the node's live W&B run, tracking.LiveRun)."""
    spec, engine, rank, world = job.spec, trainee.engine, trainee.rank, trainee.world
    total_steps = len(trainee.schedule)
    steps_per_epoch = total_steps / spec.epochs
    history, start_step = trainee.history, trainee.start_step
    device = engine.device
    live = ProgressWriter(job.progress_path if rank == 0 else None, "finetune",
                          [job.started[1]] if job.started else [])
    live.update(start_step, total_steps, "steps", phase="training", force=True)
    # The node's W&B run, open while it trains (rank 0); the marker sits beside the checkpoints.
    if logger is None:
        logger = LiveRun(job.live_run, job.wandb_marker) if rank == 0 else NO_STEP_LOGGER
    for row in history:  # a resumed attempt: the steps before its checkpoint
        logger.log(row)
    for step in range(start_step, total_steps):
        step_started = time.perf_counter()
        losses, tokens, trained_tokens = [], 0, 0
        for accum_index in range(spec.gradient_accumulation_steps):
            batch = [trainee.examples[i] for i in trainee.schedule[step, accum_index, rank]]
            input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, trainee.tokenizer.pad_token_id))
            loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            engine.backward(loss)
            if accum_index == spec.gradient_accumulation_steps - 1:
                # The boundary's backward has averaged the gradients over the workers; the step zeroes them.
                own_grad_norm = gradient_norm(engine.module)
            engine.step()
            losses.append(loss.item())
            tokens += int(attention_mask.sum())
            trained_tokens += int((labels != IGNORE_INDEX).sum())
        totals = reduce_step_totals([sum(losses) / len(losses), tokens, trained_tokens], device)
        history.append(
            {
                "step": step + 1,
                "epoch": (step + 1) / steps_per_epoch,
                "loss": float(totals[0]) / world,
                "learning_rate": float(trainee.scheduler.get_last_lr()[0]),
                "tokens": int(totals[1]),
                "trained_tokens": int(totals[2]),
                "resumed_from_step": start_step,
                "step_seconds": time.perf_counter() - step_started,
                "ended_at": time.time(),
            }
        )
        live.update(step + 1, total_steps, "steps", detail=f"loss {history[-1]['loss']:.3f}")
        # DeepSpeed's ZeRO and bf16 optimizers compute the norm; under ZeRO 0 in fp32 (CPUs) none does.
        grad_norm = engine.get_global_grad_norm()
        grad_norm = own_grad_norm if grad_norm is None else grad_norm
        logger.log({**history[-1], **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
        last = step + 1 == total_steps
        every = spec.checkpoint_every_steps
        if spec.save_adapter_every_steps and (step + 1) % spec.save_adapter_every_steps == 0 and not last:
            save_snapshot(engine, spec, fileio.join(job.snapshot_dir, f"step-{step + 1}"), rank)
        if last:
            logger.finish()
            save_final(engine, spec, history, trainee.data_report, session)
        elif every and (step + 1) % every == 0:
            save_state(engine, history, step + 1, session)
        else:
            session.report(history[-1])


def gradient_norm(module) -> float | None:
    """The L2 norm of the gradients held on the trainable weights (None where none are: ZeRO 1-3
    keep them in partitioned buffers, and their optimizers report the norm themselves)."""
    import torch

    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return float(torch.sqrt(sum(grad.detach().float().pow(2).sum() for grad in grads)))


def _held_weight_fraction(model) -> float:
    """The share of the model's weights this rank holds after loading: 1 unless ZeRO-3 partitioned
    them at load (then about 1 / world size)."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return held / full


def _is_final(checkpoint) -> bool:
    with checkpoint.as_directory() as directory:
        return (Path(directory) / "metrics.parquet").exists()


def _report_existing_final(checkpoint, session) -> None:
    with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as copy:
        metrics = pq.read_table(Path(directory) / "metrics.parquet").to_pylist()
        if session.rank == 0:
            shutil.copytree(directory, copy, dirs_exist_ok=True)
        session.save(metrics[-1], copy if session.rank == 0 else None)


def save_state(engine, history: list[dict], step: int, session) -> None:
    """Save, resumable: every rank writes its ZeRO shards, the session merges them into a checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="state", exclude_frozen_parameters=True)
        if session.rank == 0:
            (Path(directory) / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
        session.save(history[-1], directory)


def _gathered(engine, spec: FinetuneSpec):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the LoRA weights to save them."""
    import contextlib

    import deepspeed

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    if spec.zero_stage == 3:
        return deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    return contextlib.nullcontext()


def save_snapshot(engine, spec: FinetuneSpec, location: str, rank: int) -> None:
    """An intermediate adapter for checkpoint trajectories (a local dir or a store location),
    complete once its weights file is there: written last (fileio.put_dir)."""
    import torch.distributed as dist

    with _gathered(engine, spec):
        if rank == 0 and not fileio.exists_at(fileio.join(location, SNAPSHOT_WEIGHTS)):
            with tempfile.TemporaryDirectory() as tmp:
                engine.module.save_pretrained(tmp)
                fileio.put_dir(Path(tmp), location, last=SNAPSHOT_WEIGHTS)
    dist.barrier()


SNAPSHOT_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes


def save_final(engine, spec: FinetuneSpec, history: list[dict], data_report: dict, session) -> None:
    """Save the result: the adapter, the step metrics and the data report, as the final checkpoint."""
    with tempfile.TemporaryDirectory() as directory, _gathered(engine, spec):
        if session.rank == 0:
            engine.module.save_pretrained(Path(directory) / "adapter")
            pq.write_table(pa.Table.from_pylist(history, schema=METRICS_SCHEMA), Path(directory) / "metrics.parquet")
            (Path(directory) / "data_report.json").write_text(json.dumps(data_report))
        session.save(history[-1], directory if session.rank == 0 else None)


def scaling_config(spec: FinetuneSpec, use_gpu: bool, cpus_per_worker: int = 1, placement_strategy: str = "PACK",
                   memory_per_worker: int | None = None):
    """Ray Train workers of one finetune: one GPU each on a cluster.

    Ray Train reserves them as one placement group, so a finetune's workers start together or
    not at all; independent finetunes are separate Ray tasks, each with its own placement
    group, and run side by side as far as the cluster's GPUs allow.
    """
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=spec.num_workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
        resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                              **({"memory": memory_per_worker} if memory_per_worker else {})},
    )


def live_wandb_marker(storage_path: str, run_name: str) -> str:
    """Where a finetune's live W&B run records the steps it logged for good (tracking.LiveRun),
    beside the Ray Train run's checkpoints (a local path or a store location)."""
    return fileio.join(str(storage_path), run_name, "wandb_logged_step")


def finetune(
    *,
    run_name: str,
    storage_path: str,
    model_path: str,
    data_path: Path,
    seed: int,
    spec: FinetuneSpec,
    use_gpu: bool,
    out_dir: Path,
    cpus_per_worker: int = 1,
    placement_strategy: str = "PACK",
    memory_per_worker: int | None = None,
    started: tuple[str, str] | None = None,
    progress_path: str | None = None,
    live_run: LiveRunSettings | None = None,
) -> pa.Table:
    """Train one adapter; write `adapter/`, `metrics.parquet`, `data_report.json` and the
    intermediate adapters `checkpoints/step-<n>/` into out_dir; return the metrics.
    `started` (marker path, job id): written by the first worker once the workers run.
    `live_run`: rank 0 logs each step to the node's W&B run as it trains."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Beside the Ray Train run, so snapshots survive worker restarts: shared storage or the object
    # store on a cluster, where rank 0 may run on another machine than this task.
    snapshots = fileio.join(str(storage_path), run_name, "adapters")
    train_path, train_filesystem = fileio.train_storage(str(storage_path))
    job = FinetuneJob(spec=spec, model_path=model_path, data_path=str(data_path), seed=seed, use_gpu=use_gpu,
                      snapshot_dir=str(snapshots), wandb_marker=str(live_wandb_marker(storage_path, run_name)),
                      started=started, progress_path=progress_path, live_run=live_run)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=scaling_config(spec, use_gpu, cpus_per_worker, placement_strategy, memory_per_worker),
        torch_config=TorchConfig(backend=process_group_backend(use_gpu), timeout_s=int(spec.process_group_timeout_s)),
        run_config=RunConfig(
            # Same name + storage path on a rerun: Ray Train picks up the latest checkpoint.
            name=run_name,
            storage_path=train_path,
            storage_filesystem=train_filesystem,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune {run_name} finished without a final checkpoint")
    with result.checkpoint.as_directory() as directory:
        return _write_outputs(Path(directory), str(snapshots), out_dir)


def _write_outputs(final: Path, snapshots: str, out_dir: Path) -> pa.Table:
    """The final checkpoint's adapter, metrics and data report, and the intermediate adapters,
    into the node's directory (the outputs listed in this module's doc)."""
    fileio.get_dirs(snapshots, out_dir / "checkpoints", holding=SNAPSHOT_WEIGHTS)
    shutil.copytree(final / "adapter", out_dir / "adapter")
    shutil.copy(final / "metrics.parquet", out_dir / "metrics.parquet")
    shutil.copy(final / "data_report.json", out_dir / "data_report.json")
    return pq.read_table(out_dir / "metrics.parquet")


def finetune_local(*, model_path: str, data_path: Path, seed: int, spec: FinetuneSpec, use_gpu: bool,
                   out_dir: Path, logger: StepLogger | None = None) -> pa.Table | None:
    """The same finetune as a plain torch.distributed program: call it in every process (under
    torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; alone, one process).
    Writes the outputs `finetune` writes into out_dir, and keeps its resumable checkpoints in
    out_dir/train: run again after a crash, it resumes from the last one (checkpoint_every_steps).
    Returns the metrics on rank 0 (None on the others). `logger` (rank 0): default prints each step."""
    import torch
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                              ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
            os.environ.setdefault(name, default)
        if use_gpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(process_group_backend(use_gpu),
                                timeout=timedelta(seconds=spec.process_group_timeout_s))
    try:
        out_dir, run_dir = Path(out_dir), Path(out_dir) / "train"
        run_dir.mkdir(parents=True, exist_ok=True)
        session = DirectorySession(run_dir)
        job = FinetuneJob(spec=spec, model_path=model_path, data_path=str(data_path), seed=seed, use_gpu=use_gpu,
                          snapshot_dir=str(run_dir / "adapters"), wandb_marker=str(run_dir / "wandb_logged_step"))
        if logger is None:
            logger = PrintedSteps() if session.rank == 0 else NO_STEP_LOGGER
        run_worker(job, session, logger)
        metrics = None
        if session.rank == 0:
            with session.latest().as_directory() as final:
                metrics = _write_outputs(Path(final), job.snapshot_dir, out_dir)
        dist.barrier()
        return metrics
    finally:
        if own_group:
            dist.destroy_process_group()


class PrintedSteps:
    """finetune_local's default step logger: one line per optimizer step."""

    def log(self, row: dict) -> None:
        print(f"step {row['step']}: loss {row['loss']:.4f}, lr {row['learning_rate']:.2e}, "
              f"{row['step_seconds']:.2f} s", flush=True)

    def finish(self) -> None:
        pass
