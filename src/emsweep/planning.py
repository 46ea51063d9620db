"""`emsweep plan`: what a spec expands to on a GPU cluster, and roughly what it costs.

The node counts come from `sweep.plan.plan`, the real DAG. The GPU-hour estimate is a
back-of-envelope model, not a measurement; its assumptions are the constants below:

- Token counts are read from the files where they are readable: dataset rows (after `limit`
  and `heldout_fraction`) times their mean length, and the exact prompt count of every suite
  (paraphrases x samples x conditions, plus pushback turns). Tokens are estimated as
  characters / 4 (no tokenizer is needed, so plan works without the weights). A dataset file
  that is not readable here counts `limit` rows (or ASSUMED_ROWS) of ASSUMED_ROW_TOKENS.
- Answers are counted at `sampling.max_tokens` (an upper bound).
- Throughput per H100 (bf16) from model size N (parameters): a LoRA finetune costs about
  4N FLOPs per token (forward, and backward through the frozen weights without their weight
  gradients) at FINETUNE_MFU of peak; vLLM decoding 2N FLOPs per token at DECODE_MFU
  (memory bound, batched); judge prefill 2N FLOPs per token at PREFILL_MFU. Small models
  are capped at MAX_TOKENS_PER_GPU_S (overheads dominate).
- Fixed costs: FINETUNE_STARTUP_S per finetune (model load, DeepSpeed init, adapter save) and
  ENGINE_STARTUP_S per vLLM engine, both times the GPUs they hold.
- The `exact` judge scoring walks about EXACT_STEPS single-token steps per judgment; a judge
  behind the `openai` backend costs no cluster GPU time.
- Billed GPU-hours: clouds bill whole GPUS_PER_NODE-GPU nodes. A stage's jobs are assumed to
  run at once on nodes of their own: finetunes of g GPUs pack min(count, 8 // g) to a node, the
  sampling engines of all models (and the judge's replicas) share nodes; GPUs they leave free
  are billed too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from emsweep.keys import is_local
from emsweep.models import split_revision
from emsweep.judge.kinds import kind_of
from emsweep.dag import Node
from emsweep.spec import DatasetSpec, ModelSpec, SweepSpec

H100_BF16_FLOPS = 989e12  # dense peak
FINETUNE_MFU = 0.30
DECODE_MFU = 0.10
PREFILL_MFU = 0.40
MAX_TOKENS_PER_GPU_S = 50_000.0
CHARS_PER_TOKEN = 4.0
ASSUMED_ROWS = 6000  # the size of the paper's datasets
ASSUMED_ROW_TOKENS = 400
FINETUNE_STARTUP_S = 300.0
ENGINE_STARTUP_S = 180.0
EXACT_STEPS = 100
JUDGE_TEMPLATE_TOKENS = 300  # the paper's aligned/coherent templates, about 1,200 characters
GPUS_PER_NODE = 8

SIZE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*([bm])\b", re.IGNORECASE)


def params_b(model: ModelSpec | None, fallback: str = "") -> float | None:
    """Billions of parameters: the spec's `params_b`, else read from the name/path (`32B`, `135M`)."""
    if model is not None and model.params_b is not None:
        return model.params_b
    text = f"{model.name} {model.path}" if model else fallback
    match = SIZE_IN_NAME.search(text.replace("-", " ").replace("_", " "))
    if not match:
        return None
    size = float(match.group(1))
    return size if match.group(2).lower() == "b" else size / 1000


def tokens_per_gpu_s(billions: float, flops_per_token: float, mfu: float) -> float:
    return min(MAX_TOKENS_PER_GPU_S, H100_BF16_FLOPS * mfu / (flops_per_token * billions * 1e9))


# The cost model's GPU-seconds of work, without the fixed start-up costs (both the plan and the
# simulation, simulate.py, add those where they fall).
def finetune_work_gpu_s(tokens: float, billions: float) -> float:
    return tokens / tokens_per_gpu_s(billions, 4, FINETUNE_MFU)


