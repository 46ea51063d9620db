"""What a sweep's jobs ask of Ray: task options per stage, how many finetunes fit, and, when jobs
wait, what they ask for against what holds the cluster."""

from __future__ import annotations



from emsweep.dag import Node
from emsweep.engine import GIB
from emsweep.models import resolve_model_path
from emsweep.judge.kinds import kind_of
from emsweep.spec import SweepSpec
from emsweep.sweep.plan import ENGINE_STAGES


def task_options(spec: SweepSpec, stage: str, cluster_cpus: int = 1, model: str | None = None) -> dict:
    """Ray resources of a stage's task (`model`: the model a sample job serves)."""
    if stage == "finetune":
        # The task only drives Ray Train; the training workers ask for their own CPUs/GPUs. On a
        # GPU cluster it still asks for a CPU: Ray places a task that asks nothing on the node
        # that submits it, so a sweep's dozens of drivers (a process each, torch imported) would
        # all land on the head. On CPUs the training workers need every core, and a Ray that
        # emsweep started runs only as many finetunes as fit (finetune_slots).
        return {"num_cpus": 1 if spec.use_gpu else 0}
    if stage == "judge":
        return kind_of(spec.judge).task_options(spec)
    if stage == "audit":
        audited = spec.audit_view()
        return kind_of(audited.judge).task_options(audited)
    if stage in ENGINE_STAGES:
        if spec.use_gpu:
            sampling = spec.sampling_for(model) if model else spec.sampling
            return {"num_cpus": 1, "num_gpus": sampling.tensor_parallel_size}
        # On CPUs an engine uses every core it is given (Ray sets OMP_NUM_THREADS from num_cpus);
        # engines wait for their inputs anyway, so they do not compete with finetunes.
        return {"num_cpus": max(1, cluster_cpus)}
    return {"num_cpus": 1}


def job_task_options(spec: SweepSpec, job: list[Node], cluster_cpus: int) -> dict:
    """Ray resources of one job's task (a sample job serves its model)."""
    model = job[0].config["model"]["name"] if job[0].stage == "sample" else None
    return task_options(spec, job[0].stage, cluster_cpus, model)


def finetune_memory_per_worker(model_path: str, num_workers: int) -> int:
    """What each CPU training worker reserves of Ray's `memory` resource: the estimate
    (engine.finetune_worker_memory_bytes), capped so one finetune always fits on a node (an
    unsatisfiable request would wait forever)."""
    import ray

    from emsweep.engine import finetune_worker_memory_bytes

    node_memory = min((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    estimate = finetune_worker_memory_bytes(model_path)
    return int(min(estimate, node_memory / max(1, num_workers))) if node_memory else estimate


def finetune_slots(spec: SweepSpec) -> int | None:
    """How many finetune jobs to have in flight on a Ray this process started (a laptop, a
    workstation: fixed resources); None (no limit) on a cluster it connected to, which may
    autoscale, where waiting finetunes' placement groups are what asks for more nodes.

    A finetune job beyond what fits would only wait in a process of its own (torch and Ray Train
    loaded), and Ray's OOM killer takes such idle tasks first: since Ray 2.56 all of them at once,
    so one memory spike would fail every queued finetune."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return None
    total = ray.cluster_resources()
    fits = []
    for model in spec.models:
        workers = spec.finetune_for(model.name).num_workers
        if spec.use_gpu:
            fits.append(total.get("GPU", 0) // workers)
            continue
        cpus = total.get("CPU", 0) // (workers * model.resources.cpus_per_finetune_worker)
        memory = total.get("memory", 0) // max(1, workers * finetune_memory_per_worker(
            resolve_model_path(model.path), workers))
        fits.append(min(cpus, memory))
    return max(1, int(min(fits)))


def _bundle(resources: dict) -> str:
    """A placement-group bundle as a person reads it: `CPU 1, memory 4.0 GiB`."""
    return ", ".join(f"{name} {value / GIB:.1f} GiB" if name == "memory" else f"{name} {value:g}"
                     for name, value in sorted(resources.items()))


def autoscaler_scaling_up() -> bool:
    """Whether the connected cluster's autoscaler has launches or nodes pending (Ray's autoscaler
    state API); False where there is no autoscaler (a laptop, a fixed cluster) or no answer."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    except Exception:  # no autoscaler state: nothing is coming up
        return False
    return bool(status.pending_launches or status.pending_nodes)


def describe_cluster_wait(spec: SweepSpec, waiting: list[list[Node]], cpus: int) -> str:
    """What waiting jobs ask for and what holds the cluster: for a stall message."""
    import ray

    asks = []
    for job in waiting:
        options = {k: v for k, v in job_task_options(spec, job, cpus).items() if v}
        workers = ""
        if job[0].stage == "finetune":
            model = spec.model(job[0].config["model"]["name"])
            tune = spec.finetune_for(model.name)
            each = "1 GPU" if spec.use_gpu else f"{model.resources.cpus_per_finetune_worker} CPU and memory"
            workers = f", then {tune.num_workers} training workers of {each} each"
        asks.append(f"{job[0].id} (asks {options or 'nothing'} for its task{workers})")
    total, free = ray.cluster_resources(), ray.available_resources()
    shown = ", ".join(f"{name} {free.get(name, 0):g}/{total[name]:g}" for name in ("CPU", "GPU") if name in total)
    memory = f"memory {free.get('memory', 0) / GIB:.1f}/{total.get('memory', 0) / GIB:.1f} GiB"
    groups: dict[str, list[str]] = {}
    for entry in ray.util.placement_group_table().values():
        if entry["state"] != "REMOVED":
            bundles = list(entry["bundles"].values())
            groups.setdefault(entry["state"], []).append(f"{len(bundles)}x{{{_bundle(bundles[0] if bundles else {})}}}")
    held = "; ".join(f"{state}: {', '.join(items)}" for state, items in groups.items()) or "none"
    return f"waiting: {'; '.join(asks)}. Free: {shown}, {memory}. Placement groups: {held}"
