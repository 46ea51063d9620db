"""`emsweep finetune`: one finetune of a sweep spec, without Ray (finetune.finetune_local)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from emsweep.cli.common import console, load_spec_or_exit


def finetune_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    dataset: str = typer.Option(..., "--dataset", help="Which of the spec's datasets to train on"),
    out: Path = typer.Option(..., "--out", "-o", help="Where the adapter, metrics and checkpoints go"),
    seed: int = typer.Option(0, "--seed"),
    model: str = typer.Option(None, "--model", help="Which of the spec's models (default: its only one)"),
) -> None:
    """One finetune of SPEC's recipe as a plain torch.distributed program, as a sweep's finetune
    node would train it (same loss, same adapter), without Ray: to debug a finetune on one GPU, or
    on a machine without Ray. One process as is; one per GPU under torchrun:
    `torchrun --nproc-per-node 8 -m emsweep.cli finetune SPEC --dataset D --out DIR`.
    Rerun after a crash: it resumes from the last checkpoint in DIR/train."""
    from emsweep import data, finetune
    from emsweep.fileio import write_parquet_atomic
    from emsweep.models import resolve_model_path

    spec = load_spec_or_exit(spec_path)
    datasets = {d.name: d for d in spec.datasets}
    problems = []
    if dataset not in datasets:
        problems.append(f"--dataset {dataset!r}: not in {spec_path} (its datasets: {', '.join(datasets)})")
    names = [m.name for m in spec.models]
    if model is None and len(names) > 1:
        problems.append(f"--model: {spec_path} has {len(names)} models ({', '.join(names)}); name one")
    elif model is not None and model not in names:
        problems.append(f"--model {model!r}: not in {spec_path} (its models: {', '.join(names)})")
    if (out / "adapter").exists():
        problems.append(f"--out {out}: holds a finished finetune (adapter/); remove it or choose another")
    for problem in problems:
        console.print(f"[red]error:[/] {problem}")
    if problems:
        raise typer.Exit(2)
    chosen = spec.model(model or names[0])
    recipe = spec.finetune_for(chosen.name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world != recipe.num_workers and rank == 0:
        # micro_batch_indices deals micro-batches to the processes there are: the global batch follows.
        console.print(f"note: {world} process(es), the spec's recipe has num_workers={recipe.num_workers}: "
                      f"global batch {recipe.per_device_batch_size * recipe.gradient_accumulation_steps * world}")
    # Every process builds the same rows; each writes them whole and renames (no partial file).
    write_parquet_atomic(out / "data.parquet", data.load_dataset(datasets[dataset]))
    metrics = finetune.finetune_local(model_path=resolve_model_path(chosen.path), data_path=out / "data.parquet",
                                      seed=seed, spec=recipe, use_gpu=spec.use_gpu, out_dir=out)
    if metrics is not None:
        losses = metrics.column("loss").to_pylist()
        console.print(f"finetune done: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                      f"adapter in {out / 'adapter'}")