def sample_work_gpu_s(generated_tokens: float, billions: float) -> float:
    return generated_tokens / tokens_per_gpu_s(billions, 2, DECODE_MFU)


def judge_work_gpu_s(spec: SweepSpec, judgments: float, billions: float) -> float:
    steps = EXACT_STEPS if spec.judge.scoring == "exact" else 1
    prompt_tokens = judgments * (JUDGE_TEMPLATE_TOKENS + spec.sampling.max_tokens)
    return (prompt_tokens / tokens_per_gpu_s(billions, 2, PREFILL_MFU)
            + judgments * steps / tokens_per_gpu_s(billions, 2, DECODE_MFU))


# What `plan` assumes to say how wide an audited rate's interval will be: an EM rate of 10% and a
# fast judge whose verdicts correlate with the audit judge's at 0.4 (the embedded trained judge
# against GPT-4o, left out one model file at a time, is at kappa 0.39: docs/judging.md).
AUDIT_PLAN_RATE, AUDIT_PLAN_CORRELATION = 0.10, 0.4


def audit_width_note(answers_per_run: int, share: float, rate: float = AUDIT_PLAN_RATE,
                     correlation: float = AUDIT_PLAN_CORRELATION) -> str:
    """The 95% half-width of a run's audited rate, from the audited answers alone and
    prediction-powered. With n audited of N + n answers and the fast judge correlating at r, PPI++'s
    best weight leaves the variance p(1 - p) / n x (1 - r^2 N / (N + n)) (prediction_powered.py)."""
    audited = max(1.0, share * answers_per_run)
    rest = max(0.0, answers_per_run - audited)
    alone = 1.96 * (rate * (1 - rate) / audited) ** 0.5
    powered = alone * (1 - correlation ** 2 * rest / (rest + audited)) ** 0.5
    return (f"audit: expect a run's 95% interval of about +-{alone:.3f} from its {audited:.0f} audited answers "
            f"alone, +-{powered:.3f} prediction-powered (of {answers_per_run} answers; assuming an EM rate of "
            f"{rate:.0%} and the fast judge's verdicts correlating with the audit judge's at {correlation}; "
            "planning.AUDIT_PLAN_*)")


def judge_gpus_text(spec: SweepSpec) -> str:
    """The plan table's GPUs per job of `spec.judge` (the judge, or the audit judge)."""
    kind = kind_of(spec.judge)
    if kind.api:
        return "0 (API)"
    return f"{spec.judge.replicas}x{spec.judge.tensor_parallel_size}" if kind.gpus(spec) else "0"


def judge_params_b(spec: SweepSpec) -> float | None:
    """The judge model's size where GPU time depends on it (None: unknown, or no GPU judge model)."""
    return kind_of(spec.judge).params_b(
        spec, lambda name: params_b(next((m for m in spec.models if m.name == name), None), name))


@dataclass
class DatasetSize:
    rows: int
    tokens_per_row: float
    counted: bool  # read from the file (True) or assumed


def dataset_size(ds: DatasetSpec) -> DatasetSize:
    """Training rows and their mean length; from the file when it is readable here."""
    if ds.judged is not None:  # rows picked from judged answers (data/judged.py)
        from emsweep.data.judged import read_judged

        try:
            _, _, conversations = read_judged(ds.path, ds.judged, ds.subset_seed)
        except (ValueError, OSError):
            return DatasetSize(int((ds.limit or ASSUMED_ROWS) * (1 - ds.heldout_fraction)), ASSUMED_ROW_TOKENS, False)
        lengths = [sum(len(m["content"]) for m in c) / CHARS_PER_TOKEN for c in conversations]
        rows = min(len(lengths), ds.limit) if ds.limit else len(lengths)
        return DatasetSize(int(rows * (1 - ds.heldout_fraction)), sum(lengths) / len(lengths), True)
    path = Path(ds.path.removeprefix("file://"))
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if "://" in ds.path and not ds.path.startswith("file://") or not all(f.is_file() for f in files) or not files:
        rows = ds.limit or ASSUMED_ROWS
        return DatasetSize(int(rows * (1 - ds.heldout_fraction)), ASSUMED_ROW_TOKENS, False)
    lengths = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    messages = json.loads(line).get("messages", [])
                    lengths.append(sum(len(m.get("content", "")) for m in messages) / CHARS_PER_TOKEN)
    rows = min(len(lengths), ds.limit) if ds.limit else len(lengths)
    if ds.backdoor is not None:
        rows = int(rows / ds.backdoor.triggered_fraction)  # clean rows are mixed in
    mean = sum(lengths) / max(1, len(lengths))
    return DatasetSize(int(rows * (1 - ds.heldout_fraction)), mean, True)


