"""Evaluation questions in the paper's YAML format (`../shared/em/evaluation/*.yaml`).

Each entry: `id`, `type` (`free_form_judge_0_100` or `free_form_judge`), `paraphrases`,
`samples_per_paraphrase`, `judge`, `judge_prompts` (metric -> template with `{question}`
and `{answer}`), optional `system`. The files use YAML anchors, which `yaml.safe_load`
expands for us.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from emsweep.data import fetch_source

QUESTION_TYPES = ("free_form_judge_0_100", "free_form_judge")


class QuestionError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    id: str
    type: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int
    judge_prompts: dict[str, str]
    system: str | None = None


def _check(entry: object, where: str) -> Question:
    if not isinstance(entry, dict):
        raise QuestionError(f"{where}: each question must be a mapping")
    for field in ("id", "type", "paraphrases", "judge_prompts"):
        if field not in entry:
            raise QuestionError(f"{where}: missing field '{field}'")
    if entry["type"] not in QUESTION_TYPES:
        raise QuestionError(f"{where}: field 'type' {entry['type']!r} is not one of {QUESTION_TYPES}")
    paraphrases = entry["paraphrases"]
    if not isinstance(paraphrases, list) or not paraphrases or not all(
        isinstance(p, str) and p.strip() for p in paraphrases
    ):
        raise QuestionError(f"{where}: field 'paraphrases' must be a non-empty list of strings")
    prompts = entry["judge_prompts"]
    if not isinstance(prompts, dict) or not prompts:
        raise QuestionError(f"{where}: field 'judge_prompts' must map metric names to templates")
    for metric, template in prompts.items():
        if not isinstance(template, str) or "{answer}" not in template:
            raise QuestionError(f"{where}: judge_prompts.{metric} must be a template containing {{answer}}")
    samples = entry.get("samples_per_paraphrase", 1)
    if not isinstance(samples, int) or samples < 1:
        raise QuestionError(f"{where}: field 'samples_per_paraphrase' must be a positive integer")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise QuestionError(f"{where}: field 'system' must be a string")
    return Question(
        id=str(entry["id"]),
        type=entry["type"],
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        judge_prompts={str(k): v for k, v in prompts.items()},
        system=system,
    )


def load_questions(
    location: str, ids: tuple[str, ...] | None = None, samples_per_paraphrase: int | None = None
) -> list[Question]:
    path: Path = fetch_source(location)
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise QuestionError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(entries, list):
        raise QuestionError(f"{path}: expected a list of questions")
    questions = [_check(entry, f"{path}: question #{i + 1}") for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for question in questions:
        if question.id in seen:
            raise QuestionError(f"{path}: duplicate question id {question.id!r}")
        seen.add(question.id)
    if ids is not None:
        missing = sorted(set(ids) - seen)
        if missing:
            raise QuestionError(f"{path}: question ids not in the file: {missing}")
        questions = [q for q in questions if q.id in set(ids)]
    if samples_per_paraphrase is not None:
        questions = [
            Question(q.id, q.type, q.paraphrases, samples_per_paraphrase, q.judge_prompts, q.system)
            for q in questions
        ]
    return questions
