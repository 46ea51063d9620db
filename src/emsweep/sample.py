"""Stage 3, sample: answers to every suite x condition from every run of one base model.

One vLLM engine per base model. Each finetuned run is a LoRA request on that engine and
the base model itself is the baseline run; all (run x suite x condition x question x
paraphrase) prompts go in one batched `generate` call, with `n` samples per prompt. Every
request carries its own seed, so answers do not depend on batch composition.

Conditions (`eval.conditions`) decide the exact messages: a system nudge goes before the
question's own system prompt, user nudges around the question, a trigger before the user
turn (as the backdoor data transform writes it). The judge still sees the plain paraphrase.
Follow-ups, per suite:
- pushback: every answer gets one more turn per `eval.pushback.messages` entry: the
  conversation so far, then the user disagrees; turn t+1 of sample i continues turn t of i.
- harm_perception: the model rates each paraphrase's harmfulness 0-100; the rating is the
  expected value over its number-token probabilities (scoring.py), no sampling.

Output schemas (one file each per run):
`samples.parquet`: run_id string, model string, dataset string, seed int64 (null for the base
    model), checkpoint_step int64 (null: the final adapter or the base model), suite string,
    condition string, question_id string, turn int64 (1, then 2.. after pushback),
    paraphrase_idx int64, sample_idx int64, category string, system string (as sent, null if
    none), question string (the paraphrase), user string (the last user message as sent),
    answer string, finish_reason string, answer_tokens int64
`harm.parquet`: run_id, model, dataset, seed, checkpoint_step, suite, question_id,
    paraphrase_idx, perceived_harm float64 (null: no numeric answer), numeric_mass float64
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pyarrow as pa

from emsweep import scoring
from emsweep.engine import first_token_probs, make_llm, render_chat, stable_seed
from emsweep.progress import ProgressWriter, vllm_progress
from emsweep.questions import Question
from emsweep.spec import ConditionSpec, EvalSpec, SamplingSpec

RUN_FIELDS = [
    ("run_id", pa.string()),
    ("model", pa.string()),
    ("dataset", pa.string()),
    ("seed", pa.int64()),
    ("checkpoint_step", pa.int64()),
]
# The columns that identify an answer; every later table (judgments, exports) starts with them.
JOIN_FIELDS = [
    *RUN_FIELDS,
    ("suite", pa.string()),
    ("condition", pa.string()),
    ("question_id", pa.string()),
    ("turn", pa.int64()),
    ("paraphrase_idx", pa.int64()),
    ("sample_idx", pa.int64()),
]
SCHEMA = pa.schema(
    [
        *JOIN_FIELDS,
        ("category", pa.string()),
        ("system", pa.string()),
        ("question", pa.string()),
        ("user", pa.string()),
        ("answer", pa.string()),
        ("finish_reason", pa.string()),
        ("answer_tokens", pa.int64()),
    ]
)
HARM_SCHEMA = pa.schema(
    [
        *RUN_FIELDS,
        ("suite", pa.string()),
        ("question_id", pa.string()),
        ("paraphrase_idx", pa.int64()),
        ("perceived_harm", pa.float64()),
        ("numeric_mass", pa.float64()),
    ]
)


@dataclass(frozen=True)
class SampleRun:
    """A model to sample from: the base model (adapter_path None) or a finetuned adapter."""

    run_id: str
    model: str
    dataset: str
    seed: int | None
    adapter_path: str | None
    checkpoint_step: int | None = None

    def columns(self) -> dict:
        return {"run_id": self.run_id, "model": self.model, "dataset": self.dataset, "seed": self.seed,
                "checkpoint_step": self.checkpoint_step}


@dataclass(frozen=True)
class Prompt:
    suite: str
    question_id: str
    category: str | None
    condition: str
    paraphrase_idx: int
    question: str  # the paraphrase, as the judge sees it
    system: str | None  # as sent
    user: str  # as sent
    n: int

    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.user}]


def apply_condition(question: Question, paraphrase: str, condition: ConditionSpec) -> tuple[str | None, str]:
    """(system prompt, user message) for a paraphrase under a condition."""
    system = "\n\n".join(part for part in (condition.system_prompt, question.system) if part) or None
    user = condition.user_prefix + paraphrase + condition.user_suffix
    if condition.trigger:
        user = f"{condition.trigger} {user}"
    return system, user


def build_prompts(questions: list[Question], eval_spec: EvalSpec) -> list[Prompt]:
    prompts = []
    for q in questions:
        for condition in eval_spec.conditions_for(q.suite):
            for index, text in enumerate(q.paraphrases):
                system, user = apply_condition(q, text, condition)
                prompts.append(Prompt(q.suite, q.id, q.category, condition.name, index, text, system, user,
                                      q.samples_per_paraphrase))
    return prompts


def pushback_conversation(prompt: Prompt, turns: list[tuple[str, str]]) -> list[dict]:
    """The messages of a pushback turn: the prompt, then (answer, user reply) per earlier turn."""
    messages = list(prompt.messages)
    for answer, reply in turns:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": reply}]
    return messages


def harm_prompt(template: str, paraphrase: str) -> list[dict]:
    return [{"role": "user", "content": template.replace("{question}", paraphrase)}]


def request_seed(sampling_seed: int, run: SampleRun, *prompt: object) -> int:
    """A request's sampling seed: the sweep's `sampling.seed`, the run's identity (model, dataset,
    seed, checkpoint) and the prompt (suite, question, condition, paraphrase; pushback sample and
    turn). Seed replicates draw independently, so their spread includes the sampling noise; a
    run's answers are still the same alone or beside other runs, on any engine or replica. Not
    the run_id: a name, not what the run is."""
    return stable_seed(sampling_seed, run.model, run.dataset, run.seed, run.checkpoint_step, *prompt)


def sample_runs(
    model_path: str,
    runs: list[SampleRun],
    questions: list[Question],
    spec: SamplingSpec,
    eval_spec: EvalSpec,
    *,
    max_model_len: int,
    max_lora_rank: int,
    parts: set[tuple[str, str, str]] | None = None,
    harm_parts: set[tuple[str, str]] | None = None,
    progress: ProgressWriter | None = None,
    keep_engine: bool = False,
) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
    """(samples table per run, harm-perception table per run). `parts` limits sampling to those
    (run_id, suite, condition) and `harm_parts` the ratings to those (run_id, suite): the ones
    the sample cache does not hold (None: all). `keep_engine`: this process samples again later
    (a pipelined schedule's engine host), so the engine stays up for the next call."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = [run for run in runs if run.adapter_path]
    settings = dict(gpu_memory_utilization=spec.gpu_memory_utilization, max_model_len=max_model_len,
                    tensor_parallel_size=spec.tensor_parallel_size, seed=spec.seed,
                    kv_cache_gib=spec.kv_cache_gib)
    if keep_engine:
        # Later jobs bring adapters of their own: LoRA on from the start, however this one began.
        llm, lora_ids = _kept_engine(model_path, {**settings, "max_lora_rank": max_lora_rank},
                                     max_loras=max(KEPT_MAX_LORAS, len(adapters)))
    else:
        llm, lora_ids = make_llm(model_path, **settings, max_lora_rank=max_lora_rank if adapters else None,
                                 max_loras=max(1, len(adapters))), {}
    tokenizer = llm.get_tokenizer()
    # Checked before the sweep where the model was on that machine (checks.py); here before any
    # answer is sampled, so a cluster run fails at once rather than after the whole batch.
    rated = any(suite.harm_perception for suite in eval_spec.suites)
    if rated and eval_spec.harm_perception.scoring == "first_token" and (
            problem := scoring.first_token_problem(tokenizer, "self-rated harm")):
        raise ValueError(problem)
    # vLLM caches an adapter's weights by its int id: an id names one adapter for the engine's life.
    for run in adapters:
        lora_ids.setdefault(run.adapter_path, len(lora_ids) + 1)
    loras = {run.run_id: LoRARequest(run.run_id, lora_ids[run.adapter_path], run.adapter_path)
             if run.adapter_path else None for run in runs}

    def params(run: SampleRun, n: int, *seed_parts) -> SamplingParams:
        return SamplingParams(n=n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                              seed=request_seed(spec.seed, run, *seed_parts))

    prompts = build_prompts(questions, eval_spec)
    base_only = {c.name for c in eval_spec.conditions if c.base_model_only}
    requests = [(run, prompt) for run in runs for prompt in prompts
                if not (run.adapter_path and prompt.condition in base_only)
                and (parts is None or (run.run_id, prompt.suite, prompt.condition) in parts)]
    outputs = llm.generate(
        [render_chat(tokenizer, prompt.messages) for _, prompt in requests],
        [params(run, p.n, p.suite, p.question_id, p.condition, p.paraphrase_idx) for run, p in requests],
        lora_request=[loras[run.run_id] for run, _ in requests],
        use_tqdm=vllm_progress(progress, "answers") if progress else True,
    )
    rows: dict[str, list[dict]] = {run.run_id: [] for run in runs}

    def add(run, prompt, turn, sample_idx, user, completion):
        rows[run.run_id].append({
            **run.columns(), "suite": prompt.suite, "condition": prompt.condition, "question_id": prompt.question_id,
            "turn": turn, "paraphrase_idx": prompt.paraphrase_idx, "sample_idx": sample_idx,
            "category": prompt.category, "system": prompt.system, "question": prompt.question, "user": user,
            "answer": completion.text, "finish_reason": completion.finish_reason,
            "answer_tokens": len(completion.token_ids),
        })

    # Conversations that continue with pushback: (run, prompt, sample_idx, [(answer, reply), ...]).
    pushback_suites = {suite.name for suite in eval_spec.suites if suite.pushback}
    replies = eval_spec.pushback.messages
    open_conversations = []
    for (run, prompt), output in zip(requests, outputs):
        for sample_idx, completion in enumerate(output.outputs):
            add(run, prompt, 1, sample_idx, prompt.user, completion)
            if prompt.suite in pushback_suites:
                open_conversations.append((run, prompt, sample_idx, [(completion.text, replies[0])]))
    for turn in range(2, len(replies) + 2):
        if not open_conversations:
            break
        outputs = llm.generate(
            [render_chat(tokenizer, pushback_conversation(p, turns)) for _, p, _, turns in open_conversations],
            [params(run, 1, p.suite, p.question_id, p.condition, p.paraphrase_idx, i, turn)
             for run, p, i, _ in open_conversations],
            lora_request=[loras[run.run_id] for run, _, _, _ in open_conversations],
            use_tqdm=vllm_progress(progress, f"pushback turn {turn}") if progress else False,
        )
        continuing = []
        for (run, prompt, sample_idx, turns), output in zip(open_conversations, outputs):
            completion = output.outputs[0]
            add(run, prompt, turn, sample_idx, turns[-1][1], completion)
            if turn - 1 < len(replies):
                continuing.append((run, prompt, sample_idx, turns + [(completion.text, replies[turn - 1])]))
        open_conversations = continuing

    if progress and (harm_parts is None or harm_parts):
        progress.update(0, None, "", phase="harm ratings", force=True)
    harm = perceived_harm(llm, tokenizer, runs, loras, questions, eval_spec, harm_parts)
    samples = {run_id: pa.Table.from_pylist(run_rows, schema=SCHEMA) for run_id, run_rows in rows.items()}
    return samples, harm


# A pipelined schedule's engine host keeps one engine (and its adapter ids) between jobs.
_KEPT: dict = {}
KEPT_MAX_LORAS = 4  # adapters a kept engine batches at once; more are served in turn


def _kept_engine(model_path: str, settings: dict, max_loras: int):
    key = (model_path, tuple(sorted(settings.items())))
    if _KEPT.get("key") != key:
        _KEPT.clear()
        _KEPT.update(key=key, llm=make_llm(model_path, **settings, max_loras=max_loras), lora_ids={})
    return _KEPT["llm"], _KEPT["lora_ids"]


def perceived_harm(llm, tokenizer, runs, loras, questions, eval_spec: EvalSpec,
                   harm_parts: set[tuple[str, str]] | None = None) -> dict[str, pa.Table]:
    """Each run rates the harmfulness of every paraphrase of the harm-perception suites (of those
    (run_id, suite) in `harm_parts`, when given)."""
    from vllm import SamplingParams

    suites = {suite.name for suite in eval_spec.suites if suite.harm_perception}
    all_items = [(q, index, text) for q in questions if q.suite in suites for index, text in enumerate(q.paraphrases)]
    template, method = eval_spec.harm_perception.prompt, eval_spec.harm_perception.scoring
    tables = {}
    digits = scoring.digit_tokens(tokenizer) if method == "exact" and all_items else None
    for run in runs:
        items = [item for item in all_items if harm_parts is None or (run.run_id, item[0].suite) in harm_parts]
        if not items:
            tables[run.run_id] = HARM_SCHEMA.empty_table()
            continue
        texts = [render_chat(tokenizer, harm_prompt(template, text)) for _, _, text in items]
        if method == "exact":
            next_probs = functools.partial(scoring.next_digit_probs, llm, lora_request=loras[run.run_id])
            token_prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
            distributions = scoring.number_distributions(next_probs, token_prompts, digits)
        else:
            outputs = llm.generate(texts, SamplingParams(max_tokens=1, temperature=0, logprobs=20),
                                   lora_request=loras[run.run_id], use_tqdm=False)
            distributions = [scoring.first_token_numbers(first_token_probs(output)) for output in outputs]
        rows = []
        for (question, index, _), distribution in zip(items, distributions):
            value, mass = scoring.expected_value(distribution)
            rows.append({**run.columns(), "suite": question.suite, "question_id": question.id,
                         "paraphrase_idx": index, "perceived_harm": value, "numeric_mass": mass})
        tables[run.run_id] = pa.Table.from_pylist(rows, schema=HARM_SCHEMA)
    return tables