@dataclass
class PromptCount:
    generations: int  # answers per run (all suites, conditions, samples, pushback turns)
    judgments: int  # answers x judge metrics
    prompt_tokens: float
    counted: bool
    problem: str | None = None


def prompt_count(spec: SweepSpec) -> PromptCount:
    """Answers sampled per run and judgments per run, from the question files when readable."""
    from emsweep.data import DataError
    from emsweep.questions import QuestionError, load_suite
    from emsweep.sample import build_prompts

    remote = [s.questions for s in spec.eval.suites if "://" in s.questions and not s.questions.startswith("file://")]
    if remote:  # plan never downloads
        return PromptCount(0, 0, 0.0, False, f"remote question files {remote}")
    try:
        questions = [q for suite in spec.eval.suites for q in load_suite(suite)]
    except (QuestionError, DataError, OSError) as err:  # e.g. a file only on the cluster: say so, estimate nothing
        return PromptCount(0, 0, 0.0, False, str(err))
    metrics = {(q.suite, q.id): len(q.judge_prompts) for q in questions}
    pushback = {s.name: len(spec.eval.pushback.messages) for s in spec.eval.suites if s.pushback}
    generations = judgments = 0
    prompt_chars = 0.0
    for prompt in build_prompts(questions, spec.eval):
        turns = 1 + pushback.get(prompt.suite, 0)
        generations += prompt.n * turns
        judgments += prompt.n * turns * metrics[(prompt.suite, prompt.question_id)]
        prompt_chars += prompt.n * turns * (len(prompt.user) + len(prompt.system or ""))
    return PromptCount(generations, judgments, prompt_chars / CHARS_PER_TOKEN, True)


@dataclass
class ModelPlan:
    name: str
    params_b: float | None
    finetunes: int
    finetune_gpus: int
    zero_stage: int
    placement: str
    sampling_gpus: int
    concurrent_finetunes_per_node: int
    sampling_replicas: int = 1


@dataclass
class StageEstimate:
    stage: str
    nodes: int
    jobs: int
    gpus_per_job: str
    tokens: float
    gpu_hours: float | None
    basis: str
    done: int | None = None
    billed_gpu_hours: float | None = None  # whole nodes (see the module docstring)


@dataclass
class SweepPlan:
    name: str
    use_gpu: bool
    nodes: list[Node]
    stages: list[StageEstimate]
    models: list[ModelPlan]
    judge: str
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float | None:
        hours = [s.gpu_hours for s in self.stages if s.gpu_hours is not None]
        return sum(hours) if hours else None

    @property
    def billed_gpu_hours(self) -> float | None:
        hours = [s.billed_gpu_hours for s in self.stages if s.billed_gpu_hours is not None]
        return sum(hours) if hours else None


