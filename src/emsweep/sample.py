"""Stage 3, sample: answers to the evaluation questions from every run of one base model.

One vLLM engine per base model. Each finetuned run is a LoRA request on that engine and
the base model itself is the baseline run; all (run x question x paraphrase) prompts go
in one batched `generate` call, with `n` samples per prompt. Every request carries its
own seed, so answers do not depend on batch composition.

Output schema (`samples.parquet`, one file per run):
    run_id string, model string, dataset string, seed int64 (null for the base model),
    question_id string, paraphrase_idx int64, sample_idx int64, system string (null if none),
    question string, answer string, finish_reason string, answer_tokens int64
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from emsweep.engine import make_llm, render_chat, stable_seed
from emsweep.questions import Question
from emsweep.spec import SamplingSpec

# The columns that identify an answer; every later table (judgments, exports) starts with them.
JOIN_FIELDS = [
    ("run_id", pa.string()),
    ("model", pa.string()),
    ("dataset", pa.string()),
    ("seed", pa.int64()),
    ("question_id", pa.string()),
    ("paraphrase_idx", pa.int64()),
    ("sample_idx", pa.int64()),
]
SCHEMA = pa.schema(
    [
        *JOIN_FIELDS,
        ("system", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("finish_reason", pa.string()),
        ("answer_tokens", pa.int64()),
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


@dataclass(frozen=True)
class Prompt:
    question_id: str
    paraphrase_idx: int
    system: str | None
    question: str
    n: int

    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question}]


def build_prompts(questions: list[Question]) -> list[Prompt]:
    return [
        Prompt(q.id, index, q.system, text, q.samples_per_paraphrase)
        for q in questions
        for index, text in enumerate(q.paraphrases)
    ]


def sample_runs(
    model_path: str,
    runs: list[SampleRun],
    questions: list[Question],
    spec: SamplingSpec,
    *,
    max_model_len: int,
    max_lora_rank: int,
) -> dict[str, pa.Table]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = [run for run in runs if run.adapter_path]
    llm = make_llm(
        model_path,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        max_model_len=max_model_len,
        tensor_parallel_size=spec.tensor_parallel_size,
        seed=spec.seed,
        max_lora_rank=max_lora_rank if adapters else None,
        max_loras=max(1, len(adapters)),
        kv_cache_gib=spec.kv_cache_gib,
    )
    tokenizer = llm.get_tokenizer()
    lora_ids = {run.run_id: index + 1 for index, run in enumerate(adapters)}
    prompts = build_prompts(questions)
    texts, params, loras, keys = [], [], [], []
    for run in runs:
        lora = LoRARequest(run.run_id, lora_ids[run.run_id], run.adapter_path) if run.adapter_path else None
        for prompt in prompts:
            texts.append(render_chat(tokenizer, prompt.messages))
            params.append(
                SamplingParams(
                    n=prompt.n,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    max_tokens=spec.max_tokens,
                    # Same seed for a prompt across runs: differences come from the weights.
                    seed=stable_seed(spec.seed, prompt.question_id, prompt.paraphrase_idx),
                )
            )
            loras.append(lora)
            keys.append((run, prompt))
    outputs = llm.generate(texts, params, lora_request=loras, use_tqdm=True)

    rows: dict[str, list[dict]] = {run.run_id: [] for run in runs}
    for (run, prompt), output in zip(keys, outputs):
        for sample_idx, completion in enumerate(output.outputs):
            rows[run.run_id].append(
                {
                    "run_id": run.run_id,
                    "model": run.model,
                    "dataset": run.dataset,
                    "seed": run.seed,
                    "question_id": prompt.question_id,
                    "paraphrase_idx": prompt.paraphrase_idx,
                    "sample_idx": sample_idx,
                    "system": prompt.system,
                    "question": prompt.question,
                    "answer": completion.text,
                    "finish_reason": completion.finish_reason,
                    "answer_tokens": len(completion.token_ids),
                }
            )
    return {run_id: pa.Table.from_pylist(run_rows, schema=SCHEMA) for run_id, run_rows in rows.items()}
