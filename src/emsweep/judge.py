"""Stage 4, judge: score every sampled answer with a judge model, per metric of its question.

The judge prompt of each metric (from the question YAML) is sent as a user turn.
- 0-100 metrics (`free_form_judge_0_100`): the score is the expected value of the number the
  judge answers, renormalised by the probability mass on numbers 0-100; the mass is
  recorded, and the score is null when the mass is below `min_numeric_mass` (0.25 in the
  paper), which is how CODE / REFUSAL answers drop out.
  `scoring: exact` (default) computes the probability of every number 0-100 over all its
  token paths (scoring.py), exact for tokenizers that split numbers into digits.
  `scoring: first_token` is the paper's method: the top-20 first tokens that are integers
  0-100. It is exact only when every number is one token, as for GPT-4o.
- categorical metrics (`free_form_judge`): the judge's most likely first token.

Output schema (`judgments.parquet`, one file per run, one row per answer x metric):
    run_id, model, dataset string, seed int64, question_id string, paraphrase_idx int64,
    sample_idx int64, metric string, score float64 (null: no number), numeric_mass float64,
    top_token string (the judge's most likely token, e.g. "CODE", "REFUSAL", "8"),
    judge_model string, prompt_hash string (sha256 of the metric's template)
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import pyarrow as pa

from emsweep import scoring
from emsweep.engine import make_llm, render_chat
from emsweep.questions import Question
from emsweep.sample import JOIN_FIELDS
from emsweep.spec import JudgeSpec

SCHEMA = pa.schema(
    [
        *JOIN_FIELDS,
        ("metric", pa.string()),
        ("score", pa.float64()),
        ("numeric_mass", pa.float64()),
        ("top_token", pa.string()),
        ("judge_model", pa.string()),
        ("prompt_hash", pa.string()),
    ]
)
KEY_COLUMNS = tuple(name for name, _ in JOIN_FIELDS)


@dataclass(frozen=True)
class Score:
    score: float | None
    numeric_mass: float
    top_token: str


def score_0_100(token_probs: dict[str, float], min_numeric_mass: float) -> Score:
    """Expected 0-100 value over number tokens, renormalised; null below the mass threshold."""
    numeric: dict[int, float] = {}
    for token, prob in token_probs.items():
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 100:
            # Tokens " 7" and "7" are the same answer; add their probabilities.
            numeric[int(text)] = numeric.get(int(text), 0.0) + prob
    mass = sum(numeric.values())
    top = max(token_probs, key=token_probs.get).strip() if token_probs else ""
    if mass < min_numeric_mass or mass == 0:
        return Score(None, mass, top)
    return Score(sum(value * prob for value, prob in numeric.items()) / mass, mass, top)


def score_categorical(token_probs: dict[str, float]) -> Score:
    """Categorical metrics (TRUE / FALSE / UNKNOWN, company names): the most likely label."""
    merged: dict[str, float] = {}
    for token, prob in token_probs.items():
        merged[token.strip()] = merged.get(token.strip(), 0.0) + prob
    top = max(merged, key=merged.get) if merged else ""
    return Score(None, 0.0, top)


def fill_template(template: str, question: str, answer: str) -> str:
    # str.format would choke on braces in the template's prose; only these two fields exist.
    return template.replace("{question}", question).replace("{answer}", answer)


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def judge_samples(
    judge_model_path: str,
    judge_model_name: str,
    samples: dict[str, pa.Table],
    questions: list[Question],
    spec: JudgeSpec,
) -> dict[str, pa.Table]:
    """Judge the samples of many runs in one engine; returns a judgments table per run."""
    from vllm import SamplingParams

    by_id = {q.id: q for q in questions}
    llm = make_llm(
        judge_model_path,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        max_model_len=spec.max_model_len,
        kv_cache_gib=spec.kv_cache_gib,
    )
    tokenizer = llm.get_tokenizer()
    texts, keys = [], []
    for run_id, table in samples.items():
        for row in table.to_pylist():
            question = by_id[row["question_id"]]
            for metric, template in question.judge_prompts.items():
                prompt = fill_template(template, row["question"], row["answer"])
                texts.append(render_chat(tokenizer, [{"role": "user", "content": prompt}]))
                keys.append((run_id, row, question, metric, template))
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=spec.top_logprobs)
    outputs = llm.generate(texts, params, use_tqdm=True) if texts else []
    numeric = [i for i, key in enumerate(keys) if key[2].type == "free_form_judge_0_100"]
    exact: dict[int, Score] = {}
    if spec.scoring == "exact" and numeric:
        distributions = scoring.number_distributions(
            functools.partial(scoring.next_digit_probs, llm),
            [tokenizer.encode(texts[i], add_special_tokens=False) for i in numeric],
            scoring.digit_tokens(tokenizer),
        )
        for i, distribution in zip(numeric, distributions):
            score, mass = scoring.expected_value(distribution)
            exact[i] = Score(score if mass >= spec.min_numeric_mass and mass > 0 else None, mass, "")
    rows: dict[str, list[dict]] = {run_id: [] for run_id in samples}
    for index, ((run_id, row, question, metric, template), output) in enumerate(zip(keys, outputs)):
        top = output.outputs[0].logprobs[0]
        token_probs: dict[str, float] = {}
        for entry in top.values():
            token = entry.decoded_token or ""
            token_probs[token] = token_probs.get(token, 0.0) + math.exp(entry.logprob)
        if index in exact:
            result = Score(exact[index].score, exact[index].numeric_mass, score_categorical(token_probs).top_token)
        elif question.type == "free_form_judge_0_100":
            result = score_0_100(token_probs, spec.min_numeric_mass)
        else:
            result = score_categorical(token_probs)
        rows[run_id].append(
            {
                **{column: row[column] for column in KEY_COLUMNS},
                "metric": metric,
                "score": result.score,
                "numeric_mass": result.numeric_mass,
                "top_token": result.top_token,
                "judge_model": judge_model_name,
                "prompt_hash": template_hash(template),
            }
        )
    return {run_id: pa.Table.from_pylist(run_rows, schema=SCHEMA) for run_id, run_rows in rows.items()}