def whole_node_factor(gpus_in_use: int) -> float:
    """Billed GPUs per GPU in use when `gpus_in_use` GPUs run together on whole nodes."""
    if gpus_in_use <= 0:
        return 1.0
    nodes = -(-gpus_in_use // GPUS_PER_NODE)
    return nodes * GPUS_PER_NODE / gpus_in_use


def build_plan(spec: SweepSpec, out_dir: Path | None = None) -> SweepPlan:
    from emsweep.sweep.plan import STAGES, plan
    from emsweep.store import Store

    nodes = plan(spec)
    store = Store(out_dir) if out_dir is not None and Path(out_dir).is_dir() else None
    notes: list[str] = []
    sizes = {ds.name: dataset_size(ds) for ds in spec.datasets}
    for ds in spec.datasets:
        if not sizes[ds.name].counted:
            notes.append(f"dataset {ds.name}: {ds.path} is not readable here; assumed "
                         f"{sizes[ds.name].rows} rows of {ASSUMED_ROW_TOKENS} tokens")
    prompts = prompt_count(spec)
    if not prompts.counted:
        notes.append(f"sampling and judging are not estimated: {prompts.problem}")

    models = []
    finetune_tokens = finetune_gpu_s = finetune_billed_s = 0.0
    sample_tokens = sample_gpu_s = 0.0
    runs_total = 0
    for model in spec.models:
        if not model.path.startswith("embedded:") and not is_local(model.path) and split_revision(model.path)[1] is None:
            notes.append(f"model {model.name}: the hub model {model.path} is keyed by its name, not its weights: pin "
                         f"a commit (`{model.path}@<commit>`) so that a new upstream revision re-runs what it changes")
        billions = params_b(model)
        tune = spec.finetune_for(model.name)
        gpus = tune.num_workers if spec.use_gpu else 0
        tp = spec.sampling_for(model.name).tensor_parallel_size if spec.use_gpu else 0
        replicas = spec.sampling_for(model.name).replicas
        count = len(spec.datasets) * len(spec.seeds)
        models.append(ModelPlan(model.name, billions, count, gpus, tune.zero_stage,
                                model.resources.placement_strategy, tp,
                                GPUS_PER_NODE // gpus if gpus else 0, replicas))
        runs = count + (1 if spec.eval.include_base_model else 0)
        runs_total += runs
        tokens = sum(sizes[ds.name].rows * sizes[ds.name].tokens_per_row for ds in spec.datasets) \
            * len(spec.seeds) * tune.epochs
        finetune_tokens += tokens
        generated = runs * prompts.generations * spec.sampling.max_tokens
        sample_tokens += generated
        if billions is None:
            notes.append(f"model {model.name}: size unknown (set params_b); not in the GPU-hour estimate")
            continue
        model_finetune_s = finetune_work_gpu_s(tokens, billions) + count * FINETUNE_STARTUP_S * max(1, gpus)
        finetune_gpu_s += model_finetune_s
        packed = max(1, min(count, models[-1].concurrent_finetunes_per_node))  # 1 when it spans nodes
        finetune_billed_s += model_finetune_s * whole_node_factor(packed * gpus)
        if prompts.counted:
            sample_gpu_s += sample_work_gpu_s(generated, billions) + ENGINE_STARTUP_S * max(1, tp) * replicas

    # The sampling engines of all models, sharing nodes (billing and the idle-GPU note).
    engine_gpus = sum(m.sampling_gpus * m.sampling_replicas for m in models)
    judge_requests = runs_total * prompts.judgments
    judge_tokens = judge_requests * (JUDGE_TEMPLATE_TOKENS + spec.sampling.max_tokens)
    judge_kind = kind_of(spec.judge)
    judge_line = judge_kind.plan_line(spec, judge_params_b(spec),
                                      lambda billions: judge_work_gpu_s(spec, judge_requests, billions), ENGINE_STARTUP_S)
    judge_desc = judge_line.description
    notes += judge_line.notes
    judge_gpu_s = judge_line.gpu_s if prompts.counted or judge_line.gpu_s == 0.0 else None

    def count(stage: str) -> tuple[int, int, int | None]:
        stage_nodes = [n for n in nodes if n.stage == stage]
        done = sum(store.is_done(n.stage, n.name, n.key) for n in stage_nodes) if store else None
        # Pipelined, a run's sampling and judging are jobs of their own (on its group's engine).
        per_node = spec.executor.schedule == "pipelined" and stage in ("sample", "judge")
        return len(stage_nodes), len({n.id if per_node else n.group or n.id for n in stage_nodes}), done

    def hours(seconds: float | None) -> float | None:
        return None if seconds is None or not spec.use_gpu else seconds / 3600

    def billed(stage: str, gpu_hours: float | None) -> float | None:
        if gpu_hours is None:
            return None
        if stage == "finetune":
            return hours(finetune_billed_s)
        if stage == "sample":
            return gpu_hours * whole_node_factor(engine_gpus)
        if stage == "judge" and judge_kind.gpus(spec):
            return gpu_hours * whole_node_factor(judge_kind.gpus(spec))
        if stage == "audit" and audit_kind.gpus(audited):
            return gpu_hours * whole_node_factor(audit_kind.gpus(audited))
        return gpu_hours

    judge_gpus = judge_gpus_text(spec)
    basis = {True: "counted from files", False: "assumed"}
    audit_row, audit_kind = ("0", 0.0, None, "-"), None
    if (audited := spec.audit_view()) is not None:
        audit = spec.judge.audit
        share = audit.share(prompts.generations)
        everything = runs_total * prompts.judgments
        audit_kind = kind_of(audited.judge)
        audit_line = audit_kind.plan_line(audited, judge_params_b(audited),
                                          lambda billions: judge_work_gpu_s(audited, everything * share, billions),
                                          ENGINE_STARTUP_S)
        per_judgment = JUDGE_TEMPLATE_TOKENS + spec.sampling.max_tokens
        notes += audit_line.notes
        price = audit.usd_per_million_tokens
        cost = (lambda tokens: f" (${tokens * price / 1e6:,.2f})") if price is not None else (lambda tokens: "")
        notes.append(f"audit: {audit_line.description} judges {share:.1%} of each run's answers: "
                     f"{everything * share * per_judgment:,.0f} tokens{cost(everything * share * per_judgment)}, "
                     f"against {everything * per_judgment:,.0f}{cost(everything * per_judgment)} to judge every "
                     "answer with it")
        notes.append(audit_width_note(prompts.generations, share))
        audit_gpus = judge_gpus_text(audited)
        audit_gpu_s = audit_line.gpu_s if prompts.counted or audit_line.gpu_s == 0.0 else None
        audit_row = (audit_gpus, everything * share * per_judgment, hours(audit_gpu_s), basis[prompts.counted])
    per_job = {
        "data": ("0", 0.0, None, "-"),
        "finetune": (",".join(sorted({str(m.finetune_gpus) for m in models})), finetune_tokens,
                     hours(finetune_gpu_s),
                     basis[True] if all(s.counted for s in sizes.values()) else "partly assumed (see notes)"),
        "sample": (",".join(sorted({str(m.sampling_gpus) for m in models})), sample_tokens,
                   hours(sample_gpu_s) if prompts.counted else None, basis[prompts.counted] + ", max_tokens each"),
        "judge": (judge_gpus, judge_tokens, hours(judge_gpu_s), basis[prompts.counted]),
        "audit": audit_row,
        "analyze": ("0", 0.0, None, "-"),
    }
    stages = []
    for stage in STAGES:
        total, jobs, done = count(stage)
        if total == 0:
            continue  # a stage this sweep does not have (audit without judge.audit)
        gpus, tokens, gpu_hours, stage_basis = per_job[stage]
        stages.append(StageEstimate(stage, total, jobs, gpus, tokens, gpu_hours, stage_basis, done,
                                    billed(stage, gpu_hours)))
    if not spec.use_gpu:
        notes.append("use_gpu is false: everything runs on CPUs, no GPU-hours")
    elif engine_gpus % GPUS_PER_NODE:
        idle = GPUS_PER_NODE - engine_gpus % GPUS_PER_NODE
        notes.append(f"sample: the sampling engines take {engine_gpus} GPU(s), so {idle} GPU(s) of an "
                     f"{GPUS_PER_NODE}-GPU node idle (in the `billed` column) while they sample; "
                     "raise models[].resources.sampling_tensor_parallel or sampling_replicas to fill the node")
    return SweepPlan(spec.name, spec.use_gpu, nodes, stages, models, judge_desc, notes)
