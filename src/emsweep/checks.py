"""Checks of a spec that need the models' tokenizers, run before anything is started.

A score that cannot exceed 9 on a 0-100 scale is worse than an error: the sweep finishes, every
EM rate is NaN, and nothing says why. `first_token` scoring reads a number from the judge's first
token, which is only right when the tokenizer has one token per number 0..100 (GPT-4o); a local
judge (or a self-rating subject model) whose tokenizer spells numbers digit by digit is refused
here. Over HTTP the tokenizer is not visible; the judge stage warns instead (judge.digit_split_warning).
"""

from __future__ import annotations

import functools
from pathlib import Path

from emsweep.models import resolve_model_path
from emsweep.scoring import first_token_problem
from emsweep.spec import SweepSpec


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _local_tokenizer(reference: str):
    """The tokenizer of a local model reference, or None when it is not on this machine (a hub id
    on a cluster: the engine checks again when it starts)."""
    path = resolve_model_path(reference)  # raises for an embedded model that is not fetched
    return load_tokenizer(path) if Path(path).is_dir() else None


def scoring_problems(spec: SweepSpec, missing_ok: bool = False) -> list[str]:
    """One line per scoring setting of the spec that cannot produce 0-100 scores.

    `missing_ok`: an embedded model that is not fetched yet is skipped (`emsweep plan` needs no weights)."""
    from emsweep.pipeline import _judge_model_ref

    problems = []
    wanted = []
    if spec.judge.backend == "vllm" and spec.judge.scoring == "first_token":
        wanted.append((f"judge {spec.judge.model}", _judge_model_ref(spec), "judge.scoring"))
    if spec.eval.harm_perception.scoring == "first_token" and any(s.harm_perception for s in spec.eval.suites):
        wanted += [(f"model {m.name} (self-rated harm)", m.path, "eval.harm_perception.scoring") for m in spec.models]
    for who, reference, field in wanted:
        try:
            tokenizer = _local_tokenizer(reference)
        except (FileNotFoundError, ValueError) as err:
            if not (missing_ok and isinstance(err, FileNotFoundError)):
                problems.append(f"{field}: {err}")
            continue
        if tokenizer is not None and (problem := first_token_problem(tokenizer, who)):
            problems.append(f"{field}: {problem}")
    return problems
