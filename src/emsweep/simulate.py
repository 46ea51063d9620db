"""`emsweep plan --simulate`: the sweep's DAG played out on a modelled GPU cluster.

Job lengths come from the plan's cost model (planning.py: the same throughputs and start-up
costs, so the figures are as rough as its GPU-hours). Two schedules:

- barrier (what `emsweep run` does today): every finetune as soon as GPUs are free; one
  sampling job per base model once all its finetunes are done (one engine, every run in turn);
  one judging job once every model is sampled; then the analysis.
- pipelined: one sampling engine per base model starts with the first run that is ready (the
  base model at once) and takes each finetuned adapter as it arrives; one judge engine takes
  each run as its samples are in. An engine holds its GPUs from its start to its last run.

Placement: a job of at most a node's GPUs runs on one node (best fit); a larger one takes
whole free nodes. Waiting work is started downstream first (judging, then sampling, then
finetunes), so an engine is not starved by a queue of finetunes.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from emsweep import planning
from emsweep.judge.kinds import kind_of
from emsweep.spec import SweepSpec

STAGE_ORDER = ("judge", "audit", "sample", "finetune")  # start order among waiting work
JUDGE_STAGES = ("judge", "audit")  # one engine over every model's samples (an audit: its own judge's)


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str = "H100"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu}"


def parse_cluster(text: str) -> Cluster:
    """`4x8xH100` (nodes x GPUs per node x GPU), or a cluster config: a Ray cluster launcher
    YAML (its GPU node types' max_workers) or a KubeRay RayCluster (its GPU worker groups'
    maxReplicas). The cost model's throughputs are an H100's whatever the GPU is called."""
    match = re.fullmatch(r"(\d+)x(\d+)(?:x(\w+))?", text.strip())
    if match:
        nodes, gpus = int(match[1]), int(match[2])
        if nodes < 1 or gpus < 1:
            raise ValueError(f"--cluster {text}: need at least 1 node of 1 GPU")
        return Cluster(nodes, gpus, match[3] or "H100")
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--cluster {text}: neither NODESxGPUS[xGPU] (e.g. 4x8xH100) nor a cluster config file")
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    groups = []  # (nodes, gpus per node)
    for node_type in (config.get("available_node_types") or {}).values():
        gpus = int((node_type.get("resources") or {}).get("GPU", 0))
        groups.append((int(node_type.get("max_workers", 0)), gpus))
    for group in (config.get("spec") or {}).get("workerGroupSpecs") or []:
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        gpus = max((int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in containers),
                   default=0)
        groups.append((int(group.get("maxReplicas", group.get("replicas", 0))), gpus))
    groups = [(nodes, gpus) for nodes, gpus in groups if nodes > 0 and gpus > 0]
    if not groups:
        raise ValueError(f"--cluster {text}: no GPU node type with workers (max_workers / maxReplicas)")
    if len({gpus for _, gpus in groups}) > 1:
        raise ValueError(f"--cluster {text}: GPU node types of different sizes are not modelled")
    return Cluster(sum(nodes for nodes, _ in groups), groups[0][1])


@dataclass
class Work:
    """A unit of work: a whole job, or one run on an engine (`engine` names it)."""
    name: str
    stage: str
    seconds: float
    gpus: int
    deps: list[str] = field(default_factory=list)
    engine: str | None = None
    first_output_s: float | None = None  # a barrier engine job: when its first run is done


@dataclass
class Engine:
    name: str
    stage: str
    gpus: int
    startup_s: float
    items: list[str] = field(default_factory=list)  # its Work, in arrival order


@dataclass
class Simulation:
    schedule: str
    cluster: Cluster
    makespan_s: float
    busy_gpu_s: dict[str, float]  # per stage: GPUs x seconds computing (engine start-up included)
    held_gpu_s: dict[str, float]  # per stage: GPUs x seconds reserved (an engine waiting for runs)
    critical_path: list[tuple[str, float, float]]  # (what, start, end), first to last
    first_judged_s: float

    def utilisation(self, stage: str | None = None) -> float:
        busy = sum(self.busy_gpu_s.values()) if stage is None else self.busy_gpu_s.get(stage, 0.0)
        return busy / (self.cluster.gpus * self.makespan_s) if self.makespan_s else 0.0


def sweep_work(spec: SweepSpec) -> tuple[dict[str, Work], dict[str, Engine]]:
    """Every finetune and every run's sampling and judging of the sweep's real DAG
    (sweep.plan.plan: its engines are the sample jobs' groups), with the cost model's seconds."""
    from emsweep.sweep.plan import plan

    if not spec.use_gpu:
        raise ValueError("the simulation models GPUs: the spec has use_gpu: false")
    prompts = planning.prompt_count(spec)
    if not prompts.counted:
        raise ValueError(f"sampling and judging cannot be estimated: {prompts.problem}")
    judges = {"judge": _judging(spec, prompts.judgments)}
    if (audited := spec.audit_view()) is not None:
        judges["audit"] = _judging(audited, prompts.judgments * spec.judge.audit.share(prompts.generations))
    billions = {}
    for model in spec.models:
        billions[model.name] = planning.params_b(model)
        if billions[model.name] is None:
            raise ValueError(f"model {model.name}: size unknown (set params_b)")
    sizes = {ds.name: planning.dataset_size(ds) for ds in spec.datasets}
    engines = {stage: Engine(stage, stage, gpus, planning.ENGINE_STARTUP_S if gpus else 0.0)
               for stage, (gpus, _) in judges.items()}
    work: dict[str, Work] = {}
    for node in plan(spec):
        model = node.config.get("model", {}).get("name")
        if node.stage == "finetune":
            tune, size = spec.finetune_for(model), sizes[node.config["dataset"]]
            seconds = (planning.finetune_work_gpu_s(size.rows * size.tokens_per_row * tune.epochs, billions[model])
                       / tune.num_workers + planning.FINETUNE_STARTUP_S)
            work[node.id] = Work(node.id, "finetune", seconds, tune.num_workers)
        elif node.stage == "sample":
            tp = spec.sampling_for(model).tensor_parallel_size
            engine = engines.setdefault(node.group, Engine(node.group, "sample", tp, planning.ENGINE_STARTUP_S))
            seconds = planning.sample_work_gpu_s(prompts.generations * spec.sampling.max_tokens, billions[model]) / tp
            work[node.id] = Work(node.id, "sample", seconds, tp, [d for d in node.deps if d.startswith("finetune/")],
                                 engine.name)
            engine.items.append(node.id)
        elif node.stage in JUDGE_STAGES:
            gpus, seconds = judges[node.stage]
            work[node.id] = Work(node.id, node.stage, seconds, gpus, list(node.deps), node.stage)
            engines[node.stage].items.append(node.id)
    return work, engines


def _judging(spec: SweepSpec, judgments_per_run: float) -> tuple[int, float]:
    """(GPUs, seconds per run) of `spec.judge` judging a run: the judge, or the audit judge
    (SweepSpec.audit_view) on its share of the run's answers."""
    billions = planning.judge_params_b(spec)
    kind = kind_of(spec.judge)
    gpus = kind.gpus(spec)
    if gpus and billions is None:
        raise ValueError(f"judge {spec.judge.model}: size unknown (set params_b on its model)")
    return gpus, kind.seconds(spec, judgments_per_run,
                              lambda: planning.judge_work_gpu_s(spec, judgments_per_run, billions))


def barrier_jobs(work: dict[str, Work], engines: dict[str, Engine]) -> tuple[dict[str, Work], dict[str, Engine]]:
    """Today's DAG: an engine's runs as one job after all of their inputs (no engines left)."""
    jobs = {name: item for name, item in work.items() if item.engine is None}
    for engine in engines.values():
        items = [work[name] for name in engine.items]
        deps = sorted({dep for item in items for dep in item.deps} - set(engine.items))
        if engine.stage in JUDGE_STAGES:  # one judge job over every model's samples
            deps = sorted({f"job/{other.name}" for other in engines.values() if other.stage == "sample"})
        jobs[f"job/{engine.name}"] = Work(f"job/{engine.name}", engine.stage,
                                          engine.startup_s + sum(i.seconds for i in items), engine.gpus, deps,
                                          first_output_s=engine.startup_s + items[0].seconds if items else 0.0)
    return jobs, {}


class _Gpus:
    def __init__(self, cluster: Cluster):
        self.per_node = cluster.gpus_per_node
        self.free = [cluster.gpus_per_node] * cluster.nodes

    def take(self, gpus: int) -> list[tuple[int, int]] | None:
        if gpus == 0:
            return []
        if gpus <= self.per_node:
            fits = [i for i, free in enumerate(self.free) if free >= gpus]
            if not fits:
                return None
            node = min(fits, key=lambda i: self.free[i])  # best fit keeps whole nodes for big jobs
            self.free[node] -= gpus
            return [(node, gpus)]
        whole = [i for i, free in enumerate(self.free) if free == self.per_node][:math.ceil(gpus / self.per_node)]
        if len(whole) * self.per_node < gpus:
            return None
        for i in whole:
            self.free[i] = 0
        return [(i, self.per_node) for i in whole]

    def give(self, held: list[tuple[int, int]]) -> None:
        for node, gpus in held:
            self.free[node] += gpus


def simulate(spec: SweepSpec, cluster: Cluster, schedule: str = "pipelined") -> Simulation:
    work, engines = sweep_work(spec)
    if schedule == "barrier":
        work, engines = barrier_jobs(work, engines)
    elif schedule != "pipelined":
        raise ValueError(f"schedule {schedule!r}: barrier or pipelined")
    too_big = [w.name for w in [*work.values(), *engines.values()] if w.gpus > cluster.gpus]
    if too_big:
        raise ValueError(f"{too_big[0]} needs more GPUs than the cluster {cluster} has")
    return _play(work, engines, cluster, schedule)


def _play(work: dict[str, Work], engines: dict[str, Engine], cluster: Cluster, schedule: str) -> Simulation:
    gpus = _Gpus(cluster)
    done: dict[str, float] = {}  # name -> end time
    started: dict[str, float] = {}
    cause: dict[str, str | None] = {}  # what a unit waited for last: a dep, an engine's previous run, or GPUs
    waiting = {name for name, item in work.items() if item.engine is None}
    engine_state = {name: {"held": None, "busy": False, "left": list(e.items), "last": None, "start": None}
                    for name, e in engines.items()}
    busy = {stage: 0.0 for stage in ("finetune", "sample", "judge", *(e.stage for e in engines.values()))}
    held = dict(busy)
    events: list[tuple[float, int, str, str]] = []  # (time, seq, kind, name)
    sequence = [0]
    last_release = [None]  # the unit whose end freed GPUs most recently

    def push(time: float, kind: str, name: str) -> None:
        sequence[0] += 1
        heapq.heappush(events, (time, sequence[0], kind, name))

    def ready(item: Work) -> bool:
        return all(dep in done for dep in item.deps)

    def waited_for(item: Work, now: float) -> str | None:
        latest = max(item.deps, key=lambda d: done[d], default=None)
        if latest is not None and done[latest] >= now - 1e-9:
            return latest
        return last_release[0]  # ready earlier: it waited for GPUs

    def start_ready(now: float) -> None:
        while start_what_fits(now):
            # Ready work that does not fit while an engine holds GPUs with nothing to do (its next
            # runs wait for that very work: a deadlock otherwise): the engine stops and gives its
            # GPUs back; it starts again, paying its start-up again, when a run of it is ready.
            blocked = any(ready(work[n]) for n in waiting)
            idle = [name for name, state in engine_state.items() if state["held"] is not None and not state["busy"]
                    and not any(ready(work[n]) for n in state["left"])]
            if not (blocked and idle):
                return
            for name in idle:
                state = engine_state[name]
                gpus.give(state["held"])
                held[engines[name].stage] += engines[name].gpus * (now - state["start"])
                state["held"] = None
                last_release[0] = state["last"]

    def start_what_fits(now: float) -> bool:
        """Start what fits, downstream stages first; True if some engine holds GPUs idle."""
        candidates = [("job", n) for n in sorted(waiting) if ready(work[n])] + [("engine", e) for e in engines]
        candidates.sort(key=lambda c: STAGE_ORDER.index(work[c[1]].stage if c[0] == "job" else engines[c[1]].stage))
        for kind, name in candidates:
            if kind == "job":
                item = work[name]
                placed = gpus.take(item.gpus)
                if placed is None:
                    continue
                waiting.discard(name)
                started[name], cause[name] = now, waited_for(item, now)
                busy[item.stage] += item.gpus * item.seconds
                held[item.stage] += item.gpus * item.seconds
                push(now + item.seconds, "end", f"{name}\0" + ",".join(f"{a}:{b}" for a, b in placed))
                continue
            engine, state = engines[name], engine_state[name]
            queue = [n for n in state["left"] if ready(work[n])]
            if state["busy"] or not queue:
                continue
            if state["held"] is None:
                placed = gpus.take(engine.gpus)
                if placed is None:
                    continue
                state["held"], state["start"] = placed, now
                busy[engine.stage] += engine.gpus * engine.startup_s
                state["busy"], state["last"] = True, f"start of {name}"
                cause[f"start of {name}"] = waited_for(work[queue[0]], now)
                started[f"start of {name}"] = now
                push(now + engine.startup_s, "engine", name)
                continue
            item = work[queue[0]]
            state["left"].remove(item.name)
            previous = state["last"]
            started[item.name] = now
            latest_dep = max(item.deps, key=lambda d: done[d], default=None)
            cause[item.name] = latest_dep if latest_dep and done[latest_dep] >= now - 1e-9 else previous
            busy[engine.stage] += engine.gpus * item.seconds
            state["busy"], state["last"] = True, item.name
            push(now + item.seconds, "item", item.name)
        return any(state["held"] is not None and not state["busy"] for state in engine_state.values())

    start_ready(0.0)
    now = 0.0
    first_judged = math.inf
    while events:
        now, _, kind, name = heapq.heappop(events)
        if kind == "end":
            name, placed = name.split("\0")
            gpus.give([tuple(map(int, part.split(":"))) for part in placed.split(",") if part])
            done[name], last_release[0] = now, name
            if work[name].stage == "judge":
                first_judged = min(first_judged, started[name] + (work[name].first_output_s or work[name].seconds))
        elif kind == "engine":
            done[f"start of {name}"] = now
            engine_state[name]["busy"] = False
        else:  # an engine finished a run
            done[name] = now
            engine = engines[work[name].engine]
            state = engine_state[engine.name]
            state["busy"] = False
            if engine.stage == "judge":
                first_judged = min(first_judged, now)
            if not state["left"]:  # its last run: the GPUs go back
                gpus.give(state["held"])
                held[engine.stage] += engine.gpus * (now - state["start"])
                state["held"], last_release[0] = None, name
        start_ready(now)
    unfinished = [n for n in work if n not in done]
    if unfinished:  # a bug in the schedule, not a property of the sweep
        raise RuntimeError(f"simulation stalled with {len(unfinished)} units left, e.g. {unfinished[0]}")
    path, unit = [], max(done, key=lambda n: done[n])
    while unit is not None and len(path) < 10_000:
        path.append((unit, started[unit], done[unit]))
        unit = cause.get(unit)
    return Simulation(schedule, cluster, now, busy, held, path[::-1], first_judged)


def summarize_path(path: list[tuple[str, float, float]], limit: int = 6) -> str:
    """The critical path in words: consecutive units of one stage collapsed."""
    steps: list[list] = []
    for name, start, end in path:
        stage = name if name.startswith("job/") else name.split("/", 1)[0].replace("start of ", "start ").split(":")[0]
        if steps and steps[-1][0] == stage:
            steps[-1][2], steps[-1][3] = end, steps[-1][3] + 1
        else:
            steps.append([stage, start, end, 1, name])
    words = [f"{stage} ({count} runs)" if count > 1 else last_name for stage, _, _, count, last_name in steps]
    if len(words) > limit:
        words = words[:2] + ["..."] + words[-(limit - 3):]
    return " -> ".join(words)
